"""FlexLoRA (Bai et al., NeurIPS 2024, 2402.11505): clients of different ranks; the server forms
the exact mean update ``ΔW = Σ p_k s_k B_k A_k`` and hands each client the best rank-r_k
approximation of it (SVD; singular values in B; divided by the receiver's scale s = α/r).

The released code never resizes clients to their ranks and ignores α/r; both are honoured here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from finetune.config import ExperimentConfig
from finetune.records import from_record
from strategies.averaging import normalize_weights, weighted_mean
from strategies.base import FederatedStrategy
from strategies.lowrank import (
    compact_svd,
    factors_from_svd,
    is_lora,
    lora_layers,
    split_state,
    truncated_factors,
    weighted_product,
)

log = logging.getLogger(__name__)


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


class FlexLoRA(FederatedStrategy):
    """Heterogeneous ranks: each node gets the rank-r_k truncation of the global update.

    The global state holds, per layer, factors ``(A_g, B_g)`` at ``global_rank`` R with unit
    scale, ``B_g A_g = ΔW`` (exact while R >= Σ r_k); heads are averaged as usual. Node ranks are
    learnt with a QUERY to every node not seen before.
    """

    name = "flexlora"
    heterogeneous_ranks = True

    def __init__(self, *, alpha: float = 16.0, global_rank: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha, self.global_rank = alpha, global_rank
        self._svd: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @classmethod
    def options(cls, cfg: ExperimentConfig) -> dict[str, Any]:
        return {"alpha": cfg.method.alpha, "global_rank": global_rank(cfg)}

    @classmethod
    def server_model_config(cls, cfg: ExperimentConfig) -> ExperimentConfig:
        rank = global_rank(cfg)
        return cfg.with_rank(rank, alpha=float(rank))  # unit scale: B_g A_g is ΔW itself

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.prepare_payloads(from_record(arrays))
        return super().configure_train(server_round, arrays, config, grid)

    def prepare_payloads(self, global_state: dict[str, np.ndarray]) -> None:
        """Decompose each layer's global update once per round (cheap: rank-R factors)."""
        self._svd = {
            prefix: compact_svd([global_state[b_key]], [global_state[a_key]])
            for prefix, (a_key, b_key) in lora_layers(global_state).items()
        }

    def payload(self, node_id: int, global_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rank = self.node_ranks.get(node_id)
        if rank is None:
            raise RuntimeError(f"node {node_id} did not report its LoRA rank")
        out = {k: v for k, v in global_state.items() if not is_lora(k)}
        for prefix, (a_key, b_key) in lora_layers(global_state).items():
            A, B = self.layer_payload(prefix, global_state[a_key], global_state[b_key], rank)
            out[a_key], out[b_key] = A.astype(np.float32), B.astype(np.float32)
        return out

    def aggregate(
        self,
        server_round: int,
        global_state: dict[str, np.ndarray],
        client_states: Sequence[dict[str, np.ndarray]],
        weights: np.ndarray,
        node_ids: Sequence[int],
    ) -> dict[str, np.ndarray]:
        heads = [split_state(state)[1] for state in client_states]
        out = weighted_mean(heads, weights) if heads[0] else {}
        for a_key, b_key in lora_layers(global_state).values():
            As = [state[a_key] for state in client_states]
            Bs = [state[b_key] for state in client_states]
            A_g, B_g = self.layer_aggregate(As, Bs, weights, [self.alpha / A.shape[0] for A in As])
            out[a_key], out[b_key] = A_g.astype(np.float32), B_g.astype(np.float32)
        return out

    # --- per-layer math; HLoRA and HetLoRA override these ---------------------------------
    def layer_payload(
        self, prefix: str, A_g: np.ndarray, B_g: np.ndarray, rank: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Factors for a node of ``rank``: the rank-r truncated SVD of ``B_g A_g``, ÷ its scale."""
        return factors_from_svd(*self._svd[prefix], rank, self.alpha / rank)

    def layer_aggregate(
        self, As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], weights: np.ndarray, scales: Sequence[float]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Global unit-scale factors at ``global_rank`` of ``Σ p_k s_k B_k A_k``."""
        return factors_from_svd(*self.decompose(As, Bs, weights, scales), self.global_rank, 1.0)

    def decompose(
        self, As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], weights: np.ndarray, scales: Sequence[float]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SVD of the mean update ``Σ p_k s_k B_k A_k``: dense here, QR-compact in HLoRA."""
        return np.linalg.svd(flexlora_product(As, Bs, weights, scales), full_matrices=False)


def global_rank(cfg: ExperimentConfig) -> int:
    """``method.global_rank``, or the sum of every client's configured rank."""
    return cfg.method.global_rank or sum(cfg.max_client_rank(p) for p in range(cfg.partition.num_clients))
