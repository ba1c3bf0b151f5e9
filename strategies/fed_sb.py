"""Fed-SB (Singhal et al., 2025, "Fed-SB: a silver bullet for extreme communication efficiency and
performance in (private) federated LoRA fine-tuning", on LoRA-SB by Ponkshe et al., 2024): every
LoRA layer is ``W0 + s B R A`` with A and B fixed after an initialisation shared by all clients and
only the r × r matrix R trained. The server averages R: ``Σ p_k s B R_k A = s B R̄ A``, exact, and
an upload is r² numbers per layer (plus the head).

The initialisation (LoRA-SB's, as its code computes it): the first step full fine-tuning would
take, ``ΔW₁ = −η sign(Σ_i ∇_{W0} loss_i)`` (Adam's first update), and its rank-r truncated SVD
``U_r Σ_r V_rᵀ``: ``B = U_r``, ``A = V_rᵀ``, ``R₀ = Σ_r / s``, so ``s B R₀ A`` is the best rank-r
approximation of ``ΔW₁``. The code sums the gradient over ``num_samples`` examples of the pooled
training set and uses ``α = r`` (s = 1); federated, each node sums it over ``method.init_samples`` of
its own examples in a one-off set-up exchange before round 1 (the server adds the sums, so every
example counts once), and any α works (R₀ absorbs the scale). That exchange uploads a dense
d_out × d_in gradient per layer once; it is recorded in round 0's bytes. The code averages R
uniformly; here ``method.weighting`` applies as for every rule. After round 1 a node that holds A
and B gets only R and the head.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from experiment_schema import ExperimentConfig, MethodConfig, require
from finetune.lora import LORA_LATENT_SUFFIX, is_lora, lora_layers
from finetune.spec import AdapterSpec
from strategies.averaging import finite_inputs, weighted_mean
from strategies.client import ClientRule, ModelBaseline, State
from strategies.lowrank import dense_dtype, top_singular_triplets
from strategies.nodes import NodeDirectory
from strategies.protocol import SETUP_MESSAGE
from strategies.registry import Family, Rule, register
from strategies.rule import Ask, ServerRule
from strategies.traffic import Traffic, every_round

if TYPE_CHECKING:
    import datasets
    import torch

    from finetune.data import Collate

log = logging.getLogger(__name__)
FACTORS = "fed-sb-factors"  # node state: the fixed A and B this node received
GRAD_SUFFIX = ".grad"  # set-up upload: <layer prefix>.grad, Σ ∇W0 over the node's examples


@dataclass
class FedSBConfig(MethodConfig):
    """``init_samples`` examples per node estimate the first full fine-tuning step, of size
    ``init_lr`` per weight; ``rank`` is R's size (Fed-SB trains r², so it affords large r)."""

    name: str = "fed_sb"
    init_samples: int = 16
    init_lr: float = 1e-3

    uploads_are_global = False  # R and the head go up; A and B are global too

    def validate(self) -> None:
        super().validate()
        require(self.init_samples >= 1, f"method.init_samples must be >= 1, got {self.init_samples}")
        require(self.init_lr > 0, f"method.init_lr must be > 0, got {self.init_lr}")

    def check_experiment(self, cfg: ExperimentConfig) -> None:
        require(
            cfg.model.quantization == "none",
            "fed_sb initialises A and B from the gradient of the base weights, which a quantized base "
            f"(model.quantization={cfg.model.quantization}) has none of: set model.quantization=none",
        )
        require(
            not cfg.privacy.enabled,
            "privacy.enabled: fed_sb's initialisation uploads each node's gradient sums, which DP-SGD "
            "does not cover",
        )


