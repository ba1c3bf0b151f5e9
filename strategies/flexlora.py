"""FlexLoRA (Bai et al., NeurIPS 2024, 2402.11505): clients of different ranks; the server forms
the exact mean update ``ΔW = Σ p_k s_k B_k A_k`` and hands each client the best rank-r_k
approximation of it (SVD; singular values in B; divided by the receiver's scale s = α/r).

The released code never resizes clients to their ranks and ignores α/r; both are honoured here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from experiment_schema import ExperimentConfig
from finetune.lora import is_lora, lora_layers
from finetune.spec import AdapterSpec
from strategies.averaging import Weights, finite_inputs, normalize_weights
from strategies.lowrank import (
    SVD,
    Matrices,
    Scales,
    compact_svd,
    factors_from_svd,
    thin_svd,
    weighted_product,
)
from strategies.nodes import NodeDirectory
from strategies.ranks import HeterogeneousRankConfig, RankedClient
from strategies.registry import Family, Rule, register
from strategies.replies import Replies
from strategies.rule import ServerRule


@dataclass
class FlexLoRAConfig(HeterogeneousRankConfig):
    """Per-node ranks; ``global_rank`` 0 = the sum of the largest rank each client can have,
    which keeps the global factors exact."""

    name: str = "flexlora"


@finite_inputs
def flexlora_product(As: Matrices, Bs: Matrices, weights: Weights, scales: Scales) -> np.ndarray:
    """The server's dense mean update ``Σ p_k s_k B_k A_k`` (d_out × d_in)."""
    p = normalize_weights(weights)
    return weighted_product(As, Bs, [pk * sk for pk, sk in zip(p, scales, strict=True)])


@finite_inputs
def flexlora_aggregate(
    As: Matrices, Bs: Matrices, weights: Weights, scales: Scales, global_rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-scale global factors ``(A_g, B_g)`` at ``global_rank``: the truncated (dense) SVD of
    ``Σ p_k s_k B_k A_k``, exact while ``global_rank >= Σ r_k``. The paper's dense SVD (float32 for
    large layers); HLoRA computes the same factors without the dense matrix."""
    return factors_from_svd(*thin_svd(flexlora_product(As, Bs, weights, scales)), global_rank, 1.0)


@finite_inputs
def redistribution_svd(A_g: np.ndarray, B_g: np.ndarray) -> SVD:
    """The SVD of the global update ``B_g A_g`` from its factors (no dense matrix)."""
    return compact_svd([B_g], [A_g])


@finite_inputs
def flexlora_client_factors(svd: SVD, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A client's factors ``(A, B)``: ``scale · B A`` is the rank-``rank`` truncation of the global
    update whose SVD is ``svd`` (singular values in B, A with orthonormal rows)."""
    return factors_from_svd(*svd, rank, scale)


class FlexLoRA(ServerRule):
    """Heterogeneous ranks: each node gets the rank-r_k truncation of the global update.

    The global state holds, per layer, factors ``(A_g, B_g)`` at ``global_rank`` R with unit
    scale, ``B_g A_g = ΔW`` (exact while R >= Σ r_k); heads are averaged as usual. Node ranks are
    learnt with a QUERY to every node not seen before and sent to the node every round.
    """

    name = "flexlora"
    heterogeneous_ranks = True
    method: HeterogeneousRankConfig

    def __init__(
        self, method: HeterogeneousRankConfig | None = None, nodes: NodeDirectory | None = None
    ) -> None:
        super().__init__(method, nodes)
        self.alpha, self.global_rank = self.method.alpha, self.method.global_rank
        if self.global_rank < 1:
            raise ValueError(f"{self.name}: resolve method.global_rank before building the strategy")
        self._svd: dict[str, SVD] = {}

    @classmethod
    def resolve(cls, cfg: ExperimentConfig) -> HeterogeneousRankConfig:
        method = cfg.method
        assert isinstance(method, HeterogeneousRankConfig)
        bounds = method.client_rank_bounds(cfg.partition.num_clients, cfg.seed)
        return dataclasses.replace(method, global_rank=method.global_rank or cls.default_global_rank(bounds))

    @staticmethod
    def default_global_rank(client_bounds: Sequence[int]) -> int:
        return sum(client_bounds)

    @classmethod
    def global_adapter(cls, cfg: ExperimentConfig, client: AdapterSpec) -> AdapterSpec:
        rank = cls.resolve(cfg).global_rank
        return dataclasses.replace(client, rank=rank, alpha=float(rank))  # unit scale: B_g A_g is ΔW

    def begin_round(self, server_round: int, global_state: dict[str, np.ndarray]) -> None:
        """Decompose each layer's global update once per round (cheap: rank-R factors)."""
        self._svd = {
            prefix: redistribution_svd(global_state[a_key], global_state[b_key])
            for prefix, (a_key, b_key) in lora_layers(global_state).items()
        }

    def payload(self, node_id: int, global_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rank = self.nodes.rank(node_id)
        out = {k: v for k, v in global_state.items() if not is_lora(k)}
        for prefix, (a_key, b_key) in lora_layers(global_state).items():
            A, B = self.layer_payload(prefix, global_state[a_key], global_state[b_key], rank)
            out[a_key], out[b_key] = A.astype(np.float32), B.astype(np.float32)
        return out

    def aggregate(self, replies: Replies) -> dict[str, np.ndarray]:
        out = replies.mean_of_heads()
        for a_key, b_key in lora_layers(replies.global_state).values():
            As, Bs = replies.factors(a_key, b_key)
            A_g, B_g = self.layer_aggregate(As, Bs, replies.weights, [self.alpha / A.shape[0] for A in As])
            out[a_key], out[b_key] = A_g.astype(np.float32), B_g.astype(np.float32)
        return out

    # --- per-layer math; HLoRA and HetLoRA override these ---------------------------------
    def layer_payload(
        self, prefix: str, A_g: np.ndarray, B_g: np.ndarray, rank: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return flexlora_client_factors(self._svd[prefix], rank, self.alpha / rank)

    def layer_aggregate(
        self, As: Matrices, Bs: Matrices, weights: np.ndarray, scales: Scales
    ) -> tuple[np.ndarray, np.ndarray]:
        return flexlora_aggregate(As, Bs, weights, scales, self.global_rank)


RULE = register(
    Rule(
        "flexlora",
        Family.HETEROGENEOUS_RANK,
        "Bai et al., NeurIPS 2024, 2402.11505",
        FlexLoRAConfig,
        FlexLoRA,
        RankedClient,
    )
)
