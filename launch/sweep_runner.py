"""Running a sweep's jobs: one simulation SuperLink kept for every job, each job an ordinary Flower
run of its own (resumed from an interrupted attempt of the same code, or adopted when it completed
but never reached its records), and each finished job recorded at once."""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.results import code_commit, same_run_code
from finetune.hub import default_hub_mirror
from launch.simulation import PROJECT_DIR, LocalSuperLink
from launch.sweep_pairing import append_fingerprint, fingerprints_path
from launch.sweep_plan import Job, job_overrides
from launch.sweep_records import (
    COMMIT_MARKER,
    append_record,
    attempt_commit,
    completed,
    completed_run,
    job_record,
    set_aside,
)
from server_app.checkpoint import round_folders

log = logging.getLogger(__name__)


class SweepRunner:
    """One simulation SuperLink for every job of a sweep; each job an ordinary Flower run of its own
    (its own ServerApp process and client actors), so nothing a job computes depends on the jobs
    before it. What the sweep saves per job is the SuperLink's start and stop, and the run status
    polls (a summary file is watched instead)."""

    def __init__(self, flwr_home: Path) -> None:
        self.superlink = LocalSuperLink(flwr_home)
        self.mirror = default_hub_mirror()

    def __enter__(self) -> SweepRunner:
        self.superlink.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.superlink.stop()

    def run(self, job: Job, extra: str, timeout: float, commit: str) -> dict[str, Any]:
        """Run ``job`` to its end at ``commit``; what it cost."""
        folder = job.folder
        resumed = self._resume(folder, commit)
        folder.mkdir(parents=True, exist_ok=True)
        node_state = folder / "node-state"
        if resumed is None and node_state.exists():  # a fresh attempt spends no earlier attempt's ε
            node_state.rename(folder / f"node-state.{int(time.time())}.aside")
        run_config, options = self._run_config(job, extra, node_state, resumed), federation(job)
        before = {p.name for p in folder.iterdir()}
        start = time.time()
        run_id = self.superlink.submit(PROJECT_DIR, run_config, options)
        submitted = time.time()
        status = self.wait(run_id, folder, before, timeout, commit, resumed, start)
        ended = time.time()
        return {
            "job": job.name,
            "status": status,
            "job_seconds": ended - start,
            "phases": {"submit": submitted - start, "run": ended - submitted},
            "started": start,
        }

    def _run_config(self, job: Job, extra: str, node_state: Path, resumed: Path | None) -> list[str]:
        """The Flower run config of the job's run: its selections and overrides, or the attempt it
        resumes."""
        if resumed is not None:
            return [f"resume-from='{resumed}' hub-mirror='{self.mirror}'"]
        cfg = job.cfg
        # the job's simulated data owners get their own node state (and privacy ledgers): a sweep
        # repeats DP runs on the same partitions by design
        overrides = f"{cfg.overrides} {extra} seed={cfg.seed} name={job.name} node_state_dir={node_state}"
        partition = job_overrides(cfg)[0]  # type: ignore[index]
        return [
            f"method='{cfg.method}' model='{cfg.model}' dataset='{cfg.dataset}' partition='{partition}' "
            f"overrides='{overrides.strip()}' output-dir='{job.folder}' hub-mirror='{self.mirror}'"
        ]

    def _resume(self, folder: Path, commit: str) -> Path | None:
        """An interrupted attempt of the same job code is continued from its checkpoint; other
        attempts are set aside."""
        resumed = None
        for stale in sorted(folder.glob("*")) if folder.exists() else []:
            if not stale.is_dir() or (stale / "summary.json").exists() or stale.name.startswith("node-state"):
                continue
            if stale.suffix in (".interrupted", ".unrecorded"):
                continue
            if (stale / "error.txt").exists():  # it failed: a new attempt starts afresh
                set_aside(stale, "interrupted")
                continue
            made_by = attempt_commit(stale)
            same_code = made_by == commit or (
                made_by is not None and same_run_code(PROJECT_DIR, made_by, commit)
            )
            if resumed is None and round_folders(stale) and same_code:
                log.info("%s: resuming %s", folder.name, stale.name)
                resumed = stale
            else:
                set_aside(stale, "interrupted")
        return resumed

    def wait(
        self,
        run_id: int,
        folder: Path,
        before: set[str],
        timeout: float,
        commit: str,
        resumed: Path | None,
        start: float,
    ) -> str:
        """The run's final status: its run folder's summary or error file ends the wait at once;
        the SuperLink is asked only every 30 s (each ask costs a CPU-second) and at the end. The
        run folder is marked with the commit as soon as it appears."""
        deadline, asked = time.monotonic() + timeout, time.monotonic()
        while time.monotonic() < deadline:
            if run_ended(folder, before, commit, resumed, start):
                break
            if time.monotonic() - asked > 30:
                asked = time.monotonic()
                if self.superlink.run_status(run_id).startswith("finished"):
                    break
            time.sleep(0.25)
        else:
            self.superlink.flwr("stop", str(run_id), "fedsubspace-sim")
            return f"timed out after {timeout:.0f} s"
        for _ in range(120):  # the ServerApp exits right after writing its summary
            status = self.superlink.run_status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(0.5)
        return status


