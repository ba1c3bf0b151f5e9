"""Client-side training modes: GaLore's projection, kept optimizer state, DP-SGD and its accounting,
and the centralized baseline running the same training function."""

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, adapter_of

from experiment_schema import compose_config
from finetune.data import PartitionedDataset, load_train_split
from finetune.models import build_model
from finetune.optim import build_optimizer, galore_targets, optimizer_state_bytes
from finetune.privacy import epsilon, plan_round
from finetune.state import trainable_state
from finetune.tasks import build_task
from finetune.training import train_local


def _setup(method, hub_mirror, overrides=()):
    cfg = compose_config({"model": "tiny_bert", "method": method}, [*TINY_OVERRIDES, *overrides])
    cfg.hub_mirror = str(hub_mirror)
    model = build_model(cfg, hub_mirror, adapter_of(cfg))
    task = build_task(cfg, hub_mirror)
    train = load_train_split(cfg.dataset, hub_mirror, cfg.seed)
    part = PartitionedDataset(train, cfg).partition(0)
    return cfg, model, task.collate, task.prepare(part, client=0)


def _one_step(model, optimizer, collate, data):
    from finetune.data import iterate_batches

    batch = next(iterate_batches(data, collate, 8, shuffle=True, seed=0))
    model(**batch).loss.backward()
    optimizer.step()


def test_galore_projects_the_targeted_weights_and_nothing_else(hub_mirror):
    cfg, model, collate, data = _setup("galore", hub_mirror, ["method.rank=4"])
    optimizer = build_optimizer(model, 1e-3, cfg, cfg.method.settings())
    _one_step(model, optimizer, collate, data)
    targeted = set(galore_targets(model, cfg, every_layer=False))
    assert len(targeted) == 2 * 2  # query and value weights of 2 layers
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        state = optimizer.state[param]
        if name in targeted:  # 32 × 32 weight: moments live in the rank-4 subspace
            assert state["exp_avg"].shape == (32, 4) and "projector" in state
        else:  # biases, classifier: ordinary full-size AdamW moments
            assert state["exp_avg"].shape == param.shape and "projector" not in state


def test_galore_groups_without_rank_are_plain_adamw(hub_mirror):
    """The paper code's bug: GaLoreAdamW given groups without ``rank`` never projects."""
    from galore_torch import GaLoreAdamW

    cfg, model, collate, data = _setup("galore", hub_mirror, ["method.rank=4"])
    optimizer = GaLoreAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _one_step(model, optimizer, collate, data)
    assert all("projector" not in s and s["exp_avg"].shape == p.shape for p, s in optimizer.state.items())
    projected = build_optimizer(model, 1e-3, cfg, cfg.method.settings())
    _one_step(model, projected, collate, data)
    assert optimizer_state_bytes(projected) < optimizer_state_bytes(optimizer)


def test_kept_optimizer_state_resumes_where_the_last_round_stopped(hub_mirror):
    cfg, model, collate, data = _setup("galore", hub_mirror, ["train.keep_optimizer_state=true"])
    factory = lambda m, lr: build_optimizer(m, lr, cfg, cfg.method.settings())  # noqa: E731
    first = train_local(model, data, collate, cfg.train, lr=1e-3, seed=1, optimizer=factory)
    assert first.optimizer_state is not None and first.optimizer_state_bytes > 0
    second = train_local(
        model,
        data,
        collate,
        cfg.train,
        lr=5e-4,
        seed=2,
        optimizer=factory,
        optimizer_state=first.optimizer_state,
    )
    resumed = torch.load(__import__("io").BytesIO(second.optimizer_state.tobytes()), weights_only=False)
    steps = {int(s["step"]) for s in resumed["state"].values()}
    assert steps == {2 * cfg.train.local_steps}  # counted on from round 1, not restarted
    assert all(g["lr"] == 5e-4 for g in resumed["param_groups"])  # this round's rate
    fresh = train_local(
        model,
        data,
        collate,
        cfg.train.__class__(**{**cfg.train.__dict__, "keep_optimizer_state": False}),
        lr=1e-3,
        seed=1,
    )
    assert fresh.optimizer_state is None


