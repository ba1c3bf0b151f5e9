"""FedIT aggregation against hand-computed numpy (Prepare / Execute / Assert)."""

import numpy as np
import pytest

from strategies.averaging import normalize_weights, weighted_mean
from strategies.fedit import fedit_aggregate


def _product_gap(As, Bs, p):
    """Relative distance between the product of means and the mean of products."""
    A_bar = sum(pk * A for pk, A in zip(p, As, strict=True))
    B_bar = sum(pk * B for pk, B in zip(p, Bs, strict=True))
    ideal = sum(pk * B @ A for pk, A, B in zip(p, As, Bs, strict=True))
    return np.linalg.norm(B_bar @ A_bar - ideal) / np.linalg.norm(ideal)


def test_fedit_matches_hand_computed_weighted_mean():
    # Prepare: two clients, 1 and 3 examples -> p = (0.25, 0.75)
    states = [
        {"lora_A": np.array([[1.0, 2.0]], np.float32), "lora_B": np.array([[4.0], [0.0]], np.float32)},
        {"lora_A": np.array([[5.0, -2.0]], np.float32), "lora_B": np.array([[0.0], [8.0]], np.float32)},
    ]
    # Execute
    out = fedit_aggregate(states, [1, 3])
    # Assert: 0.25*[1,2] + 0.75*[5,-2] = [4, -1]; 0.25*[4,0] + 0.75*[0,8] = [1, 6]
    np.testing.assert_allclose(out["lora_A"], [[4.0, -1.0]])
    np.testing.assert_allclose(out["lora_B"], [[1.0], [6.0]])
    assert out["lora_A"].dtype == np.float32


def test_uniform_weighting_is_plain_mean():
    states = [{"w": np.array([0.0, 2.0])}, {"w": np.array([4.0, 6.0])}]
    np.testing.assert_allclose(fedit_aggregate(states, [1.0, 1.0])["w"], [2.0, 4.0])


def test_fedit_is_inexact_for_generic_factors():
    rng = np.random.default_rng(0)
    As = [rng.normal(size=(4, 16)) for _ in range(3)]
    Bs = [rng.normal(size=(12, 4)) for _ in range(3)]
    p = normalize_weights([10, 20, 30])
    assert _product_gap(As, Bs, p) > 0.1


def test_fedit_is_exact_when_all_clients_share_A():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(4, 16))
    Bs = [rng.normal(size=(12, 4)) for _ in range(3)]
    states = [{"A": A, "B": B} for B in Bs]
    p = normalize_weights([5, 1, 4])
    out = fedit_aggregate(states, [5, 1, 4])
    ideal = sum(pk * B @ A for pk, B in zip(p, Bs, strict=True))
    np.testing.assert_allclose(out["B"] @ out["A"], ideal, rtol=1e-12, atol=1e-12)


def test_single_client_returns_its_state():
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    np.testing.assert_array_equal(fedit_aggregate([state], [7])["w"], state["w"])


@pytest.mark.parametrize("weights", [[], [0, 0], [1, -1], [1, float("nan")]])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError):
        normalize_weights(weights)


def test_mismatched_states_are_refused():
    with pytest.raises(ValueError, match="different keys"):
        weighted_mean([{"a": np.zeros(2)}, {"b": np.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        weighted_mean([{"a": np.zeros(2)}, {"a": np.zeros(3)}], [1, 1])
