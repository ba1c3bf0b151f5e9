"""The 2025 rules (FedSVD, RoLoRA, Fed-SB) and the server optimizers, against hand-computed numpy
and against Flower's own FedAdam / FedYogi / FedAdagrad / FedAvgM (Prepare / Execute / Assert)."""

import numpy as np
import pytest
from fakes import FakeGrid, client_upload, engine
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from experiment_schema import ConfigError, MethodConfig, compose_config
from finetune.records import from_record, to_record
from finetune.wire import from_wire, to_wire
from server_app.loop import exchange
from strategies.averaging import normalize_weights
from strategies.fed_sb import FedSB, FedSBConfig, fed_sb_initialize
from strategies.fedit import FedIT
from strategies.fedsvd import FedSVD, FedSVDConfig, fedsvd_refactor
from strategies.rolora import RoLoRA, frozen_factor

D_OUT, D_IN, RANK = 7, 5, 3
A_KEY, B_KEY, R_KEY, HEAD = (
    "m.q.lora_A.weight",
    "m.q.lora_B.weight",
    "m.q.lora_A.latent",
    "m.classifier.weight",
)
SIZES = {1: 10, 2: 30, 3: 60}
rng = np.random.default_rng(0)


def one_round(strategy, global_state, uploads, server_round=1):
    """A round through the real Strategy: node n answers ``uploads[n]`` (or ``uploads(n, payload)``)."""

    def respond(message):
        node = message.metadata.dst_node_id
        if message.metadata.message_type == "query":
            return RecordDict({"metrics": MetricRecord({"partition-id": node})})
        payload = from_wire(message.content.array_records["arrays"])
        upload = uploads(node, payload) if callable(uploads) else uploads[node]
        metrics = MetricRecord({"num-examples": SIZES[node]})
        return RecordDict({"arrays": to_wire(upload), "metrics": metrics})

    grid = FakeGrid(SIZES, respond)
    messages = list(strategy.configure_train(server_round, to_record(global_state), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(server_round, exchange(grid, messages, timeout=1.0))
    return messages, from_record(arrays) if arrays is not None else None  # None: the round failed


def mean(arrays):
    p = normalize_weights([SIZES[n] for n in SIZES])
    return sum(pk * arrays[n].astype(np.float64) for pk, n in zip(p, SIZES, strict=True))


# --- FedSVD -------------------------------------------------------------------------------


def test_fedsvd_refactor_has_orthonormal_rows_and_keeps_the_product():
    A, B = rng.normal(size=(RANK, D_IN)), rng.normal(size=(D_OUT, RANK))
    A_new, B_new = fedsvd_refactor(A, B)
    np.testing.assert_allclose(A_new @ A_new.T, np.eye(RANK), atol=1e-10)
    np.testing.assert_allclose(B_new @ A_new, B @ A, atol=1e-10)  # a re-parametrisation, exactly
    A_zero, B_zero = fedsvd_refactor(A, np.zeros_like(B))  # round 0: B is LoRA's zero init
    np.testing.assert_allclose(A_zero @ A_zero.T, np.eye(RANK), atol=1e-10)
    assert np.abs(B_zero).max() == 0


def test_fedsvd_round_averages_B_then_refactors_exactly():
    # Prepare: the round's A, and clients that upload their own B (and a head)
    A = rng.normal(size=(RANK, D_IN)).astype(np.float32)
    global_state = {A_KEY: A, B_KEY: np.zeros((D_OUT, RANK), np.float32), HEAD: np.zeros((2, 3), np.float32)}
    Bs = {n: rng.normal(size=(D_OUT, RANK)).astype(np.float32) for n in SIZES}
    uploads = {n: {B_KEY: Bs[n], HEAD: np.full((2, 3), float(n), np.float32)} for n in SIZES}
    strategy = engine(FedSVD, FedSVDConfig(rank=RANK, alpha=8.0), min_train_nodes=3)
    # Execute
    messages, new = one_round(strategy, global_state, uploads)
    # Assert: A travelled down, never up; s B_new A_new = s B̄ A; A_new has orthonormal rows
    assert all(A_KEY in from_wire(m.content.array_records["arrays"]) for m in messages)
    assert all(set(strategy.expected_shapes(n)) == {B_KEY, HEAD} for n in SIZES)
    s = 8.0 / RANK
    np.testing.assert_allclose(s * new[B_KEY] @ new[A_KEY], s * mean(Bs) @ A, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new[A_KEY] @ new[A_KEY].T, np.eye(RANK), atol=1e-5)
    np.testing.assert_allclose(new[HEAD], mean({n: uploads[n][HEAD] for n in SIZES}), rtol=1e-6)


def test_fedsvd_refactors_every_svd_period_rounds():
    A = rng.normal(size=(RANK, D_IN)).astype(np.float32)
    state = {A_KEY: A, B_KEY: np.zeros((D_OUT, RANK), np.float32)}
    uploads = {n: {B_KEY: rng.normal(size=(D_OUT, RANK)).astype(np.float32)} for n in SIZES}
    strategy = engine(FedSVD, FedSVDConfig(rank=RANK, svd_period=2), min_train_nodes=3)
    _, after_1 = one_round(strategy, state, uploads, server_round=1)
    np.testing.assert_array_equal(after_1[A_KEY], A)  # round 1 of a period of 2: A kept
    _, after_2 = one_round(strategy, after_1, uploads, server_round=2)
    assert not np.allclose(after_2[A_KEY], A)
    B_bar = mean({n: uploads[n][B_KEY] for n in SIZES})
    np.testing.assert_allclose(after_2[B_KEY] @ after_2[A_KEY], B_bar @ A, rtol=1e-5, atol=1e-5)


def test_fedsvd_refuses_a_server_optimizer_while_it_refactors():
    with pytest.raises(ConfigError, match="svd_period=0"):
        compose_config({"method": "fedsvd"}, ["method.server_optimizer=adam"])
    assert compose_config({"method": "fedsvd"}, ["method.server_optimizer=adam", "method.svd_period=0"])


# --- RoLoRA -------------------------------------------------------------------------------


@pytest.mark.parametrize("server_round", [1, 2, 3, 4])
def test_rolora_averages_only_the_rounds_factor_exactly(server_round):
    # Prepare
    A = rng.normal(size=(RANK, D_IN)).astype(np.float32)
    B = rng.normal(size=(D_OUT, RANK)).astype(np.float32)
    global_state = {A_KEY: A, B_KEY: B, HEAD: np.zeros((2, 3), np.float32)}
    trained = B_KEY if frozen_factor(server_round) == "A" else A_KEY
    factors = {n: rng.normal(size=global_state[trained].shape).astype(np.float32) for n in SIZES}
    uploads = {n: {trained: factors[n], HEAD: np.full((2, 3), float(n), np.float32)} for n in SIZES}
    strategy = engine(RoLoRA, min_train_nodes=3)
    # Execute
    _, new = one_round(strategy, global_state, uploads, server_round)
    # Assert: odd rounds Σ p_k s B_k A = s B̄ A, even rounds Σ p_k s B A_k = s B Ā; the other stays
    assert all(set(strategy.expected_shapes(n)) == {trained, HEAD} for n in SIZES)
    if trained == B_KEY:
        np.testing.assert_array_equal(new[A_KEY], A)
        ideal = mean(factors) @ A
        np.testing.assert_allclose(new[B_KEY] @ new[A_KEY], ideal, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(new[B_KEY], B)
        ideal = B.astype(np.float64) @ mean(factors)
        np.testing.assert_allclose(new[B_KEY] @ new[A_KEY], ideal, rtol=1e-5, atol=1e-5)


def test_round_one_trains_B():
    assert frozen_factor(1) == "A" and frozen_factor(2) == "B"  # LoRA's B = 0 gives A no gradient


# --- Fed-SB -------------------------------------------------------------------------------


def test_fed_sb_initialisation_is_the_truncated_first_step():
    G = rng.normal(size=(D_OUT, D_IN))
    step, scale = 1e-3, 2.0
    A, B, R = fed_sb_initialize(G, RANK, step, scale)
    U, S, Vt = np.linalg.svd(-step * np.sign(G))
    best = (U[:, :RANK] * S[:RANK]) @ Vt[:RANK]  # Eckart–Young on the sign step
    np.testing.assert_allclose(scale * B @ R @ A, best, atol=1e-12)
    np.testing.assert_allclose(A @ A.T, np.eye(RANK), atol=1e-12)
    np.testing.assert_allclose(B.T @ B, np.eye(RANK), atol=1e-12)


def test_fed_sb_averages_R_exactly_and_uploads_r_squared_numbers():
    # Prepare: fixed A, B; clients upload their own R and head
    A = np.linalg.qr(rng.normal(size=(D_IN, RANK)))[0].T.astype(np.float32)
    B = np.linalg.qr(rng.normal(size=(D_OUT, RANK)))[0].astype(np.float32)
    global_state = {
        A_KEY: A,
        B_KEY: B,
        R_KEY: np.eye(RANK, dtype=np.float32),
        HEAD: np.zeros((2, 3), np.float32),
    }
    Rs = {n: rng.normal(size=(RANK, RANK)).astype(np.float32) for n in SIZES}
    uploads = {n: {R_KEY: Rs[n], HEAD: np.full((2, 3), float(n), np.float32)} for n in SIZES}
    strategy = engine(FedSB, FedSBConfig(rank=RANK, alpha=float(RANK)), min_train_nodes=3)
    # Execute: round 1, then round 2 once every node holds A and B
    messages_1, new = one_round(strategy, global_state, uploads)
    messages_2, _ = one_round(strategy, new, uploads, server_round=2)
    # Assert
    np.testing.assert_array_equal(new[A_KEY], A)
    np.testing.assert_array_equal(new[B_KEY], B)
    ideal = B @ mean(Rs) @ A
    np.testing.assert_allclose(B @ new[R_KEY] @ A, ideal, rtol=1e-5, atol=1e-6)
    assert strategy.rounds[1].payload_up[1] == 4 * (RANK * RANK + 2 * 3)  # r² per layer, and the head
    assert all(A_KEY in from_wire(m.content.array_records["arrays"]) for m in messages_1)
    assert not any(A_KEY in from_wire(m.content.array_records["arrays"]) for m in messages_2)  # A, B once


def test_upload_bytes_per_method():
    """Measured through the engine, each node answering with what its rule's client half uploads
    after training its whole adapter: FFA-LoRA, FedSVD and RoLoRA send one factor (half of
    FedIT's); Fed-SB sends only the r × r R, in round 1 (A and B travelled down) and after."""
    from strategies import get_rule

    d, r, head = 256, 8, (2, 3)
    shapes = {A_KEY: (r, d), B_KEY: (d, r), HEAD: head}
    adapter = {k: rng.normal(size=shape).astype(np.float32) for k, shape in shapes.items()}

    def bytes_up(name, server_rounds, payload):
        """A node's serialized upload in each round, whose arrays alone must be ``payload`` bytes."""
        cfg = compose_config({"method": name}, [f"method.rank={r}"])
        trained = {**adapter, R_KEY: np.eye(r, dtype=np.float32)} if name == "fed_sb" else adapter
        strategy = engine(get_rule(name).strategy, cfg.method, min_train_nodes=3)
        state, sent = strategy.initial_state(trained), []

        def answer(t):  # a client loads what it was sent, trains all of its adapter, uploads
            return lambda node, received: client_upload(cfg, t, {**trained, **received})

        for t in server_rounds:
            _, state = one_round(strategy, state, answer(t), t)
            stats = strategy.rounds[t]
            assert set(stats.payload_up.values()) == {payload}, (name, t, stats.payload_up)
            assert stats.rejected == {} and sorted(stats.aggregated) == sorted(SIZES), (name, t)
            sent.append(stats.bytes_up[1])
        return sent

    head_bytes = 4 * head[0] * head[1]
    [fedit] = bytes_up("fedit", [1], payload=4 * 2 * r * d + head_bytes)
    for name, rounds in (("ffa_lora", [1]), ("fedsvd", [1]), ("rolora", [1, 2])):
        for sent in bytes_up(name, rounds, payload=4 * r * d + head_bytes):  # one factor and the head
            assert 0.45 < sent / fedit < 0.55, name
    for sent in bytes_up("fed_sb", [1, 2], payload=4 * r * r + head_bytes):  # R: 256 bytes, not 16,384
        assert sent < fedit / 8


# --- server optimizers --------------------------------------------------------------------

FLOWER = {
    "adam": lambda: FedAdam(eta=0.05, eta_l=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3, min_train_nodes=3),
    "yogi": lambda: FedYogi(eta=0.05, eta_l=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3, min_train_nodes=3),
    "adagrad": lambda: FedAdagrad(eta=0.05, eta_l=0.1, tau=1e-3, min_train_nodes=3),  # Flower fixes β₁ = 0
    "avgm": lambda: FedAvgM(server_learning_rate=0.7, server_momentum=0.5, min_train_nodes=3),
}
OURS = {
    "adam": MethodConfig(server_optimizer="adam", server_lr=0.05, server_beta1=0.9, server_beta2=0.99),
    "yogi": MethodConfig(server_optimizer="yogi", server_lr=0.05, server_beta1=0.9, server_beta2=0.99),
    "adagrad": MethodConfig(server_optimizer="adagrad", server_lr=0.05, server_beta1=0.0),
    "avgm": MethodConfig(server_optimizer="avgm", server_lr=0.7, server_momentum=0.5),
}


def flower_rounds(flower, initial, rounds):
    """Flower's own strategy over the same uploads (its FedAvg sampling, its aggregation)."""
    grid = FakeGrid(SIZES, lambda m: None)
    current, history = initial, []
    for server_round, uploads in enumerate(rounds, start=1):
        messages = list(flower.configure_train(server_round, to_record(current), ConfigRecord(), grid))
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            content = RecordDict(
                {"arrays": to_record(uploads[node]), "metrics": MetricRecord({"num-examples": SIZES[node]})}
            )  # Flower's own strategy: plain records, not our wire
            replies.append(Message(content, reply_to=message))
        arrays, _ = flower.aggregate_train(server_round, replies)
        current = {k: v.numpy() for k, v in arrays.items()}
        history.append(current)
    return history


@pytest.mark.parametrize("kind", sorted(FLOWER))
def test_server_optimizers_reproduce_flowers(kind):
    # Prepare: three rounds of uploads around a moving global state
    initial = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}
    rounds = [
        {n: {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in initial.items()} for n in SIZES}
        for _ in range(3)
    ]
    # Execute
    expected = flower_rounds(FLOWER[kind](), initial, rounds)
    ours, state = engine(FedIT, OURS[kind], min_train_nodes=3), initial
    for server_round, uploads in enumerate(rounds, start=1):
        _, state = one_round(ours, state, uploads, server_round)
        # Assert
        for key in initial:
            np.testing.assert_allclose(state[key], expected[server_round - 1][key], rtol=1e-6, atol=1e-6)


def test_avgm_without_momentum_at_rate_one_is_plain_averaging():
    initial = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    uploads = {n: {"w": rng.normal(size=(4, 3)).astype(np.float32)} for n in SIZES}
    _, plain = one_round(engine(FedIT, min_train_nodes=3), initial, uploads)
    _, stepped = one_round(
        engine(FedIT, MethodConfig(server_optimizer="avgm"), min_train_nodes=3), initial, uploads
    )
    np.testing.assert_allclose(stepped["w"], plain["w"], rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "why"),
    [
        ("flexlora", "redistributed per node rank"),
        ("hetlora", "redistributed per node rank"),
        ("flora", "folded into the frozen base"),
        ("fedex_lora", "folded into the frozen base"),
        ("centralized", "no federation"),
    ],
)
def test_rules_without_global_arrays_refuse_a_server_optimizer(method, why):
    with pytest.raises(ConfigError, match=why):
        compose_config({"method": method}, ["method.server_optimizer=adam"])


def test_the_server_optimizer_steps_only_the_arrays_a_round_aggregated():
    # RoLoRA's round 1 aggregates B: A must not move, however the optimizer's moments look
    A = rng.normal(size=(RANK, D_IN)).astype(np.float32)
    state = {A_KEY: A, B_KEY: np.zeros((D_OUT, RANK), np.float32)}
    uploads = {n: {B_KEY: rng.normal(size=(D_OUT, RANK)).astype(np.float32)} for n in SIZES}
    strategy = engine(
        RoLoRA,
        compose_config({"method": "rolora"}, ["method.server_optimizer=adam"]).method,
        min_train_nodes=3,
    )
    _, new = one_round(strategy, state, uploads, server_round=1)
    np.testing.assert_array_equal(new[A_KEY], A)
    assert set(strategy.rule.server_optimizer.m) == {B_KEY}
