"""FLoRA, FedEx-LoRA and full fine-tuning as Strategies: exact global models, the merged-base
catch-up protocol under partial participation, failures and lost client state."""

import numpy as np
import pytest
from fakes import FakeGrid, engine
from flwr.app import ConfigRecord, Error, MetricRecord, RecordDict

from finetune.lora import split_base_deltas
from finetune.records import from_record, to_record
from finetune.wire import from_wire, to_wire, unpack
from server_app.loop import exchange
from strategies.fedex_lora import FedExLoRA, FedExLoRAConfig
from strategies.flora import FLoRA, FLoRAConfig
from strategies.full import FullFineTuning
from strategies.merging import UPDATE_INFIX, catch_up
from strategies.protocol import BASE_FROM as FROM_KEY
from strategies.protocol import BASE_VERSION as VERSION_KEY

D_OUT, D_IN, RANK, ALPHA = 16, 12, 2, 4.0
PREFIX = "m.q"
A_KEY, B_KEY, HEAD, DELTA = (
    f"{PREFIX}.lora_A.weight",
    f"{PREFIX}.lora_B.weight",
    "m.classifier.weight",
    f"{PREFIX}.base_delta",
)


def trainable(rank=RANK, seed=0):
    rng = np.random.default_rng(seed)
    return {
        A_KEY: rng.normal(size=(rank, D_IN)).astype(np.float32),
        B_KEY: np.zeros((D_OUT, rank), np.float32),
        HEAD: np.zeros((2, D_OUT), np.float32),
    }


class Clients:
    """Nodes that keep (version, D) like the ClientApp and answer with seeded random factors."""

    def __init__(self, ranks, sizes=None):
        self.ranks, self.sizes = ranks, sizes or {n: 10 * (i + 1) for i, n in enumerate(ranks)}
        self.held = {n: (0, {}) for n in ranks}
        self.received = {}  # node -> this round's payload keys
        self.fail = set()  # nodes that answer with an error
        self.server_deltas = {0: {PREFIX: np.zeros((D_OUT, D_IN), np.float32)}}  # version -> D
        self.seen_bases = []  # (node, version, D) each client trained on

    def respond(self, message):
        node = message.metadata.dst_node_id
        if message.metadata.message_type == "query":
            described = {"lora-rank": self.ranks[node], "partition-id": node}
            return RecordDict({"metrics": MetricRecord(described)})
        if node in self.fail:
            return Error(code=0, reason="simulated crash")
        config = message.content.config_records["config"]
        sync = from_wire(message.content.array_records["arrays"])
        self.received[node] = set(sync)
        version, held = self.held[node]
        try:
            deltas = catch_up(held, version, sync, int(config[VERSION_KEY]), int(config[FROM_KEY]))
        except RuntimeError as error:
            return Error(code=0, reason=str(error))
        self.held[node] = (int(config[VERSION_KEY]), deltas)
        self.seen_bases.append((node, int(config[VERSION_KEY]), deltas[PREFIX] if deltas else None))
        rng = np.random.default_rng([node, int(config["server-round"])])
        r = self.ranks[node]
        upload = {
            A_KEY: rng.normal(size=(r, D_IN)).astype(np.float32),
            B_KEY: rng.normal(size=(D_OUT, r)).astype(np.float32),
            HEAD: np.full((2, D_OUT), float(node), np.float32),
        }
        metrics = MetricRecord({"num-examples": self.sizes[node], VERSION_KEY: int(config[VERSION_KEY])})
        return RecordDict({"arrays": to_wire(upload), "metrics": metrics})


def run_rounds(strategy, clients, global_state, rounds):
    grid = FakeGrid(clients.ranks, clients.respond)
    for server_round in range(1, rounds + 1):
        config = ConfigRecord({"server-round": server_round})
        messages = list(strategy.configure_train(server_round, to_record(global_state), config, grid))
        arrays, _ = strategy.aggregate_train(server_round, exchange(grid, messages, timeout=1.0))
        if arrays is not None:
            global_state = from_record(arrays)
            clients.server_deltas[strategy.rule.version] = split_base_deltas(global_state)[1]
    return global_state


def ideal_update(clients, server_round, weights_of, scale_of):
    """Σ p_k s_k B_k A_k of the uploads the clients of ``weights_of`` sent in ``server_round``."""
    total = sum(weights_of.values())
    out = np.zeros((D_OUT, D_IN))
    for node, w in weights_of.items():
        rng = np.random.default_rng([node, server_round])
        r = clients.ranks[node]
        A, B = rng.normal(size=(r, D_IN)).astype(np.float32), rng.normal(size=(D_OUT, r)).astype(np.float32)
        out += w / total * scale_of(r) * B.astype(np.float64) @ A.astype(np.float64)
    return out


