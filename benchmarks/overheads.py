"""Per-run overheads from a run record's rounds: how much longer a federated round's training phase
took than the clients' own training needs (framework overhead, and the part of it that is Flower's
messaging), and how many more bytes the messages carried than the arrays a method must move (wire
overhead)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def makespan(durations: Sequence[float], workers: int) -> float:
    """The least time ``workers`` need for jobs of ``durations`` when each next-longest job goes to
    the first free worker (LPT scheduling: within 4/3 of the optimum, exact for equal jobs)."""
    free = [0.0] * max(workers, 1)
    for duration in sorted(durations, reverse=True):
        free[free.index(min(free))] += duration
    return max(free)


def framework_overhead(record: dict[str, Any], parallel: int) -> float | None:
    """Mean over rounds of :func:`framework_ratios`."""
    ratios = framework_ratios(record, parallel)
    return float(np.mean(ratios)) if ratios else None


def framework_ratios(record: dict[str, Any], parallel: int) -> list[float]:
    """Per federated round, the training phase's wall time over the least it could take: the
    clients' training times scheduled on ``parallel`` workers (or, for records without per-client
    times, the larger of the slowest client and the summed time ÷ ``parallel``)."""
    ratios = []
    for row in record["rounds"][1:]:
        slowest, wall = row.get("slowest_client_seconds"), row.get("train_phase_seconds")
        if not slowest or not wall or not row.get("clients_aggregated"):
            continue  # no federated round (the centralized baseline trains in the server)
        ratios.append(wall / _least_training_time(row, slowest, parallel))
    return ratios


def _least_training_time(row: dict[str, Any], slowest: float, parallel: int) -> float:
    """The least time one round's client training takes on ``parallel`` workers."""
    if row.get("client_seconds"):
        return makespan(row["client_seconds"], parallel)
    return max(slowest, (row.get("client_seconds_total") or slowest) / parallel)


def transport_ratios(record: dict[str, Any], parallel: int) -> list[float]:
    """Per federated round that recorded them, the training phase's wall time over the clients'
    whole train handlers (model set-up, data preparation, training, serialization) scheduled on
    ``parallel`` workers: what is left is Flower's messaging and scheduling."""
    return [
        row["train_phase_seconds"] / makespan(row["client_handler_seconds"], parallel)
        for row in record["rounds"][1:]
        if row.get("client_handler_seconds") and row.get("train_phase_seconds")
    ]


def wire_overhead(record: dict[str, Any]) -> float | None:
    """Bytes the messages carried (serialized records) over the raw bytes of the arrays the method
    must move."""
    sent = sum((r.get("bytes_down") or 0) + (r.get("bytes_up") or 0) for r in record["rounds"])
    minimal = sum(
        (r.get("payload_bytes_down") or 0) + (r.get("payload_bytes_up") or 0) for r in record["rounds"]
    )
    return sent / minimal if minimal else None
