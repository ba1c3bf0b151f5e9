"""The records of a sweep's results folder: the completed, commit-marked runs of its reported jobs
(``results/<job>/<run folder>/``), merged into the stored ``runs.jsonl`` the report is built from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from benchmarks.results import merge_records, read_records, run_record, write_records

#: A tuning job's name: ``...-lr<mult>-s<seed>``.
TUNING_JOB = re.compile(r"-lr[0-9.e+-]+-s\d+$")


def collect(results: Path) -> list[dict[str, Any]]:
    """Records of the completed runs under ``results/<job>/<run folder>/`` that the sweep marked
    with the commit it ran them at (``sweep-commit``): reported jobs only (tuning jobs,
    ``...-lr<mult>-s<seed>``, keep their own records), no attempt set aside, no fingerprint re-run."""
    records = []
    for job_dir in sorted(p for p in results.iterdir() if p.is_dir() and not p.name.startswith(".")):
        seed_text = job_dir.name.rsplit("-s", 1)[-1]
        if TUNING_JOB.search(job_dir.name) or "-s" not in job_dir.name or not seed_text.isdigit():
            continue
        records += _job_records(job_dir, int(seed_text))
    return records


def _job_records(job_dir: Path, seed: int) -> list[dict[str, Any]]:
    """The records of a job's completed, commit-marked run folders."""
    records = []
    for run_dir in sorted(job_dir.iterdir()):
        marker = run_dir / "sweep-commit"
        if run_dir.suffix in (".interrupted", ".unrecorded") or not marker.is_file():
            continue
        record = run_record(run_dir, job_dir.name, seed, marker.read_text().strip())
        if record is not None:
            records.append(record)
    return records


def gather_records(results: Path, stored: Path) -> list[dict[str, Any]]:
    """The records in ``stored``, merged with (and updated by) the completed runs under ``results``."""
    records = read_records(stored)
    if results.is_dir():
        known = {r["job"] for r in records}
        records = merge_records(records, [r for r in collect(results) if r["job"] not in known])
        write_records(stored, records)
    return records