def test_fedex_global_model_is_exact():
    clients = Clients({1: RANK, 2: RANK, 3: RANK})
    strategy = engine(FedExLoRA, FedExLoRAConfig(rank=RANK, alpha=ALPHA), min_train_nodes=3)
    new = run_rounds(strategy, clients, strategy.initial_state(trainable()), rounds=1)
    ideal = ideal_update(clients, 1, clients.sizes, lambda r: ALPHA / r)
    effective = new[DELTA].astype(np.float64) + ALPHA / RANK * new[B_KEY] @ new[A_KEY]
    np.testing.assert_allclose(effective, ideal, rtol=1e-5, atol=1e-5)
    assert np.abs(new[DELTA]).max() > 1e-2  # FedIT's product alone would be off by this much
    np.testing.assert_allclose(new[HEAD], (1 * 10 + 2 * 20 + 3 * 30) / 60, rtol=1e-6)


def test_flora_stacks_mixed_ranks_exactly_and_keeps_no_global_adapter():
    clients = Clients({1: 1, 2: 3, 3: 2})
    strategy = engine(FLoRA, FLoRAConfig(alpha=ALPHA), min_train_nodes=3)
    new = run_rounds(strategy, clients, strategy.initial_state(trainable()), rounds=1)
    assert set(new) == {HEAD, DELTA}
    assert strategy.nodes.ranks == clients.ranks
    np.testing.assert_allclose(
        new[DELTA], ideal_update(clients, 1, clients.sizes, lambda r: ALPHA / r), atol=1e-5
    )


def test_flora_rejects_an_adapter_of_the_wrong_rank():
    clients = Clients({1: 1, 2: 3, 3: 2})
    strategy = engine(FLoRA, FLoRAConfig(alpha=ALPHA), min_train_nodes=3)
    strategy.nodes.ranks = {1: 1, 2: 3, 3: 4}  # node 3 registered rank 4, trains at 2
    run_rounds(strategy, clients, strategy.initial_state(trainable()), rounds=1)
    assert "shape" in strategy.rounds[1].rejected[3]
    assert strategy.rounds[1].aggregated == [1, 2]


@pytest.mark.parametrize("base_sync", ["auto", "factors", "dense"])
def test_partial_participation_every_client_trains_on_the_servers_base(base_sync):
    nodes = {n: RANK for n in range(1, 7)}
    clients = Clients(nodes)
    method = FedExLoRAConfig(rank=RANK, alpha=ALPHA, base_sync=base_sync)
    strategy = engine(FedExLoRA, method, fraction_train=0.34, min_train_nodes=2, seed=0)
    run_rounds(strategy, clients, strategy.initial_state(trainable()), rounds=12)
    assert len({node for node, _, _ in clients.seen_bases}) == 6
    stale = [
        (node, v)
        for node, v, d in clients.seen_bases
        if v > 0 and not np.array_equal(d, clients.server_deltas[v][PREFIX])
    ]
    assert not stale  # bit-identical: both sides run apply_increment on the same float32 factors
    kinds = {
        "factors" if any(UPDATE_INFIX in k for k in keys) else "dense" if DELTA in keys else "none"
        for keys in clients.received.values()
    }
    if base_sync == "dense":
        assert "factors" not in kinds
    if base_sync == "factors":
        assert "dense" not in kinds


def test_auto_sends_factors_one_round_behind_and_dense_far_behind():
    clients = Clients({1: RANK, 2: RANK, 3: RANK})
    strategy = engine(FedExLoRA, FedExLoRAConfig(rank=RANK, alpha=ALPHA), min_train_nodes=3)
    strategy.rule._global = run_rounds(strategy, clients, strategy.initial_state(trainable()), rounds=2)
    assert strategy.rule.version == 2 and strategy.rule.node_version == {
        1: 1,
        2: 1,
        3: 1,
    }  # what they trained on
    # One round of rank-K·r factors: 3·2·(12 + 16) = 168 values < 16·12 = 192 dense; two: 336.
    assert strategy.rule.catch_up_from(1) == 1
    assert {k for k in strategy.rule.payload(1, strategy.rule._global) if k not in trainable()} == {
        f"{PREFIX}{UPDATE_INFIX}2.L",
        f"{PREFIX}{UPDATE_INFIX}2.R",
    }
    strategy.rule.node_version[1] = 0
    assert strategy.rule.catch_up_from(1) is None and DELTA in strategy.rule.payload(1, strategy.rule._global)
    assert list(strategy.rule.history) == [2]  # older increments than a dense D's worth are dropped
    strategy.rule.node_version[1] = 2
    assert set(strategy.rule.payload(1, strategy.rule._global)) == set(trainable())  # up to date


