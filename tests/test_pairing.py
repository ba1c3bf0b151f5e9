"""The benchmark's design: a tuning split held out of every client and of the validation split,
and a seed that fixes the partitions, the client draws and the data order for every method."""

import json

import pytest
from fakes import FakeGrid

from client_app.app import training_seed
from experiment_schema import ConfigError, compose_config
from finetune.data import PartitionedDataset, load_eval_split, load_train_split
from server_app.app import build_strategy

TUNING = "dataset.tuning_examples=300 dataset.max_train_examples=2000"
METHODS = ("fedit", "ffa_lora", "full", "fedsvd", "flexlora", "fedsa_lora", "fed_sb")


def _cfg(method="fedit", overrides=""):
    return compose_config({"method": method}, f"{TUNING} {overrides}")


def test_the_tuning_split_is_held_out_of_every_partition_and_the_validation_split(hub_mirror):
    cfg = _cfg()
    train = load_train_split(cfg.dataset, hub_mirror, cfg.seed)
    parts = PartitionedDataset(train, cfg)
    tuning = load_eval_split(_cfg(overrides="dataset.evaluate_on=tuning").dataset, hub_mirror, 0)
    validation = load_eval_split(cfg.dataset, hub_mirror, cfg.seed)
    tuned = set(tuning["idx"])
    assert len(tuned) == len(tuning) == 300
    for client in range(cfg.partition.num_clients):
        assert tuned.isdisjoint(parts.partition(client)["idx"]), client
    assert tuned.isdisjoint(train["idx"])
    # the tuning rows are training rows (not validation's) and share no sentence with validation
    assert set(tuning["sentence"]).isdisjoint(validation["sentence"])
    full = load_train_split(compose_config({}, "").dataset, hub_mirror, 0)
    assert tuned <= set(full["idx"])


def test_the_tuning_split_is_the_same_for_every_seed_and_method(hub_mirror):
    def rows(method, seed):
        cfg = _cfg(method, f"seed={seed} dataset.evaluate_on=tuning")
        return load_eval_split(cfg.dataset, hub_mirror, cfg.seed)["idx"]

    assert rows("fedit", 0) == rows("full", 3) == rows("ffa_lora", 1)


def test_scoring_on_a_tuning_split_that_does_not_exist_is_refused():
    with pytest.raises(ConfigError, match=r"dataset\.tuning_examples > 0"):
        compose_config({}, "dataset.evaluate_on=tuning")
    with pytest.raises(ConfigError, match=r"dataset\.evaluate_on"):
        compose_config({}, "dataset.evaluate_on=test")


def test_a_seed_fixes_partitions_client_draws_and_data_order_for_every_method(hub_mirror):
    grid = FakeGrid(range(1, 11), lambda message: None)
    seen = set()
    for method in METHODS:
        cfg = _cfg(method, "seed=4 partition.seed=4 federation.fraction_train=0.5")
        train = load_train_split(cfg.dataset, hub_mirror, cfg.seed)
        parts = PartitionedDataset(train, cfg)
        strategy = build_strategy(cfg)
        draws = tuple(tuple(strategy.nodes.sample(grid.get_node_ids(), r)) for r in range(1, 4))
        partitions = tuple(tuple(parts.partition(c)["idx"]) for c in range(cfg.partition.num_clients))
        orders = tuple(training_seed(cfg, r, c) for r in range(1, 4) for c in range(10))
        seen.add((draws, partitions, orders))
    assert len(seen) == 1
    other = _cfg("fedit", "seed=5 partition.seed=5 federation.fraction_train=0.5")
    strategy = build_strategy(other)
    assert (
        tuple(tuple(strategy.nodes.sample(grid.get_node_ids(), r)) for r in range(1, 4))
        != next(iter(seen))[0]
    )


def test_evaluating_every_k_rounds_scores_round_0_every_kth_and_the_last_and_changes_no_result(
    hub_mirror, tmp_path
):
    from test_resume import _rows, _run_config, _serve

    every, sparse = tmp_path / "every", tmp_path / "sparse"
    _serve(_run_config("fedit", every, hub_mirror), 100)
    _serve(_run_config("fedit", sparse, hub_mirror, ["evaluation.every=3"]), 200)
    (dense_run,), (sparse_run,) = every.iterdir(), sparse.iterdir()
    dense, thin = _rows(dense_run), _rows(sparse_run)
    assert [r["round"] for r in thin if "eval_accuracy" in r] == [0, 3, 4]
    for a, b in zip(dense, thin, strict=True):
        assert a["train_loss"] == b["train_loss"]
        if "eval_accuracy" in b:
            assert a["eval_accuracy"] == b["eval_accuracy"]
    summary = json.loads((sparse_run / "summary.json").read_text())
    assert (
        summary["best"]["round"] in (0, 3, 4)
        and summary["final"]["eval_accuracy"] == thin[-1]["eval_accuracy"]
    )
    assert "| 1 | - | - |" in (sparse_run / "summary.md").read_text()
