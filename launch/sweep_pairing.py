"""What a cell's reported jobs need before they run: the tuning stage's choices (``tuned.json``),
and, when the cell already holds records from another commit, the fingerprint re-run at this commit
that lets the report pair the runs across commits (``benchmarks.pairing``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from benchmarks.pairing import admit, cell_of, equivalent_commits, fingerprint_record, is_clean
from benchmarks.results import read_records, same_run_code, write_records
from launch.simulation import PROJECT_DIR
from launch.sweep_plan import Job, tuning_key

NOT_REPRODUCED = (
    "{} did not reproduce its recorded metrics at {}: this code trains differently, so its runs could "
    "not be paired with the cell's records. Restore the code, or start the preset anew in a fresh "
    "records file."
)


def refresh_tuned(jobs: list[Job]) -> None:
    """Add to ``tuned.json`` the choices of every cell whose tuning jobs (in ``jobs``: pass the
    whole preset's) have all been recorded (``benchmarks.tuning``); choices already there stay."""
    from benchmarks.tuning import write_tuned

    tuning = [j for j in jobs if j.tuning and j.records is not None]
    reported = next((j for j in jobs if not j.tuning and j.cfg.get("tuned")), None)
    if reported is None or not tuning:
        return
    records = [r for r in read_records(tuning[0].records) if is_clean(r)]  # type: ignore[arg-type]
    done = {r["job"] for r in records}
    cells = {tuning_key(j.cfg) for j in tuning}
    incomplete = {tuning_key(j.cfg) for j in tuning if j.name not in done}
    write_tuned(records, reported.tuned_file.parent, cells - incomplete)


def has_tuned(job: Job) -> bool:
    """Whether a reported job's cell and rule have a tuned choice (always, without tuning)."""
    if job.tuning or not job.cfg.get("tuned"):
        return True
    path = job.tuned_file
    chosen = json.loads(path.read_text()) if path.is_file() else {}
    return str(job.cfg.method) in chosen.get(tuning_key(job.cfg), {})


def cell_records(job: Job) -> list[dict[str, Any]]:
    assert job.records is not None
    return [
        r for r in read_records(job.records) if (r.get("model"), r["dataset"], r.get("setting")) == job.cell
    ]


def same_code(a: str, b: str) -> bool:
    """Whether commits ``a`` and ``b`` hold the same job code."""
    return same_run_code(PROJECT_DIR, a, b)


def fingerprint_check(job: Job, commit: str) -> tuple[Job | None, bool]:
    """Before ``job`` at ``commit``: the fingerprint job still to run — a recorded job of the cell's
    paired runs (``benchmarks.pairing``), re-run here to show this commit trains like theirs — and
    whether such a re-run at this commit already failed to reproduce (then nothing of the cell may
    run)."""
    if job.tuning or job.records is None:
        return None, False
    method = str(job.cfg.get("fingerprint_method") or "fedit")
    runs = cell_records(job)
    prints = [
        f for f in read_records(fingerprints_path(job.records)) if is_clean(f) and cell_of(f) == job.cell
    ]
    paired = admit(runs, prints, method, same_code).kept
    if not paired:
        return None, False
    classes, _ = equivalent_commits([r for r in runs if is_clean(r)], prints, same_code)
    kept_class = classes[str(paired[0]["commit"])]
    if classes.get(commit) == kept_class or any(
        same_code(c, commit) for c, k in classes.items() if k == kept_class
    ):
        return None, False
    recorded = fingerprint_record(paired, method)
    assert recorded is not None
    if stored_fingerprint(job.records, recorded["job"], commit) is not None:
        return None, True  # re-run here, and it did not join the paired runs' class
    cfg = copy.deepcopy(job.cfg)
    cfg.method, cfg.seed = recorded["method"], recorded["seed"]
    return Job(cfg, job.grid), False


def stored_fingerprint(records: Path, name: str, commit: str) -> dict[str, Any] | None:
    stored = read_records(fingerprints_path(records))
    return next((r for r in stored if r["job"] == name and r.get("commit") == commit), None)


def append_fingerprint(path: Path, record: dict[str, Any]) -> None:
    """Fingerprints are kept per job *and* commit: a newer one never replaces an older one."""
    kept = [r for r in read_records(path) if (r["job"], r.get("commit")) != (record["job"], record["commit"])]
    write_records(path, sorted([*kept, record], key=lambda r: (r["job"], str(r.get("commit")))))


def fingerprints_path(records: Path) -> Path:
    return records.with_name("fingerprints.jsonl")
