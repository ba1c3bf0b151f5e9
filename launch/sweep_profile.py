"""One job of a sweep preset timed phase by phase (``--profile JOB``): the job's phases from its
record, and each round's training, its slowest client's start-up, and evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.results import code_commit, read_records
from launch.simulation import PROJECT_DIR
from launch.sweep_pairing import refresh_tuned
from launch.sweep_plan import Job, plan
from launch.sweep_records import completed_run
from launch.sweep_runner import SweepRunner, run_one


def profile(preset: str, name: str, arguments: list[str]) -> int:
    """One job of the preset timed phase by phase: run (and recorded) unless it already completed
    here; the table goes to ``<records folder>/profile-<job>.md``."""
    job = next((j for j in plan(preset, arguments) if j.name == name), None)
    if job is None:
        raise SystemExit(f"{preset} has no job {name!r}")
    recorded = {r["job"] for r in read_records(job.records)} if job.records else set()
    if completed_run(job.folder) is None and name in recorded:
        raise SystemExit(f"{name} is recorded but its run folder is not here: profile it where it ran")
    if completed_run(job.folder) is None and not run_to_profile(preset, job, arguments):
        return 1
    record = next((r for r in read_records(job.records) if r["job"] == name), None) if job.records else None
    run_dir = completed_run(job.folder)
    assert run_dir is not None
    text = profile_markdown(name, record, run_dir)
    print(text)
    if job.records is not None:
        (job.records.parent / f"profile-{name}.md").write_text(text)
    return 0


def run_to_profile(preset: str, job: Job, arguments: list[str]) -> bool:
    """Run (and record) the job to profile, at the committed code; whether it completed."""
    if code_commit(PROJECT_DIR).endswith("+dirty"):
        raise SystemExit("the code has uncommitted changes: commit before profiling a job (it is recorded)")
    with SweepRunner(PROJECT_DIR / ".flwr-sweep" / preset) as runner:
        refresh_tuned(plan(preset, arguments, restrict=False))
        return run_one(runner, job, code_commit(PROJECT_DIR), False, float(job.cfg.timeout_s))


def profile_markdown(name: str, record: dict[str, Any] | None, run_dir: Path) -> str:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    lines = [f"# Profile of `{name}`", ""]
    if record is not None:
        lines += [
            f"Job wall time {record.get('job_seconds') or record['wall_seconds']:.1f} s at "
            f"`{record.get('commit') or 'unknown'}` (the sweep's clock; the run's own for older records).",
            "",
            "| phase | seconds |",
            "|---|---|",
            *(f"| {phase} | {seconds:.2f} |" for phase, seconds in record.get("phases", {}).items()),
            "",
        ]
    lines += [
        "| round | training | of which slowest client: process start / set-up / data | evaluation |",
        "|---|---|---|---|",
    ]
    for row in rows:
        start = [
            row.get(k) for k in ("slowest_startup_seconds", "slowest_setup_seconds", "slowest_data_seconds")
        ]
        shown = " / ".join("—" if v is None else f"{v:.2f}" for v in start)
        train, evaluation = row.get("train_phase_seconds") or 0.0, row.get("eval_seconds") or 0.0
        lines.append(f"| {row['round']} | {train:.2f} | {shown} | {evaluation:.2f} |")
    return "\n".join(lines) + "\n"
