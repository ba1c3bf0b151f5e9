"""Client-level DP-SGD with Opacus: Poisson-sampled batches, per-sample clipping, Gaussian noise,
and the privacy spent composed over every round a client has taken part in.

The accountant's history is a list of ``(noise multiplier, sample rate, steps)`` — one entry per
round the client trained — kept in the client's context, so ε covers all of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from experiment_schema import PrivacyConfig

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps) per round


@dataclass(frozen=True)
class PrivateRound:
    """The DP-SGD parameters of one client's round."""

    noise_multiplier: float
    clip_norm: float
    sample_rate: float  # Poisson: each example joins each batch with this probability
    steps: int
    delta: float
    accountant: str


def plan_round(
    cfg: PrivacyConfig, num_examples: int, batch_size: int, steps: int, num_rounds: int
) -> PrivateRound:
    """σ as configured, or calibrated so that ``num_rounds`` rounds of ``steps`` end at the target."""
    sample_rate = min(1.0, batch_size / num_examples)
    sigma = cfg.noise_multiplier
    if cfg.target_epsilon > 0:
        from opacus.accountants.utils import get_noise_multiplier

        sigma = get_noise_multiplier(
            target_epsilon=cfg.target_epsilon,
            target_delta=cfg.target_delta,
            sample_rate=sample_rate,
            steps=steps * num_rounds,
            accountant=cfg.accountant,
            epsilon_tolerance=0.005,
        )
    return PrivateRound(sigma, cfg.clip_norm, sample_rate, steps, cfg.target_delta, cfg.accountant)


def epsilon(history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε spent after every round in ``history`` (0 for none)."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def check_parameters_in_place(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse to wrap a model whose trainable parameters are not materialised on one device or are
    not the very tensors the optimizer holds. Opacus registers per-parameter hooks: a model that is
    moved (or lazily materialised) after them trains with stale references — every step "works",
    ε is reported, and the LoRA weights never change (meta-pytorch/opacus#820). Our sessions move
    the model before any optimizer or hook exists; this keeps it so."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    devices = {p.device for p in trainable}
    if len(devices) != 1 or any(p.is_meta for p in trainable):
        raise RuntimeError(
            f"DP-SGD needs every trainable parameter materialised on one device, got {devices}"
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if held != {id(p) for p in trainable}:
        raise RuntimeError("the optimizer holds other tensors than the model's trainable parameters")


class PrivateTraining:
    """Opacus's per-sample gradients for ``model`` and a DP optimizer, undone by :meth:`close`
    (the model object is shared by every client a process serves)."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, plan: PrivateRound, num_examples: int
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        check_parameters_in_place(model, optimizer)
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.clip_norm,
            expected_batch_size=max(1, math.ceil(plan.sample_rate * num_examples)),
            loss_reduction="mean",
        )

    def close(self) -> None:
        self.module.remove_hooks()
        for param in self.module.parameters():
            for attr in ("grad_sample", "_forward_counter"):
                if hasattr(param, attr):
                    delattr(param, attr)
