"""Scale benchmark: the default recipe with 10, 100 and 1,000 virtual clients, 10 % sampled a round,
3 rounds; peak memory of the simulation's whole process tree and seconds per round.

    python -m benchmarks.scale [--clients 10,100,1000] [--rounds 3] [--fraction 0.1]

Each size is one ``fedsubspace run`` (a real simulation SuperLink); a sampler reads the RSS of the
launcher's process tree every second. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def tree_rss_mb(process: psutil.Process) -> float:
    """RSS of a process and every descendant, in MB."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def measure(clients: int, rounds: int, fraction: float, extra: list[str]) -> dict[str, float | list[float]]:
    output = Path(tempfile.mkdtemp(prefix=f"scale-{clients}-"))
    sampled = max(1, int(clients * fraction))
    command = [
        sys.executable, "-m", "launch.cli", "run", f"partition.num_clients={clients}",
        f"federation.num_rounds={rounds}", f"federation.fraction_train={fraction}",
        f"federation.min_train_clients={min(sampled, 2)}", "save_adapter=false", "--output-dir", str(output),
        "--timeout", "3000", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    peak, watcher = [0.0], psutil.Process(process.pid)

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(watcher))
            time.sleep(1.0)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    code = process.wait()
    thread.join()
    if code != 0:
        raise SystemExit(f"{clients} clients: the run failed (exit {code}); see {output}")
    (metrics,) = output.glob("*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {
        "clients": clients,
        "sampled": sampled,
        "peak_tree_rss_mb": peak[0],
        "round_seconds": [row["seconds"] for row in rows[1:]],
        "train_phase_seconds": [row["train_phase_seconds"] for row in rows[1:]],
        "eval_seconds": [row["eval_seconds"] for row in rows[1:]],
        "wall_seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("overrides", nargs="*", help="more overrides for every run")
    args = parser.parse_args(argv)
    rows = [measure(int(n), args.rounds, args.fraction, args.overrides) for n in args.clients.split(",")]
    header = ("clients", "sampled a round", "peak RSS of the process tree (MB)", "s per round",
              "of which training / evaluation", "wall (s)")  # fmt: skip
    print("\n| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rounds = ", ".join(f"{s:.1f}" for s in r["round_seconds"])  # type: ignore[union-attr]
        split = ", ".join(
            f"{t:.1f}/{e:.1f}"
            for t, e in zip(r["train_phase_seconds"], r["eval_seconds"], strict=True)  # type: ignore[arg-type]
        )
        cells = (
            r["clients"],
            r["sampled"],
            f"{r['peak_tree_rss_mb']:.0f}",
            rounds,
            split,
            f"{r['wall_seconds']:.0f}",
        )
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
