"""The one place that trains: used by clients of every rule and the centralized baseline (how a
model is scored is its task's, ``finetune/tasks``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from experiment_schema import TrainConfig
from finetune.data import Collate, iterate_batches, poisson_batches
from finetune.memory import peak_memory_mb, reset_peak_memory
from finetune.models import freeze_batch_norm_statistics
from finetune.optim import load_optimizer_state, optimizer_state_bytes, save_optimizer_state
from finetune.precision import autocast, grad_scaler, training_precision
from finetune.privacy import PrivateRound, PrivateTraining
from finetune.spec import Regularizer
from finetune.tasks import Batch


@dataclass
class TrainResult:
    loss: float  # mean training loss over the round's steps
    steps: int
    examples_seen: int
    seconds: float
    peak_memory_mb: float
    optimizer_state_bytes: int = 0  # moments (+ GaLore projectors) at the end of the round
    optimizer_state: np.ndarray | None = None  # serialized, when train.keep_optimizer_state

    @property
    def samples_per_second(self) -> float:
        return self.examples_seen / self.seconds if self.seconds > 0 else 0.0


def local_step_count(cfg: TrainConfig, num_examples: int) -> int:
    """Optimizer steps for one round: ``local_steps``, or ``local_epochs`` full passes."""
    if cfg.local_steps > 0:
        return cfg.local_steps
    return cfg.local_epochs * math.ceil(num_examples / cfg.batch_size)


def _endless_batches(
    dataset: datasets.Dataset, collate: Collate, batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        yield from iterate_batches(dataset, collate, batch_size, shuffle=True, seed=seed + epoch)
        epoch += 1


OptimizerFactory = Callable[[torch.nn.Module, float], torch.optim.Optimizer]


def adamw(weight_decay: float) -> OptimizerFactory:
    def build(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    return build


def train_local(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    collate: Collate,
    cfg: TrainConfig,
    lr: float,
    seed: int,
    regularizer: Regularizer | None = None,
    *,
    optimizer: OptimizerFactory | None = None,
    optimizer_state: np.ndarray | None = None,
    privacy: PrivateRound | None = None,
) -> TrainResult:
    """One round of local training — clients, and the centralized baseline, all come here.

    ``dataset`` holds the task's prepared examples and ``collate`` makes them batches
    (``Task.prepare`` / ``Task.collate``).

    ``optimizer`` builds the optimizer (AdamW by default; GaLore for ``galore``), resumed from
    ``optimizer_state`` when given; a rule's ``regularizer`` (HetLoRA's rank self-pruning term) is
    added to the task loss; ``privacy`` switches to DP-SGD (Poisson batches, per-sample clipping,
    Gaussian noise) for ``privacy.steps`` steps.
    """
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    if privacy is not None and regularizer is not None:
        raise ValueError("DP-SGD clips per-sample gradients; a rule's regularizer cannot be added")
    reset_peak_memory()
    torch.manual_seed(seed)  # dropout draws: the same whichever process trains this client
    start = time.perf_counter()
    opt = open_optimizer(model, lr, optimizer or adamw(cfg.weight_decay), optimizer_state)
    private = PrivateTraining(model, opt, privacy, len(dataset)) if privacy is not None else None
    steps, batches = round_batches(dataset, collate, cfg, privacy, seed)
    model.train()
    freeze_batch_norm_statistics(model)
    try:
        step_optimizer = private.optimizer if private is not None else opt
        plan = StepPlan(
            steps=steps,
            micro_batches=cfg.grad_accum_steps,
            clip_norm=cfg.max_grad_norm if private is None else 0.0,  # DP-SGD clips per sample itself
            precision=training_precision(cfg, private=privacy is not None),
        )
        loss, seen = run_steps(model, step_optimizer, batches, plan, lr, regularizer)
    finally:
        if private is not None:
            private.close()
    return TrainResult(
        loss=loss,
        steps=steps,
        examples_seen=seen,
        seconds=time.perf_counter() - start,
        peak_memory_mb=peak_memory_mb(),
        optimizer_state_bytes=optimizer_state_bytes(opt),
        optimizer_state=save_optimizer_state(opt) if cfg.keep_optimizer_state else None,
    )


def open_optimizer(
    model: torch.nn.Module, lr: float, factory: OptimizerFactory, state: np.ndarray | None
) -> torch.optim.Optimizer:
    """A new optimizer at ``lr``, resumed from a saved ``state`` when given."""
    opt = factory(model, lr)
    if state is not None:
        load_optimizer_state(opt, state)
        for group in opt.param_groups:
            group["lr"] = lr  # this round's rate, not the one saved with the state
    return opt


def round_batches(
    dataset: datasets.Dataset, collate: Collate, cfg: TrainConfig, privacy: PrivateRound | None, seed: int
) -> tuple[int, Iterator[Batch | None]]:
    """The round's step count and batches: Poisson-sampled under DP-SGD, else shuffled epochs."""
    if privacy is not None:
        return privacy.steps, poisson_batches(dataset, collate, privacy.sample_rate, seed)
    return local_step_count(cfg, len(dataset)), _endless_batches(dataset, collate, cfg.batch_size, seed)


