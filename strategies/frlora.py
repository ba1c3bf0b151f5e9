"""FRLoRA (Yan et al., ICLR 2025; code IAMJackYan/FRLoRA): federated *residual* LoRA.

Every LoRA layer starts from the principal part of its pretrained weight (PiSSA): ``s B0 A0`` is
the rank-r truncated SVD of ``W``, and the frozen base holds the residual ``W − s B0 A0``, so the
model starts unchanged. Each round the clients train ``(A, B)`` from ``(A0, B0)``, the server takes
FedIT's means ``(Ā, B̄)`` (and the head's), folds the round's update ``s (B̄ Ā − B0 A0)`` into
every client's base, and sends everyone back to ``(A0, B0)``: the global model after round t is
``W + Σ_t s (B̄_t Ā_t − B0 A0)``. As in the official code, the factors are averaged (FedIT's cross
terms stay); what changes is that LoRA restarts each round at the principal subspace with the
round's residual merged into the base, instead of accumulating in A and B.

The merged update travels as exact rank-2r factors ``L = s [B̄, −B0]``, ``R = [Ā; A0]`` (or the
dense delta when smaller, ``base_sync``), through the merged-base machinery FedEx-LoRA uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from experiment_schema import ExperimentConfig, require
from finetune.lora import lora_layers
from finetune.spec import AdapterSpec
from strategies.averaging import finite_inputs, weighted_mean
from strategies.fedex_lora import FedExLoRA
from strategies.merging import Factors, MergedBaseClient, MergedBaseConfig
from strategies.registry import Family, Rule, register
from strategies.replies import Replies


@dataclass
class FRLoRAConfig(MergedBaseConfig):
    name: str = "frlora"

    def check_experiment(self, cfg: ExperimentConfig) -> None:
        require(
            cfg.model.quantization == "none",
            f"frlora starts LoRA at the principal singular part of each base weight and leaves the "
            f"residual in the base, which a {cfg.model.quantization} base cannot hold: use "
            "model.quantization=none",
        )


@finite_inputs
def frlora_increment(
    A_bar: np.ndarray, B_bar: np.ndarray, A0: np.ndarray, B0: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(L, R)`` with ``L R = s (B̄ Ā − B0 A0)``: ``L = s [B̄, −B0]`` (d_out × 2r), ``R = [Ā; A0]``
    (2r × d_in), in float64."""
    L = scale * np.concatenate([B_bar.astype(np.float64), -B0.astype(np.float64)], axis=1)
    R = np.concatenate([A_bar.astype(np.float64), A0.astype(np.float64)], axis=0)
    return L, R


class FRLoRA(FedExLoRA):
    """FedEx-LoRA's merged base with another increment: FedIT's means of A, B and the head; the
    round's update merged into the base; every client back at the principal init ``(A0, B0)``,
    which the global state keeps."""

    name = "frlora"

    def merge(self, replies: Replies) -> tuple[dict[str, np.ndarray], Factors]:
        new = weighted_mean(replies.states, replies.weights)  # Ā, B̄ and the head
        increment = {}
        for prefix, (a_key, b_key) in lora_layers(replies.states[0]).items():
            A0, B0 = replies.global_state[a_key], replies.global_state[b_key]
            increment[prefix] = frlora_increment(new[a_key], new[b_key], A0, B0, self.scale)
            new[a_key], new[b_key] = A0, B0
        return new, increment


class FRLoRAClient(MergedBaseClient):
    """FedEx-LoRA's client (its merged base kept and caught up; it starts from what it received,
    here always ``(A0, B0)``) on a model whose LoRA starts at the principal init."""

    @classmethod
    def default_adapter(cls, cfg: ExperimentConfig, rank: int | None = None) -> AdapterSpec:
        return dataclasses.replace(super().default_adapter(cfg, rank), init="principal")


RULE = register(
    Rule("frlora", Family.MERGED_BASE, "Yan et al., ICLR 2025 (FRLoRA)", FRLoRAConfig, FRLoRA, FRLoRAClient)
)
