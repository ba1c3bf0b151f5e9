"""FedEx-LoRA (Singhal et al., ACL 2025, 2410.09432): FedIT's means plus the residual
``s (Σ p_k B_k A_k − B̄ Ā)`` folded into the frozen base, so the global model is exact.

Orientation matters: the residual is kept in the math layout ``d_out × d_in`` of ``B A`` and added
as is to an ``nn.Linear`` weight; only GPT-2's ``Conv1D`` (``fan_in_fan_out``) stores the transpose
(``finetune.state.set_base_deltas`` transposes there). The official GLUE code transposes for
nn.Linear too, which silently corrupts square query/value weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune.lora import lora_layers, lora_scale
from strategies.averaging import Weights, finite_inputs, normalize_weights, weighted_mean
from strategies.lowrank import Matrices
from strategies.merging import BaseMergingStrategy, Factors, MergedBaseClient, MergedBaseConfig
from strategies.nodes import NodeDirectory
from strategies.registry import Family, Rule, register
from strategies.replies import Replies


@dataclass
class FedExLoRAConfig(MergedBaseConfig):
    name: str = "fedex_lora"


@finite_inputs
def fedex_residual_factors(
    As: Matrices, Bs: Matrices, weights: Weights, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """The residual as exact low-rank factors ``(L, R)`` in nn.Linear layout, from the identity
    ``Σ p_k B_k A_k − B̄Ā = Σ p_k (B_k − B̄)(A_k − Ā)`` (Σ p_k = 1): ``L = s[p_1(B_1 − B̄) …]``,
    ``R = [A_1 − Ā; …]``, rank K r — cheaper than the dense matrix whenever K r (d_in + d_out) <
    d_in d_out, and exactly zero when the clients' A (or B) agree."""
    p = normalize_weights(weights)
    A_bar = sum(pk * A.astype(np.float64) for pk, A in zip(p, As, strict=True))
    B_bar = sum(pk * B.astype(np.float64) for pk, B in zip(p, Bs, strict=True))
    L = scale * np.concatenate([pk * (B - B_bar) for pk, B in zip(p, Bs, strict=True)], axis=1)
    R = np.concatenate([A - A_bar for A in As], axis=0)
    return L, R


class FedExLoRA(BaseMergingStrategy):
    """FedIT's means for the adapter and head; the residual merged into every client's base."""

    name = "fedex_lora"

    def __init__(self, method: FedExLoRAConfig | None = None, nodes: NodeDirectory | None = None) -> None:
        super().__init__(method, nodes)
        self.scale = lora_scale(self.method.alpha, self.method.rank)

    def merge(self, replies: Replies) -> tuple[dict[str, np.ndarray], Factors]:
        new = weighted_mean(replies.states, replies.weights)  # Ā, B̄ and the head
        increment = {}
        for prefix, (a_key, b_key) in lora_layers(replies.states[0]).items():
            As, Bs = replies.factors(a_key, b_key)
            increment[prefix] = fedex_residual_factors(As, Bs, replies.weights, self.scale)
        return new, increment


RULE = register(
    Rule(
        "fedex_lora",
        Family.MERGED_BASE,
        "Singhal et al., ACL 2025, 2410.09432",
        FedExLoRAConfig,
        FedExLoRA,
        MergedBaseClient,
    )
)
