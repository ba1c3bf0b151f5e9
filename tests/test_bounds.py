"""Update norms measured on what a reply changes in the model, against dense computations; the
clip's bound; the outlier rule."""

import numpy as np
import pytest

from finetune.lora import LORA_A_SUFFIX, LORA_B_SUFFIX
from strategies.bounds import clip_update, outliers, update_norm

ALPHA = 16.0


def scale_of(rank: int) -> float:
    return ALPHA / rank


def factors(rng, prefix: str, rank: int, d_in: int = 7, d_out: int = 9) -> dict:
    return {
        prefix + LORA_A_SUFFIX: rng.normal(size=(rank, d_in)).astype(np.float32),
        prefix + LORA_B_SUFFIX: rng.normal(size=(d_out, rank)).astype(np.float32),
    }


def dense_squared(reference: dict, reply: dict, prefix: str) -> float:
    a, b = prefix + LORA_A_SUFFIX, prefix + LORA_B_SUFFIX
    A, B = reply.get(a, reference.get(a)), reply.get(b, reference.get(b))
    assert A is not None and B is not None
    after = scale_of(A.shape[0]) * B.astype(np.float64) @ A.astype(np.float64)
    before = 0.0
    if a in reference and b in reference:
        before = (
            scale_of(reference[a].shape[0])
            * reference[b].astype(np.float64)
            @ reference[a].astype(np.float64)
        )
    return float(np.sum((after - before) ** 2))


def test_factor_and_head_updates_match_the_dense_difference():
    rng = np.random.default_rng(0)
    reference = {**factors(rng, "q.", 4), **factors(rng, "v.", 4), "head.weight": rng.normal(size=(3, 5))}
    reply = {**factors(rng, "q.", 4), **factors(rng, "v.", 4), "head.weight": rng.normal(size=(3, 5))}
    expected = dense_squared(reference, reply, "q.") + dense_squared(reference, reply, "v.")
    expected += float(np.sum((reply["head.weight"] - reference["head.weight"]) ** 2))
    assert update_norm(reference, reply, scale_of) == pytest.approx(np.sqrt(expected), rel=1e-9)


def test_mixed_ranks_frozen_factor_and_fresh_adapter_match_the_dense_difference():
    rng = np.random.default_rng(1)
    reference = {**factors(rng, "q.", 4), **factors(rng, "v.", 4)}
    reply = {
        **factors(rng, "q.", 2),  # the node's rank differs from the reference's
        "v." + LORA_B_SUFFIX: rng.normal(size=(9, 4)).astype(np.float32),  # A frozen (FFA-LoRA)
        **factors(rng, "k.", 3),  # a layer the node started fresh (B = 0)
    }
    expected = sum(dense_squared(reference, reply, p) for p in ("q.", "v.", "k."))
    assert update_norm(reference, reply, scale_of) == pytest.approx(np.sqrt(expected), rel=1e-9)


def test_a_factor_whose_partner_stays_on_the_node_counts_as_an_array():
    rng = np.random.default_rng(2)
    a_key = "q." + LORA_A_SUFFIX
    reference, reply = {a_key: rng.normal(size=(4, 7))}, {a_key: rng.normal(size=(4, 7))}
    assert update_norm(reference, reply, scale_of) == pytest.approx(
        np.linalg.norm(reply[a_key] - reference[a_key])
    )


def test_the_dense_product_is_never_formed():
    # d × d in float64 would take 80 GB: forming it fails with a MemoryError (or takes minutes)
    rng = np.random.default_rng(3)
    d = 100_000
    reference = factors(rng, "q.", 2, d_in=d, d_out=d)
    reply = factors(rng, "q.", 2, d_in=d, d_out=d)
    assert update_norm(reference, reply, scale_of) > 0


def test_clipping_one_moving_factor_scales_its_update_exactly():
    rng = np.random.default_rng(4)
    reference = factors(rng, "q.", 4)
    b_key = "q." + LORA_B_SUFFIX
    reply = {b_key: reference[b_key] + rng.normal(size=(9, 4)).astype(np.float32)}
    norm = update_norm(reference, reply, scale_of)
    clipped, factor = clip_update(reference, reply, scale_of, norm / 10)
    assert factor == pytest.approx(0.1)
    np.testing.assert_allclose(
        clipped[b_key] - reference[b_key], 0.1 * (reply[b_key] - reference[b_key]), atol=1e-6
    )
    assert update_norm(reference, clipped, scale_of) == pytest.approx(norm / 10, rel=1e-5)


def test_clipping_two_moving_factors_ends_at_the_bound():
    rng = np.random.default_rng(5)
    reference = {**factors(rng, "q.", 4), "head.weight": rng.normal(size=(3, 5))}
    reply = {k: v + 3 * rng.normal(size=v.shape).astype(v.dtype) for k, v in reference.items()}
    norm = update_norm(reference, reply, scale_of)
    clipped, factor = clip_update(reference, reply, scale_of, norm / 100)
    assert 0 < factor < 1
    assert norm / 100 * 0.999 <= update_norm(reference, clipped, scale_of) <= norm / 100 * (1 + 1e-6)


def test_an_update_within_the_bound_is_unchanged():
    rng = np.random.default_rng(6)
    reference = factors(rng, "q.", 4)
    reply = factors(rng, "q.", 4)
    clipped, factor = clip_update(reference, reply, scale_of, 1e9)
    assert factor == 1.0
    assert all(clipped[k] is reply[k] for k in reply)


def test_outliers_are_the_norms_above_k_times_the_median():
    norms = {1: 1.0, 2: 1.1, 3: 0.9, 4: 2.9, 5: 1000.0}
    assert outliers(norms, 3.0) == {5: 1.1}
    assert outliers({1: 1.0, 2: 1.2}, 3.0) == {}
