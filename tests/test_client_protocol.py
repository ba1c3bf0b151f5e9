"""The real ClientApp functions, called in-process: what each rule trains, uploads and keeps.

Two clients share one process (as in a Ray actor), so state leaking between them would show.
"""

import fakes  # noqa: F401  (sets the task identity Message() needs)
import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from client_app.app import evaluate, train
from client_app.session import _SESSIONS
from experiment_schema import compose_config
from finetune.lora import is_lora_a, is_lora_b
from finetune.models import build_model
from finetune.records import from_record
from finetune.state import trainable_state
from finetune.wire import from_wire, to_wire
from strategies import get_rule
from strategies.client import KEPT_ARRAYS as LOCAL_KEY
from strategies.protocol import Instruction


def _cfg(method, hub_mirror):
    from conftest import TINY_OVERRIDES

    cfg = compose_config({"model": "tiny_bert", "method": method}, TINY_OVERRIDES)
    cfg.hub_mirror = str(hub_mirror)
    return cfg


def _context(partition_id):
    return Context(
        run_id=1, node_id=100 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": 2},
        state=RecordDict(), run_config={},
    )  # fmt: skip


def _message(cfg, state, kind=MessageType.TRAIN, server_round=1, **instruction):
    config = Instruction(cfg.to_json(), server_round=server_round, lr=5e-2, **instruction).to_config()
    message = Message(
        RecordDict({"arrays": to_wire(state), "config": config}), dst_node_id=1, message_type=kind
    )
    message.metadata.__dict__["_message_id"] = f"m-{kind}-{server_round}"
    return message


def _model(cfg, hub_mirror, rank=None):
    """The model a client of ``cfg``'s rule builds (at ``rank``, for per-node ranks)."""
    return build_model(cfg, hub_mirror, get_rule(cfg.method.name).client.default_adapter(cfg, rank))


def _global(cfg, hub_mirror):
    init = trainable_state(_model(cfg, hub_mirror))
    return init, {k: v for k, v in init.items() if get_rule(cfg.method.name).traffic.shares(k)}


def test_fedit_uploads_everything_it_trained(hub_mirror):
    cfg = _cfg("fedit", hub_mirror)
    init, global_state = _global(cfg, hub_mirror)
    reply = train(_message(cfg, global_state), _context(0))
    upload = from_wire(reply.content.array_records["arrays"])
    assert set(upload) == set(init)
    assert reply.content.metric_records["metrics"]["num-examples"] > 0


def test_ffa_keeps_A_bit_identical_and_uploads_no_A(hub_mirror):
    cfg = _cfg("ffa_lora", hub_mirror)
    init, global_state = _global(cfg, hub_mirror)
    assert not any(is_lora_a(k) for k in global_state)
    for partition_id in (0, 1):
        context = _context(partition_id)
        for server_round in (1, 2):
            reply = train(_message(cfg, global_state, server_round=server_round), context)
            assert set(from_wire(reply.content.array_records["arrays"])) == set(global_state)

    after = trainable_state(next(reversed(_SESSIONS.values())).model)
    for key in init:
        if is_lora_a(key):
            np.testing.assert_array_equal(after[key], init[key])


def test_fedsa_keeps_B_and_head_local_and_uploads_A_only(hub_mirror):
    cfg = _cfg("fedsa_lora", hub_mirror)
    init, global_state = _global(cfg, hub_mirror)
    contexts = {p: _context(p) for p in (0, 1)}
    replies = {p: train(_message(cfg, global_state), contexts[p]).content for p in (0, 1)}
    uploads = {p: from_wire(replies[p].array_records["arrays"]) for p in (0, 1)}
    timing = replies[0].metric_records["metrics"]
    assert timing["handler-seconds"] > timing["train-seconds"] > 0  # the handler holds the training
    for p, ctx in contexts.items():
        assert set(uploads[p]) == {k for k in init if is_lora_a(k)}
        kept = from_record(ctx.state.array_records[LOCAL_KEY])
        assert set(kept) == {k for k in init if not is_lora_a(k)}
        assert any(is_lora_b(k) and np.abs(v).sum() > 0 for k, v in kept.items())  # B trained, kept here
    b_key = next(k for k in init if is_lora_b(k))
    kept0 = from_record(contexts[0].state.array_records[LOCAL_KEY])
    kept1 = from_record(contexts[1].state.array_records[LOCAL_KEY])
    assert not np.array_equal(kept0[b_key], kept1[b_key])  # personal, no leakage through the shared model

    # Personalised evaluation uses this client's own B: different clients, different models.
    results = [evaluate(_message(cfg, global_state, MessageType.EVALUATE), contexts[p]) for p in (0, 1)]
    metrics = [r.content.metric_records["metrics"] for r in results]
    assert all(m["num-examples"] > 0 and 0 <= m["accuracy"] <= 1 for m in metrics)


