"""Transport at the speed of the wire: a synthetic payload of LLM shape (``--arrays`` float32
arrays, ``--sizes`` MB each way) echoed SuperLink -> SuperNode -> ClientApp -> back by a Flower app
that does nothing else (``benchmarks/wire_probe``), on the local cluster — on loopback, and on
separate hosts (network namespaces, TLS + node authentication, each link shaped to ``--rates``
Mbit/s) — against the same bytes over a plain TCP socket on the same link, and against the
shaped link's limit (2 × bytes × 8 / rate).

    python -m benchmarks.transport [--sizes 5,50] [--arrays 128] [--rates 100,10] [--rounds 3]
        [--where loopback,hosts] [--unpacked]

One node, so the payload has the link to itself. Medians over rounds 2+ (round 1 installs the
app on the node). Prints a table; asserts nothing. Separate hosts need root (ip netns, tc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

APP = Path(__file__).resolve().parent / "wire_probe"
#: An echo server: accept one connection, read N bytes, send them back.
ECHO_SERVER = """
import socket, sys
n = int(sys.argv[2]); s = socket.create_server((sys.argv[1], 0)); print(s.getsockname()[1], flush=True)
c, _ = s.accept(); buf = bytearray(n); view = memoryview(buf); got = 0
while got < n: got += c.recv_into(view[got:], n - got)
c.sendall(buf); c.close()
"""
#: Its client: send N bytes, read them back, print the seconds.
ECHO_CLIENT = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]); data = bytes(n)
start = time.perf_counter(); c = socket.create_connection((host, port)); c.sendall(data)
buf = bytearray(n); view = memoryview(buf); got = 0
while got < n: got += c.recv_into(view[got:], n - got)
print(time.perf_counter() - start)
"""


def socket_seconds(nbytes: int, hosts: Any | None) -> float:
    """A plain TCP round trip of ``nbytes`` each way between the hub and node 0 (loopback: both here)."""
    on_node = (lambda c: hosts.on_node(0, c)) if hosts else (lambda c: c)
    on_hub = (lambda c: hosts.on_hub(c)) if hosts else (lambda c: c)
    address = hosts.node_address(0) if hosts else "127.0.0.1"
    server = subprocess.Popen(
        on_node([sys.executable, "-c", ECHO_SERVER, address, str(nbytes)]), stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        out = subprocess.run(
            on_hub([sys.executable, "-c", ECHO_CLIENT, address, port, str(nbytes)]),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return float(out.stdout.strip())
    finally:
        server.wait(timeout=60)


def probe(
    megabytes: float, arrays: int, rounds: int, packed: bool, rate: float | None, where: str
) -> dict[str, Any]:
    from launch.cluster import LocalCluster
    from launch.netns import Hosts

    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        out = Path(folder) / "rounds.jsonl"
        hosts = stack.enter_context(Hosts(1, rate_mbit=rate)) if where == "hosts" else None
        secure = hosts is not None
        cluster = LocalCluster(Path(folder) / "flwr", 1, tls=secure, auth=secure)
        cluster.hosts = hosts
        stack.enter_context(cluster)
        config = (
            f"payload-mb={megabytes} arrays={arrays} rounds={rounds} packed={str(packed).lower()} out='{out}'"
        )
        outcome = cluster.run([config], timeout=3600, stream=False, app=APP)
        if not outcome.ok:
            raise RuntimeError(f"the probe run ended {outcome.status}; see {cluster.flwr_home}")
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        nbytes = rows[0]["payload_bytes"]
        sockets = [socket_seconds(nbytes, hosts) for _ in range(3)]
    seconds = statistics.median(r["seconds"] for r in rows[1:]) if len(rows) > 1 else rows[0]["seconds"]
    return {
        "where": where, "rate_mbit": rate, "payload_mb": nbytes / 1e6, "arrays": arrays, "packed": packed,
        "round_seconds": seconds, "each_round": [r["seconds"] for r in rows],
        "socket_seconds": statistics.median(sockets),
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
