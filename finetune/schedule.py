"""Learning rate per federated round (clients train each round at a constant rate)."""

from __future__ import annotations

import math

from experiment_schema import TrainConfig


def round_lr(cfg: TrainConfig, server_round: int, num_rounds: int, peak: float | None = None) -> float:
    """Linear warm-up over ``warmup_rounds``, then constant / cosine / linear decay to
    ``lr * min_lr_ratio`` at the last round (``lr`` = ``peak`` if given, else ``cfg.lr``).
    Rounds count from 1."""
    lr = cfg.lr if peak is None else peak
    if cfg.warmup_rounds and server_round <= cfg.warmup_rounds:
        return lr * server_round / (cfg.warmup_rounds + 1)
    if cfg.lr_schedule == "constant":
        return lr
    span = max(num_rounds - cfg.warmup_rounds - 1, 1)
    progress = min(max(server_round - cfg.warmup_rounds - 1, 0) / span, 1.0)
    floor = lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr - (lr - floor) * progress
