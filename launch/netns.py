"""Separate hosts on one machine: a network namespace for the SuperLink's host (the hub) and one
for each SuperNode's, each node joined to the hub by a veth pair with addresses this module
assigns (``10.<net>.<node>.1`` on the hub's side, ``.2`` on the node's, a /30 each), optionally
shaped by ``tc`` token-bucket rate limits in both directions. Needs root and ``ip``/``tc``; every
namespace it creates it removes again, and it sends nothing anywhere but between them.

    with Hosts(nodes=2, rate_mbit=10) as hosts:
        subprocess.run(hosts.on_hub(["python3", "-m", "http.server", "8000"]))
        subprocess.run(hosts.on_node(0, ["curl", f"http://{hosts.hub_address(0)}:8000/"]))
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from dataclasses import dataclass, field


def add_host_options(parser: argparse.ArgumentParser) -> None:
    """``--separate-hosts`` and ``--rate-mbit``: the cluster across network namespaces (launch/netns.py)."""
    parser.add_argument(
        "--separate-hosts", action="store_true",
        help="the SuperLink and each SuperNode in a network namespace of its own (root; launch/netns.py)",
    )  # fmt: skip
    parser.add_argument(
        "--rate-mbit", type=float, default=None, help="with --separate-hosts: each link's rate"
    )


class NamespacesUnavailable(RuntimeError):
    """This machine (or user) cannot create network namespaces."""


def run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}")


def unavailable_reason() -> str:
    """Why namespaces cannot be used here, or "" when they can (tests skip with the reason)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed"
    probe = f"fsx-probe-{os.getpid()}"
    try:
        run("ip", "netns", "add", probe)
    except RuntimeError as error:
        return f"cannot create a network namespace: {error}"
    run("ip", "netns", "delete", probe)
    return ""


@dataclass
class Hosts:
    """A hub and ``nodes`` node hosts; ``rate_mbit``: each link's rate each way (None: unshaped)."""

    nodes: int
    rate_mbit: float | None = None
    net: int = 231  # the second octet of every address: 10.<net>.<node>.<1|2>
    prefix: str = field(default_factory=lambda: f"fsx{os.getpid() % 100000}")
    created: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def node(self, index: int) -> str:
        return f"{self.prefix}-n{index}"

    def hub_address(self, index: int) -> str:
        """The hub's address on node ``index``'s link: where that node reaches the SuperLink."""
        return f"10.{self.net}.{index}.1"

    def node_address(self, index: int) -> str:
        return f"10.{self.net}.{index}.2"

    def hub_addresses(self) -> list[str]:
        return [self.hub_address(i) for i in range(self.nodes)]

    def on_hub(self, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hub, *command]

    def on_node(self, index: int, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.node(index), *command]

    def __enter__(self) -> Hosts:
        reason = unavailable_reason()
        if reason:
            raise NamespacesUnavailable(reason)
        try:
            self._add_namespace(self.hub)
            for index in range(self.nodes):
                self._add_namespace(self.node(index))
                self._link(index)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _add_namespace(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self.created.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def _link(self, index: int) -> None:
        """A veth pair hub <-> node ``index``, addressed and up, shaped both ways."""
        hub_end, node_end = f"{self.prefix}h{index}", f"{self.prefix}v{index}"
        run("ip", "link", "add", hub_end, "netns", self.hub, "type", "veth", "peer", "name", node_end,
            "netns", self.node(index))  # fmt: skip
        for namespace, device, address in (
            (self.hub, hub_end, self.hub_address(index)),
            (self.node(index), node_end, self.node_address(index)),
        ):
            run("ip", "-n", namespace, "addr", "add", f"{address}/30", "dev", device)
            run("ip", "-n", namespace, "link", "set", device, "up")
            if self.rate_mbit is not None:
                self._shape(namespace, device)

    def _shape(self, namespace: str, device: str) -> None:
        """A token bucket on the device's egress: ``rate_mbit``, a burst of about 10 ms of it."""
        assert self.rate_mbit is not None
        burst = max(int(self.rate_mbit * 1e6 / 8 / 100), 16 * 1024)  # bytes: 10 ms, at least 16 KiB
        run("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf",
            "rate", f"{self.rate_mbit}mbit", "burst", str(burst), "latency", "400ms")  # fmt: skip

    def remove(self) -> None:
        """Delete every namespace this object created (their veth pairs go with them)."""
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
        self.created.clear()
