"""A real Flower deployment on this machine: one SuperLink and N SuperNodes as separate processes,
optionally with TLS and SuperNode authentication, running an experiment with ``flwr run``.

    python -m launch.cluster --num-nodes 2 [--tls] [--auth] [--separate-hosts [--rate-mbit 10]] \
        --run-config "method='fedit' overrides='partition.num_clients=2 federation.num_rounds=2'"

Each SuperNode gets its data through its node config (``partition-id``/``num-partitions`` of the
shared dataset, and the mirror); the run's real outcome is read from its recorded status, and
every process started is stopped by PID on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from finetune.hub import default_hub_mirror
from launch.netns import Hosts, add_host_options
from launch.processes import (
    console_script,
    free_port,
    own_children,
    start_process,
    stop_process,
    stop_processes,
)
from launch.simulation import (
    CONNECTION,
    PROJECT_DIR,
    LocalSuperLink,
    RunOutcome,
    TLSFiles,
)
from launch.supernode import add_heartbeat_option, heartbeat_problem

log = logging.getLogger(__name__)


@dataclass
class SuperNode:
    index: int
    node_config: str
    private_key: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    log_file: Path | None = None
    runtime_port: int = 0
    runtime: subprocess.Popen[bytes] | None = None  # the warm SuperExec (launch/warm_node.py)
    runtime_log: Path | None = None


@dataclass
class LocalCluster:
    """SuperLink + SuperNodes on loopback, owned by this process."""

    flwr_home: Path
    num_nodes: int
    tls: bool = False
    auth: bool = False
    hub_mirror: str = ""
    #: The warm node runtime (a long-lived worker per node); False: Flower's own SuperExec, one
    #: fresh ClientApp process per message.
    warm: bool = True
    #: torch threads per node (0: the machine's cores shared out between the nodes)
    threads_per_node: int = 0
    worker_options: list[str] = field(default_factory=list)  # more launch/warm_node.py options
    #: the heartbeat period the warm nodes declare (launch/supernode.py; 0: Flower's 30 s): the
    #: SuperLink gives up on a silent node after twice this
    heartbeat_interval: float = 0.0
    nodes: list[SuperNode] = field(default_factory=list)
    strays: list[SuperNode] = field(default_factory=list)  # nodes started beside the cluster's own
    superlink: LocalSuperLink | None = None
    #: Separate hosts (launch.netns): the SuperLink in the hub namespace, node i in its own,
    #: reaching the SuperLink over its shaped link. None: everything on loopback.
    hosts: Hosts | None = None

    def __post_init__(self) -> None:
        if self.heartbeat_interval and (problem := heartbeat_problem(self.heartbeat_interval)):
            raise ValueError(problem)
        if self.heartbeat_interval and not self.warm:
            raise ValueError("--heartbeat-interval needs the warm runtime's SuperNode (not --cold)")

    def start(self) -> None:
        self.flwr_home = self.flwr_home.resolve()
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        names = ("127.0.0.1", "localhost", *(self.hosts.hub_addresses() if self.hosts else ()))
        tls = TLSFiles.make(self.flwr_home / "certs", names) if self.tls else None
        self.superlink = LocalSuperLink(
            self.flwr_home, simulation=False, tls=tls, node_auth=self.auth,
            bind="0.0.0.0" if self.hosts else "127.0.0.1", on_host=self.hosts.on_hub if self.hosts else None,
            warm_server=self.warm, long_poll=self.warm,
        )  # fmt: skip
        self.superlink.start()
        for index in range(self.num_nodes):
            config = f"partition-id={index} num-partitions={self.num_nodes}"
            if self.hub_mirror:
                config += f" hub-mirror='{self.hub_mirror}'"
            node = SuperNode(index, config)
            if self.auth:
                node.private_key = self.make_node_key(f"supernode-{index}")
                self.register(node.private_key)
            self.nodes.append(node)
            self.start_node(node)

    def make_node_key(self, name: str) -> Path:
        """An ECDSA P-384 key pair for SuperNode authentication (the private key stays with the node)."""
        key = self.flwr_home / "keys" / name
        key.parent.mkdir(parents=True, exist_ok=True)
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True)
        return key

    def register(self, private_key: Path) -> None:
        """``flwr supernode register``: only registered public keys may connect."""
        assert self.superlink is not None
        result = self.superlink.flwr(
            "supernode", "register", str(private_key.with_suffix(".pub")), CONNECTION
        )
        if result.returncode != 0:
            raise RuntimeError(f"registering {private_key.name} failed:\n{result.stdout}\n{result.stderr}")

    def node_command(self, node: SuperNode) -> list[str]:
        assert self.superlink is not None
        # the warm runtime's SuperNode also polls sooner when idle and holds its SuperExec's task polls
        # (launch/supernode.py), as its SuperLink holds the nodes' pulls; --cold is stock Flower throughout
        supernode = console_script("fedsubspace-supernode" if self.warm else "flower-supernode")
        address = self.superlink.address
        if self.hosts is not None:  # across its link, from its own host
            address = f"{self.hosts.hub_address(node.index)}:{self.superlink.port}"
        command = [
            supernode, "--superlink", address,
            "--port", str(node.runtime_port), "--node-config", node.node_config, "--max-retries", "0",
        ]  # fmt: skip
        command += ["--isolation", "process"] if self.warm else []
        command += ["--heartbeat-interval", f"{self.heartbeat_interval:g}"] if self.heartbeat_interval else []
        command += (
            ["--insecure"]
            if self.superlink.tls is None
            else ["--root-certificates", str(self.superlink.tls.ca_cert)]
        )
        command += ["--auth-supernode-private-key", str(node.private_key)] if node.private_key else []
        return self.on_node_host(node, command)

    def on_node_host(self, node: SuperNode, command: list[str]) -> list[str]:
        """``command`` run on ``node``'s host (its namespace, when the cluster has separate hosts)."""
        return self.hosts.on_node(node.index, command) if self.hosts is not None else command

    def start_node(self, node: SuperNode) -> None:
        assert self.superlink is not None
        node.log_file = self.flwr_home / f"supernode-{node.index}.log"
        node.runtime_port = node.runtime_port or free_port()
        if node not in self.nodes and node not in self.strays:
            self.strays.append(node)
        node.process = start_process(
            self.node_command(node), self.superlink.env(), self.flwr_home, node.log_file
        )
        if self.warm:
            self.start_runtime(node)

    def runtime_command(self, node: SuperNode) -> list[str]:
        threads = self.threads_per_node or max(1, (os.cpu_count() or 1) // max(self.num_nodes, 1))
        return self.on_node_host(node, [
            sys.executable, "-m", "launch.warm_node", "--runtime-api-address",
            f"127.0.0.1:{node.runtime_port}", "--insecure", "--threads", str(threads), *self.worker_options,
        ])  # fmt: skip

    def start_runtime(self, node: SuperNode) -> None:
        """The node's warm SuperExec (its worker dies with it)."""
        assert self.superlink is not None
        node.runtime_log = self.flwr_home / f"supernode-{node.index}-runtime.log"
        env = {**self.superlink.env(), "PYTHONPATH": str(PROJECT_DIR)}
        node.runtime = start_process(self.runtime_command(node), env, self.flwr_home, node.runtime_log)

    def worker_pids(self, index: int) -> list[int]:
        """The warm worker process(es) of node ``index``."""
        runtime = self.nodes[index].runtime
        if runtime is None:
            return []
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(runtime.pid).children()
            return [p.pid for p in children if "spawn_main" in " ".join(p.cmdline())]
        return []

    def kill_node(self, index: int) -> None:
        """Stop one SuperNode abruptly (SIGKILL), as a crashed machine would."""
        import signal

        stop_process(self.nodes[index].process, sig=signal.SIGKILL)

    def stop(self) -> None:
        """The run's ServerApp first (a node that vanished under a live run would be recorded as a
        failed round), then the SuperLink and the nodes together."""
        nodes = [*self.nodes, *self.strays]
        link = self.superlink.process if self.superlink is not None else None
        if self.superlink is not None:
            self.superlink.end_server_app()
        stop_processes([link, *[p for node in nodes for p in (node.runtime, node.process)]])
        if self.superlink is not None:
            self.superlink.process = None
        for node in nodes:
            node.process = node.runtime = None

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(
        self, run_config: list[str], timeout: float = 3600.0, stream: bool = True, app: Path = PROJECT_DIR
    ) -> RunOutcome:
        assert self.superlink is not None
        run_id = self.superlink.submit(app, run_config)
        log.info("run %d submitted to %s", run_id, self.superlink.address)
        return self.superlink.follow(run_id, timeout, stream=stream)


def enter_cluster(stack: contextlib.ExitStack, cluster: LocalCluster, args: argparse.Namespace) -> None:
    """Start ``cluster`` in ``stack``, on separate hosts first when ``args`` asks for them."""
    if getattr(args, "separate_hosts", False):
        cluster.hosts = stack.enter_context(Hosts(cluster.num_nodes, rate_mbit=args.rate_mbit))
    stack.enter_context(cluster)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-nodes", type=int, default=2)
    parser.add_argument("--tls", action="store_true", help="TLS with a fresh private CA (openssl)")
    parser.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls)")
    parser.add_argument("--run-config", action="append", default=[], help="as for flwr run (repeatable)")
    parser.add_argument("--output-dir", default=str(PROJECT_DIR / "runs"))
    parser.add_argument("--hub-mirror", default=default_hub_mirror())
    parser.add_argument("--flwr-home", default=str(PROJECT_DIR / ".flwr-cluster"))
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--cold", action="store_true", help="Flower's SuperExec: a process per message")
    parser.add_argument("--app", type=Path, default=PROJECT_DIR, help="another Flower app (a benchmark's)")
    add_heartbeat_option(parser)
    add_host_options(parser)
    args = parser.parse_args(argv)
    own_children()  # SIGTERM, Ctrl-C or our parent's death stop the run, then every process
    logging.basicConfig(level=logging.INFO, format="%(levelname)-7s %(name)s: %(message)s")
    output = Path(args.output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    ours = args.app.resolve() == PROJECT_DIR
    run_config = [f"output-dir='{output}' hub-mirror='{args.hub_mirror}'"] if ours else []
    run_config += args.run_config
    cluster = LocalCluster(
        Path(args.flwr_home),
        args.num_nodes,
        tls=args.tls or args.auth,
        auth=args.auth,
        hub_mirror=args.hub_mirror,
        warm=not args.cold,
        heartbeat_interval=args.heartbeat_interval,
    )
    with contextlib.ExitStack() as stack:
        enter_cluster(stack, cluster, args)
        outcome = cluster.run(run_config, timeout=args.timeout, app=args.app.resolve())
    log.info("run %d: %s after %.0f s", outcome.run_id, outcome.status, outcome.seconds)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
