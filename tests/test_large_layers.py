"""Aggregation at LLM layer sizes: dense d_out × d_in matrices only where a rule needs one, in
float32 above ``LARGE_LAYER_ENTRIES``; the factored shortcuts equal the dense formulas."""

import numpy as np
import pytest

from strategies.flexlora import flexlora_product
from strategies.hetlora import hetlora_weights
from strategies.hlora import hlora_aggregate
from strategies.lowrank import LARGE_LAYER_ENTRIES, dense_dtype, product_norm, top_singular_triplets
from strategies.merging import apply_increment

LARGE = (2048, 2049)  # just above the threshold


def _factors(rng, d_out, d_in, rank, clients=2):
    As = [rng.normal(size=(rank, d_in)).astype(np.float32) for _ in range(clients)]
    Bs = [rng.normal(size=(d_out, rank)).astype(np.float32) for _ in range(clients)]
    return As, Bs


def test_dense_matrices_are_float64_for_small_layers_and_float32_for_large_ones():
    assert LARGE[0] * LARGE[1] > LARGE_LAYER_ENTRIES >= 2048 * 2048
    assert dense_dtype(2048, 2048) is np.float64 and dense_dtype(*LARGE) is np.float32
    rng = np.random.default_rng(0)
    As, Bs = _factors(rng, *LARGE, rank=4)
    product = flexlora_product(As, Bs, [1, 3], [2.0, 2.0])
    assert product.dtype == np.float32
    B64 = [B.astype(np.float64) for B in Bs]
    expected = 0.5 * (B64[0] @ As[0]) + 1.5 * (B64[1] @ As[1])
    np.testing.assert_allclose(product, expected, rtol=1e-4, atol=1e-4)
    small = flexlora_product([a[:, :10] for a in As], [b[:12] for b in Bs], [1, 3], [2.0, 2.0])
    assert small.dtype == np.float64


def test_apply_increment_on_a_large_layer_keeps_float32_accuracy():
    rng = np.random.default_rng(1)
    delta = rng.normal(size=LARGE).astype(np.float32)
    L, R = rng.normal(size=(LARGE[0], 8)), rng.normal(size=(8, LARGE[1]))
    merged = apply_increment(delta, L, R)
    assert merged.dtype == np.float32
    np.testing.assert_allclose(merged, delta + L @ R, rtol=1e-5, atol=1e-4)


def test_hetlora_norms_come_from_gram_matrices_without_the_product():
    rng = np.random.default_rng(2)
    for d_out, d_in, rank in [(12, 10, 3), (64, 48, 8), (5, 7, 9)]:  # the last: rank above both sides
        A, B = rng.normal(size=(rank, d_in)), rng.normal(size=(d_out, rank))
        assert product_norm(A, B) == pytest.approx(np.linalg.norm(B @ A), rel=1e-12)
    assert product_norm(np.zeros((2, 3)), rng.normal(size=(4, 2))) == 0.0
    As, Bs = _factors(rng, 12, 10, 3)
    dense = np.array([np.linalg.norm(B.astype(np.float64) @ A) for A, B in zip(As, Bs, strict=True)])
    np.testing.assert_allclose(hetlora_weights(As, Bs, [1, 1], [1.0, 1.0]), dense / dense.sum(), rtol=1e-12)


def test_truncated_svd_of_a_large_matrix_finds_its_leading_triplets():
    rng = np.random.default_rng(3)
    (d_out, d_in), rank = LARGE, 6
    U0 = np.linalg.qr(rng.normal(size=(d_out, rank)))[0]
    V0 = np.linalg.qr(rng.normal(size=(d_in, rank)))[0]
    S0 = np.array([9.0, 7.0, 5.0, 3.0, 2.0, 1.0])
    matrix = ((U0 * S0) @ V0.T).astype(np.float32)
    U, S, Vt = top_singular_triplets(matrix, 4)
    np.testing.assert_allclose(S, S0[:4], rtol=1e-4)
    np.testing.assert_allclose((U * S) @ Vt, (U0[:, :4] * S0[:4]) @ V0[:, :4].T, atol=1e-4)
    small = rng.normal(size=(12, 10))
    U, S, Vt = top_singular_triplets(small, 3)
    np.testing.assert_allclose(S, np.linalg.svd(small, compute_uv=False)[:3], rtol=1e-12)


def test_hlora_never_forms_the_dense_matrix_yet_matches_it():
    import tracemalloc

    rng = np.random.default_rng(4)
    (d_out, d_in), clients = (1024, 1536), 3
    As, Bs = _factors(rng, d_out, d_in, 4, clients)
    tracemalloc.start()  # numpy reports its array buffers to tracemalloc
    try:
        A_g, B_g = hlora_aggregate(As, Bs, [1, 2, 3], [1.0] * clients, global_rank=12)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dense = d_out * d_in * 4  # one d_out × d_in matrix in float32 (6 MB here)
    assert peak < dense / 4, f"peak {peak / 1e6:.2f} MB: a dense matrix (or a large part of one) was formed"
    np.testing.assert_allclose(B_g @ A_g, flexlora_product(As, Bs, [1, 2, 3], [1.0] * 3), atol=1e-9)
