"""Peak memory of the current process over a window (a training round)."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch

from finetune.precision import device

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory() -> None:
    """Start a new measurement window (GPU allocator peak, or the Linux RSS high-water mark)."""
    if device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()


def reset_peak_rss() -> None:
    """Reset the Linux RSS high-water mark (VmHWM) to the current RSS; elsewhere the peak covers
    the process lifetime."""
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


def peak_memory_mb() -> float:
    """Peak since the last reset: GPU memory allocated when on GPU, else peak RSS."""
    if device().type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """The process's peak resident memory since the last reset (host memory, not the GPU's)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
