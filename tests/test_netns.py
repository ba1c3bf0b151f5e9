"""Separate hosts on one machine: namespaces this test creates (and removes), joined by veth pairs
with addresses it assigns, shaped by tc token buckets; skipped with the reason where the machine
does not allow them."""

import subprocess
import sys
import time

import pytest

from launch.netns import Hosts, unavailable_reason

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON or "namespaces available")

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9911)); s.listen(1); print("ready", flush=True)
conn, _ = s.accept(); total = 0
while chunk := conn.recv(1 << 16):
    total += len(chunk)
print(total, flush=True)
"""
CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 9911), timeout=10)
start = time.perf_counter(); s.sendall(b"x" * int(sys.argv[2])); s.close()
"""


def transfer_seconds(hosts: Hosts, size: int, node: int = 0, to: str = "") -> float:
    """Seconds to move ``size`` bytes from ``node`` to the hub (at ``to``, else its address on the
    node's link) over a plain TCP socket."""
    server = subprocess.Popen(hosts.on_hub([sys.executable, "-c", SERVER]), stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        address = to or hosts.hub_address(node)
        subprocess.run(hosts.on_node(node, [sys.executable, "-c", CLIENT, address, str(size)]), check=True)
        received = int(server.stdout.readline())
        elapsed = time.perf_counter() - start
    finally:
        server.kill()
        server.wait()
    assert received == size
    return elapsed


def test_each_node_reaches_the_hub_on_its_own_link_only_and_the_namespaces_go_away():
    with Hosts(nodes=2) as hosts:
        assert transfer_seconds(hosts, 1000, node=1) < 5
        other_link = hosts.on_node(1, [sys.executable, "-c", CLIENT, hosts.hub_address(0), "10"])
        assert subprocess.run(other_link, capture_output=True).returncode != 0  # no route to node 0's link
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert hosts.hub in namespaces and hosts.node(1) in namespaces
    assert hosts.hub not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_a_shaped_link_moves_bytes_at_its_rate():
    size = 2_500_000  # 20 Mbit: 2 s at 10 Mbit/s
    with Hosts(nodes=1, rate_mbit=10) as shaped:
        slow = transfer_seconds(shaped, size)
    with Hosts(nodes=1) as unshaped:
        fast = transfer_seconds(unshaped, size)
    assert 1.6 < slow < 4.0, slow
    assert fast < slow / 4, (fast, slow)
