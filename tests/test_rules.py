"""Property tests of every aggregation rule against hand-computed numpy (Prepare/Execute/Assert)."""

import numpy as np
import pytest

from finetune.lora import lora_layers
from strategies.averaging import normalize_weights
from strategies.fedex_lora import fedex_residual_factors
from strategies.fedsa_lora import fedsa_aggregate
from strategies.ffa_lora import ffa_aggregate
from strategies.flexlora import (
    flexlora_aggregate,
    flexlora_client_factors,
    flexlora_product,
    redistribution_svd,
)
from strategies.flora import flora_stack
from strategies.hetlora import hetlora_aggregate, hetlora_client_factors, hetlora_weights
from strategies.hlora import hlora_aggregate, hlora_svd
from strategies.lora_fair import cosine, lora_fair_aggregate, lora_fair_correction
from strategies.lowrank import factors_from_svd, weighted_product

D_OUT, D_IN = 12, 10


def factors(rng, ranks):
    return [rng.normal(size=(r, D_IN)) for r in ranks], [rng.normal(size=(D_OUT, r)) for r in ranks]


def mean_product(As, Bs, weights, scales=None):
    p = normalize_weights(weights)
    scales = scales or [1.0] * len(As)
    return sum(pk * sk * B @ A for pk, sk, A, B in zip(p, scales, As, Bs, strict=True))


# --- FFA-LoRA -----------------------------------------------------------------------------


def test_ffa_is_exact_with_shared_A():
    rng = np.random.default_rng(0)
    A0 = rng.normal(size=(4, D_IN))
    Bs = [rng.normal(size=(D_OUT, 4)) for _ in range(3)]
    states = [{"l.lora_B.weight": B} for B in Bs]
    B_bar = ffa_aggregate(states, [1, 2, 3])["l.lora_B.weight"]
    np.testing.assert_allclose(B_bar @ A0, mean_product([A0] * 3, Bs, [1, 2, 3]), atol=1e-12)


def test_ffa_refuses_uploads_with_A():
    with pytest.raises(ValueError, match="no lora_A"):
        ffa_aggregate([{"l.lora_A.weight": np.zeros((2, 2))}], [1])


# --- FedSA-LoRA ---------------------------------------------------------------------------


def test_fedsa_averages_A_only():
    states = [{"l.lora_A.weight": np.full((2, 3), 1.0)}, {"l.lora_A.weight": np.full((2, 3), 4.0)}]
    np.testing.assert_allclose(fedsa_aggregate(states, [2, 1])["l.lora_A.weight"], 2.0)
    with pytest.raises(ValueError, match="only lora_A"):
        fedsa_aggregate([{"l.lora_B.weight": np.zeros((2, 2))}], [1])


# --- FLoRA --------------------------------------------------------------------------------


def test_flora_stack_is_exact_for_mixed_ranks():
    rng = np.random.default_rng(1)
    As, Bs = factors(rng, [2, 4, 8])
    A_stack, B_stack = flora_stack(As, Bs, [5, 3, 2])
    assert A_stack.shape == (14, D_IN) and B_stack.shape == (D_OUT, 14)
    np.testing.assert_allclose(B_stack @ A_stack, mean_product(As, Bs, [5, 3, 2]), atol=1e-12)


# --- FedEx-LoRA ---------------------------------------------------------------------------


def fedex_dense_residual(As, Bs, weights, scale):
    """By hand: s (Σ p_k B_k A_k − B̄ Ā)."""
    p = normalize_weights(weights)
    A_bar = sum(pk * A for pk, A in zip(p, As, strict=True))
    B_bar = sum(pk * B for pk, B in zip(p, Bs, strict=True))
    return A_bar, B_bar, scale * (mean_product(As, Bs, weights) - B_bar @ A_bar)


def test_fedex_base_plus_mean_product_is_exact():
    rng = np.random.default_rng(2)
    As, Bs = factors(rng, [4, 4, 4])
    W0, s = rng.normal(size=(D_OUT, D_IN)), 2.0
    A_bar, B_bar, _ = fedex_dense_residual(As, Bs, [1, 1, 2], s)
    L, R = fedex_residual_factors(As, Bs, [1, 1, 2], s)
    np.testing.assert_allclose(
        W0 + L @ R + s * B_bar @ A_bar, W0 + s * mean_product(As, Bs, [1, 1, 2]), atol=1e-12
    )
    assert np.linalg.norm(L @ R) > 1e-3  # FedIT alone would be off by this much


