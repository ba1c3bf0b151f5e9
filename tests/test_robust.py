"""Robust aggregates against Flower's own strategies on the same replies, and in the engine in
place of a weighted-mean rule's aggregate."""

import fakes  # noqa: F401  (lets Message() exist outside an app)
import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum

from experiment_schema import ConfigError, compose_config
from finetune.records import from_record, to_record
from strategies.protocol import ARRAYS, METRICS, NUM_EXAMPLES
from strategies.robust import RobustAggregate


def uploads(n: int = 7, seed: int = 0) -> tuple[list[dict], list[float]]:
    rng = np.random.default_rng(seed)
    states = [
        {
            "q.lora_A.weight": rng.normal(size=(4, 6)).astype(np.float32),
            "head.bias": rng.normal(size=3).astype(np.float32),
        }
        for _ in range(n)
    ]
    states[-1] = {k: 1e3 * v for k, v in states[-1].items()}  # one far outlier
    return states, [float(c) for c in rng.integers(5, 50, size=n)]


def flower_aggregate(strategy, states, weights) -> dict:
    replies = [
        Message(
            RecordDict({ARRAYS: to_record(s), METRICS: MetricRecord({NUM_EXAMPLES: int(w)})}),
            dst_node_id=i + 1,
            message_type="train",
        )
        for i, (s, w) in enumerate(zip(states, weights, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert isinstance(arrays, ArrayRecord)
    return from_record(arrays)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (RobustAggregate("median"), FedMedian()),
        (RobustAggregate("trimmed_mean", trim=0.2), FedTrimmedAvg(beta=0.2)),
        (RobustAggregate("krum", byzantine=2), Krum(num_malicious_nodes=2)),
        (
            RobustAggregate("multi_krum", byzantine=2, keep=3),
            MultiKrum(num_malicious_nodes=2, num_nodes_to_select=3),
        ),
    ],
    ids=["median", "trimmed_mean", "krum", "multi_krum"],
)
def test_robust_aggregates_equal_flowers_strategies(ours, theirs):
    states, weights = uploads()
    expected = flower_aggregate(theirs, states, weights)
    got = ours.combine(states, weights)
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7)
    assert all(np.abs(v).max() < 100 for v in got.values()), "the outlier leaked into the aggregate"


@pytest.mark.parametrize(
    ("method", "overrides", "named"),
    [
        ("flexlora", ["federation.robust=median"], "does not apply to flexlora: clients upload factors"),
        ("flora", ["federation.robust=trimmed_mean"], "does not apply to flora: the exact sum"),
        ("lora_fair", ["federation.robust=krum"], "does not apply to lora_fair: its server correction"),
        ("fedit", ["federation.robust=median", "federation.stream_aggregation=on"], "must all be held"),
        ("fedit", ["federation.update_bound=reject", "federation.stream_aggregation=on"], "must all be held"),
        ("fedit", ["federation.update_bound=clip"], "update_bound_norm > 0"),
        (
            "fedit",
            ["federation.robust=krum", "federation.robust_byzantine=2", "partition.num_clients=6"],
            "2f \\+ 3 = 7",
        ),
        ("fedit", ["federation.robust=mean"], "federation.robust"),
        (
            "fedit",
            [
                "federation.robust=median",
                "privacy.enabled=true",
                "privacy.mode=central",
                "method.weighting=uniform",
                "privacy.noise_multiplier=1.0",
            ],
            "privacy.mode=central",
        ),
    ],
)
def test_a_defence_that_cannot_apply_fails_before_training(method, overrides, named):
    with pytest.raises(ConfigError, match=named):
        compose_config({"method": method}, overrides)


def test_the_defences_pass_validation_where_they_apply():
    cfg = compose_config(
        {"method": "ffa_lora"},
        [
            "federation.robust=multi_krum",
            "federation.update_bound=clip",
            "federation.update_bound_norm=5",
            "partition.num_clients=10",
            "federation.robust_byzantine=2",
        ],
    )
    assert cfg.federation.robust == "multi_krum"
