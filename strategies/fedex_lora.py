"""FedEx-LoRA (Singhal et al., ACL 2025, 2410.09432): FedIT's means plus the residual
``s (Σ p_k B_k A_k − B̄ Ā)`` folded into the frozen base, so the global model is exact.

Orientation matters: for ``nn.Linear`` (PEFT layout, weight d_out × d_in) the residual is added
as is; only GPT-2's ``Conv1D`` (``fan_in_fan_out``) stores the transpose. The official GLUE code
transposes for nn.Linear too, which silently corrupts square query/value weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.averaging import normalize_weights
from strategies.lowrank import weighted_product


def fedex_residual(
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    weights: Sequence[float],
    scale: float,
    fan_in_fan_out: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(Ā, B̄, residual)`` with ``W0 + residual + s B̄ Ā = W0 + s Σ p_k B_k A_k``, the residual
    in the base weight's own layout (transposed only for ``fan_in_fan_out`` layers)."""
    p = normalize_weights(weights)
    A_bar = sum(pk * A.astype(np.float64) for pk, A in zip(p, As, strict=True))
    B_bar = sum(pk * B.astype(np.float64) for pk, B in zip(p, Bs, strict=True))
    residual = scale * (weighted_product(As, Bs, p) - B_bar @ A_bar)
    return A_bar, B_bar, residual.T if fan_in_fan_out else residual


def fedex_residual_factors(
    As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], weights: Sequence[float], scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """The residual as exact low-rank factors ``(R, L)``, ``L R = s(Σ p_k B_k A_k − B̄Ā)``, of rank
    (K+1) r: ``L = s[p_1 B_1 … p_K B_K, −B̄]``, ``R = [A_1; …; A_K; Ā]`` (nn.Linear layout)."""
    p = normalize_weights(weights)
    A_bar = sum(pk * A.astype(np.float64) for pk, A in zip(p, As, strict=True))
    B_bar = sum(pk * B.astype(np.float64) for pk, B in zip(p, Bs, strict=True))
    L = scale * np.concatenate([*(pk * B for pk, B in zip(p, Bs, strict=True)), -B_bar], axis=1)
    R = np.concatenate([*(A.astype(np.float64) for A in As), A_bar], axis=0)
    return R, L
