"""Data from the mirror, partition sizes and skew, metrics, and missing-data errors."""

import datasets
import numpy as np
import pytest
from sklearn.metrics import f1_score, matthews_corrcoef

from experiment_schema import ConfigError, compose_config
from finetune.data import (
    DataNotFoundError,
    PartitionedDataset,
    _quotas,
    load_eval_split,
    load_split,
    load_train_split,
)
from finetune.metrics import accuracy, f1, matthews


def _partitions(hub_mirror, partition, overrides=""):
    cfg = compose_config({"partition": partition}, f"dataset.max_train_examples=2000 {overrides}")
    train = load_train_split(cfg.dataset, hub_mirror, seed=0)
    return cfg, train, PartitionedDataset(train, cfg)


def label_histogram(data, field, num_labels):
    return np.bincount(np.asarray(data[field]), minlength=num_labels).tolist()


def _label_skew(parts, train):
    """Mean total-variation distance between client and global label distributions."""
    global_hist = np.asarray(label_histogram(train, "label", 2), float)
    global_p = global_hist / global_hist.sum()
    dists = []
    for i in range(parts.cfg.num_clients):
        hist = np.asarray(label_histogram(parts.partition(i), "label", 2), float)
        dists.append(0.5 * np.abs(hist / hist.sum() - global_p).sum())
    return float(np.mean(dists))


def test_mirror_provides_glue_splits(hub_mirror):
    cfg = compose_config({"dataset": "mrpc"})
    data = load_split(cfg.dataset, "validation", hub_mirror)
    assert len(data) == 408
    assert {"sentence1", "sentence2", "label"} <= set(data.column_names)


def test_iid_partitions_cover_the_data_evenly(hub_mirror):
    _, train, parts = _partitions(hub_mirror, "iid")
    sizes = parts.sizes()
    assert sum(sizes) == len(train) == 2000
    assert max(sizes) - min(sizes) <= 1
    ids = set()
    for i in range(10):
        idx = parts.partition(i)["idx"]
        assert ids.isdisjoint(idx)
        ids.update(idx)


def test_dirichlet_is_skewed_and_complete(hub_mirror):
    _, train, iid = _partitions(hub_mirror, "iid")
    _, _, skewed = _partitions(hub_mirror, "dirichlet", "partition.alpha=0.3 partition.min_partition_size=2")
    assert sum(skewed.sizes()) == len(train)
    assert min(skewed.sizes()) >= 2
    assert _label_skew(skewed, train) > 3 * _label_skew(iid, train)


def test_validation_shares_follow_each_clients_training_proportions(hub_mirror):
    cfg, _, parts = _partitions(hub_mirror, "dirichlet", "partition.alpha=0.3 partition.min_partition_size=2")
    evaluation = load_eval_split(cfg.dataset, hub_mirror, seed=0)
    shares = parts.shares_of(evaluation)
    ids = [set(share["idx"]) for share in shares]
    assert sum(map(len, ids)) == len(set().union(*ids)) == len(evaluation)  # disjoint, complete
    train_counts = np.array([label_histogram(parts.partition(i), "label", 2) for i in range(10)], float)
    eval_totals = np.array(label_histogram(evaluation, "label", 2), float)
    expected = train_counts / train_counts.sum(axis=0) * eval_totals  # client k's quota of each label
    got = np.array([label_histogram(share, "label", 2) for share in shares], float)
    assert np.abs(got - expected).max() < 1.0 + 1e-9  # largest remainder: floor or ceil of the quota
    assert shares_of_again(parts, evaluation) == [share["idx"] for share in shares]  # deterministic


def shares_of_again(parts, evaluation):
    return [share["idx"] for share in parts.shares_of(evaluation)]


def test_iid_validation_shares_are_even_and_none_is_left_empty(hub_mirror):
    cfg, _, parts = _partitions(hub_mirror, "iid")
    evaluation = load_eval_split(cfg.dataset, hub_mirror, seed=0).select(range(25))
    assert sorted(len(share) for share in parts.shares_of(evaluation)) == [2] * 5 + [3] * 5
    assert sorted(len(share) for share in parts.shares_of(evaluation.select(range(7)))) == [0] * 3 + [1] * 7


class _FixedPartitioner:
    def __init__(self, parts):
        self.parts = parts

    def load_partition(self, partition_id):
        return self.parts[partition_id]


def _labelled(labels):
    return datasets.Dataset.from_dict({"sentence": ["x"] * len(labels), "label": labels})


