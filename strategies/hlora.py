"""HLoRA (Liu et al., 2503.00813): FlexLoRA's rule computed without the dense d_out × d_in SVD.

``Σ p_k s_k B_k A_k = L R`` with ``L = [p_1 s_1 B_1 … p_K s_K B_K]``, ``R = [A_1; …; A_K]``; QR of
both sides leaves a Σr × Σr core to decompose (the NVFlare re-implementation's trick, with the
α/r scales it omits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from strategies.averaging import Weights, finite_inputs, normalize_weights
from strategies.flexlora import FlexLoRA, FlexLoRAConfig
from strategies.lowrank import SVD, Matrices, Scales, compact_svd, factors_from_svd
from strategies.ranks import RankedClient
from strategies.registry import Family, Rule, register


@dataclass
class HLoRAConfig(FlexLoRAConfig):
    name: str = "hlora"


@finite_inputs
def hlora_svd(As: Matrices, Bs: Matrices, weights: Weights, scales: Scales) -> SVD:
    """Thin SVD ``(U, S, Vt)`` of ``Σ p_k s_k B_k A_k``, of size Σ r_k."""
    p = normalize_weights(weights)
    lefts = [pk * sk * B for pk, sk, B in zip(p, scales, Bs, strict=True)]
    return compact_svd(lefts, As)


@finite_inputs
def hlora_aggregate(
    As: Matrices, Bs: Matrices, weights: Weights, scales: Scales, global_rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """FlexLoRA's global factors through the QR-compact SVD."""
    return factors_from_svd(*hlora_svd(As, Bs, weights, scales), global_rank, 1.0)


class HLoRA(FlexLoRA):
    """FlexLoRA's protocol with the QR-compact SVD (no dense d_out × d_in matrix)."""

    name = "hlora"

    def layer_aggregate(
        self, As: Matrices, Bs: Matrices, weights: np.ndarray, scales: Scales
    ) -> tuple[np.ndarray, np.ndarray]:
        return hlora_aggregate(As, Bs, weights, scales, self.global_rank)


RULE = register(
    Rule("hlora", Family.HETEROGENEOUS_RANK, "Liu et al., 2503.00813", HLoRAConfig, HLoRA, RankedClient)
)
