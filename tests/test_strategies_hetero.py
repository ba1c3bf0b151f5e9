"""FlexLoRA and HLoRA as Strategies: node ranks by QUERY, per-node truncations, exact products."""

import numpy as np
import pytest
from fakes import FakeGrid, engine
from flwr.app import MetricRecord, RecordDict

from experiment_schema import compose_config
from finetune.records import from_record, to_record
from finetune.wire import from_wire, to_wire
from server_app.loop import exchange
from strategies.client import NodeFacts
from strategies.flexlora import FlexLoRA, FlexLoRAConfig
from strategies.hetlora import HetLoRAConfig
from strategies.hlora import HLoRA
from strategies.protocol import RANK, Instruction
from strategies.ranks import configured_rank


def global_rank(cfg):
    """The global rank the strategy of ``cfg`` is built with."""
    return FlexLoRA.resolve(cfg).global_rank


D_OUT, D_IN, ALPHA = 7, 9, 16.0
RANKS = {11: 2, 22: 4, 33: 3}
A_KEY, B_KEY, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "m.classifier.weight"
rng = np.random.default_rng(0)
CLIENT = {
    n: {
        A_KEY: rng.normal(size=(r, D_IN)),
        B_KEY: rng.normal(size=(D_OUT, r)),
        HEAD: np.full((2, D_OUT), float(n)),
    }
    for n, r in RANKS.items()
}
SIZES = {11: 10, 22: 30, 33: 60}


def respond(message):
    node = message.metadata.dst_node_id
    if message.metadata.message_type == "query":
        return RecordDict({"metrics": MetricRecord({"lora-rank": RANKS[node], "partition-id": node})})
    upload = {k: v.astype(np.float32) for k, v in CLIENT[node].items()}
    return RecordDict({"arrays": to_wire(upload), "metrics": MetricRecord({"num-examples": SIZES[node]})})


def run_round(strategy, global_state, server_round=1):
    grid = FakeGrid(RANKS, respond)
    config = Instruction("{}", lr=0.1).to_config()
    messages = list(strategy.configure_train(server_round, to_record(global_state), config, grid))
    arrays, _ = strategy.aggregate_train(server_round, exchange(grid, messages, timeout=1.0))
    return messages, from_record(arrays)


def initial_global(rank=9):
    return {
        A_KEY: rng.normal(size=(rank, D_IN)).astype(np.float32),
        B_KEY: np.zeros((D_OUT, rank), np.float32),
        HEAD: np.zeros((2, D_OUT), np.float32),
    }


@pytest.mark.parametrize("rule", [FlexLoRA, HLoRA])
def test_each_node_gets_factors_at_its_own_rank(rule):
    strategy = engine(rule, FlexLoRAConfig(alpha=ALPHA, global_rank=9), fraction_train=1.0, min_train_nodes=3)
    messages, _ = run_round(strategy, initial_global())
    assert strategy.nodes.ranks == RANKS
    for message in messages:
        arrays = from_wire(message.content.array_records["arrays"])
        r = RANKS[message.metadata.dst_node_id]
        assert arrays[A_KEY].shape == (r, D_IN) and arrays[B_KEY].shape == (D_OUT, r)
        assert message.content.config_records["config"][RANK] == r  # told, never inferred from shapes
        assert strategy.rounds[1].bytes_down[message.metadata.dst_node_id] == to_wire(arrays).count_bytes()


@pytest.mark.parametrize("rule", [FlexLoRA, HLoRA])
def test_global_product_is_exact_and_head_averaged(rule):
    strategy = engine(
        rule, FlexLoRAConfig(alpha=ALPHA, global_rank=9), fraction_train=1.0, min_train_nodes=3
    )  # 9 = Σ r_k
    _, new = run_round(strategy, initial_global())
    p = {n: SIZES[n] / 100 for n in RANKS}
    ideal = sum(p[n] * (ALPHA / r) * CLIENT[n][B_KEY] @ CLIENT[n][A_KEY] for n, r in RANKS.items())
    np.testing.assert_allclose(new[B_KEY] @ new[A_KEY], ideal, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new[HEAD], sum(p[n] * n for n in RANKS), rtol=1e-6)


def test_next_round_hands_out_truncated_svds_and_hlora_matches_flexlora():
    payloads = {}
    for rule in (FlexLoRA, HLoRA):
        strategy = engine(
            rule, FlexLoRAConfig(alpha=ALPHA, global_rank=9), fraction_train=1.0, min_train_nodes=3
        )
        _, new = run_round(strategy, initial_global())
        messages, _ = run_round(strategy, new, server_round=2)
        payloads[rule.name] = {
            m.metadata.dst_node_id: from_wire(m.content.array_records["arrays"]) for m in messages
        }
    delta = new[B_KEY].astype(np.float64) @ new[A_KEY]
    U, S, Vt = np.linalg.svd(delta)
    for node, r in RANKS.items():
        best = (U[:, :r] * S[:r]) @ Vt[:r]  # Eckart–Young
        for name in ("flexlora", "hlora"):
            got = payloads[name][node]
            np.testing.assert_allclose((ALPHA / r) * got[B_KEY] @ got[A_KEY], best, rtol=1e-4, atol=1e-4)