def test_fedex_low_rank_residual_factors_are_exact():
    rng = np.random.default_rng(4)
    As, Bs = factors(rng, [2, 2, 2])
    _, _, dense = fedex_dense_residual(As, Bs, [3, 1, 1], 1.5)
    L, R = fedex_residual_factors(As, Bs, [3, 1, 1], 1.5)
    assert L.shape == (D_OUT, 6) and R.shape == (6, D_IN)  # K r
    np.testing.assert_allclose(L @ R, dense, atol=1e-12)


def test_fedex_residual_vanishes_when_clients_share_A():
    rng = np.random.default_rng(14)
    As, Bs = factors(rng, [3, 3, 3])
    shared = [As[0]] * 3
    L, R = fedex_residual_factors(shared, Bs, [1, 2, 3], 2.0)
    assert np.abs(L @ R).max() < 1e-12  # FedIT is exact here, so FedEx adds nothing


# --- FlexLoRA / HLoRA ---------------------------------------------------------------------


def test_flexlora_server_product_is_exact_with_scales():
    rng = np.random.default_rng(5)
    As, Bs = factors(rng, [2, 4])
    scales = [16 / 2, 16 / 4]
    np.testing.assert_allclose(
        flexlora_product(As, Bs, [1, 3], scales), mean_product(As, Bs, [1, 3], scales), atol=1e-12
    )


def eckart_young(delta, rank):
    """By hand: the best rank-r approximation of ``delta``."""
    U, S, Vt = np.linalg.svd(delta)
    return (U[:, :rank] * S[:rank]) @ Vt[:rank]


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_flexlora_client_factors_are_the_truncated_svd(rank):
    # Prepare: global factors holding the exact mean update (rank 9 = Σ r_k)
    rng = np.random.default_rng(6)
    As, Bs = factors(rng, [2, 3, 4])
    weights, scales = [1, 1, 1], [8.0, 16 / 3, 4.0]
    A_g, B_g = flexlora_aggregate(As, Bs, weights, scales, global_rank=9)
    scale = 16 / rank
    # Execute: what the strategy hands a client of this rank
    A, B = flexlora_client_factors(redistribution_svd(A_g, B_g), rank, scale)
    # Assert
    delta = mean_product(As, Bs, weights, scales)
    np.testing.assert_allclose(B_g @ A_g, delta, atol=1e-10)
    np.testing.assert_allclose(scale * B @ A, eckart_young(delta, rank), atol=1e-10)
    np.testing.assert_allclose(A @ A.T, np.eye(rank), atol=1e-10)  # singular values live in B


def test_flexlora_is_exact_when_rank_covers_all_clients():
    rng = np.random.default_rng(7)
    As, Bs = factors(rng, [2, 2, 2])
    A_g, B_g = flexlora_aggregate(As, Bs, [1, 2, 3], [1.0, 1.0, 1.0], global_rank=6)  # r >= Σ r_k
    np.testing.assert_allclose(B_g @ A_g, mean_product(As, Bs, [1, 2, 3]), atol=1e-10)
    A_4, B_4 = flexlora_aggregate(As, Bs, [1, 2, 3], [1.0, 1.0, 1.0], global_rank=4)  # truncated
    np.testing.assert_allclose(B_4 @ A_4, eckart_young(mean_product(As, Bs, [1, 2, 3]), 4), atol=1e-10)


def test_hlora_qr_path_equals_dense_svd():
    rng = np.random.default_rng(8)
    As, Bs = factors(rng, [2, 3, 4])
    weights, scales = [4, 2, 1], [8.0, 16 / 3, 4.0]
    dense = flexlora_product(As, Bs, weights, scales)
    U, S, Vt = hlora_svd(As, Bs, weights, scales)
    np.testing.assert_allclose((U * S) @ Vt, dense, atol=1e-10)
    np.testing.assert_allclose(S, np.linalg.svd(dense, compute_uv=False)[: len(S)], atol=1e-10)
    for rank in (1, 3, 5, 9):
        A_q, B_q = hlora_aggregate(As, Bs, weights, scales, rank)
        A_d, B_d = flexlora_aggregate(As, Bs, weights, scales, rank)
        np.testing.assert_allclose(B_q @ A_q, B_d @ A_d, atol=1e-10)
        np.testing.assert_allclose(B_q @ A_q, eckart_young(dense, rank), atol=1e-10)