@dataclass(frozen=True)
class StepPlan:
    """How a round's optimizer steps run."""

    steps: int
    micro_batches: int = 1  # gradient accumulation: micro-batches per optimizer step
    clip_norm: float = 0.0  # 0: no clipping
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 scales the loss)


def run_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch | None],
    plan: StepPlan,
    lr: float,
    regularizer: Regularizer | None,
) -> tuple[float, int]:
    """``plan.steps`` optimizer steps, each over ``plan.micro_batches`` batches; the mean loss per
    optimizer step and the examples seen."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = grad_scaler(plan.precision, device)
    total_loss, seen, losses = 0.0, 0, 0
    for _ in range(plan.steps):
        step_loss, stepped = 0.0, False
        for _ in range(plan.micro_batches):
            batch = next(batches)
            if batch is None:  # an empty Poisson draw: nothing to learn from, the step still counts
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(plan.precision, device):
                loss = model(**batch).loss
                if regularizer is not None:
                    loss = loss + regularizer(model)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} (lr={lr})")
            scaled = loss / plan.micro_batches
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            step_loss += loss.item() / plan.micro_batches
            seen += int(batch["labels"].shape[0])
            stepped = True
        if not stepped:
            continue
        optimizer_step(optimizer, params, plan.clip_norm, scaler)
        total_loss += step_loss
        losses += 1
    return total_loss / max(losses, 1), seen


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    clip_norm: float,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Clip (on the unscaled gradients), step and clear; fp16's scaler skips a step that overflowed."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def base_weight_gradients(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    collate: Collate,
    batch_size: int,
    examples: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """``Σ_i ∇_{W0} loss_i`` over ``examples`` seeded-random examples of ``dataset``, for the frozen
    weight under every LoRA layer (layer prefix → d_out × d_in, the math layout of ``B A``): the
    gradient full fine-tuning would take, which LoRA-SB's initialisation approximates."""
    from finetune.state import base_layer_weight, lora_base_layers

    layers = lora_base_layers(model)
    weights = {prefix: base_layer_weight(layer) for prefix, layer in layers.items()}
    sums = {prefix: torch.zeros_like(w, dtype=torch.float32) for prefix, w in weights.items()}
    device = next(model.parameters()).device
    chosen = np.random.default_rng(seed).permutation(len(dataset))[: min(examples, len(dataset))]
    model.eval()  # no dropout: the gradient of the pretrained model itself
    for weight in weights.values():
        weight.requires_grad_(True)
    try:
        for batch in iterate_batches(dataset.select(chosen.tolist()), collate, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            (model(**batch).loss * int(batch["labels"].shape[0])).backward()
            for prefix, weight in weights.items():
                assert weight.grad is not None
                sums[prefix] += weight.grad.float()
                weight.grad = None
            model.zero_grad(set_to_none=True)
    finally:
        for weight in weights.values():
            weight.requires_grad_(False)
    return {
        prefix: (total.T if getattr(layers[prefix], "fan_in_fan_out", False) else total).cpu().numpy()
        for prefix, total in sums.items()
    }
