"""How the launchers end mid-run: ``fedsubspace run`` (simulation) and ``fedsubspace cluster``
(SuperLink + SuperNodes) on a tiny recipe, each ended once round 2 is under way by SIGTERM, Ctrl-C
(SIGINT), the death of the launcher's parent, or SIGKILL of the launcher itself (then its watchdog
cleans up); seconds from the signal until every process it started is gone, what is left, and the
rounds recorded after the stop.

    python -m benchmarks.shutdown [--launchers run,cluster] [--ways term,int,parent,kill]

Prints figures; asserts nothing (tests/test_shutdown.py asserts the outcomes, not the times).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

PROJECT_DIR = Path(__file__).resolve().parents[1]
WAYS = ("term", "int", "parent", "kill")
# 150 local steps: a round of several seconds, so that a stop (~1.3 s) lands inside round 2
TINY = [
    "model=tiny_bert", "partition.num_clients=2", "dataset.max_train_examples=200",
    "dataset.max_eval_examples=64", "federation.num_rounds=6", "federation.fraction_train=1.0",
    "train.local_steps=150", "train.batch_size=8",
]  # fmt: skip
#: A parent that starts the launcher and waits: SIGKILLing it is "the launcher's parent died".
PARENT = "import subprocess, sys; subprocess.Popen(sys.argv[1:]).wait()"


@dataclass
class Ending:
    launcher: str
    way: str
    seconds: float  # from the signal until the last process the launcher started is gone
    left: list[str] = field(default_factory=list)  # command lines still alive 15 s after
    rounds_before: list[int] = field(default_factory=list)  # rounds recorded when the signal went
    rounds_after: list[int] = field(default_factory=list)  # rounds recorded in the end
    vanished_rounds: list[int] = field(default_factory=list)  # rounds that aggregated no client


def rows(output: Path) -> list[dict[str, Any]]:
    files = list(output.glob("*/metrics.jsonl"))
    return [json.loads(line) for line in files[0].read_text().splitlines()] if files else []


def descendants(pid: int) -> dict[tuple[int, float], psutil.Process]:
    try:
        found = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    keyed = {}
    for process in found:
        try:
            keyed[(process.pid, process.create_time())] = process
        except psutil.NoSuchProcess:
            continue
    return keyed


def end_mid_run(
    launcher: str, way: str, folder: Path, hub_mirror: str, timeout: float = 300, extra: Sequence[str] = ()
) -> Ending:
    """Start ``launcher`` (with ``extra`` arguments), wait until round 2 runs, end it ``way``; what
    happened."""
    output = folder / "out"
    command = [
        sys.executable, "-m", "launch.cli", launcher, "--output-dir", str(output), "--hub-mirror", hub_mirror,
        "--flwr-home", str(folder / "flwr"), *extra, *TINY,
    ]  # fmt: skip
    if launcher == "cluster":
        command += ["--num-nodes", "2"]
    if way == "parent":
        parent = _quiet([sys.executable, "-c", PARENT, *command])
        deadline = time.monotonic() + 30
        while not (children := psutil.Process(parent.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.05)
        root = children[0].pid
    else:
        parent = _quiet(command)
        root = parent.pid
    seen: dict[tuple[int, float], psutil.Process] = {}
    deadline = time.monotonic() + timeout
    while len(rows(output)) < 2 and time.monotonic() < deadline and parent.poll() is None:
        seen |= descendants(root)
        time.sleep(0.05)
    if len(rows(output)) < 2:
        parent.kill()
        raise RuntimeError(f"{launcher}: round 2 never started (exit {parent.poll()})")
    seen |= descendants(root)
    before = [int(r["round"]) for r in rows(output)]
    start = time.monotonic()
    if way == "parent":
        parent.kill()
    else:
        os.kill(root, {"term": signal.SIGTERM, "int": signal.SIGINT, "kill": signal.SIGKILL}[way])
    everyone = [p for p in [_process(root), *seen.values()] if p is not None]
    while time.monotonic() - start < 60:
        parent.poll()  # reap our own child as soon as it ends
        if not any(_alive(p) for p in everyone):
            break
        time.sleep(0.05)
    seconds = time.monotonic() - start
    parent.wait(timeout=30)
    after = rows(output)
    left = [_describe(p) for p in everyone if _alive(p) or _unreaped(p)]
    return Ending(
        launcher,
        way,
        seconds,
        left,
        before,
        [int(r["round"]) for r in after],
        [int(r["round"]) for r in after if int(r["round"]) > 0 and r.get("clients_aggregated") == 0],
    )


def _quiet(command: list[str]) -> subprocess.Popen[bytes]:
    """``command`` as a terminal starts it: SIGINT does what Ctrl-C does even where this process
    ignores it (a shell's background job does, and its children inherit that)."""
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=PROJECT_DIR,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _unreaped(process: psutil.Process) -> bool:
    """A zombie whose parent (not init, which reaps what it inherits) never collected it."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE and process.ppid() > 1
    except psutil.Error:
        return False


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.status()}: {' '.join(process.cmdline()[:3])}"
    except psutil.Error:
        return str(process)


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--launchers", default="run,cluster")
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--hub-mirror", default="")
    args = parser.parse_args(argv)
    from finetune.hub import default_hub_mirror

    mirror = args.hub_mirror or default_hub_mirror()
    print("| launcher | ended by | seconds until every process is gone | left | rounds at the signal | "
          "rounds recorded | rounds with no client |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for launcher in args.launchers.split(","):
        for way in args.ways.split(","):
            with tempfile.TemporaryDirectory() as folder:
                e = end_mid_run(launcher, way, Path(folder), mirror)
            print(f"| {launcher} | {way} | {e.seconds:.1f} | {e.left or 'none'} | {e.rounds_before} | "
                  f"{e.rounds_after} | {e.vanished_rounds or 'none'} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