def test_client_refuses_a_federation_of_the_wrong_size(hub_mirror):
    cfg = _cfg("fedit", hub_mirror)
    _, global_state = _global(cfg, hub_mirror)
    context = _context(0)
    context.node_config["num-partitions"] = 5
    with pytest.raises(ValueError, match=r"partition\.num_clients=2"):
        train(_message(cfg, global_state), context)


def test_heterogeneous_rank_client_trains_at_its_own_rank(hub_mirror):
    from flwr.app import MessageType as MT

    from client_app.app import query

    cfg = _cfg("flexlora", hub_mirror)  # client_ranks [4, 8, 16]
    for partition_id, rank in ((0, 4), (1, 8)):
        context = _context(partition_id)
        answer = query(_message(cfg, {}, MT.QUERY), context).content.metric_records["metrics"]
        assert answer["lora-rank"] == rank
        state = trainable_state(_model(cfg, hub_mirror, rank))
        upload = from_wire(train(_message(cfg, state, rank=rank), context).content.array_records["arrays"])
        assert all(v.shape[0] == rank for k, v in upload.items() if is_lora_a(k))
    context = _context(0)
    context.node_config["lora-rank"] = 2  # a node's own setting wins
    assert query(_message(cfg, {}, MT.QUERY), context).content.metric_records["metrics"]["lora-rank"] == 2


def test_hetlora_client_penalises_the_tail_and_prunes_when_it_shrinks(hub_mirror):
    import torch

    from strategies.hetlora import self_pruning_penalty

    cfg = _cfg("hetlora", hub_mirror)  # client_ranks [4, 8, 16]: partition 1 trains at rank 8
    model = _model(cfg, hub_mirror, 8)
    state = trainable_state(model)
    # Penalty = Σ ‖B[:, 7:]‖‖A[7:, :]‖ (k = ceil(0.99 * 8) capped at r - 1 = 7)
    expected = sum(
        np.linalg.norm(state[k.replace("lora_A", "lora_B")][:, 7:]) * np.linalg.norm(state[k][7:, :])
        for k in state if is_lora_a(k)
    )  # fmt: skip
    assert float(self_pruning_penalty(model, 0.99)) == pytest.approx(expected, abs=1e-5)  # smooth norm: ε
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.fill_(0.1)
    assert float(self_pruning_penalty(model, 0.99)) > 0

    context = _context(1)
    # Round 1 from the real init (B = 0: the penalty's gradient must stay finite there).
    init = trainable_state(_model(cfg, hub_mirror, 8))
    first = train(_message(cfg, init, server_round=1, rank=8), context)
    assert first.content.metric_records["metrics"]["next-rank"] == 8  # nothing to compare with yet
    trained = from_wire(first.content.array_records["arrays"])
    assert all(np.isfinite(v).all() for v in trained.values())
    # Round 2 receives factors whose tail is zero: it stays zero, smaller than round 1's -> prune.
    tail_free = {k: v.copy() for k, v in trained.items()}
    for key in tail_free:
        if is_lora_a(key):
            tail_free[key][7:, :] = 0.0
        elif is_lora_b(key):
            tail_free[key][:, 7:] = 0.0
    second = train(_message(cfg, tail_free, server_round=2, rank=8), context)
    upload = from_wire(second.content.array_records["arrays"])
    assert all(v.shape[0] == 8 for k, v in upload.items() if is_lora_a(k))  # this round's rank
    assert second.content.metric_records["metrics"]["next-rank"] == 7  # next round's
    assert context.state.config_records["rank-pruning"]["rank"] == 7


def _merging_message(cfg, state, server_round, version, from_version, rank=None):
    return _message(
        cfg, state, server_round=server_round, base_version=version, base_from=from_version, rank=rank
    )


