"""One aggregation path: every weighted-mean rule folds its replies the same way whether the
round held them all or folded them as they arrived, in any arrival order — bit for bit — and the
fold agrees with the rule's own pure function."""

import numpy as np
import pytest
from fakes import FakeGrid, engine
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from finetune.records import from_record, to_record
from finetune.wire import from_wire, to_wire
from server_app.loop import exchange
from strategies import RULES

STREAMABLE = sorted(name for name, rule in RULES.items() if rule.strategy.streamable)
GLOBAL = {
    "m.q.lora_A.weight": np.full((4, 6), 0.5, np.float32),
    "m.q.lora_B.weight": np.full((5, 4), 0.25, np.float32),
    "m.classifier.weight": np.zeros((2, 5), np.float32),
}
SIZES = {11: 7, 22: 13, 33: 29, 44: 3}


def answering(traffic):
    """Nodes that upload seeded random arrays of what the rule's traffic sends up."""
    return lambda message: answer(message, traffic)


def answer(message, traffic):
    node = message.metadata.dst_node_id
    if message.metadata.message_type == "query":
        return RecordDict({"metrics": MetricRecord({"partition-id": sorted(SIZES).index(node)})})
    rng = np.random.default_rng(node)
    sent = from_wire(message.content.array_records["arrays"])
    upload = {
        k: rng.normal(size=v.shape).astype(np.float32) for k, v in sent.items() if traffic.uploads(1, k)
    }
    metrics = MetricRecord({"num-examples": SIZES[node], "train-loss": 1.0})
    return RecordDict({"arrays": to_wire(upload), "metrics": metrics})


def one_round(name, streamed, arrival=lambda replies: replies):
    strategy = engine(RULES[name].strategy, min_train_nodes=len(SIZES))
    grid = FakeGrid(SIZES, answering(RULES[name].traffic))
    state = strategy.initial_state(dict(GLOBAL))
    messages = list(strategy.configure_train(1, to_record(state), ConfigRecord(), grid))
    replies = arrival(exchange(grid, messages, timeout=1.0))
    if streamed:
        assert strategy.start_streaming(1, "on")
        for reply in replies:
            strategy.receive(reply)
        replies = []
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.rounds[1].rejected == {}
    return strategy, from_record(arrays)


@pytest.mark.parametrize("name", STREAMABLE)
def test_held_and_streamed_rounds_are_bit_identical_in_any_arrival_order(name):
    _, held = one_round(name, streamed=False)
    _, streamed = one_round(name, streamed=True, arrival=lambda replies: list(reversed(replies)))
    _, shuffled = one_round(name, streamed=False, arrival=lambda replies: [replies[i] for i in (2, 0, 3, 1)])
    for other in (streamed, shuffled):
        assert other.keys() == held.keys()
        assert all(np.array_equal(other[k], held[k]) for k in held), name


@pytest.mark.parametrize("name", STREAMABLE)
def test_the_fold_is_the_rules_own_weighted_mean(name):
    strategy, folded = one_round(name, streamed=False)
    nodes = sorted(SIZES)
    uploads = []
    for node in nodes:
        rng = np.random.default_rng(node)
        expected = strategy.expected_shapes(node)
        uploads.append({k: rng.normal(size=shape).astype(np.float32) for k, shape in expected.items()})
    mean = strategy.rule.rule(uploads, [SIZES[n] for n in nodes])
    reference = strategy.rule.finalize(1, {**strategy._global, **mean})
    assert folded.keys() == reference.keys()
    for key, value in reference.items():
        np.testing.assert_allclose(folded[key], value, rtol=1e-6, atol=1e-6)
