"""FedProx: the proximal term by hand, μ = 0 is FedIT exactly, a larger μ keeps clients closer to the
global model, and DP is refused (the walkthrough's example rule, docs/adding-a-rule.md)."""

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES
from test_client_protocol import _context, _global, _message

from client_app.app import train
from experiment_schema import ConfigError, compose_config
from finetune.wire import from_wire
from strategies.fedprox import FedProx, proximal_term


def test_proximal_term_is_half_mu_times_the_squared_distance():
    # Prepare
    anchor = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    params = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([[3.0]]), "frozen": torch.tensor([9.0])}
    # Execute
    term = proximal_term(params, anchor, mu=0.1)
    # Assert: 0.05 * ((1 + 4) + 9); parameters without an anchor do not count
    assert float(term) == pytest.approx(0.05 * 14)


def test_the_server_averages_like_fedit():
    states = [{"w": np.full(3, 1.0, np.float32)}, {"w": np.full(3, 4.0, np.float32)}]
    np.testing.assert_allclose(FedProx.rule(states, [2, 1])["w"], 2.0)


def _upload(method, hub_mirror, *overrides):
    """The global state a client of ``method`` received and what it uploaded after one round."""
    cfg = compose_config({"model": "tiny_bert", "method": method}, [*TINY_OVERRIDES, *overrides])
    cfg.hub_mirror = str(hub_mirror)
    _, global_state = _global(cfg, hub_mirror)
    reply = train(_message(cfg, global_state), _context(0))
    return global_state, from_wire(reply.content.array_records["arrays"])


def test_mu_zero_is_fedit_and_a_large_mu_stays_near_the_global_model(hub_mirror):
    _, fedit = _upload("fedit", hub_mirror)
    global_state, free = _upload("fedprox", hub_mirror, "method.proximal_mu=0")
    _, held = _upload("fedprox", hub_mirror, "method.proximal_mu=50")
    assert all(np.array_equal(fedit[k], free[k]) for k in fedit)  # the same seeded training

    def drift(upload):
        return sum(float(np.sum((upload[k] - global_state[k]) ** 2)) for k in global_state)

    assert drift(held) < 0.9 * drift(free)


def test_dp_is_refused_before_training():
    with pytest.raises(ConfigError, match="proximal term is not per-sample"):
        compose_config({"method": "fedprox"}, ["privacy.enabled=true", "privacy.noise_multiplier=1"])
