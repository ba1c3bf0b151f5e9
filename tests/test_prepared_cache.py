"""Prepared partitions on the node's disk: a fresh process reads them instead of tokenizing, keys
separate what differs, a damaged entry is rebuilt."""

import datasets
import pytest

from experiment_schema import compose_config
from finetune.prepared_cache import cached_on_disk, prepared_key


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSUBSPACE_CACHE_DIR", str(tmp_path / "prepared"))
    return tmp_path / "prepared"


def _rows(n):
    return datasets.Dataset.from_dict({"input_ids": [[i, i + 1] for i in range(n)], "labels": list(range(n))})


def test_a_second_process_reads_the_stored_rows_instead_of_preparing_again(cache):
    made = []

    def make():
        made.append(1)
        return _rows(5)

    first = cached_on_disk("k1", make)
    again = cached_on_disk("k1", make)
    assert len(made) == 1 and first["labels"] == again["labels"] == list(range(5))
    assert (cache / "k1").is_dir() and not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_a_damaged_entry_is_rebuilt(cache):
    cached_on_disk("k2", lambda: _rows(3))
    for file in (cache / "k2").iterdir():
        file.write_bytes(b"garbage")
    assert cached_on_disk("k2", lambda: _rows(4))["labels"] == list(range(4))


def test_off_turns_the_cache_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSUBSPACE_CACHE_DIR", "off")
    made = []
    cached_on_disk("k3", lambda: made.append(1) or _rows(2))
    cached_on_disk("k3", lambda: made.append(1) or _rows(2))
    assert len(made) == 2


def test_keys_differ_by_everything_that_decides_the_rows():
    base = compose_config({}, "")
    key = prepared_key(base, "train-0")
    assert key == prepared_key(compose_config({}, "federation.num_rounds=3 train.lr=1e-3"), "train-0")
    for overrides in (
        "seed=1", "partition.alpha=0.1", "partition.num_clients=4", "model.max_length=40",
        "dataset.max_train_examples=100", "dataset.tuning_examples=50", "model=tiny_bert",
    ):  # fmt: skip
        assert prepared_key(compose_config({}, overrides), "train-0") != key, overrides
    assert prepared_key(base, "train-1") != key and prepared_key(base, "eval-0") != key


def test_a_client_session_stores_its_tokenized_partition_for_the_next_process(cache, hub_mirror, tiny_cfg):
    from client_app.session import ClientSession
    from finetune.data import PartitionedDataset, load_train_split
    from finetune.tasks import build_task

    def session():
        train = load_train_split(tiny_cfg.dataset, hub_mirror, tiny_cfg.seed)
        task = build_task(tiny_cfg, hub_mirror)
        return ClientSession(tiny_cfg, hub_mirror, None, task, train, PartitionedDataset(train, tiny_cfg), {})

    first = session().partition(1)
    assert len(list(cache.iterdir())) == 1
    second = session()
    second.partitions.partition = None  # a cache hit must not partition (nor tokenize) again
    again = second.partition(1)
    assert again["input_ids"] == first["input_ids"] and again["labels"] == first["labels"]
