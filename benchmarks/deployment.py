"""Deployed vs simulated, side by side in one sitting: the default recipe (MiniLM, SST-2, FedIT) with
2 clients on a 2-node loopback cluster — warm node runtime and Flower's cold process-per-message —
and in a 2-client simulation; seconds per round, the deployed/simulated ratio, and where a
client's round goes before training (process start, model set-up, data preparation), and the
non-training time of a round: its training phase less the slowest client's handler.

    python -m benchmarks.deployment [--rounds 4] [--modes warm,cold,simulation] [--sittings 3]
        [--transport-mb 50] [--out FILE] [overrides ...]

Each mode is one ``fedsubspace`` run (real processes); ``--sittings`` runs the modes in turn that many
times (the machine's speed drifts; each sitting's ratio compares runs made minutes apart).
``--transport-mb`` then also echoes a payload of LLM shape (128 arrays, that many MB each way)
SuperLink -> SuperNode -> ClientApp and back on the loopback cluster, against the same bytes over a
plain socket (``benchmarks/transport.py``), so that the issue's three targets come from one run; its
record is the last sitting's entry ``{"mode": "transport", ...}``. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMMANDS = {"simulation": ["run"], "warm": ["cluster"], "cold": ["cluster", "--cold"]}


@dataclass
class ModeResult:
    mode: str
    rows: list[dict[str, Any]]
    wall_seconds: float

    def series(self, key: str) -> list[float]:
        if key == NON_TRAINING:
            return [non_training_seconds(r) for r in self.rows]
        return [float(r.get(key) or 0.0) for r in self.rows]

    def later(self, key: str) -> float:
        """The median over rounds 2+ (round 1 loads models and prepares data everywhere)."""
        values = self.series(key)[1:]
        return statistics.median(values) if values else float("nan")


def measure(mode: str, rounds: int, extra: list[str]) -> ModeResult:
    output = Path(tempfile.mkdtemp(prefix=f"deployment-{mode}-"))
    command = [
        sys.executable, "-m", "launch.cli", *COMMANDS[mode], "partition.num_clients=2",
        f"federation.num_rounds={rounds}", "save_adapter=false", "--output-dir", str(output), *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    code = subprocess.call(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{mode}: the run failed (exit {code}); see {output}")
    (metrics,) = output.glob("*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()][1:]
    return ModeResult(mode, rows, time.perf_counter() - start)


PHASES = ("slowest_startup_seconds", "slowest_setup_seconds", "slowest_data_seconds")
NON_TRAINING = "non_training_seconds"


def non_training_seconds(row: dict[str, Any]) -> float:
    """What a round's training phase spends outside the slowest client's handler (the ClientApp's
    whole call: set-up, data, training, the reply's packing): moving messages, waiting for them,
    screening and folding replies."""
    handlers = row.get("client_handler_seconds") or [0.0]
    return float(row.get("train_phase_seconds") or 0.0) - max(handlers)


def table(results: list[ModeResult], rounds: int) -> str:
    simulated = next((r.later("seconds") for r in results if r.mode == "simulation"), float("nan"))
    lines = [
        f"Default recipe, 2 clients, {rounds} rounds; medians over rounds 2+:",
        "",
        "| mode | s / round, rounds 2+ (each round) | deployed / simulated | non-training s / round, "
        "rounds 2+ | slowest client, round 1: process start / model set-up / data (s) | the same, rounds 2+ "
        "| accuracy after the last round |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        each = ", ".join(f"{s:.1f}" for s in r.series("seconds"))
        first = " / ".join(f"{r.series(k)[0]:.1f}" for k in PHASES)
        rest = " / ".join(f"{r.later(k):.2f}" for k in PHASES)
        ratio, accuracy = r.later("seconds") / simulated, r.series("eval_accuracy")[-1]
        cells = [r.mode, f"{r.later('seconds'):.2f} ({each})", f"{ratio:.3f}", f"{r.later(NON_TRAINING):.2f}"]
        cells += [first, rest, f"{accuracy:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", default="simulation,warm,cold")
    parser.add_argument("--sittings", type=int, default=1, help="the modes in turn, this many times")
    parser.add_argument("--transport-mb", type=float, default=0.0, help="also the LLM-shaped echo (MB)")
    parser.add_argument("--out", default="", help="also write the records here (JSON)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    sittings = []
    for _ in range(args.sittings):  # A B A B ...: a machine whose speed drifts affects both alike
        sittings.append([measure(m, args.rounds, args.overrides) for m in args.modes.split(",")])
        print("\n" + table(sittings[-1], args.rounds) + "\n", flush=True)
    if len(sittings) > 1:
        print(summary(sittings))
    records: list[list[dict[str, Any]]] = [
        [{"mode": r.mode, "rows": r.rows, "wall_seconds": r.wall_seconds} for r in s] for s in sittings
    ]
    if args.transport_mb:
        from benchmarks.transport import probe

        echo = probe(args.transport_mb, 128, 6, True, None, "loopback")
        print(
            f"transport, loopback: {echo['payload_mb']:.0f} MB each way in 128 arrays, "
            f"{echo['round_seconds']:.2f} s a round (median of rounds 2+); a plain socket "
            f"{echo['socket_seconds']:.3f} s: "
            f"{echo['round_seconds'] / echo['socket_seconds']:.1f}x"
        )
        records[-1].append({"mode": "transport", **echo})
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
    print(json.dumps(records))


def summary(sittings: list[list[ModeResult]]) -> str:
    """Per deployed mode: the deployed/simulated ratio and the non-training seconds of each sitting
    (medians over rounds 2+), and their medians."""
    lines = []
    for mode in [r.mode for r in sittings[0] if r.mode != "simulation"]:
        ratios, idle = [], []
        for results in sittings:
            by_mode = {r.mode: r for r in results}
            if "simulation" in by_mode:
                ratios.append(by_mode[mode].later("seconds") / by_mode["simulation"].later("seconds"))
            idle.append(by_mode[mode].later(NON_TRAINING))
        lines.append(
            f"{mode}: deployed / simulated {', '.join(f'{x:.3f}' for x in ratios)} (median "
            f"{statistics.median(ratios) if ratios else float('nan'):.3f}); non-training s / round "
            f"{', '.join(f'{x:.2f}' for x in idle)} (median {statistics.median(idle):.2f})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
