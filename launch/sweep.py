"""Benchmark sweep: every job of a preset's grids, one ordinary Flower run each, on one SuperLink
kept for the whole sweep; resumable, and runnable in chunks under a time budget.

    python -m launch.sweep --preset cpu_paired --budget-min 150     # a chunk; the next call resumes
    python -m launch.sweep --preset cpu_paired --dry-run            # compose + validate every job
    python -m launch.sweep --preset cpu_paired --plan               # jobs left and their measured cost
    python -m launch.sweep --preset cpu_paired --profile fedit-sst2-dir05-s0   # one job, phase by phase
    python -m launch.sweep --preset cpu_small method=fedit,full seed=0   # a sub-grid

A preset is ``conf/sweep/<preset>.yaml`` and every ``<preset>_*.yaml`` beside it (a *grid* each):
its ``hydra.sweeper.params`` span the jobs, ``settings`` name cells (a partition with its options
and the methods it applies to), a grid with ``stage: tune`` is a tuning stage (``lr_mult`` times
each method's own peak learning rate, scored on the tuning split), and the reported grids use the
values the tuning runs chose (``tuned``, written here through ``benchmarks.tuning``). Arguments
``key=a,b`` keep only those values of a grid parameter; other ``key=value`` arguments override the
preset (``records=null results_dir=<scratch folder>`` for a trial).

Order: every tuning job first (each rule of each cell at its default learning rate, then the nearer
multiples, then the farther), then the reported jobs seed by seed (every cell of seed 0, then of
seed 1, ...), so a partial sweep already answers something with paired seeds.

Each finished job's record (``benchmarks.results.run_record``, with its commit and the phases of
its wall time) goes into the grid's ``records`` file at once; commit those files after a chunk. A
job already in the records, or completed under ``results_dir``, is skipped; an interrupted one
continues from its last checkpoint. The sweep refuses to run from a tree whose code has
uncommitted changes (records from it could never be paired), unless ``--allow-dirty``.

When a cell already holds records from another commit, the cell's *fingerprint job* (its
``fingerprint_method`` at the lowest seed) is run again at this commit first and stored in
``fingerprints.jsonl``: the report pairs runs across commits only where it reproduced bit for bit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from finetune.hub import default_hub_mirror
from launch.processes import own_children
from launch.sweep_chunk import run_sweep
from launch.sweep_cost import ESTIMATE_MARGIN, Budget, estimate, job_seconds, print_plan
from launch.sweep_pairing import (
    NOT_REPRODUCED,
    append_fingerprint,
    cell_records,
    fingerprint_check,
    fingerprints_path,
    has_tuned,
    refresh_tuned,
    stored_fingerprint,
)
from launch.sweep_plan import (
    SWEEP_DIR,
    Job,
    compose_grid,
    dry_run,
    in_setting,
    job_name,
    job_overrides,
    plan,
    preset_grids,
    tuned_overrides,
    tuning_key,
    validate,
)
from launch.sweep_profile import profile, profile_markdown
from launch.sweep_records import (
    COMMIT_MARKER,
    append_record,
    attempt_commit,
    completed,
    completed_run,
    job_record,
    pending,
    phases,
    set_aside,
)
from launch.sweep_runner import SweepRunner, adopted, run_one
from launch.sweep_snapshot import RUNNING, SNAPSHOTS, run_from_snapshot, snapshot_in_use

# The sweep's parts, each in its own module (``python -m launch.sweep`` stays the entry point):
#   sweep_plan      the jobs of a preset's grids, their names, overrides and run order; --dry-run
#   sweep_records   run folders, each finished job's record and its phases, the jobs pending
#   sweep_cost      a job's estimated cost from the records, the time budget; --plan
#   sweep_pairing   the tuning stage's choices and the fingerprint re-run across commits
#   sweep_runner    one SuperLink for every job, a job run, resumed or adopted, and recorded
#   sweep_chunk     a chunk of the sweep under its budget (run_sweep)
#   sweep_profile   one job timed phase by phase; --profile
#   sweep_snapshot  a chunk run from a git worktree of this commit; --snapshot
# Their names stay importable from here. A test that patches a name patches it where it is used
# (``launch.sweep_chunk.code_commit``, ``launch.sweep_plan.OUTPUT_ROOT``, ...): a patch here would
# reach nothing, which is why ``OUTPUT_ROOT`` is not re-exported.
__all__ = [
    "COMMIT_MARKER",
    "ESTIMATE_MARGIN",
    "NOT_REPRODUCED",
    "RUNNING",
    "SNAPSHOTS",
    "SWEEP_DIR",
    "Budget",
    "Job",
    "SweepRunner",
    "adopted",
    "append_fingerprint",
    "append_record",
    "attempt_commit",
    "cell_records",
    "completed",
    "completed_run",
    "compose_grid",
    "dry_run",
    "estimate",
    "fingerprint_check",
    "fingerprints_path",
    "has_tuned",
    "in_setting",
    "job_name",
    "job_overrides",
    "job_record",
    "job_seconds",
    "main",
    "pending",
    "phases",
    "plan",
    "preset_grids",
    "print_plan",
    "profile",
    "profile_markdown",
    "refresh_tuned",
    "run_from_snapshot",
    "run_one",
    "run_sweep",
    "set_aside",
    "snapshot_in_use",
    "stored_fingerprint",
    "tuned_overrides",
    "tuning_key",
    "validate",
]


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", "--config-name", dest="preset", default="cpu_paired")
    parser.add_argument("--budget-min", type=float, default=None, help="stop before a job that would overrun")
    parser.add_argument("--dry-run", action="store_true", help="compose and validate every job, run none")
    parser.add_argument("--plan", action="store_true", help="print the jobs left and their measured cost")
    parser.add_argument("--profile", metavar="JOB", help="time one job phase by phase (run unless done)")
    parser.add_argument(
        "--snapshot", action="store_true", help="run from a worktree of this commit (keep editing meanwhile)"
    )
    parser.add_argument("--allow-dirty", action="store_true", help="run from uncommitted code (unpairable)")
    parser.add_argument("--grid", action="append", help="only these grid files of the preset (repeatable)")
    parser.add_argument(
        "arguments", nargs="*", help="key=a,b restricts a grid parameter; key=value overrides"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = argument_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True
    )
    if args.snapshot:
        return run_from_snapshot([a for a in argv if a != "--snapshot"])
    own_children()
    os.environ.setdefault("FEDSUBSPACE_HUB_MIRROR", default_hub_mirror() or "")
    if args.dry_run:
        return dry_run(args.preset, args.arguments)
    if args.plan:
        print_plan(args.preset, args.arguments)
        return 0
    if args.profile:
        return profile(args.preset, args.profile, args.arguments)
    return run_sweep(args.preset, args.arguments, args.budget_min, args.allow_dirty, args.grid)


if __name__ == "__main__":
    sys.exit(main())
