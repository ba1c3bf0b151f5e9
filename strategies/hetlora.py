"""HetLoRA (Cho et al., EMNLP 2024, 2401.06432): clients of different ranks train the first r_k
components of a global rank-r_max LoRA; the server zero-pads their factors to r_max and averages
them with weights proportional to the norm of each client's update, ``‖s_k B_k A_k‖_F`` (times the
example weight). Inexact, by design of the paper; clients self-prune their rank."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from experiment_schema import ExperimentConfig, require
from strategies.averaging import Weights, finite_inputs, normalize_weights
from strategies.client import NodeFacts, NodeState, Regularizer, State
from strategies.flexlora import FlexLoRA
from strategies.lowrank import Matrices, Scales, pad_rank, product_norm
from strategies.protocol import NEXT_RANK, TrainReport, metric_int
from strategies.ranks import HeterogeneousRankConfig, RankedClient
from strategies.registry import Family, Rule, register

if TYPE_CHECKING:
    import torch

PRUNING = "rank-pruning"  # node state: the rank this node pruned itself to and its tail's norm


@dataclass
class HetLoRAConfig(HeterogeneousRankConfig):
    """Per-node ranks (``global_rank`` 0 = the largest client rank) and the rank self-pruning
    regulariser ``prune_lambda ‖B[:, k:]‖ ‖A[k:, :]‖`` with ``k = ceil(prune_gamma r)``."""

    name: str = "hetlora"
    prune_lambda: float = 1e-3
    prune_gamma: float = 0.99

    def validate(self) -> None:
        super().validate()
        require(self.prune_lambda >= 0, f"method.prune_lambda must be >= 0, got {self.prune_lambda}")
        require(0 < self.prune_gamma < 1, f"method.prune_gamma must be in (0, 1), got {self.prune_gamma}")

    def check_experiment(self, cfg: ExperimentConfig) -> None:
        require(
            not cfg.privacy.enabled,
            f"privacy.enabled: {self.name}'s rank self-pruning term is not per-sample; DP-SGD cannot clip it",
        )


@finite_inputs
def hetlora_weights(As: Matrices, Bs: Matrices, weights: Weights, scales: Scales) -> np.ndarray:
    """Normalised ``p_k ‖s_k B_k A_k‖_F``; falls back to ``p_k`` when every update is zero."""
    p = normalize_weights(weights)
    norms = np.array([sk * product_norm(A, B) for A, B, sk in zip(As, Bs, scales, strict=True)])
    mixed = p * norms
    return mixed / mixed.sum() if mixed.sum() > 0 else p


@finite_inputs
def hetlora_aggregate(
    As: Matrices, Bs: Matrices, weights: Weights, scales: Scales, max_rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Global unit-scale ``(A, B)`` at ``max_rank``: the norm-weighted mean of the zero-padded
    factors, each client's B first multiplied by its scale ``s_k``."""
    unit_Bs = [sk * B for sk, B in zip(scales, Bs, strict=True)]
    w = hetlora_weights(As, unit_Bs, weights, [1.0] * len(As))
    padded = [
        pad_rank(A.astype(np.float64), B.astype(np.float64), max_rank)
        for A, B in zip(As, unit_Bs, strict=True)
    ]
    A_bar = sum(wk * A for wk, (A, _) in zip(w, padded, strict=True))
    B_bar = sum(wk * B for wk, (_, B) in zip(w, padded, strict=True))
    return A_bar, B_bar


@finite_inputs
def hetlora_client_factors(
    A_g: np.ndarray, B_g: np.ndarray, rank: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """A client's factors: the first ``rank`` components of the unit-scale global factors."""
    return A_g[:rank], B_g[:, :rank] / scale


def hetlora_penalty_tail(rank: int, gamma: float) -> int:
    """Index where the self-pruning regulariser's tail starts: ``ceil(γ r)``, at most r − 1."""
    return min(max(int(np.ceil(gamma * rank)), 1), rank - 1) if rank > 1 else rank


def self_pruning_penalty(model: torch.nn.Module, gamma: float) -> torch.Tensor:
    """``Σ_layers ‖B[:, k:]‖_F ‖A[k:, :]‖_F`` with ``k = ceil(γ r)``: the tail HetLoRA prunes."""
    import torch

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
    import torch

    # ‖x‖'s gradient x/‖x‖ is 0/0 at x = 0, where LoRA's B starts: keep it finite.
    return torch.sqrt((x * x).sum() + 1e-12)


class HetLoRA(FlexLoRA):
    """Global LoRA at r_max; node k trains the first r_k components and may prune its rank.

    Global factors are kept at unit scale; a node receives ``(A[:r_k], B[:, :r_k] / s_k)`` and
    its upload is scaled back by ``s_k`` before the zero-padded, norm-weighted mean.
    """

    name = "hetlora"

    @staticmethod
    def default_global_rank(client_bounds: Sequence[int]) -> int:
        return max(client_bounds)

    def begin_round(self, server_round: int, global_state: dict[str, np.ndarray]) -> None:
        pass  # truncation needs no decomposition

    def layer_payload(
        self, prefix: str, A_g: np.ndarray, B_g: np.ndarray, rank: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return hetlora_client_factors(A_g, B_g, rank, self.alpha / rank)

    def layer_aggregate(
        self, As: Matrices, Bs: Matrices, weights: np.ndarray, scales: Scales
    ) -> tuple[np.ndarray, np.ndarray]:
        return hetlora_aggregate(As, Bs, weights, scales, self.global_rank)

    def accept_reply(self, node_id: int, metrics: dict[str, float]) -> None:
        rank = metric_int(metrics, NEXT_RANK)  # a pruned rank applies from the node's next round
        if rank is not None and 1 <= rank <= self.global_rank:
            self.nodes.ranks[node_id] = rank


class HetLoRAClient(RankedClient):
    """Adds the self-pruning term to the loss; lowers its rank once the penalised tail shrank."""

    @property
    def method(self) -> HetLoRAConfig:
        assert isinstance(self.cfg.method, HetLoRAConfig)
        return self.cfg.method

    @classmethod
    def describe(
        cls, cfg: ExperimentConfig, partition_id: int, node: NodeState, facts: NodeFacts
    ) -> int | None:
        pruning = node.values(PRUNING)
        return (
            int(pruning["rank"]) if pruning is not None else super().describe(cfg, partition_id, node, facts)
        )

    def regularizer(self) -> Regularizer:
        strength, gamma = self.method.prune_lambda, self.method.prune_gamma
        return lambda model: strength * self_pruning_penalty(model, gamma)

    def finish(self, model: torch.nn.Module, trained: State, report: TrainReport) -> State:
        report.next_rank = self.prune(model)
        return super().finish(model, trained, report)

    def prune(self, model: torch.nn.Module) -> int:
        """``ceil(γ r)`` once the penalised tail shrank since this node's last round, else r."""
        import torch

        rank, gamma = self.rank, self.method.prune_gamma
        with torch.no_grad():
            tail = float(self_pruning_penalty(model, gamma))
        previous = self.node.values(PRUNING)
        if previous is not None and tail < float(previous["tail-norm"]) and rank > 1:
            rank = hetlora_penalty_tail(rank, gamma)
        self.node.set_values(PRUNING, {"rank": rank, "tail-norm": tail})
        return rank


RULE = register(
    Rule(
        "hetlora",
        Family.HETEROGENEOUS_RANK,
        "Cho et al., EMNLP 2024, 2401.06432",
        HetLoRAConfig,
        HetLoRA,
        HetLoRAClient,
    )
)
