"""Learning rate per federated round (clients train each round at a constant rate)."""

from __future__ import annotations

import math

from finetune.config import TrainConfig


def round_lr(cfg: TrainConfig, server_round: int, num_rounds: int) -> float:
    """Linear warm-up over ``warmup_rounds``, then constant / cosine / linear decay to
    ``lr * min_lr_ratio`` at the last round. Rounds count from 1."""
    if cfg.warmup_rounds and server_round <= cfg.warmup_rounds:
        return cfg.lr * server_round / (cfg.warmup_rounds + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(num_rounds - cfg.warmup_rounds - 1, 1)
    progress = min(max(server_round - cfg.warmup_rounds - 1, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr - (cfg.lr - floor) * progress