def federation(job: Job) -> str:
    """The simulation federation's options for the job: its nodes and each client's resources."""
    cfg = job.cfg
    return (
        f"num-supernodes={int(cfg.num_supernodes)} "
        f"client-resources-num-cpus={int(cfg.get('cpus_per_client', 1))} "
        f"client-resources-num-gpus={float(cfg.get('gpus_per_client', 0.0))}"
    )


def run_ended(folder: Path, before: set[str], commit: str, resumed: Path | None, start: float) -> bool:
    """Whether the run (a folder new since ``before``, or the attempt it resumes) wrote its summary
    or error file since ``start``; new run folders are marked with ``commit`` first."""
    runs = [p for p in folder.iterdir() if p.is_dir() and p.name not in before]
    for run in runs:
        if not (run / COMMIT_MARKER).exists():
            (run / COMMIT_MARKER).write_text(commit)
    runs += [resumed] if resumed is not None else []
    ends = [p / name for p in runs for name in ("summary.json", "error.txt")]
    return any(end.exists() and end.stat().st_mtime >= start for end in ends)


def run_one(runner: SweepRunner, job: Job, commit: str, is_fingerprint: bool, timeout: float) -> bool:
    """Run (or adopt) one job and record it: in its records, or its cell's fingerprints."""
    extra = job_overrides(job.cfg)[1]  # type: ignore[index]
    if is_fingerprint:
        job = Job(copy.deepcopy(job.cfg), job.grid)
        job.cfg.results_dir = str(job.results / "fingerprints" / commit)
    log.info("%s%s: starting", job.name, " (fingerprint)" if is_fingerprint else "")
    outcome = adopted(job) if completed(job.folder) else None
    if outcome is None:
        outcome = runner.run(job, extra, timeout, commit)
    record = job_record(job, outcome, outcome.get("commit", commit))
    job.results.mkdir(parents=True, exist_ok=True)
    with (job.results / "sweep.jsonl").open("a") as handle:
        handle.write(
            json.dumps({k: outcome[k] for k in ("job", "status", "job_seconds")} | {"commit": commit}) + "\n"
        )
    if record is None:
        log.error("%s: %s (see %s)", job.name, outcome["status"], job.folder)
        return False
    if job.records is not None:
        if is_fingerprint:
            append_fingerprint(fingerprints_path(job.records), record)
        else:
            append_record(job.records, record)
    log.info("%s: %s in %.0f s", job.name, outcome["status"], outcome["job_seconds"])
    return True


def adopted(job: Job) -> dict[str, Any] | None:
    """A job that completed under ``results_dir`` but never reached its records (the sweep was
    stopped in between): recorded with the commit its run folder was marked with, and the cost the
    sweep log gives; a run of unknown code is set aside and the job runs again."""
    run = completed_run(job.folder)
    assert run is not None
    commit = attempt_commit(run)
    current = code_commit(PROJECT_DIR)
    if commit is None or not (commit == current or same_run_code(PROJECT_DIR, commit, current)):
        set_aside(run, "unrecorded")  # unknown or other code: run it again
        return None
    log_file = job.results / "sweep.jsonl"
    logged = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.is_file() else []
    entry = next((e for e in reversed(logged) if e["job"] == job.name and e.get("commit") == commit), None)
    seconds = (
        float(entry["job_seconds"])
        if entry
        else float(json.loads((run / "summary.json").read_text())["wall_seconds"])
    )
    return {
        "job": job.name, "status": "finished:completed", "job_seconds": seconds, "commit": commit,
        "phases": {"submit": 0.0, "run": seconds}, "started": None,
    }  # fmt: skip