@finite_inputs
def fed_sb_initialize(
    gradient_sum: np.ndarray, rank: int, step: float, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A, B, R₀)`` with ``scale · B R₀ A`` the rank-r truncated SVD of ``−step · sign(gradient_sum)``
    (B and A with orthonormal columns / rows)."""
    target = -step * np.sign(gradient_sum.astype(dense_dtype(*gradient_sum.shape)))
    U, S, Vt = top_singular_triplets(target, rank)
    k = min(rank, len(S))
    A = np.zeros((rank, gradient_sum.shape[1]))
    B = np.zeros((gradient_sum.shape[0], rank))
    A[:k], B[:, :k] = Vt[:k], U[:, :k]
    R = np.zeros((rank, rank))
    R[:k, :k] = np.diag(S[:k] / scale)
    return A, B, R


def latent_key(prefix: str) -> str:
    return prefix + LORA_LATENT_SUFFIX


def travels(key: str) -> bool:
    """R and the head go up every round; the fixed A and B never do."""
    return not is_lora(key)


class FedSB(ServerRule):
    """The weighted mean of R (and the head); A and B are set once, from the nodes' gradients."""

    name = "fed_sb"
    streamable = True
    method: FedSBConfig
    traffic = Traffic(uploads=every_round(travels))
    has_setup = True
    rule = staticmethod(weighted_mean)

    def __init__(self, method: FedSBConfig | None = None, nodes: NodeDirectory | None = None) -> None:
        super().__init__(method, nodes)
        self.holders: set[int] = set()  # nodes known to hold them

    def setup(self, ask: Ask, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        uploads = ask(SETUP_MESSAGE)
        if not uploads:
            raise RuntimeError("fed_sb: no node answered the set-up (gradient) exchange")
        state = dict(state)
        scale = self.method.alpha / self.method.rank
        for prefix, (a_key, b_key) in lora_layers(state).items():
            total = np.asarray(np.sum([u[prefix + GRAD_SUFFIX] for u in uploads], axis=0, dtype=np.float64))
            A, B, R = fed_sb_initialize(total, self.method.rank, self.method.init_lr, scale)
            state[a_key], state[b_key], state[latent_key(prefix)] = (x.astype(np.float32) for x in (A, B, R))
        log.info("fed_sb: A, B and R initialised from the gradients of %d node(s)", len(uploads))
        return state

    def payload(self, node_id: int, global_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if node_id in self.holders:
            return {k: v for k, v in global_state.items() if travels(k)}
        return global_state

    def accept_reply(self, node_id: int, metrics: dict[str, float]) -> None:
        self.holders.add(node_id)

    def node_failed(self, node_id: int) -> None:
        self.holders.discard(node_id)


class FedSBClient(ClientRule):
    """Trains R (and the head) between the fixed A and B, which it keeps after receiving them."""

    @classmethod
    def default_adapter(cls, cfg: ExperimentConfig, rank: int | None = None) -> AdapterSpec:
        return dataclasses.replace(super().default_adapter(cfg, rank), kind="lora_latent")

    def load(self, model: torch.nn.Module, received: State, baseline: ModelBaseline) -> None:
        factors = {k: v for k, v in received.items() if is_lora(k)}
        if factors:
            self.node.set_arrays(FACTORS, factors)
        else:
            factors = self.node.arrays(FACTORS)
            if not factors and self.job.instruction.server_round > 0:
                raise ValueError("fed_sb: this node lost its fixed A and B; the server sends them next time")
        super().load(model, {**received, **factors}, baseline)

    def setup(self, model: torch.nn.Module, data: datasets.Dataset, collate: Collate) -> State:
        from finetune.training import base_weight_gradients

        assert isinstance(self.cfg.method, FedSBConfig)
        seed = self.cfg.seed * 1_000_003 + self.job.partition_id
        batch_size = self.cfg.train.batch_size
        grads = base_weight_gradients(model, data, collate, batch_size, self.cfg.method.init_samples, seed)
        return {prefix + GRAD_SUFFIX: g for prefix, g in grads.items()}


RULE = register(
    Rule(
        "fed_sb",
        Family.LORA,
        "Singhal et al., 2025 (Fed-SB); LoRA-SB initialisation, Ponkshe et al., 2024",
        FedSBConfig,
        FedSB,
        FedSBClient,
    )
)
