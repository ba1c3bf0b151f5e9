"""LoRA bookkeeping and low-rank linear algebra shared by the heterogeneous-rank rules.

PEFT layout for an ``nn.Linear`` with weight ``W0 ∈ R^{d_out×d_in}``: ``A = lora_A ∈ R^{r×d_in}``,
``B = lora_B ∈ R^{d_out×r}``, forward ``W0 x + s·B A x`` with ``s = alpha / r``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
BASE_DELTA_SUFFIX = ".base_delta"  # a merged update of a layer's frozen weight, d_out × d_in


def is_lora_a(key: str) -> bool:
    return key.endswith(LORA_A_SUFFIX)


def is_lora_b(key: str) -> bool:
    return key.endswith(LORA_B_SUFFIX)


def is_lora(key: str) -> bool:
    return is_lora_a(key) or is_lora_b(key)


def is_base_delta(key: str) -> bool:
    return key.endswith(BASE_DELTA_SUFFIX)


def lora_layers(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``prefix -> (A key, B key)`` for every adapted layer; both factors must be present."""
    keys = set(keys)
    layers = {}
    for key in sorted(keys):
        if is_lora_a(key):
            prefix = key[: -len(LORA_A_SUFFIX)]
            b_key = prefix + LORA_B_SUFFIX
            if b_key not in keys:
                raise ValueError(f"{key} has no matching {b_key}")
            layers[prefix] = (key, b_key)
    orphans = [k for k in keys if is_lora_b(k) and k[: -len(LORA_B_SUFFIX)] not in layers]
    if orphans:
        raise ValueError(f"lora_B without lora_A: {orphans[:3]}")
    return layers


def lora_scale(alpha: float, rank: int) -> float:
    return alpha / rank


def weighted_product(
    As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], coefficients: Sequence[float]
) -> np.ndarray:
    """Dense ``Σ_k c_k B_k A_k`` (d_out × d_in), in float64."""
    out = np.zeros((Bs[0].shape[0], As[0].shape[1]), dtype=np.float64)
    for c, A, B in zip(coefficients, As, Bs, strict=True):
        out += c * (B.astype(np.float64) @ A.astype(np.float64))
    return out


def truncated_factors(delta: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` factors ``(A, B)`` with ``scale·B A`` = the best rank-r approximation of
    ``delta`` (Eckart–Young). Singular values go into B; A has orthonormal rows. Ranks beyond
    ``min(delta.shape)`` are zero-padded."""
    U, S, Vt = np.linalg.svd(delta, full_matrices=False)
    return factors_from_svd(U, S, Vt, rank, scale)


def factors_from_svd(
    U: np.ndarray, S: np.ndarray, Vt: np.ndarray, rank: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B) = (Vt[:r], U[:, :r] S[:r] / scale)``, zero-padded when r exceeds the SVD's size."""
    d_out, d_in = U.shape[0], Vt.shape[1]
    A = np.zeros((rank, d_in), dtype=np.float64)
    B = np.zeros((d_out, rank), dtype=np.float64)
    k = min(rank, len(S))
    A[:k] = Vt[:k]
    B[:, :k] = U[:, :k] * S[:k] / scale
    return A, B


def compact_svd(
    lefts: Sequence[np.ndarray], rights: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``U S Vt`` of ``Σ_k L_k R_k`` without forming the dense d_out × d_in matrix.

    ``L = [L_1 … L_K]`` (d_out × Σr) and ``R = [R_1; …; R_K]`` (Σr × d_in) are QR-factorised,
    ``L R = Q_L (R_L R_Rᵀ) Q_Rᵀ``, and only the small Σr × Σr core is decomposed (the HLoRA /
    NVFlare trick): O((d_in + d_out)(Σr)²) instead of O(d_out d_in min(d_out, d_in)).
    """
    L = np.concatenate([np.asarray(x, np.float64) for x in lefts], axis=1)
    R = np.concatenate([np.asarray(x, np.float64) for x in rights], axis=0)
    q_left, r_left = np.linalg.qr(L)
    q_right, r_right = np.linalg.qr(R.T)
    u, s, vt = np.linalg.svd(r_left @ r_right.T)
    return q_left @ u, s, vt @ q_right.T


def pad_rank(A: np.ndarray, B: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad factors to ``rank`` (A gains rows, B gains columns)."""
    r = A.shape[0]
    if r > rank:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    return np.pad(A, ((0, rank - r), (0, 0))), np.pad(B, ((0, 0), (0, rank - r)))


def split_state(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(LoRA factors, everything else)`` — the second part (heads) is averaged plainly."""
    lora = {k: v for k, v in state.items() if is_lora(k)}
    return lora, {k: v for k, v in state.items() if not is_lora(k)}


def split_base_deltas(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(trainable state, {layer prefix: base delta})`` of a global state."""
    deltas = {k[: -len(BASE_DELTA_SUFFIX)]: v for k, v in state.items() if is_base_delta(k)}
    return {k: v for k, v in state.items() if not is_base_delta(k)}, deltas
