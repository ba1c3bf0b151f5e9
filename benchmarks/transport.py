"""Transport at the speed of the wire: a synthetic payload of LLM shape (``--arrays`` float32
arrays, ``--sizes`` MB each way) echoed SuperLink -> SuperNode -> ClientApp -> back by a Flower app
that does nothing else (``benchmarks/wire_probe``), on the local cluster — on loopback, and on
separate hosts (network namespaces, TLS + node authentication, each link shaped to ``--rates``
Mbit/s) — against the same bytes over a plain TCP socket on the same link, and against the
shaped link's limit (2 × bytes × 8 / rate).

    python -m benchmarks.transport [--sizes 5,50] [--arrays 128] [--rates 100,10] [--rounds 3]
        [--where loopback,hosts] [--unpacked]

One node, so the payload has the link to itself. Medians over rounds 2+ (round 1 installs the
app on the node); the socket figure is the median of three round trips between the same hosts,
made by the probe app itself after its rounds. Prints a table; asserts nothing. Separate hosts
need root (ip netns, tc).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

APP = Path(__file__).resolve().parent / "wire_probe"
PROJECT_DIR = APP.parents[1]


def probe(
    megabytes: float, arrays: int, rounds: int, packed: bool, rate: float | None, where: str
) -> dict[str, Any]:
    """One probe run on a one-node cluster (``python -m launch.cluster --app``)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "probe.json"
        config = (
            f"payload-mb={megabytes} arrays={arrays} rounds={rounds} packed={str(packed).lower()} out='{out}'"
        )
        command = [
            sys.executable, "-m", "launch.cluster", "--num-nodes", "1", "--app", str(APP),
            "--flwr-home", str(Path(folder) / "flwr"), "--run-config", config,
        ]  # fmt: skip
        if where == "hosts":  # separate hosts: TLS and node authentication on, the link shaped
            command += ["--separate-hosts", "--auth", *(["--rate-mbit", str(rate)] if rate else [])]
        done = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"the probe run failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        result = json.loads(out.read_text())
    rounds_s = [r["seconds"] for r in result["rounds"]]
    nbytes = result["payload_bytes"]
    return {
        "where": where, "rate_mbit": rate, "payload_mb": nbytes / 1e6, "arrays": arrays, "packed": packed,
        "round_seconds": statistics.median(rounds_s[1:] or rounds_s), "each_round": rounds_s,
        "socket_seconds": statistics.median(s for trips in result["socket_seconds"] for s in trips),
        "wire_limit_seconds": 2 * nbytes * 8 / (rate * 1e6) if rate else None,
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| link | payload (MB each way, arrays) | round, median of rounds 2+ (s) | plain socket (s) | "
        "round / socket | wire limit (s) | round / limit |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        link = (
            "loopback"
            if r["where"] == "loopback"
            else f"separate hosts, TLS + auth, {r['rate_mbit']:g} Mbit/s"
        )
        limit = r["wire_limit_seconds"]
        cells = [
            link, f"{r['payload_mb']:.1f}, {r['arrays']}" + ("" if r["packed"] else " (unpacked)"),
            f"{r['round_seconds']:.2f}", f"{r['socket_seconds']:.2f}",
            f"{r['round_seconds'] / r['socket_seconds']:.2f}", f"{limit:.2f}" if limit else "—",
            f"{r['round_seconds'] / limit:.2f}" if limit else "—",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--sizes", default="5,50", help="MB each way")
    parser.add_argument("--arrays", type=int, default=128)
    parser.add_argument("--rates", default="100,10", help="Mbit/s of the separate hosts' links")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--where", default="loopback,hosts")
    parser.add_argument("--unpacked", action="store_true", help="also one Flower Array per array")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    rows = []
    for where in args.where.split(","):
        for rate in [None] if where == "loopback" else [float(r) for r in args.rates.split(",")]:
            for size in (float(s) for s in args.sizes.split(",")):
                for packed in (True, False) if args.unpacked else (True,):
                    rows.append(probe(size, args.arrays, args.rounds, packed, rate, where))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("\n" + table(rows) + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