def test_failed_node_gets_the_dense_base_next_time():
    clients = Clients({1: RANK, 2: RANK, 3: RANK})
    strategy = engine(
        FedExLoRA, FedExLoRAConfig(rank=RANK, alpha=ALPHA, base_sync="factors"), min_train_nodes=3
    )
    clients.fail = {2}
    state = run_rounds(strategy, clients, strategy.initial_state(trainable()), rounds=1)
    assert strategy.rule.node_version[2] == -1 and "simulated crash" in strategy.rounds[1].rejected[2]
    clients.fail = set()
    run_rounds_from(strategy, clients, state, server_round=2)
    assert DELTA in clients.received[2] and not any(UPDATE_INFIX in k for k in clients.received[2])
    assert DELTA not in clients.received[1] and any(UPDATE_INFIX in k for k in clients.received[1])
    assert strategy.rounds[2].aggregated == [1, 2, 3]


def test_client_that_lost_its_base_is_refused_then_resynced():
    clients = Clients({1: RANK, 2: RANK, 3: RANK})
    strategy = engine(
        FedExLoRA, FedExLoRAConfig(rank=RANK, alpha=ALPHA, base_sync="factors"), min_train_nodes=3
    )
    state = run_rounds(strategy, clients, strategy.initial_state(trainable()), rounds=2)
    clients.held[3] = (0, {})  # e.g. a restarted SuperNode: empty context
    state = run_rounds_from(strategy, clients, state, server_round=3)
    assert "out of sync" in strategy.rounds[3].rejected[3]
    assert strategy.rounds[3].aggregated == [1, 2]
    run_rounds_from(strategy, clients, state, server_round=4)
    assert DELTA in clients.received[3] and strategy.rounds[4].aggregated == [1, 2, 3]
    _, version, delta = clients.seen_bases[-1]
    np.testing.assert_array_equal(delta, clients.server_deltas[version][PREFIX])


def run_rounds_from(strategy, clients, state, server_round):
    grid = FakeGrid(clients.ranks, clients.respond)
    config = ConfigRecord({"server-round": server_round})
    messages = list(strategy.configure_train(server_round, to_record(state), config, grid))
    arrays, _ = strategy.aggregate_train(server_round, exchange(grid, messages, timeout=1.0))
    new = from_record(arrays)
    clients.server_deltas[strategy.rule.version] = split_base_deltas(new)[1]
    return new


def test_full_fine_tuning_averages_every_weight():
    weights = {"m.q.weight": np.ones((3, 3), np.float32), "m.q.bias": np.zeros(3, np.float32)}
    sizes = {1: 1, 2: 3}

    def respond(message):
        node = message.metadata.dst_node_id
        upload = {k: v + node for k, v in weights.items()}
        return RecordDict({"arrays": to_wire(upload), "metrics": MetricRecord({"num-examples": sizes[node]})})

    grid = FakeGrid(sizes, respond)
    strategy = engine(FullFineTuning, min_train_nodes=2)
    messages = list(strategy.configure_train(1, to_record(weights), ConfigRecord(), grid))
    new = from_record(strategy.aggregate_train(1, exchange(grid, messages, timeout=1.0))[0])
    np.testing.assert_allclose(new["m.q.weight"], 1 + (1 * 1 + 2 * 3) / 4)
    np.testing.assert_allclose(new["m.q.bias"], (1 * 1 + 2 * 3) / 4)


def test_client_side_evaluation_sends_what_training_sends_base_updates_in_float32():
    """With float16 on the wire, training sends the base updates in float32 (both sides must
    reproduce D bit for bit); the evaluation messages must carry the very same encoding."""
    clients = Clients({1: RANK, 2: RANK, 3: RANK})
    method = FedExLoRAConfig(rank=RANK, alpha=ALPHA, base_sync="factors", wire_dtype="float16")
    strategy = engine(FedExLoRA, method, fraction_train=0.67, min_train_nodes=2, evaluate_on_clients=True)
    state = run_rounds(strategy, clients, strategy.initial_state(trainable()), rounds=2)
    grid = FakeGrid(clients.ranks, clients.respond)
    config = ConfigRecord({"server-round": 3})
    evaluation = list(strategy.configure_evaluate(2, to_record(state), config, grid))
    training = list(strategy.configure_train(3, to_record(state), config, grid))
    for sent in (evaluation, training):
        dtypes = {
            key: array.dtype
            for message in sent
            for key, array in unpack(message.content.array_records["arrays"]).items()
        }
        assert any(UPDATE_INFIX in key for key in dtypes)  # a node one merge behind gets factors
        assert all(d == "float32" for k, d in dtypes.items() if UPDATE_INFIX in k or k == DELTA), dtypes
        assert all(d == "float16" for k, d in dtypes.items() if k in (A_KEY, B_KEY, HEAD)), dtypes
    by_node = {m.metadata.dst_node_id: m.content.array_records["arrays"] for m in evaluation}
    for message in training:
        record = message.content.array_records["arrays"]
        assert record.count_bytes() == by_node[message.metadata.dst_node_id].count_bytes()
