"""The client halves of the 2025 rules, through the real ClientApp functions in process."""

import numpy as np
import pytest
import torch
from conftest import adapter_of
from flwr.app import MessageType
from test_client_protocol import _cfg, _context, _global, _message

from client_app.app import setup, train
from client_app.session import _SESSIONS
from finetune.lora import is_lora_a, is_lora_b, is_lora_latent
from finetune.models import build_model, fold_latent
from finetune.state import trainable_state
from finetune.wire import from_wire
from strategies.protocol import SETUP_MESSAGE


def _upload(reply):
    return from_wire(reply.content.array_records["arrays"])


def test_rolora_client_trains_one_factor_a_round(hub_mirror):
    cfg = _cfg("rolora", hub_mirror)
    init, global_state = _global(cfg, hub_mirror)
    global_state = {k: (v + 0.01 if is_lora_b(k) else v) for k, v in global_state.items()}  # B ≠ 0
    context = _context(0)
    odd = _upload(train(_message(cfg, global_state, server_round=1), context))
    model = next(reversed(_SESSIONS.values())).model
    after_odd = trainable_state(model)
    even = _upload(train(_message(cfg, global_state, server_round=2), context))
    after_even = trainable_state(model)
    assert not any(is_lora_a(k) for k in odd) and any(is_lora_b(k) for k in odd)
    assert not any(is_lora_b(k) for k in even) and any(is_lora_a(k) for k in even)
    assert all(np.array_equal(after_odd[k], global_state[k]) for k in init if is_lora_a(k))  # A frozen
    assert all(np.array_equal(after_even[k], global_state[k]) for k in init if is_lora_b(k))  # B frozen
    assert any(not np.array_equal(after_even[k], global_state[k]) for k in init if is_lora_a(k))


def test_fed_sb_setup_sums_the_pretrained_gradient(hub_mirror):
    # Prepare
    cfg = _cfg("fed_sb", hub_mirror)
    context = _context(0)
    message = _message(cfg, {}, kind=SETUP_MESSAGE, server_round=0)
    # Execute
    reply = setup(message, context)
    grads = _upload(reply)
    # Assert: one d_out × d_in gradient per adapted layer, equal to autograd's over the same examples
    session = next(reversed(_SESSIONS.values()))
    from finetune.state import base_layer_weight, lora_base_layers

    layers = lora_base_layers(session.model)
    assert set(grads) == {p + ".grad" for p in layers}
    data = session.partition(0)
    chosen = np.random.default_rng(cfg.seed * 1_000_003).permutation(len(data))[: cfg.method.init_samples]
    batch = session.task.collate([data[int(i)] for i in chosen])
    weights = {p: base_layer_weight(layer) for p, layer in layers.items()}
    for w in weights.values():
        w.requires_grad_(True)
    session.model.eval()
    (session.model(**batch).loss * len(chosen)).backward()  # one batch of all: the sum of gradients
    for prefix, w in weights.items():
        np.testing.assert_allclose(grads[prefix + ".grad"], w.grad.numpy(), rtol=1e-4, atol=1e-6)
        w.requires_grad_(False)
        w.grad = None


def test_fed_sb_client_keeps_A_and_B_and_uploads_r_squared(hub_mirror):
    cfg = _cfg("fed_sb", hub_mirror)
    init, global_state = _global(cfg, hub_mirror)
    context = _context(1)
    first = _upload(train(_message(cfg, global_state, server_round=1), context))
    assert set(first) == {k for k in init if is_lora_latent(k) or not (is_lora_a(k) or is_lora_b(k))}
    assert all(v.shape == (cfg.method.rank, cfg.method.rank) for k, v in first.items() if is_lora_latent(k))
    later = {k: v for k, v in global_state.items() if not (is_lora_a(k) or is_lora_b(k))}
    train(_message(cfg, later, server_round=2), context)  # R and the head only: A, B from its state
    with pytest.raises(ValueError, match="lost its fixed A and B"):
        train(_message(cfg, later, server_round=2), _context(0))  # a node that never got them


def test_a_folded_lora_sb_model_is_the_same_function_as_a_plain_lora(hub_mirror):
    cfg = _cfg("fed_sb", hub_mirror)
    model = build_model(cfg, hub_mirror, adapter_of(cfg)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    inputs = {"input_ids": torch.tensor([[101, 2023, 2003, 102]])}
    before = model(**inputs).logits
    fold_latent(model)
    assert not any(is_lora_latent(k) for k in trainable_state(model))
    torch.testing.assert_close(model(**inputs).logits, before, rtol=1e-5, atol=1e-6)


def test_setup_message_type_is_a_query_action():
    assert SETUP_MESSAGE.split(".")[0] == MessageType.QUERY
