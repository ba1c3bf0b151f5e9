"""HetLoRA (Cho et al., EMNLP 2024, 2401.06432): clients of different ranks train the first r_k
components of a global rank-r_max LoRA; the server zero-pads their factors to r_max and averages
them with weights proportional to the norm of each client's update, ``‖s_k B_k A_k‖_F`` (times the
example weight). Inexact, by design of the paper; clients self-prune their rank."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from finetune.config import ExperimentConfig
from strategies.averaging import normalize_weights
from strategies.flexlora import FlexLoRA
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


def self_pruning_penalty(model: torch.nn.Module, gamma: float) -> torch.Tensor:
    """``Σ_layers ‖B[:, k:]‖_F ‖A[k:, :]‖_F`` with ``k = ceil(γ r)``: the tail HetLoRA prunes."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        for kind in ("lora_A", "lora_B"):
            if f".{kind}." in name:
                factors.setdefault(name.split(f".{kind}.")[0], {})[kind] = param
    total = torch.zeros((), device=next(model.parameters()).device)
    for pair in factors.values():
        A, B = pair["lora_A"], pair["lora_B"]
        k = hetlora_penalty_tail(A.shape[0], gamma)
        total = total + _smooth_norm(B[:, k:]) * _smooth_norm(A[k:, :])
    return total


def _smooth_norm(x: torch.Tensor) -> torch.Tensor:
    # ‖x‖'s gradient x/‖x‖ is 0/0 at x = 0, where LoRA's B starts: keep it finite.
    return torch.sqrt((x * x).sum() + 1e-12)


class HetLoRA(FlexLoRA):
    """Global LoRA at r_max; node k trains the first r_k components and may prune its rank.

    Global factors are kept at unit scale; a node receives ``(A[:r_k], B[:, :r_k] / s_k)`` and
    its upload is scaled back by ``s_k`` before the zero-padded, norm-weighted mean.
    """

    name = "hetlora"
    self_pruning = True

    @classmethod
    def options(cls, cfg: ExperimentConfig) -> dict[str, Any]:
        return {"alpha": cfg.method.alpha, "global_rank": max_rank(cfg)}

    @classmethod
    def server_model_config(cls, cfg: ExperimentConfig) -> ExperimentConfig:
        rank = max_rank(cfg)
        return cfg.with_rank(rank, alpha=float(rank))

    def prepare_payloads(self, global_state: dict[str, np.ndarray]) -> None:
        pass  # truncation needs no decomposition

    def layer_payload(
        self, prefix: str, A_g: np.ndarray, B_g: np.ndarray, rank: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return A_g[:rank], B_g[:, :rank] / (self.alpha / rank)

    def layer_aggregate(
        self, As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], weights: np.ndarray, scales: Sequence[float]
    ) -> tuple[np.ndarray, np.ndarray]:
        unit_Bs = [sk * B for sk, B in zip(scales, Bs, strict=True)]
        return hetlora_aggregate(As, unit_Bs, weights, [1.0] * len(As), self.global_rank)

    def accept_reply(self, node_id: int, metrics: dict[str, float]) -> None:
        rank = metrics.get("lora-rank")  # a pruned rank applies from the node's next round
        if rank is not None and 1 <= rank <= self.global_rank:
            self.node_ranks[node_id] = int(rank)


def max_rank(cfg: ExperimentConfig) -> int:
    """``method.global_rank``, or the largest configured client rank."""
    return cfg.method.global_rank or max(cfg.max_client_rank(p) for p in range(cfg.partition.num_clients))
