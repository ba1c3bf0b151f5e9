"""How busy the machine's cores were while a command ran: ``python -m benchmarks.cpu_busy -- make test``.

Samples ``/proc/stat`` every ``--interval`` seconds and prints the command's wall time, the mean
share of all cores that were busy, and the share of samples below ``--low`` (an idle core the
command could have used). The whole machine is sampled: run it on a quiet one."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

STAT = Path("/proc/stat")


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all cores since boot."""
    fields = [int(v) for v in STAT.read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--low", type=float, default=0.6, help="a sample below this share counts as low")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    start, previous = time.monotonic(), cpu_times()
    samples: list[float] = []
    child = subprocess.Popen(command)
    while child.poll() is None:
        time.sleep(args.interval)
        now = cpu_times()
        samples.append(busy_share(previous, now))
        previous = now
    wall = time.monotonic() - start
    mean = sum(samples) / len(samples) if samples else 0.0
    low = sum(s < args.low for s in samples) / len(samples) if samples else 0.0
    print(
        f"cpu_busy: exit {child.returncode}, {wall:.0f} s wall, {mean:.0%} mean busy of all cores, "
        f"{low:.0%} of {len(samples)} samples ({args.interval:g} s) under {args.low:.0%}",
        file=sys.stderr,
    )
    return child.returncode


if __name__ == "__main__":
    raise SystemExit(main())