def test_truncation_pads_ranks_beyond_the_matrix():
    A, B = factors_from_svd(*np.linalg.svd(np.eye(3)), 5, 1.0)
    assert A.shape == (5, 3) and B.shape == (3, 5)
    np.testing.assert_allclose(B @ A, np.eye(3), atol=1e-12)


# --- HetLoRA ------------------------------------------------------------------------------


def test_hetlora_pads_and_norm_weights():
    # Prepare: client 1 rank 1 with ‖BA‖ = 1, client 2 rank 2 with ‖BA‖ = 3, equal examples
    A1, B1 = np.array([[1.0, 0.0]]), np.array([[1.0], [0.0]])
    A2, B2 = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[3.0, 0.0], [0.0, 0.0]])
    # Execute
    w = hetlora_weights([A1, A2], [B1, B2], [1, 1], [1.0, 1.0])
    A_bar, B_bar = hetlora_aggregate([A1, A2], [B1, B2], [1, 1], [1.0, 1.0], max_rank=2)
    # Assert: weights 1/4, 3/4; rank-1 client padded with zeros
    np.testing.assert_allclose(w, [0.25, 0.75])
    np.testing.assert_allclose(A_bar, [[1.0, 0.0], [0.0, 0.75]])
    np.testing.assert_allclose(B_bar, [[0.25 + 2.25, 0.0], [0.0, 0.0]])