def test_fedex_client_keeps_its_merged_base_and_catches_up_exactly(hub_mirror):
    from finetune.state import base_weights, lora_base_layers
    from strategies.merging import apply_increment

    cfg = _cfg("fedex_lora", hub_mirror)
    init, global_state = _global(cfg, hub_mirror)
    w0 = base_weights(_model(cfg, hub_mirror))
    rng = np.random.default_rng(0)
    dense = {p: rng.normal(size=tuple(w.shape), scale=0.01).astype(np.float32) for p, w in w0.items()}
    context = _context(0)
    sync = {p + ".base_delta": d for p, d in dense.items()}
    reply = train(_merging_message(cfg, {**global_state, **sync}, 1, version=3, from_version=-1), context)
    assert reply.content.metric_records["metrics"]["base-version"] == 3
    assert set(from_wire(reply.content.array_records["arrays"])) == set(init)  # no base travels up
    held = from_record(context.state.array_records["merged-base"])
    assert all(np.array_equal(held[p], dense[p]) for p in dense)
    model = next(reversed(_SESSIONS.values())).model
    for prefix, layer in lora_base_layers(model).items():  # the model trained on W0 + D
        torch.testing.assert_close(
            layer.get_base_layer().weight, w0[prefix] + torch.from_numpy(dense[prefix])
        )

    factors = {
        p: (rng.normal(size=(d.shape[0], 4)), rng.normal(size=(4, d.shape[1]))) for p, d in dense.items()
    }
    updates = {}
    for p, (L, R) in factors.items():
        updates[f"{p}.base_update.5.L"], updates[f"{p}.base_update.5.R"] = (
            L.astype(np.float32),
            R.astype(np.float32),
        )
    train(_merging_message(cfg, {**global_state, **updates}, 2, version=5, from_version=3), context)
    held = from_record(context.state.array_records["merged-base"])
    for p, (L, R) in factors.items():  # bit-identical to the server's own apply_increment
        np.testing.assert_array_equal(
            held[p], apply_increment(dense[p], L.astype(np.float32), R.astype(np.float32))
        )
    assert context.state.config_records["merged-base-version"]["version"] == 5

    with pytest.raises(RuntimeError, match="out of sync"):  # the server believes it holds 4
        train(_merging_message(cfg, {**global_state, **updates}, 3, version=6, from_version=4), context)


def test_flora_client_trains_a_fresh_adapter_at_its_rank_and_uploads_it(hub_mirror):
    cfg = _cfg("flora", hub_mirror)
    cfg.method.client_ranks = [2, 4]
    init = trainable_state(_model(cfg, hub_mirror, 4))
    head = {k: v for k, v in init.items() if "lora" not in k}
    context = _context(1)
    uploads = []
    for server_round in (1, 2):
        reply = train(_merging_message(cfg, head, server_round, version=0, from_version=0, rank=4), context)
        uploads.append(from_wire(reply.content.array_records["arrays"]))
    for upload in uploads:
        assert set(upload) == set(init)
        assert all(v.shape[0] == 4 for k, v in upload.items() if is_lora_a(k))  # partition 1 → rank 4
    assert all(not np.allclose(uploads[0][k], uploads[1][k], atol=1e-2) for k in uploads[0] if is_lora_a(k))


def test_full_client_moves_every_targeted_weight(hub_mirror):
    cfg = _cfg("full", hub_mirror)
    init, global_state = _global(cfg, hub_mirror)
    assert set(global_state) == set(init) and any(k.endswith("query.weight") for k in init)
    reply = train(_message(cfg, global_state), _context(0))
    upload = from_wire(reply.content.array_records["arrays"])
    assert set(upload) == set(init)
    assert all(not np.array_equal(upload[k], init[k]) for k in init if k.endswith("weight"))


def test_a_node_trains_on_its_own_data_file(hub_mirror, tmp_path):
    import datasets

    from experiment_schema import ConfigError

    rows = {
        "sentence": [f"a {'good' if i % 2 else 'bad'} film number {i}" for i in range(24)],
        "label": [i % 2 for i in range(24)],
    }
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "mine.parquet"))
    cfg = _cfg("fedit", hub_mirror)
    _, global_state = _global(cfg, hub_mirror)
    context = _context(0)
    context.node_config["data-path"] = str(tmp_path / "mine.parquet")
    reply = train(_message(cfg, global_state), context)
    assert reply.content.metric_records["metrics"]["num-examples"] == 24  # its file, not partition 0
    datasets.Dataset.from_dict({"text": ["x"], "label": [0]}).to_parquet(str(tmp_path / "wrong.parquet"))
    context.node_config["data-path"] = str(tmp_path / "wrong.parquet")
    with pytest.raises(ConfigError, match=r"lacks the dataset's fields \['sentence'\]"):
        train(_message(cfg, global_state), context)


def test_a_model_with_a_merged_base_is_never_handed_to_a_rule_that_expects_it_pristine(hub_mirror):
    from finetune.state import base_weights, lora_base_layers

    fedex = _cfg("fedex_lora", hub_mirror)
    _, global_state = _global(fedex, hub_mirror)
    w0 = base_weights(_model(fedex, hub_mirror))
    sync = {p + ".base_delta": np.full(tuple(w.shape), 0.5, np.float32) for p, w in w0.items()}
    train(_merging_message(fedex, {**global_state, **sync}, 1, version=1, from_version=-1), _context(0))
    fedit = _cfg("fedit", hub_mirror)  # the same adapter in the same process, then a plain LoRA rule
    train(_message(fedit, _global(fedit, hub_mirror)[1]), _context(1))
    model = next(reversed(_SESSIONS.values())).model
    for prefix, layer in lora_base_layers(model).items():
        torch.testing.assert_close(layer.get_base_layer().weight, w0[prefix])
