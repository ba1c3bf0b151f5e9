"""A sweep chunk run from a git worktree of this commit (``--snapshot``), so the checkout can be
edited and committed while it runs; the worktrees of earlier commits are removed once their chunk
has ended."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from benchmarks.results import code_commit
from finetune.hub import default_hub_mirror
from launch.simulation import PROJECT_DIR
from launch.sweep_plan import OUTPUT_ROOT

log = logging.getLogger(__name__)

SNAPSHOTS = ".sweep-snapshots"
RUNNING = ".sweep-running"  # in a snapshot: the pid of the chunk running from it


def run_from_snapshot(argv: list[str]) -> int:
    """The sweep run from a git worktree of this commit (``.sweep-snapshots/<commit>``), writing its
    records and results here: the checkout can be edited and committed while the chunk runs."""
    commit = code_commit(PROJECT_DIR)
    if not commit or commit.endswith("+dirty"):
        print("--snapshot needs committed code: commit first", file=sys.stderr)
        return 2
    folder = PROJECT_DIR / SNAPSHOTS / commit
    remove_ended_snapshots(keep=folder)
    if not folder.is_dir():
        subprocess.run(["git", "worktree", "prune"], cwd=PROJECT_DIR, check=False)
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(folder), commit], cwd=PROJECT_DIR, check=True
        )
    env = os.environ | {
        "FEDSUBSPACE_SWEEP_OUTPUT": str(OUTPUT_ROOT),
        "FEDSUBSPACE_HUB_MIRROR": os.environ.get("FEDSUBSPACE_HUB_MIRROR") or default_hub_mirror() or "",
    }
    log.info("running from the snapshot %s; records and results go to %s", folder, OUTPUT_ROOT)
    child = subprocess.Popen([sys.executable, "-m", "launch.sweep", *argv], cwd=folder, env=env)
    (folder / RUNNING).write_text(str(child.pid))
    # stopping this launcher stops the chunk (which stops its SuperLink and runs)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.terminate())
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        (folder / RUNNING).unlink(missing_ok=True)


def remove_ended_snapshots(keep: Path) -> None:
    """Remove the worktree of every earlier commit whose chunk has ended (``keep`` stays)."""
    snapshots = PROJECT_DIR / SNAPSHOTS
    for old in snapshots.glob("*") if snapshots.is_dir() else []:
        if old != keep and not snapshot_in_use(old):
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=PROJECT_DIR, check=False)


def snapshot_in_use(folder: Path) -> bool:
    """Whether the chunk that ``folder``'s marker names is still running."""
    marker = folder / RUNNING
    if not marker.is_file():
        return False
    try:
        os.kill(int(marker.read_text().strip()), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