def test_hetlora_scales_uploads_to_unit_scale_and_hands_out_truncations():
    # Prepare: clients at rank 1 (s = 2) and rank 2 (s = 1), both with B A = the same matrix
    A1, B1 = np.array([[1.0, 0.0]]), np.array([[0.5], [0.0]])  # s B A = [[1, 0], [0, 0]]
    A2, B2 = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 0.0]])
    # Execute
    A_g, B_g = hetlora_aggregate([A1, A2], [B1, B2], [1, 1], [2.0, 1.0], max_rank=2)
    A_r1, B_r1 = hetlora_client_factors(A_g, B_g, 1, 2.0)
    # Assert: equal norms -> equal weights; the global product is unit scale; a rank-1 client
    # gets the first component divided by its scale
    np.testing.assert_allclose(B_g @ A_g, [[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(A_r1, A_g[:1])
    np.testing.assert_allclose(2.0 * B_r1, B_g[:, :1])


# --- LoRA-FAIR ----------------------------------------------------------------------------


def test_lora_fair_never_lowers_cosine_and_keeps_correction_small():
    rng = np.random.default_rng(9)
    for trial in range(5):
        As, Bs = factors(rng, [4, 4, 4])
        weights = rng.integers(1, 10, 3).tolist()
        p = normalize_weights(weights)
        A_bar = sum(pk * A for pk, A in zip(p, As, strict=True))
        B_bar = sum(pk * B for pk, B in zip(p, Bs, strict=True))
        ideal = weighted_product(As, Bs, p)
        _, B_fair = lora_fair_aggregate(As, Bs, weights)
        before, after = cosine(ideal, B_bar @ A_bar), cosine(ideal, B_fair @ A_bar)
        assert after >= before - 1e-12, trial
        assert after > before + 1e-4, trial  # and it does improve generic cases
        assert np.linalg.norm(B_fair - B_bar) < np.linalg.norm(B_bar), trial


def test_lora_fair_factored_correction_follows_the_dense_one():
    """The aggregate's factored correction (no d_out × d_in matrix) against the dense reference."""
    from strategies.lora_fair import lora_fair_correction_factored

    rng = np.random.default_rng(11)
    for trial in range(5):
        As, Bs = factors(rng, [4, 4, 4])
        p = normalize_weights(rng.integers(1, 10, 3).tolist())
        A_bar = sum(pk * A for pk, A in zip(p, As, strict=True))
        B_bar = sum(pk * B for pk, B in zip(p, Bs, strict=True))
        dense = lora_fair_correction(A_bar, B_bar, weighted_product(As, Bs, p))
        factored = lora_fair_correction_factored(A_bar, B_bar, As, Bs, p)
        assert np.abs(dense).max() > 1e-3, trial  # a real correction, not two zeros
        np.testing.assert_allclose(factored, dense, rtol=1e-7, atol=1e-10, err_msg=str(trial))


def test_lora_fair_correction_is_zero_when_fedit_is_already_ideal():
    rng = np.random.default_rng(10)
    A = rng.normal(size=(4, D_IN))
    B = rng.normal(size=(D_OUT, 4))
    np.testing.assert_allclose(lora_fair_correction(A, B, B @ A), 0.0, atol=1e-8)


# --- bookkeeping --------------------------------------------------------------------------


def test_lora_layers_pairs_factors():
    keys = ["x.q.lora_A.weight", "x.q.lora_B.weight", "x.v.lora_A.weight", "x.v.lora_B.weight", "head.weight"]
    assert lora_layers(keys) == {
        "x.q": ("x.q.lora_A.weight", "x.q.lora_B.weight"),
        "x.v": ("x.v.lora_A.weight", "x.v.lora_B.weight"),
    }
    with pytest.raises(ValueError, match="no matching"):
        lora_layers(["x.q.lora_A.weight"])


# --- non-finite input -----------------------------------------------------------------------


def _bad(kind):
    rng = np.random.default_rng(20)
    As, Bs = factors(rng, [2, 3])
    As[1] = As[1].copy()
    As[1][0, 0] = np.inf if kind == "inf" else np.nan
    return As, Bs


@pytest.mark.parametrize("kind", ["inf", "nan"])
def test_every_pure_rule_refuses_non_finite_input(kind):
    from strategies.fed_sb import fed_sb_initialize
    from strategies.fedit import fedit_aggregate
    from strategies.fedsvd import fedsvd_refactor
    from strategies.flexlora import flexlora_aggregate

    As, Bs = _bad(kind)
    states = [{"w": As[0]}, {"w": np.full_like(As[0], np.inf if kind == "inf" else np.nan)}]
    calls = {
        "fedit": lambda: fedit_aggregate(states, [1, 1]),
        "ffa": lambda: ffa_aggregate(
            [{"l.lora_B.weight": Bs[0]}, {"l.lora_B.weight": Bs[0] * np.nan}], [1, 1]
        ),
        "fedsa": lambda: fedsa_aggregate(
            [{"l.lora_A.weight": As[0]}, {"l.lora_A.weight": As[0] + np.inf}], [1, 1]
        ),
        "flexlora (its dense SVD would never return)": lambda: flexlora_aggregate(
            As, Bs, [1, 1], [1.0, 1.0], 5
        ),
        "hlora": lambda: hlora_svd(As, Bs, [1, 1], [1.0, 1.0]),
        "hetlora (a NaN would re-weight every client)": lambda: hetlora_weights(As, Bs, [1, 1], [1.0, 1.0]),
        "hetlora aggregate": lambda: hetlora_aggregate(As, Bs, [1, 1], [1.0, 1.0], 3),
        "flora": lambda: flora_stack(As, Bs, [1, 1]),
        "fedex": lambda: fedex_residual_factors([As[1], As[1]], [Bs[1][:, :3], Bs[1][:, :3]], [1, 1], 1.0),
        "lora_fair": lambda: lora_fair_aggregate([As[1], As[1]], [Bs[1], Bs[1]], [1, 1]),
        "fedsvd": lambda: fedsvd_refactor(As[1], Bs[1]),
        "fed_sb": lambda: fed_sb_initialize(As[1], 2, 1e-3, 1.0),
        "weighted_product": lambda: weighted_product(As, Bs, [0.5, 0.5]),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="NaN or Inf"):
            call()
            pytest.fail(name)


def test_an_svd_that_gesdd_cannot_converge_on_falls_back_to_gesvd(monkeypatch):
    from strategies import lowrank

    matrix = np.random.default_rng(0).normal(size=(12, 7))
    expected = np.linalg.svd(matrix, full_matrices=False)
    assert all(np.array_equal(a, b) for a, b in zip(lowrank.thin_svd(matrix), expected, strict=True))

    def no_convergence(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(lowrank.np.linalg, "svd", no_convergence)
    U, S, Vt = lowrank.thin_svd(matrix)
    assert np.allclose((U * S) @ Vt, matrix) and np.allclose(S, expected[1])
