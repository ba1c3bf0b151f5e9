"""Fault injection on the default recipe (MiniLM, SST-2, 10 clients, FedIT): one client's replies
are altered in every round (server_app/faults.py) — its update × 1e3, sign-flipped, a replay of
its previous upload, a duplicate reply, or a stop mid-upload — with and without the defences
(``federation.update_bound=reject`` and ``federation.robust=trimmed_mean``), beside the clean run
with and without them. For each run: whether it completed, the faulty node's outcome in every
round (rejected / clipped / averaged / ignored duplicate), the final accuracy against the clean
run's, and the checkpoint it left.

    python -m benchmarks.faults [--rounds 10] [--kinds scaled,sign_flipped,...] [--out FOLDER] [overrides ...]

Each case is one ``fedsubspace run`` (a Ray simulation, real processes). Prints a table and writes
``records.jsonl`` and ``README.md`` to ``--out`` when given; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server_app.faults import FAULT_KINDS

FAULTY_PARTITION = 9
DEFENCES = ["federation.update_bound=reject", "federation.robust=trimmed_mean", "federation.robust_trim=0.1"]


@dataclass
class Case:
    fault: str  # "" = clean
    defended: bool
    status: str = ""
    accuracy: float | None = None
    outcomes: list[str] = field(default_factory=list)  # the faulty node's, round by round
    checkpoint_rounds: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.fault or 'clean'}, defences {'on' if self.defended else 'off'}"


def run_case(case: Case, rounds: int, extra: list[str]) -> Case:
    output = Path(tempfile.mkdtemp(prefix=f"faults-{case.fault or 'clean'}-"))
    command = [
        sys.executable, "-m", "launch.cli", "run", f"federation.num_rounds={rounds}", "save_adapter=false",
        "--output-dir", str(output), *(DEFENCES if case.defended else []), *extra,
    ]  # fmt: skip
    if case.fault:
        command += ["--run-config", f"inject-fault='{case.fault}:{FAULTY_PARTITION}'"]
    start = time.perf_counter()
    code = subprocess.call(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    case.wall_seconds = time.perf_counter() - start
    folders = list(output.glob("*/summary.json"))
    if code != 0 or not folders:
        case.status = f"failed (exit {code}; see {output})"
        return case
    folder = folders[0].parent
    summary = json.loads(folders[0].read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()][1:]
    case.status = str(summary.get("status"))
    case.accuracy = summary["final"].get("eval_accuracy")
    injected = {int(r): int(node) for r, _, node in summary.get("faults_injected", [])}
    case.outcomes = [outcome(row, injected.get(int(row["round"]))) for row in rows]
    case.checkpoint_rounds = sorted(
        int(p.name.split("-")[1]) for p in (folder / "checkpoints").glob("round-*")
    )
    return case


def outcome(row: dict[str, Any], node: int | None) -> str:
    """What the round did with the faulty node's reply."""
    if node is None:
        return (
            "averaged (no fault this round)" if FAULTY_PARTITION in row["partitions_aggregated"] else "absent"
        )
    rejected, clipped = row.get("clients_rejected", {}), row.get("updates_clipped", {})
    if str(node) in rejected:
        return "rejected: " + rejected[str(node)].split(" (")[0]
    if str(node) in clipped:
        return f"clipped ×{clipped[str(node)]:.3g}"
    ignored = [why for why in row.get("replies_ignored", []) if why.startswith(f"node {node}:")]
    return "averaged" + (" (a duplicate ignored)" if ignored else "")


def table(cases: list[Case], rounds: int) -> str:
    clean = next((c.accuracy for c in cases if not c.fault and not c.defended), None)
    lines = [
        f"Default recipe (MiniLM, SST-2, 10 clients, FedIT), {rounds} rounds; partition {FAULTY_PARTITION}'s "
        "replies altered in every round. Defences: " + ", ".join(DEFENCES) + ".",
        "",
        "| case | status | accuracy | vs clean (points) | the faulty node, round by round "
        "| checkpoints | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        gap = f"{100 * (c.accuracy - clean):+.2f}" if c.accuracy is not None and clean is not None else "–"
        accuracy = f"{c.accuracy:.4f}" if c.accuracy is not None else "–"
        rounds_seen = "; ".join(sorted(set(c.outcomes), key=c.outcomes.index)) or "–"
        cells = [
            c.label,
            c.status,
            accuracy,
            gap,
            rounds_seen,
            str(c.checkpoint_rounds),
            f"{c.wall_seconds:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kinds", default=",".join(FAULT_KINDS))
    parser.add_argument("--out", type=Path, default=None, help="folder for records.jsonl and README.md")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    plan = [Case("", False), Case("", True)]
    plan += [Case(kind, defended) for kind in args.kinds.split(",") for defended in (False, True)]
    cases = []
    for case in plan:
        cases.append(run_case(case, args.rounds, args.overrides))
        print(f"{case.label}: {case.status}, accuracy {case.accuracy}, {case.wall_seconds:.0f} s", flush=True)
    text = table(cases, args.rounds)
    print("\n" + text + "\n")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "records.jsonl").write_text("".join(json.dumps(asdict(c)) + "\n" for c in cases))
        command = "python -m benchmarks.faults " + " ".join(argv if argv is not None else sys.argv[1:])
        (args.out / "README.md").write_text(f"# Fault injection\n\n`{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
