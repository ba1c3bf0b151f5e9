"""FFA-LoRA and LoRA-FAIR as Strategies: what travels, what is averaged."""

import numpy as np
import pytest
from fakes import FakeGrid, client_upload, engine
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from experiment_schema import compose_config
from finetune.lora import is_lora_a
from finetune.records import from_record, to_record
from finetune.wire import from_wire, to_wire
from server_app.loop import exchange
from strategies import RULES
from strategies.fedit import FedIT
from strategies.ffa_lora import FFALoRA
from strategies.lora_fair import LoRAFAIR, cosine

rng = np.random.default_rng(0)
A0 = rng.normal(size=(4, 6)).astype(np.float32)
FULL = {
    "m.q.lora_A.weight": A0,
    "m.q.lora_B.weight": np.zeros((5, 4), np.float32),
    "m.classifier.weight": np.zeros((2, 5), np.float32),
}


def reply_with(state, n=10):
    return RecordDict({"arrays": to_wire(state), "metrics": MetricRecord({"num-examples": n})})


def one_round(strategy, global_state, respond, nodes=(1, 2, 3)):
    grid = FakeGrid(nodes, respond)
    messages = list(strategy.configure_train(1, to_record(global_state), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, exchange(grid, messages, timeout=1.0))
    return messages, from_record(arrays) if arrays is not None else None  # None: the round failed


def test_upload_keys_per_method():
    keys = list(FULL)
    for name, rule in RULES.items():  # a client uploads only arrays of the global state
        uploaded = {k for k in keys if rule.traffic.uploads(1, k)}
        assert uploaded <= {k for k in keys if rule.traffic.shares(k)}, name
    uploads = {name: sorted(k for k in keys if rule.traffic.uploads(1, k)) for name, rule in RULES.items()}
    assert uploads["fedit"] == sorted(keys)
    assert uploads["lora_fair"] == sorted(keys)
    assert uploads["ffa_lora"] == ["m.classifier.weight", "m.q.lora_B.weight"]
    assert uploads["fedsa_lora"] == ["m.q.lora_A.weight"]
    assert [k for k in keys if RULES["fedsa_lora"].traffic.keeps(k)] == [
        "m.q.lora_B.weight",
        "m.classifier.weight",
    ]
    cfg = compose_config({"method": "ffa_lora"})
    assert RULES["ffa_lora"].client.default_adapter(cfg).freeze_lora_a
    assert not RULES["fedit"].client.default_adapter(cfg).freeze_lora_a


def test_ffa_round_moves_no_A_and_is_exact():
    global_state = {k: v for k, v in FULL.items() if FFALoRA.traffic.shares(k)}
    Bs = {n: rng.normal(size=(5, 4)).astype(np.float32) for n in (1, 2, 3)}
    sizes = {1: 10, 2: 20, 3: 70}

    def respond(message):
        node = message.metadata.dst_node_id
        return reply_with({**global_state, "m.q.lora_B.weight": Bs[node]}, sizes[node])

    messages, new = one_round(engine(FFALoRA, fraction_train=1.0, min_train_nodes=3), global_state, respond)
    assert not any(is_lora_a(k) for m in messages for k in m.content.array_records["arrays"])
    ideal = sum(sizes[n] / 100 * Bs[n].astype(np.float64) @ A0 for n in Bs)
    np.testing.assert_allclose(new["m.q.lora_B.weight"] @ A0, ideal, rtol=1e-5, atol=1e-5)


def test_ffa_upload_is_about_half_of_fedit():
    """The bytes a node sends up in a round, answering with what its rule's client half uploads
    after training the whole adapter: FFA-LoRA's B (its A is frozen), FedIT's A and B."""
    big = {
        "l.lora_A.weight": rng.normal(size=(8, 768)).astype(np.float32),
        "l.lora_B.weight": rng.normal(size=(768, 8)).astype(np.float32),
    }
    up = {}
    for name, rule_type in (("fedit", FedIT), ("ffa_lora", FFALoRA)):
        cfg = compose_config({"method": name})
        strategy = engine(rule_type, cfg.method, fraction_train=1.0, min_train_nodes=1)

        def respond(message, cfg=cfg):  # the client loads what it was sent, trains it all, uploads
            if message.metadata.message_type == "query":
                return RecordDict({"metrics": MetricRecord({"partition-id": 0})})
            received = from_wire(message.content.array_records["arrays"])
            return reply_with(client_upload(cfg, 1, {**big, **received}))

        one_round(strategy, strategy.initial_state(big), respond, nodes=(1,))
        up[name] = strategy.rounds[1]
    factor = 4 * 8 * 768  # bytes of one float32 factor
    assert up["ffa_lora"].payload_up[1] == factor  # B alone goes up
    assert up["fedit"].payload_up[1] == 2 * factor
    ratio = up["ffa_lora"].bytes_up[1] / up["fedit"].bytes_up[1]
    assert 0.49 < ratio < 0.51
    assert all(stats.rejected == {} and stats.aggregated == [1] for stats in up.values())  # and accepted


def test_lora_fair_round_improves_on_fedit_and_averages_the_head():
    states = {
        n: {
            "m.q.lora_A.weight": rng.normal(size=(4, 6)).astype(np.float32),
            "m.q.lora_B.weight": rng.normal(size=(5, 4)).astype(np.float32),
            "m.classifier.weight": np.full((2, 5), float(n), np.float32),
        }
        for n in (1, 2, 3)
    }
    _, new = one_round(
        engine(LoRAFAIR, fraction_train=1.0, min_train_nodes=3),
        FULL,
        lambda m: reply_with(states[m.metadata.dst_node_id]),
    )
    np.testing.assert_allclose(new["m.classifier.weight"], 2.0)
    A_bar = np.mean([s["m.q.lora_A.weight"] for s in states.values()], axis=0)
    B_bar = np.mean([s["m.q.lora_B.weight"] for s in states.values()], axis=0)
    np.testing.assert_allclose(new["m.q.lora_A.weight"], A_bar, rtol=1e-6)
    ideal = np.mean(
        [s["m.q.lora_B.weight"].astype(np.float64) @ s["m.q.lora_A.weight"] for s in states.values()], axis=0
    )
    assert cosine(ideal, new["m.q.lora_B.weight"] @ A_bar) > cosine(ideal, B_bar @ A_bar) + 1e-3


def test_personalised_rules_evaluate_on_every_client():
    from strategies.fedsa_lora import FedSALoRA

    grid = FakeGrid([1, 2, 3], lambda m: None)
    state = {"m.q.lora_A.weight": A0}
    assert (
        list(engine(FedIT, fraction_train=1.0).configure_evaluate(1, to_record(state), ConfigRecord(), grid))
        == []
    )
    messages = list(
        engine(FedSALoRA, fraction_train=0.3).configure_evaluate(1, to_record(state), ConfigRecord(), grid)
    )
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    assert all(m.metadata.message_type == "evaluate" for m in messages)


def test_personalised_metrics_are_example_weighted():
    from strategies.fedsa_lora import FedSALoRA

    answers = {1: (10, 0.9), 2: (30, 0.5), 3: None}

    def respond(message):
        answer = answers[message.metadata.dst_node_id]
        if answer is None:
            return RecordDict({"metrics": MetricRecord({"accuracy": 1.0})})  # no num-examples: ignored
        return RecordDict({"metrics": MetricRecord({"num-examples": answer[0], "accuracy": answer[1]})})

    grid = FakeGrid([1, 2, 3], respond)
    strategy = engine(FedSALoRA)
    messages = list(
        strategy.configure_evaluate(1, to_record({"m.q.lora_A.weight": A0}), ConfigRecord(), grid)
    )
    metrics = strategy.aggregate_evaluate(1, exchange(grid, messages, timeout=1.0))
    assert metrics["accuracy"] == pytest.approx(0.6) and metrics["num-examples"] == 40
