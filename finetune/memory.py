"""Peak memory of the current process over a window (a training round)."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory() -> None:
    """Start a new measurement window (GPU allocator peak, or the Linux RSS high-water mark)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # Resets VmHWM to the current RSS; elsewhere the peak covers the process lifetime.
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


def peak_memory_mb() -> float:
    """Peak since the last reset: GPU memory allocated when on GPU, else peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
