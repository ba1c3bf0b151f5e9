"""The one place that trains and evaluates: used by clients, the server and the centralized baseline."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from finetune.config import TrainConfig
from finetune.data import iterate_batches
from finetune.memory import peak_memory_mb, reset_peak_memory
from finetune.metrics import compute_metrics


@dataclass
class TrainResult:
    loss: float  # mean training loss over the round's steps
    steps: int
    examples_seen: int
    seconds: float
    peak_memory_mb: float

    @property
    def samples_per_second(self) -> float:
        return self.examples_seen / self.seconds if self.seconds > 0 else 0.0


def local_step_count(cfg: TrainConfig, num_examples: int) -> int:
    """Optimizer steps for one round: ``local_steps``, or ``local_epochs`` full passes."""
    if cfg.local_steps > 0:
        return cfg.local_steps
    return cfg.local_epochs * math.ceil(num_examples / cfg.batch_size)


def _endless_batches(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        yield from iterate_batches(dataset, tokenizer, batch_size, shuffle=True, seed=seed + epoch)
        epoch += 1


def train_local(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    cfg: TrainConfig,
    lr: float,
    seed: int,
    regularizer: Callable[[torch.nn.Module], torch.Tensor] | None = None,
) -> TrainResult:
    """Train the model's trainable parameters with a fresh AdamW for one round; a rule's
    ``regularizer`` (e.g. HetLoRA's rank self-pruning term) is added to the task loss."""
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    reset_peak_memory()
    torch.manual_seed(seed)  # dropout draws: the same whichever process trains this client
    start = time.perf_counter()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    steps = local_step_count(cfg, len(dataset))
    batches = _endless_batches(dataset, tokenizer, cfg.batch_size, seed)
    model.train()
    total_loss, seen = 0.0, 0
    for _ in range(steps):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = model(**batch).loss
        if regularizer is not None:
            loss = loss + regularizer(model)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} (lr={lr})")
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total_loss += loss.item()
        seen += int(batch["labels"].shape[0])
    return TrainResult(
        loss=total_loss / steps,
        steps=steps,
        examples_seen=seen,
        seconds=time.perf_counter() - start,
        peak_memory_mb=peak_memory_mb(),
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    metric_names: list[str],
) -> dict[str, float]:
    """Mean loss and the task metrics on ``dataset``."""
    model.eval()
    device = next(model.parameters()).device
    losses, preds, labels = [], [], []
    for batch in iterate_batches(dataset, tokenizer, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        losses.append(out.loss.item() * batch["labels"].shape[0])
        preds.append(out.logits.argmax(dim=-1).cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    pred, true = np.concatenate(preds), np.concatenate(labels)
    return {"loss": float(sum(losses) / len(true)), **compute_metrics(metric_names, pred, true)}
