"""Numeric precision: the dtype frozen weights are stored in, the autocast dtype training and
evaluation compute in, and loss scaling for fp16. Trainable parameters and optimizer state stay
float32 whatever the choice (peft keeps adapter weights float32 over a low-precision base)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from experiment_schema import ModelConfig, TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: ``cpu`` or ``cuda``: the device this process trains on, where a test or benchmark must choose.
DEVICE_ENV = "FEDSUBSPACE_DEVICE"


def device() -> torch.device:
    """The GPU when there is one, else the CPU; ``$FEDSUBSPACE_DEVICE`` chooses (``cuda`` without
    a GPU is an error, not a silent CPU run)."""
    chosen = os.environ.get(DEVICE_ENV, "")
    if chosen not in ("", "cpu", "cuda"):
        raise ValueError(f"${DEVICE_ENV}={chosen!r}: expected cpu or cuda")
    if chosen == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"${DEVICE_ENV}=cuda but torch sees no CUDA device")
    return torch.device(chosen or ("cuda" if torch.cuda.is_available() else "cpu"))


def gpu_has_bf16() -> bool:
    return device().type == "cuda" and torch.cuda.is_bf16_supported()


def training_precision(train: TrainConfig, private: bool = False) -> str:
    """``fp32`` | ``bf16`` | ``fp16``: ``auto`` is bf16 on a GPU that has it, else fp32 (CPU, DP-SGD)."""
    if train.precision != "auto":
        return train.precision
    return "bf16" if gpu_has_bf16() and not private else "fp32"


def weight_dtype(model: ModelConfig) -> torch.dtype:
    """The frozen weights' dtype: ``auto`` is float32 on CPU, bfloat16 on a GPU that has it, else float16."""
    if model.dtype != "auto":
        return DTYPES[model.dtype]
    if device().type != "cuda":
        return torch.float32
    return torch.bfloat16 if gpu_has_bf16() else torch.float16


@contextlib.contextmanager
def autocast(precision: str, on: torch.device) -> Iterator[None]:
    """Compute in ``precision`` inside the block (nothing changes for fp32)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=on.type, dtype=AUTOCAST[precision]):
        yield


def grad_scaler(precision: str, on: torch.device) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scaling (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(on.type) if precision == "fp16" else None
