"""FLoRA (Wang et al., NeurIPS 2024, 2409.05976): stack the clients' factors,
``A_stack = [p_1 A_1; …; p_K A_K]``, ``B_stack = [B_1 … B_K]``, so that
``B_stack A_stack = Σ p_k B_k A_k`` exactly, for any mix of ranks. Clients merge the stacked
update into their base weights and start a fresh LoRA each round."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.averaging import normalize_weights


def flora_stack(
    As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], weights: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """``(A_stack, B_stack)`` of rank Σ r_k with the client weights folded into A."""
    p = normalize_weights(weights)
    A_stack = np.concatenate([pk * A.astype(np.float64) for pk, A in zip(p, As, strict=True)], axis=0)
    B_stack = np.concatenate([B.astype(np.float64) for B in Bs], axis=1)
    return A_stack, B_stack
