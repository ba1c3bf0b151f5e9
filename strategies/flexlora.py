"""FlexLoRA (Bai et al., NeurIPS 2024, 2402.11505): clients of different ranks; the server forms
the exact mean update ``ΔW = Σ p_k s_k B_k A_k`` and hands each client the best rank-r_k
approximation of it (SVD; singular values in B; divided by the receiver's scale s = α/r).

The released code never resizes clients to their ranks and ignores α/r; both are honoured here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.averaging import normalize_weights
from strategies.lowrank import truncated_factors, weighted_product


def flexlora_product(
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    weights: Sequence[float],
    scales: Sequence[float],
) -> np.ndarray:
    """The server's dense mean update ``Σ p_k s_k B_k A_k`` (d_out × d_in)."""
    p = normalize_weights(weights)
    return weighted_product(As, Bs, [pk * sk for pk, sk in zip(p, scales, strict=True)])


def flexlora_client_factors(delta: np.ndarray, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Client factors ``(A, B)``: ``scale · B A`` is the rank-``rank`` truncated SVD of ``delta``."""
    return truncated_factors(delta, rank, scale)