@pytest.mark.parametrize("method", ["ffa_lora", "fedsvd"])  # both train B only (A frozen for the round)
def test_dp_epsilon_equals_the_accountant_computed_independently(hub_mirror, method):
    """Two rounds of the real ClientApp with DP; ε recomputed from scratch with Opacus's RDP analysis."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant
    from test_client_protocol import _context, _global, _message

    from client_app.app import train
    from finetune.wire import from_wire

    cfg = compose_config(
        {"model": "tiny_bert", "method": method},
        [*TINY_OVERRIDES, "privacy.enabled=true", "privacy.noise_multiplier=1.3"],
    )
    cfg.hub_mirror = str(hub_mirror)
    init, global_state = _global(cfg, hub_mirror)
    context = _context(0)
    reported = []
    for server_round in (1, 2):
        reply = train(_message(cfg, global_state, server_round=server_round), context)
        metrics = reply.content.metric_records["metrics"]
        reported.append(metrics["dp-epsilon"])
        upload = from_wire(reply.content.array_records["arrays"])
        assert all(np.isfinite(v).all() for v in upload.values())
        assert upload and not any("lora_A" in k for k in upload)  # only B (and the head) go up
    n = int(metrics["num-examples"])
    q, steps = cfg.train.batch_size / n, cfg.train.local_steps
    orders = RDPAccountant.DEFAULT_ALPHAS
    for rounds, got in zip((1, 2), reported, strict=True):
        rdp = compute_rdp(q=q, noise_multiplier=1.3, steps=rounds * steps, orders=orders)
        expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=cfg.privacy.target_delta)
        assert got == pytest.approx(expected, rel=1e-9)
    assert reported[1] > reported[0] > 0
    # A stays bit-identical under DP-SGD too (frozen: no per-sample gradient, no noise).
    from client_app.session import _SESSIONS

    after = trainable_state(next(reversed(_SESSIONS.values())).model)
    assert all(np.array_equal(after[k], init[k]) for k in init if "lora_A" in k)
    # Opacus's hooks are gone: the shared model trains normally for the next client.
    model = next(reversed(_SESSIONS.values())).model
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_dp_target_calibrates_noise_and_stops_the_client(hub_mirror):
    from test_client_protocol import _context, _global, _message

    from client_app.app import train

    overrides = ["privacy.enabled=true", "privacy.target_epsilon=2.0", "federation.num_rounds=3"]
    cfg = compose_config({"model": "tiny_bert", "method": "fedit"}, [*TINY_OVERRIDES, *overrides])
    cfg.hub_mirror = str(hub_mirror)
    _, global_state = _global(cfg, hub_mirror)
    context = _context(1)
    spent = []
    for server_round in (1, 2, 3):
        metrics = train(
            _message(cfg, global_state, server_round=server_round), context
        ).content.metric_records["metrics"]
        spent.append(metrics["dp-epsilon"])
    assert spent[-1] == pytest.approx(2.0, abs=0.02)  # calibrated for 3 rounds: ends at the target
    from client_app.privacy import PrivacyBudgetExhausted

    with pytest.raises(PrivacyBudgetExhausted, match="privacy budget exhausted"):
        train(_message(cfg, global_state, server_round=4), context)
    plan = plan_round(cfg.privacy, 100, 8, 2, 3)
    assert epsilon([(plan.noise_multiplier, plan.sample_rate, 2)] * 3, 1e-5) == pytest.approx(2.0, abs=0.02)


def test_dp_rejects_a_rule_it_cannot_clip():
    from experiment_schema import ConfigError

    with pytest.raises(ConfigError, match="self-pruning"):
        compose_config({"method": "hetlora"}, "privacy.enabled=true")


def test_centralized_trains_with_the_client_training_function(hub_mirror, monkeypatch, tmp_path):
    import server_app.centralized as centralized
    from server_app.results import RunRecorder

    cfg, model, collate, data = _setup("centralized", hub_mirror)
    calls = []
    real = centralized.train_local

    def spy(*args, **kwargs):
        calls.append(args[3].local_steps)
        return real(*args, **kwargs)

    monkeypatch.setattr(centralized, "train_local", spy)
    cfg.output_dir = str(tmp_path)
    recorder = RunRecorder.create(cfg)
    before = trainable_state(model)
    centralized.run_centralized(
        cfg, model, collate, data, lambda r, a: {"accuracy": 0.5, "loss": 1.0}, recorder
    )
    assert calls == [2 * cfg.train.local_steps] * cfg.federation.num_rounds  # 2 clients' worth per round
    after = trainable_state(model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert [row["round"] for row in recorder.rows] == [0, 1, 2]


def test_central_dp_clips_each_update_and_reports_epsilon(tmp_path):
    from fakes import FakeGrid
    from flwr.app import MetricRecord, RecordDict
    from opacus.accountants import RDPAccountant

    from experiment_schema import ConfigError
    from finetune.records import from_record, to_record
    from finetune.wire import from_wire, to_wire
    from server_app.app import build_strategy, central_dp_wrapper
    from server_app.loop import run_federation
    from server_app.results import RunRecorder

    overrides = [
        "partition.num_clients=2", "federation.num_rounds=2", "method.weighting=uniform",
        "privacy.enabled=true", "privacy.mode=central", "privacy.clip_norm=0.5",
        "privacy.noise_multiplier=1e-6",
    ]  # fmt: skip

    def respond(message):  # every client moves 10 away from the global weights
        if message.metadata.message_type == "query":
            return RecordDict({"metrics": MetricRecord({"partition-id": message.metadata.dst_node_id - 1})})
        sent = from_wire(message.content.array_records["arrays"])
        upload = {"w": sent["w"] + 10.0}
        return RecordDict({"arrays": to_wire(upload), "metrics": MetricRecord({"num-examples": 5})})

    def federate(extra, nodes, folder):
        cfg = compose_config({"model": "tiny_bert", "method": "fedit"}, [*overrides, *extra])
        cfg.output_dir = str(tmp_path / folder)
        strategy = build_strategy(cfg)
        wrapper = central_dp_wrapper(cfg, strategy)
        recorder = RunRecorder.create(cfg)
        evaluate = lambda r, a: {"accuracy": 0.5, "loss": 1.0}  # noqa: E731
        initial = to_record({"w": np.zeros(4, np.float32)})
        final = run_federation(FakeGrid(nodes, respond), strategy, cfg, initial, evaluate, recorder, wrapper)
        return cfg, from_record(final), recorder.rows[1:]

    def composed(sigma, sample_rate, rounds, delta):
        """Opacus's RDP accountant after one Gaussian release (σ, q) per round."""
        accountant = RDPAccountant()
        for _ in range(rounds):
            accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
        return accountant.get_epsilon(delta=delta)

    # σ ≈ 0, both nodes every round: two steps of the clipped mean, and ε says there is no privacy
    cfg, final, rows = federate([], [1, 2], "no-noise")
    assert np.linalg.norm(final["w"]) == pytest.approx(2 * 0.5, rel=1e-5)
    assert cfg.privacy.accountant == "rdp" and cfg.privacy.target_delta == 1e-5
    expected = [composed(1e-6, 1.0, r, 1e-5) for r in (1, 2)]
    assert [row["dp_epsilon"] for row in rows] == pytest.approx(expected, rel=1e-9)
    # σ = 0.8, 2 of 4 nodes a round (q = 1/2), three rounds: ε composes exactly those releases
    extra = [
        "privacy.noise_multiplier=0.8", "partition.num_clients=4", "federation.fraction_train=0.5",
        "federation.num_rounds=3",
    ]  # fmt: skip
    cfg, _, rows = federate(extra, [1, 2, 3, 4], "noise")
    assert [row["clients_aggregated"] for row in rows] == [2, 2, 2]
    expected = [composed(0.8, 0.5, r, 1e-5) for r in (1, 2, 3)]
    assert [row["dp_epsilon"] for row in rows] == pytest.approx(expected, rel=1e-9)
    assert 1 < expected[0] < expected[2] < 1e3  # a real budget, spent round by round
    for bad, message in (
        (["method.weighting=examples"], "weighting=uniform"),
        (["privacy.target_epsilon=3"], "noise_multiplier"),
    ):
        with pytest.raises(ConfigError, match=message):
            compose_config({"method": "fedit"}, [*overrides, *bad])
    with pytest.raises(ConfigError, match=r"privacy\.mode=local"):
        compose_config({"method": "flexlora"}, overrides)
