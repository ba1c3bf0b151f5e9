"""FRLoRA: the principal (PiSSA) init leaves the model unchanged, each round's update
s(B̄Ā − B0A0) is merged into every client's base exactly, and every client restarts at (A0, B0)."""

import numpy as np
import pytest
import torch
from fakes import engine
from test_strategies_merging import (
    A_KEY,
    ALPHA,
    B_KEY,
    DELTA,
    HEAD,
    PREFIX,
    RANK,
    Clients,
    run_rounds,
    trainable,
)

from experiment_schema import ConfigError, compose_config
from finetune.models import build_base_model, build_model, lora_base_layers
from finetune.spec import AdapterSpec
from strategies.frlora import FRLoRA, FRLoRAConfig, frlora_increment


def test_the_principal_init_holds_the_top_singular_part_and_leaves_the_model_unchanged(tiny_cfg, hub_mirror):
    rank, alpha = 4, 8.0
    scale = alpha / rank
    pretrained = dict(build_base_model(tiny_cfg, hub_mirror).named_parameters())
    model = build_model(tiny_cfg, hub_mirror, AdapterSpec(rank=rank, alpha=alpha, init="principal"))
    layers = lora_base_layers(model)
    assert layers
    for prefix, layer in layers.items():
        W = pretrained[prefix.removeprefix("base_model.model.") + ".weight"]
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        principal = scale * (B @ A)
        residual = layer.get_base_layer().weight
        torch.testing.assert_close(residual + principal, W, atol=1e-5, rtol=1e-5)  # the model is unchanged
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        truncated = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        torch.testing.assert_close(principal.double(), truncated, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(B, torch.zeros_like(B))  # not peft's zero-B init


def test_the_increment_is_the_round_update_as_rank_2r_factors():
    rng = np.random.default_rng(0)
    A_bar, A0 = rng.normal(size=(2, RANK, 12))
    B_bar, B0 = rng.normal(size=(2, 16, RANK))
    L, R = frlora_increment(A_bar, B_bar, A0, B0, 2.0)
    assert L.shape == (16, 2 * RANK) and R.shape == (2 * RANK, 12)
    np.testing.assert_allclose(L @ R, 2.0 * (B_bar @ A_bar - B0 @ A0), atol=1e-12)


def test_each_round_merges_its_update_and_every_client_restarts_at_the_principal_init():
    clients = Clients({1: RANK, 2: RANK, 3: RANK})
    strategy = engine(FRLoRA, FRLoRAConfig(rank=RANK, alpha=ALPHA), min_train_nodes=3)
    initial = trainable()
    initial[B_KEY] = np.random.default_rng(1).normal(size=initial[B_KEY].shape).astype(np.float32)  # B0 ≠ 0
    A0, B0 = initial[A_KEY].astype(np.float64), initial[B_KEY].astype(np.float64)
    final = run_rounds(strategy, clients, strategy.initial_state(initial), rounds=2)
    assert np.array_equal(final[A_KEY], initial[A_KEY]) and np.array_equal(final[B_KEY], initial[B_KEY])
    p = {n: s / sum(clients.sizes.values()) for n, s in clients.sizes.items()}
    expected = np.zeros_like(final[DELTA], dtype=np.float64)
    for server_round in (1, 2):
        uploads = {n: upload(n, server_round) for n in p}
        A_bar = sum(p[n] * uploads[n][0] for n in p)
        B_bar = sum(p[n] * uploads[n][1] for n in p)
        expected += ALPHA / RANK * (B_bar @ A_bar - B0 @ A0)
    np.testing.assert_allclose(final[DELTA], expected, atol=1e-4)
    np.testing.assert_allclose(final[HEAD], (1 * 10 + 2 * 20 + 3 * 30) / 60, rtol=1e-6)
    trained_on = [(v, d) for _, v, d in clients.seen_bases if v > 0]
    assert trained_on and all(np.array_equal(d, clients.server_deltas[v][PREFIX]) for v, d in trained_on)


def upload(node, server_round):
    """The factors ``Clients`` answers with (seeded per node and round), in float64."""
    rng = np.random.default_rng([node, server_round])
    A = rng.normal(size=(RANK, 12)).astype(np.float32)
    B = rng.normal(size=(16, RANK)).astype(np.float32)
    return A.astype(np.float64), B.astype(np.float64)


def test_frlora_refuses_a_quantized_base():
    with pytest.raises(ConfigError, match="frlora starts LoRA at the principal"):
        compose_config({"method": "frlora", "model": "tiny_llama"}, ["model.quantization=nf4"])
