"""Weighting by examples (default) or uniform is an option on every rule."""

import numpy as np
import pytest
from fakes import FakeGrid
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from experiment_schema import compose_config
from finetune.records import from_record, to_record
from finetune.wire import to_wire
from server_app.loop import exchange
from strategies import RULES

D_OUT, D_IN, RANK = 6, 5, 2
TRAINABLE = {
    "m.q.lora_A.weight": np.random.default_rng(0).normal(size=(RANK, D_IN)).astype(np.float32),
    "m.q.lora_B.weight": np.zeros((D_OUT, RANK), np.float32),
    "m.classifier.weight": np.zeros((2, D_OUT), np.float32),
}


def aggregate_once(name, weighting, sizes):
    overrides = [f"method.weighting={weighting}", f"partition.num_clients={len(sizes)}"]
    overrides += [f"federation.min_train_clients={len(sizes)}", f"method.rank={RANK}"]
    if RULES[name].heterogeneous_ranks:
        overrides.append(f"method.client_ranks=[{RANK}]")
    strategy = RULES[name].build_strategy(compose_config({"method": name}, overrides))

    def respond(message):
        node = message.metadata.dst_node_id
        if message.metadata.message_type == "query":
            return RecordDict({"metrics": MetricRecord({"lora-rank": RANK, "partition-id": node})})
        rng = np.random.default_rng(node)
        upload = {
            k: rng.normal(size=shape).astype(np.float32)
            for k, shape in strategy.expected_shapes(node).items()
        }
        return RecordDict({"arrays": to_wire(upload), "metrics": MetricRecord({"num-examples": sizes[node]})})

    grid = FakeGrid(sizes, respond)
    initial = to_record(strategy.initial_state(TRAINABLE))
    messages = list(strategy.configure_train(1, initial, ConfigRecord({"server-round": 1}), grid))
    arrays, _ = strategy.aggregate_train(1, exchange(grid, messages, timeout=1.0))
    assert strategy.rounds[1].aggregated == sorted(sizes)
    return from_record(arrays)


@pytest.mark.parametrize("name", sorted(RULES))
def test_uniform_weighting_ignores_example_counts(name):
    uniform = aggregate_once(name, "uniform", {1: 1, 2: 500})
    equal = aggregate_once(name, "examples", {1: 7, 2: 7})
    by_examples = aggregate_once(name, "examples", {1: 1, 2: 500})
    assert set(uniform) == set(equal)
    for key in uniform:
        np.testing.assert_allclose(uniform[key], equal[key], rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(uniform[k], by_examples[k], atol=1e-4) for k in uniform)
