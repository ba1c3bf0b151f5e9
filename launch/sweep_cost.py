"""A sweep's measured cost: each job's expected seconds from the records of the most similar jobs,
the time budget of a chunk, and the plan of the jobs left with their cost (``--plan``)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.results import read_records
from launch.sweep_plan import Job, plan
from launch.sweep_records import pending

#: A job is started only when the budget left exceeds its estimate times this.
ESTIMATE_MARGIN = 1.15


def job_seconds(record: dict[str, Any]) -> float:
    """What a recorded job cost end to end (older records: the run's own wall time)."""
    return float(record.get("job_seconds") or record["wall_seconds"])


def estimate(job: Job, history: list[dict[str, Any]], default: float) -> float:
    """The job's expected cost from the measured records of the most similar jobs: the same
    method in the same cell and stage, else in the cell's other stage, else the cell's other
    methods, else the dataset's — from jobs that had the machine to themselves where any did
    (a contended job's wall time overstates its cost)."""
    model, dataset, setting = job.cell
    stage = "tune" if job.tuning else "report"
    method = str(job.cfg.method)
    keys = (
        lambda r: (r["method"], r["dataset"], r.get("setting"), r.get("stage", "report"), r.get("model")),
        lambda r: (r["method"], r["dataset"], r.get("setting"), r.get("model")),
        lambda r: (r["dataset"], r.get("setting"), r.get("model")),
        lambda r: (r["dataset"], r.get("model")),
    )
    wanted = (
        (method, dataset, setting, stage, model),
        (method, dataset, setting, model),
        (dataset, setting, model),
        (dataset, model),
    )
    for pool in ([r for r in history if not r.get("contended")], history):
        for key, target in zip(keys, wanted, strict=True):
            seen = [job_seconds(r) for r in pool if key(r) == target]
            if seen:
                return float(statistics.median(seen))
    return default


def recorded_history(jobs: list[Job]) -> list[dict[str, Any]]:
    """Every record in the records files of ``jobs``: the measurements estimates come from."""
    return [r for j in {x.records for x in jobs if x.records} for r in read_records(j)]


def default_estimate(jobs: list[Job]) -> float:
    """The cost of a job nothing similar was measured for: the preset's ``estimate_s``."""
    return float(jobs[0].cfg.get("estimate_s", 300)) if jobs else 300.0


@dataclass
class Budget:
    seconds: float | None
    start: float = dataclasses.field(default_factory=lambda: time.monotonic())

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.monotonic() - self.start)

    def allows(self, cost: float) -> bool:
        return cost * ESTIMATE_MARGIN <= self.left()


def print_plan(preset: str, arguments: list[str]) -> None:
    """The preset's jobs per stage and cell with their estimated cost, and what is left to run."""
    jobs = plan(preset, arguments)
    history = recorded_history(jobs)
    default = default_estimate(jobs)
    left = list(pending(jobs))
    cells: dict[tuple[str, ...], list[float]] = {}
    for job in jobs:
        cells.setdefault(("tune" if job.tuning else "report", *job.cell), []).append(
            estimate(job, history, default)
        )
    total = 0.0
    print("| stage | model | dataset | setting | jobs | est. s per job (median) | est. minutes |")
    print("|---|---|---|---|---|---|---|")
    for key, costs in cells.items():
        total += sum(costs)
        print(
            f"| {' | '.join(key)} | {len(costs)} | {statistics.median(costs):.0f} | {sum(costs) / 60:.0f} |"
        )
    remaining = sum(estimate(j, history, default) for j in left)
    print(f"\n{len(jobs)} jobs, {total / 3600:.1f} h; {len(left)} left, {remaining / 3600:.1f} h")
