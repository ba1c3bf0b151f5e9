"""FLoRA (Wang et al., NeurIPS 2024, 2409.05976): stack the clients' factors,
``A_stack = [p_1 A_1; …; p_K A_K]``, ``B_stack = [B_1 … B_K]``, so that
``B_stack A_stack = Σ p_k B_k A_k`` exactly, for any mix of ranks. Clients merge the stacked
update into their base weights and start a fresh LoRA each round."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune.lora import lora_layers, lora_scale
from strategies.averaging import Weights, finite_inputs, normalize_weights
from strategies.lowrank import Matrices
from strategies.merging import BaseMergingStrategy, Factors, MergedBaseClient, MergedBaseConfig
from strategies.nodes import NodeDirectory
from strategies.ranks import HeterogeneousRankConfig, RankedClient
from strategies.registry import Family, Rule, register
from strategies.replies import Replies


@dataclass
class FLoRAConfig(HeterogeneousRankConfig, MergedBaseConfig):
    """Per-node ranks (FLoRA keeps no global adapter: ``global_rank`` is unused) and the merged
    base's synchronisation."""

    name: str = "flora"

    no_server_optimizer = MergedBaseConfig.no_server_optimizer
    no_robust_aggregate = MergedBaseConfig.no_robust_aggregate


@finite_inputs
def flora_stack(As: Matrices, Bs: Matrices, weights: Weights) -> tuple[np.ndarray, np.ndarray]:
    """``(A_stack, B_stack)`` of rank Σ r_k with the client weights folded into A."""
    p = normalize_weights(weights)
    A_stack = np.concatenate([pk * A.astype(np.float64) for pk, A in zip(p, As, strict=True)], axis=0)
    B_stack = np.concatenate([B.astype(np.float64) for B in Bs], axis=1)
    return A_stack, B_stack


class FLoRA(BaseMergingStrategy):
    """Fresh adapter every round, at each node's own rank; the stacked update goes into the base.

    The global state is the head plus the base deltas; the stack is applied as the increment
    ``L R`` with ``L = [s_1 B_1 … s_K B_K]`` and ``R = [p_1 A_1; …; p_K A_K]``.
    """

    name = "flora"
    heterogeneous_ranks = True
    global_lora = False

    def __init__(self, method: FLoRAConfig | None = None, nodes: NodeDirectory | None = None) -> None:
        super().__init__(method, nodes)
        self.alpha = self.method.alpha

    def merge(self, replies: Replies) -> tuple[dict[str, np.ndarray], Factors]:
        new = replies.mean_of_heads()
        increment = {}
        for prefix, (a_key, b_key) in lora_layers(replies.states[0]).items():
            As, Bs = replies.factors(a_key, b_key)
            scaled = [lora_scale(self.alpha, A.shape[0]) * B for A, B in zip(As, Bs, strict=True)]
            R, L = flora_stack(As, scaled, replies.weights)
            increment[prefix] = (L, R)
        return new, increment


class FLoRAClient(MergedBaseClient, RankedClient):
    """Merges the stacked update into its base, then trains a fresh seeded LoRA at its own rank."""

    fresh_adapter = True


RULE = register(
    Rule(
        "flora", Family.MERGED_BASE, "Wang et al., NeurIPS 2024, 2409.05976", FLoRAConfig, FLoRA, FLoRAClient
    )
)
