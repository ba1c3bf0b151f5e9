"""HetLoRA (Cho et al., EMNLP 2024, 2401.06432): clients of different ranks train the first r_k
components of a global rank-r_max LoRA; the server zero-pads their factors to r_max and averages
them with weights proportional to the norm of each client's update, ``‖s_k B_k A_k‖_F`` (times the
example weight). Inexact, by design of the paper; clients self-prune their rank."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.averaging import normalize_weights
from strategies.lowrank import pad_rank


def hetlora_weights(
    As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], weights: Sequence[float], scales: Sequence[float]
) -> np.ndarray:
    """Normalised ``p_k ‖s_k B_k A_k‖_F``; falls back to ``p_k`` when every update is zero."""
    p = normalize_weights(weights)
    norms = np.array(
        [
            sk * np.linalg.norm(B.astype(np.float64) @ A.astype(np.float64))
            for A, B, sk in zip(As, Bs, scales, strict=True)
        ]
    )
    mixed = p * norms
    return mixed / mixed.sum() if mixed.sum() > 0 else p


def hetlora_aggregate(
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    weights: Sequence[float],
    scales: Sequence[float],
    max_rank: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Global ``(A, B)`` at ``max_rank``: the norm-weighted mean of the zero-padded factors."""
    w = hetlora_weights(As, Bs, weights, scales)
    padded = [
        pad_rank(A.astype(np.float64), B.astype(np.float64), max_rank) for A, B in zip(As, Bs, strict=True)
    ]
    A_bar = sum(wk * A for wk, (A, _) in zip(w, padded, strict=True))
    B_bar = sum(wk * B for wk, (_, B) in zip(w, padded, strict=True))
    return A_bar, B_bar


def hetlora_penalty_tail(rank: int, gamma: float) -> int:
    """Index where the self-pruning regulariser's tail starts: ``ceil(γ r)``, at most r − 1."""
    return min(max(int(np.ceil(gamma * rank)), 1), rank - 1) if rank > 1 else rank