def test_global_rank_defaults_to_the_sum_of_client_ranks():
    cfg = compose_config({"method": "flexlora"}, "partition.num_clients=4")
    assert cfg.method.client_ranks == [4, 8, 16]
    assert [cfg.method.client_rank(p, cfg.seed) for p in range(4)] == [4, 8, 16, 4]
    assert global_rank(cfg) == 32
    from strategies import get_rule

    server = get_rule("flexlora").server_adapter(cfg)
    assert server.rank == 32 and server.alpha == 32.0  # unit scale
    assert global_rank(compose_config({"method": "hlora"}, "method.global_rank=12")) == 12


def test_node_without_a_rank_is_an_error():
    strategy = engine(FlexLoRA, FlexLoRAConfig(alpha=ALPHA, global_rank=9))
    with pytest.raises(RuntimeError, match="did not report its LoRA rank"):
        strategy.rule.payload(99, initial_global())


def test_hetlora_truncates_pads_and_norm_weights():
    from strategies.hetlora import HetLoRA, hetlora_weights

    strategy = engine(
        HetLoRA, HetLoRAConfig(alpha=ALPHA, global_rank=4), fraction_train=1.0, min_train_nodes=3
    )
    global_state = initial_global(rank=4)
    global_state[B_KEY] = rng.normal(size=(D_OUT, 4)).astype(np.float32)
    messages, new = run_round(strategy, global_state)
    for message in messages:  # first r_k components; B divided by the receiver's scale
        r = RANKS[message.metadata.dst_node_id]
        got = from_wire(message.content.array_records["arrays"])
        np.testing.assert_array_equal(got[A_KEY], global_state[A_KEY][:r])
        np.testing.assert_allclose(got[B_KEY] * (ALPHA / r), global_state[B_KEY][:, :r], rtol=1e-6)
    # Server: unit-scale B (s_k B_k), zero-padded to 4, weights ∝ p_k ‖s_k B_k A_k‖
    As = [CLIENT[n][A_KEY] for n in RANKS]
    unit_Bs = [CLIENT[n][B_KEY] * ALPHA / r for n, r in RANKS.items()]
    w = hetlora_weights(As, unit_Bs, [SIZES[n] for n in RANKS], [1.0] * 3)
    expect_A = sum(wk * np.pad(A, ((0, 4 - A.shape[0]), (0, 0))) for wk, A in zip(w, As, strict=True))
    expect_B = sum(wk * np.pad(B, ((0, 0), (0, 4 - B.shape[1]))) for wk, B in zip(w, unit_Bs, strict=True))
    np.testing.assert_allclose(new[A_KEY], expect_A, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new[B_KEY], expect_B, rtol=1e-5, atol=1e-5)


def test_hetlora_takes_pruned_ranks_from_replies():
    from strategies.hetlora import HetLoRA

    pruned = {11: 1, 22: 3, 33: 3}

    def respond_pruned(message):
        reply = respond(message)
        if message.metadata.message_type == "train":
            reply.metric_records["metrics"]["next-rank"] = pruned[message.metadata.dst_node_id]
        return reply

    strategy = engine(
        HetLoRA, HetLoRAConfig(alpha=ALPHA, global_rank=4), fraction_train=1.0, min_train_nodes=3
    )
    grid = FakeGrid(RANKS, respond_pruned)
    config = Instruction("{}").to_config()
    messages = list(strategy.configure_train(1, to_record(initial_global(rank=4)), config, grid))
    strategy.aggregate_train(1, exchange(grid, messages, timeout=1.0))
    assert strategy.nodes.ranks == pruned


def test_rank_from_a_distribution_is_seeded_per_partition():
    overrides = "partition.num_clients=40 method.client_ranks=[2,8] method.client_rank_probs=[0.25,0.75]"
    cfg = compose_config({"method": "flexlora"}, overrides)
    ranks = [cfg.method.client_rank(p, cfg.seed) for p in range(40)]
    again = compose_config({"method": "flexlora"}, overrides)
    assert ranks == [again.method.client_rank(p, again.seed) for p in range(40)]
    assert set(ranks) == {2, 8} and 20 <= ranks.count(8) <= 38  # ~30 of 40 expected
    assert global_rank(cfg) == sum(ranks)


def test_rank_from_the_nodes_memory():
    from client_app.node import node_facts

    cfg = compose_config({"method": "flexlora"}, "method.rank_by_memory_gb=[[0,4],[16,8],[40,16]]")
    assert [cfg.method.memory_rank(gb) for gb in (8, 16, 24, 80)] == [4, 8, 8, 16]

    def rank(node_config):
        return configured_rank(cfg.method, cfg.seed, 0, node_facts(node_config))

    assert rank({"memory-gb": 24}) == 8
    assert rank({"memory-gb": 24, "lora-rank": 2}) == 2  # the node's own rank wins
    assert rank({}) in (4, 8, 16)  # this machine's GPU memory or RAM
    assert configured_rank(cfg.method, 0, 0, NodeFacts({}, lambda: 17.0)) == 8
    assert global_rank(cfg) == 16 * cfg.partition.num_clients  # room for every node at its largest


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.client_ranks=[2,8] method.client_rank_probs=[0.5]", "client_rank_probs"),
        ("method.client_ranks=[2,8] method.client_rank_probs=[0.5,0.6]", "summing to 1"),
        ("method.rank_by_memory_gb=[[16,8],[0,4]]", "rising thresholds"),
        ("method.rank_by_memory_gb=[[0,0]]", "rank_by_memory_gb"),
    ],
)
def test_bad_rank_rules_are_config_errors(override, message):
    from experiment_schema import ConfigError

    with pytest.raises(ConfigError, match=message):
        compose_config({"method": "flexlora"}, override)
