"""One chunk of a sweep: the preset's pending jobs in run order, each run at the commit the chunk
started at, until the time budget would be overrun; a cell whose fingerprint does not reproduce at
this commit stops it, and so does code that changes while it runs."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.results import code_commit
from launch.simulation import PROJECT_DIR
from launch.sweep_cost import Budget, default_estimate, estimate, recorded_history
from launch.sweep_pairing import NOT_REPRODUCED, fingerprint_check, has_tuned, refresh_tuned
from launch.sweep_plan import Job, plan, validate
from launch.sweep_records import pending
from launch.sweep_runner import SweepRunner, run_one

log = logging.getLogger(__name__)

DIRTY = (
    "the code has uncommitted changes: records made from it could never be paired with others. "
    "Commit first (or pass --allow-dirty for a trial whose records the report refuses)."
)


@dataclass
class Chunk:
    """The jobs one call of the sweep runs at ``commit`` within ``budget``, and how many ran."""

    jobs: list[Job]
    commit: str
    budget: Budget
    default: float
    done: int = 0
    skipped: int = 0

    def run(self, runner: SweepRunner, job: Job) -> int | None:
        """Run ``job``, after its cell's fingerprint job when this commit needs one; the sweep's exit
        status when the chunk must end here, else None."""
        if not has_tuned(job):
            log.warning("%s: no tuned learning rate for its cell yet (tuning incomplete), skipped", job.name)
            self.skipped += 1
            return None
        if code_commit(PROJECT_DIR) != self.commit:  # each job's app is packaged from this tree
            print(f"the code changed since the sweep started at {self.commit}; stopping", file=sys.stderr)
            return 2
        fingerprint, failed = fingerprint_check(job, self.commit)
        if failed:
            print(
                NOT_REPRODUCED.format(f"the fingerprint of {job.name}'s cell", self.commit), file=sys.stderr
            )
            return 3
        for current, is_fingerprint in ([(fingerprint, True)] if fingerprint else []) + [(job, False)]:
            if not self.affords(current):
                return 0
            ok = run_one(runner, current, self.commit, is_fingerprint, timeout=float(current.cfg.timeout_s))
            self.done += ok
            self.skipped += not ok
            if is_fingerprint and (not ok or fingerprint_check(job, self.commit)[1]):
                print(NOT_REPRODUCED.format(current.name, self.commit), file=sys.stderr)
                return 3
        return None

    def affords(self, job: Job) -> bool:
        """Whether the budget left covers the job's estimate; when not, the chunk ends here."""
        cost = estimate(job, recorded_history(self.jobs), self.default)
        if self.budget.allows(cost):
            return True
        log.info(
            "stopping: %s needs about %.0f s, %.0f s of the budget left", job.name, cost, self.budget.left()
        )
        print(f"{self.done} jobs run, {self.skipped} failed or skipped; budget reached before {job.name}")
        return False

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.done} jobs run, {self.skipped} failed; the preset is complete"
        return f"{self.done} jobs run, {self.skipped} failed or skipped (see the log)"


def run_sweep(
    preset: str,
    arguments: list[str],
    budget_min: float | None,
    allow_dirty: bool,
    grids: list[str] | None = None,
    flwr_home: Path | None = None,
) -> int:
    """Run the preset's pending jobs (of ``grids`` among its grids, restricted by ``arguments``)
    within ``budget_min`` minutes; 0 when it ran what it could, 1 when a job failed or was skipped,
    2 for uncommitted or changing code, 3 when a fingerprint did not reproduce."""
    commit = code_commit(PROJECT_DIR)
    if commit.endswith("+dirty") and not allow_dirty:
        print(DIRTY, file=sys.stderr)
        return 2
    jobs = plan(preset, arguments, grids)
    for job in jobs:  # a bad grid fails here, before anything starts
        if job.tuning or not job.cfg.get("tuned"):
            validate(job)
    budget = Budget(None if budget_min is None else budget_min * 60.0)
    chunk = Chunk(jobs, commit, budget, default_estimate(jobs))
    with SweepRunner(flwr_home or PROJECT_DIR / ".flwr-sweep" / preset) as runner:
        tuned_ready = False
        for job in list(pending(jobs)):
            if not job.tuning and not tuned_ready:
                refresh_tuned(plan(preset, arguments, grids, restrict=False))
                tuned_ready = True
            status = chunk.run(runner, job)
            if status is not None:
                return status
    print(chunk.summary())
    return 0 if not chunk.skipped else 1
