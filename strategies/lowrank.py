"""Low-rank linear algebra shared by the rules (factors in PEFT layout: ``A`` is r × d_in, ``B`` is
d_out × r; see ``finetune/lora.py``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from strategies.averaging import Weights, finite_inputs

log = logging.getLogger(__name__)
SVD = tuple[np.ndarray, np.ndarray, np.ndarray]  # (U, S, Vt)
Matrices = Sequence[np.ndarray]  # one LoRA factor per client (all A, or all B, of a layer)
Scales = Sequence[float]  # each client's LoRA scale alpha / r_k
# Dense d_out × d_in matrices above this many entries (a 2048 × 2048 layer) are formed in float32:
# a 4096² float64 matrix is 134 MB per layer and per copy; small layers keep float64's exactness.
LARGE_LAYER_ENTRIES = 1 << 22


def dense_dtype(d_out: int, d_in: int) -> type[np.floating]:
    """The dtype a rule forms a dense d_out × d_in matrix in: float64, float32 for large layers."""
    return np.float64 if d_out * d_in <= LARGE_LAYER_ENTRIES else np.float32


@finite_inputs
def weighted_product(As: Matrices, Bs: Matrices, coefficients: Weights) -> np.ndarray:
    """Dense ``Σ_k c_k B_k A_k`` (d_out × d_in), in float64 (float32 for large layers)."""
    dtype = dense_dtype(Bs[0].shape[0], As[0].shape[1])
    out = np.zeros((Bs[0].shape[0], As[0].shape[1]), dtype=dtype)
    for c, A, B in zip(coefficients, As, Bs, strict=True):
        out += dtype(c) * (B.astype(dtype) @ A.astype(dtype))
    return out


@finite_inputs
def product_norm(A: np.ndarray, B: np.ndarray) -> float:
    """``‖B A‖_F`` from r × r Gram matrices, without forming B A: ``‖BA‖² = Σ (BᵀB) ∘ (AAᵀ)``."""
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    return float(np.sqrt(max(float(((B64.T @ B64) * (A64 @ A64.T)).sum()), 0.0)))


@finite_inputs
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


@finite_inputs
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
    u, s, vt = thin_svd(r_left @ r_right.T)
    return q_left @ u, s, vt @ q_right.T


def thin_svd(matrix: np.ndarray) -> SVD:
    """``U S Vt`` of ``matrix`` (thin): LAPACK's divide-and-conquer ``gesdd`` (numpy's), and where
    that does not converge on a finite matrix — it can fail where the slower QR-iteration ``gesvd``
    succeeds — ``gesvd``. Matrices it decomposes give the same result as before, bit for bit."""
    try:
        return tuple(np.linalg.svd(matrix, full_matrices=False))  # type: ignore[return-value]
    except np.linalg.LinAlgError:
        from scipy.linalg import svd

        log.warning("SVD (gesdd) of a %s matrix did not converge; using gesvd", matrix.shape)
        return tuple(svd(matrix, full_matrices=False, lapack_driver="gesvd"))


def top_singular_triplets(matrix: np.ndarray, rank: int) -> SVD:
    """The ``rank`` largest singular triplets, largest first: a full SVD for small layers, ARPACK's
    truncated one for large ones (a full SVD of a 4096² matrix costs ~a minute per layer)."""
    if matrix.size <= LARGE_LAYER_ENTRIES or rank >= min(matrix.shape) - 1:
        U, S, Vt = thin_svd(matrix)
        return U[:, :rank], S[:rank], Vt[:rank]
    from scipy.sparse.linalg import svds

    U, S, Vt = svds(matrix, k=rank, random_state=0)
    order = np.argsort(S)[::-1]
    return U[:, order], S[order], Vt[order]


def pad_rank(A: np.ndarray, B: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad factors to ``rank`` (A gains rows, B gains columns)."""
    r = A.shape[0]
    if r > rank:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    return np.pad(A, ((0, rank - r), (0, 0))), np.pad(B, ((0, 0), (0, rank - r)))
