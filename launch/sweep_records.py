"""What a sweep keeps of its jobs: their run folders (completed, set aside, marked with the commit
that ran them), each finished job's record with the phases of its wall time, and the jobs still
pending."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.pairing import is_clean
from benchmarks.results import merge_records, read_records, run_record, write_records
from launch.sweep_plan import Job

#: A run folder's mark of the commit whose code the sweep ran it with.
COMMIT_MARKER = "sweep-commit"


def completed(folder: Path) -> bool:
    """Whether a previous job left a completed run in ``folder``."""
    return completed_run(folder) is not None


def completed_run(folder: Path) -> Path | None:
    """The newest completed run folder in ``folder`` (attempts set aside are not runs)."""
    for summary in sorted(folder.glob("*/summary.json"), reverse=True):
        if summary.parent.suffix in (".interrupted", ".unrecorded"):
            continue
        try:
            if json.loads(summary.read_text()).get("status") == "completed":
                return summary.parent
        except json.JSONDecodeError:
            continue
    return None


def set_aside(folder: Path, kind: str) -> Path:
    """Rename an attempt to ``<name>.<kind>`` (``<name>.<n>.<kind>`` when taken): kept, never a run."""
    target, n = folder.with_name(f"{folder.name}.{kind}"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.{n}.{kind}")
    return folder.rename(target)


def attempt_commit(run_dir: Path) -> str | None:
    marker = run_dir / COMMIT_MARKER
    return marker.read_text().strip() if marker.is_file() else None


def job_record(job: Job, outcome: dict[str, Any], commit: str) -> dict[str, Any] | None:
    """The committed record of a finished job: the run's compact record, its stage, its commit,
    what the whole job cost and the phases of that time."""
    run_dir = completed_run(job.folder)
    if run_dir is None:
        return None
    record = run_record(run_dir, job.name, int(job.cfg.seed), commit)
    if record is None:
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    record.update(
        model=str(job.cfg.model),
        stage="tune" if job.tuning else "report",
        job_seconds=round(outcome["job_seconds"], 2),
        phases=phases(outcome, summary, record),
        **machine_load(),
    )
    return record


#: A job's timing counts as contended when the machine's 1-minute load average at its end exceeds
#: its cores by this factor (a job's own clients keep about one process per core busy).
CONTENDED_LOAD = 1.25


def machine_load() -> dict[str, Any]:
    """The 1-minute load average when the job ended and whether it says other work shared the
    machine: a contended job's metrics stand, its wall time overstates its cost."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return {"load_1m": round(load, 2), "cores": cores, "contended": load > CONTENDED_LOAD * cores}


def phases(outcome: dict[str, Any], summary: dict[str, Any], record: dict[str, Any]) -> dict[str, float]:
    """The job's wall time split: submitting (``flwr run``), the ServerApp's start (process,
    imports), its set-up (data, model), the rounds' training (of which the first round's client
    start-up) and evaluation, and the finish (summary written to status seen)."""
    rounds = record["rounds"]
    train = sum(r.get("train_phase_seconds") or 0.0 for r in rounds)
    evaluation = sum(r.get("eval_seconds") or 0.0 for r in rounds)
    first: dict[str, Any] = next((r for r in rounds if r["round"] == 1), {})
    later = [r.get("train_phase_seconds") or 0.0 for r in rounds if r["round"] > 1]
    cold = (first.get("train_phase_seconds") or 0.0) - (statistics.median(later) if later else 0.0)
    started = summary.get("started_at") if outcome.get("started") else None
    result = {
        "submit": outcome["phases"]["submit"],
        "train": train,
        "evaluate": evaluation,
        "first_round_cold_start": max(cold, 0.0),
    }
    if started is not None:
        result["server_start"] = started - outcome["started"] - outcome["phases"]["submit"]
        result["server_setup"] = float(summary.get("setup_seconds") or 0.0)
        result["finish"] = (
            outcome["started"] + outcome["job_seconds"] - started - float(summary["wall_seconds"])
        )
    return {k: round(v, 2) for k, v in result.items()}


def append_record(path: Path, record: dict[str, Any]) -> None:
    write_records(path, merge_records(read_records(path), [record]))


def pending(jobs: list[Job]) -> Iterator[Job]:
    """The jobs neither in their records nor (for grids without records) completed."""
    recorded = {
        path: {r["job"] for r in read_records(path) if is_clean(r)}
        for path in {j.records for j in jobs if j.records}
    }
    for job in jobs:
        if job.records is None:
            if not completed(job.folder):
                yield job
        elif job.name not in recorded[job.records]:
            yield job