def test_a_client_whose_quota_rounds_to_nothing_gets_one_example():
    cfg = compose_config({"partition": "dirichlet"}, "partition.num_clients=4")
    held = [[0] * 97, [0] + [1] * 50, [0, 0] + [1] * 50, [0]]  # client 3: one example of label 0
    parts = PartitionedDataset(_labelled([label for labels in held for label in labels]), cfg)
    parts.partitioner = _FixedPartitioner([_labelled(labels) for labels in held])
    shares = parts.shares_of(_labelled([0] * 4 + [1] * 4))
    # label 0: 4 x (97, 1, 2, 1) / 101 = (3.84, 0.04, 0.08, 0.04) -> (4, 0, 0, 0); label 1: (0, 2, 2, 0);
    # client 3 would have nothing, so it takes one label-0 example from client 0
    assert [label_histogram(share, "label", 2) for share in shares] == [[3, 0], [0, 2], [0, 2], [1, 0]]


def test_quotas_are_largest_remainder():
    rng = np.random.default_rng(0)
    assert _quotas(10, np.array([0.55, 0.3, 0.15]), rng).tolist() in ([6, 3, 1], [5, 3, 2])
    assert _quotas(7, np.array([0.5, 0.5]), rng).sum() == 7
    assert _quotas(9, np.array([1 / 3] * 3), rng).tolist() == [3, 3, 3]


def test_pathological_gives_each_client_k_classes(hub_mirror):
    _, _, parts = _partitions(
        hub_mirror, "pathological", "partition.classes_per_client=1 partition.num_clients=4"
    )
    for i in range(4):
        assert sum(1 for count in label_histogram(parts.partition(i), "label", 2) if count) == 1


def test_more_clients_than_examples_is_refused(hub_mirror):
    cfg = compose_config({"partition": "iid"}, "dataset.max_train_examples=20 partition.num_clients=20")
    train = load_train_split(cfg.dataset, hub_mirror, seed=0).select(range(5))
    with pytest.raises(ConfigError, match="exceeds the 5 examples"):
        PartitionedDataset(train, cfg)


def test_impossible_dirichlet_is_a_config_error(hub_mirror):
    _, _, parts = _partitions(
        hub_mirror, "dirichlet", "partition.alpha=0.01 partition.min_partition_size=250"
    )
    with pytest.raises(
        ConfigError, match=r"need 2500 examples; the data has 2000: lower partition\.min_partition"
    ):
        parts.sizes()


def test_a_dirichlet_draw_flwr_datasets_gives_up_on_is_repaired_deterministically(hub_mirror):
    # Prepare: a skew so sharp that 10 redraws never give every client 150 examples
    overrides = "partition.alpha=0.01 partition.min_partition_size=150"
    _, train, parts = _partitions(hub_mirror, "dirichlet", overrides)
    # Execute
    sizes = parts.sizes()
    again = _partitions(hub_mirror, "dirichlet", overrides)[2]
    # Assert: every client has its minimum, every example is used once, the same split twice,
    # and the skew survives (most clients hold one label almost only)
    assert min(sizes) >= 150 and sum(sizes) == len(train)
    assert [parts.partition(i)["idx"] for i in range(10)] == [again.partition(i)["idx"] for i in range(10)]
    dominant = [max(h.values()) / sum(h.values()) for h in parts.histograms()]
    assert sum(d > 0.8 for d in dominant) >= 5


def test_missing_data_names_mirror_and_hub(tmp_path):
    cfg = compose_config({"dataset": "cola"})
    with pytest.raises(DataNotFoundError, match="nyu-mll/glue/cola") as error:
        load_split(cfg.dataset, "train", tmp_path)
    assert str(tmp_path) in str(error.value)


def test_missing_split_lists_what_the_mirror_has(hub_mirror):
    cfg = compose_config({}, "dataset.eval_split=dev")
    with pytest.raises(DataNotFoundError, match=r"it has \['test', 'train', 'validation'\]"):
        load_eval_split(cfg.dataset, hub_mirror, seed=0)


def test_unlabelled_eval_split_is_refused(hub_mirror):
    cfg = compose_config({"dataset": "rte"}, "dataset.eval_split=test")
    with pytest.raises(ConfigError, match="no labels"):
        load_eval_split(cfg.dataset, hub_mirror, seed=0)


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.7, true, 1 - true)
    assert accuracy(pred, true) == pytest.approx((pred == true).mean())
    assert f1(pred, true) == pytest.approx(f1_score(true, pred))
    assert matthews(pred, true) == pytest.approx(matthews_corrcoef(true, pred))
    three = rng.integers(0, 3, 300)
    noisy = np.where(rng.random(300) < 0.6, three, rng.integers(0, 3, 300))
    assert matthews(noisy, three) == pytest.approx(matthews_corrcoef(three, noisy))
