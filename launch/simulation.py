"""Run an experiment on Flower's simulation runtime and report its real outcome.

Starts a private ``flower-superlink --simulation`` (own FLWR_HOME, a free port, runtime
dependency installation off), submits the app with ``flwr run``, streams its log, reads the
run's recorded status (``flwr run`` exits 0 even when the ServerApp fails) and stops every
process it started, by process group.

    python -m launch.simulation --num-supernodes 10 \
        --run-config "method='fedit' dataset='sst2' overrides='federation.num_rounds=5'"
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from finetune.hub import default_hub_mirror
from launch.fab import app_fab
from launch.polling import SUPEREXEC_TASK_POLL_ENV
from launch.processes import (
    console_script,
    end_processes,
    free_port,
    own_children,
    server_apps,
    start_process,
    stop_process,
)

log = logging.getLogger(__name__)
#: The SuperLink's health check, run on its host (another network namespace).
HEALTH_PROBE = """import httpx, sys
try:
    sys.exit(0 if httpx.get({url!r}, timeout=1.0, verify={verify!r}).is_success else 1)
except httpx.HTTPError:
    sys.exit(1)
"""

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "fedsubspace-sim"
COMPLETED = "finished:completed"
#: How long a stop waits for the ServerApp to end before it is killed (then the other processes go):
#: Flower's ServerApp takes longer than that to honour SIGTERM, and nothing of ours needs it to.
SERVERAPP_GRACE_SECONDS = 0.5


@dataclass
class RunOutcome:
    run_id: int
    status: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED


@dataclass(frozen=True)
class TLSFiles:
    """A CA certificate and the SuperLink's certificate and key (``scripts/make-certs.sh``)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def make(cls, folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TLSFiles:
        """A fresh CA and a server certificate for ``hosts``, made with openssl."""
        script = PROJECT_DIR / "scripts" / "make-certs.sh"
        result = subprocess.run(
            ["bash", str(script), str(folder), *hosts], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{script} failed:\n{result.stdout}\n{result.stderr}")
        return cls(folder / "ca.crt", folder / "server.pem", folder / "server.key")


SERVERAPP_TASK_POLL_S = 0.2


class LocalSuperLink:
    """A SuperLink owned by this process (simulation runtime, or deployment for real
    SuperNodes, optionally with TLS and SuperNode authentication); stopped with its children."""

    def __init__(
        self,
        flwr_home: Path,
        port: int | None = None,
        *,
        simulation: bool = True,
        tls: TLSFiles | None = None,
        node_auth: bool = False,
        ray_address: str = "",
        bind: str = "127.0.0.1",
        on_host: Callable[[list[str]], list[str]] | None = None,
        warm_server: bool = True,
        long_poll: bool = False,
    ) -> None:
        """``bind``: the address it listens on (``0.0.0.0``: every interface of its host);
        ``on_host``: wraps every command that must run on its host (``launch.netns``: in its
        network namespace): the SuperLink itself, its health check and the flwr CLI;
        ``warm_server``: its SuperExec forks each run's ServerApp from a process that has imported
        the heavy stack once (``launch/warm_server.py``); False: Flower's, a fresh process per run;
        ``long_poll``: it holds a SuperNode's empty pull until a message arrives (``launch/superlink.py``)."""
        if node_auth and tls is None:
            raise ValueError("SuperNode authentication needs TLS")
        self.flwr_home = flwr_home.resolve()
        self.port = port or free_port()
        self.simulation, self.tls, self.node_auth = simulation, tls, node_auth
        self.ray_address = ray_address  # a running Ray cluster the simulation joins (RAY_ADDRESS)
        self.bind, self.on_host, self.warm_server, self.long_poll = bind, on_host, warm_server, long_poll
        self.process: subprocess.Popen[bytes] | None = None
        self.active_run: int | None = None  # submitted and not yet seen to finish

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = os.environ.copy()
        # The SuperLink spawns flower-superexec / flwr-simulation by name: use this environment's.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["FLWR_HOME"] = str(self.flwr_home)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env.setdefault("RAY_DEDUP_LOGS", "0")
        if self.ray_address:  # ray.init() in flwr-simulation joins this cluster instead of starting one
            env["RAY_ADDRESS"] = self.ray_address
        else:
            # Without an address, ray.init() joins whatever cluster `ray start` last recorded on this
            # machine (ray_current_cluster in Ray's temp folder), even a dead one: the actors would never
            # start. "local" always starts the run's own Ray.
            env.setdefault("RAY_ADDRESS", "local")
        return env

    def write_connection(self) -> None:
        """The flwr CLI's connection to this SuperLink, in ``$FLWR_HOME/config.toml``."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        security = (
            "insecure = true" if self.tls is None else f'root-certificates = "{self.tls.ca_cert.resolve()}"'
        )
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n{security}\n'
        )

    def start(self, timeout: float = 60.0) -> None:
        self.write_connection()
        log_file = self.flwr_home / "superlink.log"
        command = [
            console_script("fedsubspace-superlink" if self.long_poll else "flower-superlink"),
            "--isolation", "subprocess",
            "--host", self.bind, "--port", str(self.port),
            "--disable-runtime-dependency-installation", "--log-file", str(log_file),
        ]  # fmt: skip
        command += ["--simulation"] if self.simulation else []
        command += ["--enable-supernode-auth"] if self.node_auth else []
        if self.tls is None:
            command += ["--insecure"]
        else:
            command += [
                "--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
            ]  # fmt: skip
        # Its own process group: stop() ends its children too. Its SuperExec looks for a submitted
        # run every 0.2 s, not every 1 s (the nodes' own SuperExecs keep their setting).
        env = {**self.env(), SUPEREXEC_TASK_POLL_ENV: str(SERVERAPP_TASK_POLL_S)}
        if self.warm_server:  # the SuperLink starts its SuperExec by name: ours comes first on PATH
            env["PATH"] = os.pathsep.join([str(self.warm_superexec_shim()), env["PATH"]])
        self.process = start_process(self.hosted(command), env, self.flwr_home)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {self.process.returncode}; see {log_file}")
            if self.healthy():
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"flower-superlink did not become healthy in {timeout:.0f} s; see {log_file}")

    def warm_superexec_shim(self) -> Path:
        """A folder whose ``flower-superexec`` runs ``launch/warm_server.py`` with its arguments
        (its log, and its runs' output, in ``$FLWR_HOME/warm-superexec.log``)."""
        folder = self.flwr_home / "warm-superexec"
        folder.mkdir(parents=True, exist_ok=True)
        shim = folder / "flower-superexec"
        log_file = self.flwr_home / "warm-superexec.log"
        shim.write_text(
            f'#!/bin/sh\nPYTHONPATH="{PROJECT_DIR}" exec "{sys.executable}" -m launch.warm_server "$@" '
            f'2>>"{log_file}"\n'
        )
        shim.chmod(0o755)
        return folder

    def hosted(self, command: list[str]) -> list[str]:
        return self.on_host(command) if self.on_host is not None else command

    def healthy(self) -> bool:
        """Its health endpoint answers, asked from its own host."""
        scheme, verify = ("http", True) if self.tls is None else ("https", str(self.tls.ca_cert))
        url = f"{scheme}://{self.address}/health"
        if self.on_host is None:
            try:
                return httpx.get(url, timeout=1.0, verify=verify).is_success
            except httpx.HTTPError:
                return False
        probe = HEALTH_PROBE.format(url=url, verify=verify)
        checked = subprocess.run(self.hosted([sys.executable, "-c", probe]), capture_output=True, check=False)
        return checked.returncode == 0

    def stop(self) -> None:
        """End the run's ServerApp first (SIGTERM to its process: it records no further round,
        and no round in which every node vanished), then the SuperLink and every other process
        it started — the simulation's Ray, the SuperExec."""
        self.end_server_app()
        stop_process(self.process)
        self.process = None

    def end_server_app(self) -> None:
        """SIGTERM to the run's ServerApp (SIGKILL after a grace period): no round after this."""
        if self.process is not None and self.process.poll() is None:
            end_processes(server_apps(self.process.pid), grace=SERVERAPP_GRACE_SECONDS)
        self.active_run = None

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.hosted([console_script("flwr"), *args]),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run_status(self, run_id: int) -> str:
        """``pending``, ``running``, ``finished:completed`` ... as ``flwr list`` shows it."""
        if self.on_host is None:  # same host: ask the Control API from this process, in milliseconds
            with contextlib.suppress(Exception):  # anything unexpected: ask the way a user would
                return self.control_status(run_id)
        result = self.flwr("list", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(result.stdout)["runs"]
            return str(runs[0]["status"])
        except (json.JSONDecodeError, KeyError, IndexError):
            return f"unknown ({result.stdout.strip()[:200]} {result.stderr.strip()[:200]})"

    @contextlib.contextmanager
    def control_client(self) -> Iterator[Any]:
        """A client of the SuperLink's Control API, as the ``flwr`` CLI makes it."""
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        client = ControlHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.tls is None,
            root_certificates=self.tls.ca_cert.read_bytes() if self.tls is not None else None,
            interceptors=[
                CliClientHttpInterceptor(),
                RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
            ],
        )
        try:
            yield client
        finally:
            client.close()

    def control_status(self, run_id: int) -> str:
        """The run's status through the Control API, as the ``flwr`` CLI asks for it — without
        starting a ``flwr list`` process (about a CPU-second each)."""
        from flwr.proto.control_pb2 import ListRunsRequest

        with self.control_client() as client:
            run = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
        status, sub_status = run.status.status, run.status.sub_status
        return f"{status}:{sub_status}" if sub_status else status

    def start_run(self, app: Path, run_config: list[str], federation_config: str | None = None) -> int:
        """Start a run of ``app`` through the Control API as ``flwr run`` does (the same FAB, run
        config and federation config), without a ``flwr run`` process (about two CPU-seconds)."""
        from flwr.cli.config_utils import load_and_validate
        from flwr.common.config import parse_config_args
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab
        from flwr.supercore.utils import simulation_config_from_json

        load_and_validate(app / "pyproject.toml")  # raises ValueError naming what is wrong
        fab_bytes = app_fab(app)  # flwr run's FAB, without its walk through .venv
        federation = None
        if federation_config:
            given = parse_config_args([federation_config])
            federation = simulation_config_from_json({k.replace("-", "_"): v for k, v in given.items()})
        request = StartRunRequest(
            fab=fab_to_proto(Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})),
            override_config=user_config_to_proto(parse_config_args(run_config)),
            federation="",
            override_federation_config=federation,
        )
        with self.control_client() as client:
            started = client.StartRun(request)
        if not started.HasField("run_id"):
            raise RuntimeError(f"the SuperLink started no run: {started}")
        return int(started.run_id)

    def submit(self, app: Path, run_config: list[str], federation_config: str | None = None) -> int:
        """Start a run as ``flwr run`` does; from this process on the same host."""
        if self.on_host is None:
            self.active_run = self.start_run(app, run_config, federation_config)
            return self.active_run
        args = ["run", str(app), CONNECTION, "--format", "json"]
        args += ["--federation-config", federation_config] if federation_config else []
        for item in run_config:
            args += ["--run-config", item]
        result = self.flwr(*args, timeout=300.0)
        try:
            self.active_run = int(json.loads(result.stdout)["run-id"])
            return self.active_run
        except (json.JSONDecodeError, KeyError, ValueError) as error:
            raise RuntimeError(f"flwr run failed:\n{result.stdout}\n{result.stderr}") from error

    def follow(self, run_id: int, timeout: float, stream: bool = True) -> RunOutcome:
        """Stream the run's log until it finishes (or ``timeout``), then return its status."""
        start = time.monotonic()
        logger = None
        if stream:
            logger = subprocess.Popen(
                self.hosted([console_script("flwr"), "log", str(run_id), CONNECTION, "--stream"]),
                env=self.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert logger.stdout is not None
            noise = self.flwr_home / "stream-noise.log"
            threading.Thread(target=filter_stream, args=(logger.stdout, noise), daemon=True).start()
        try:
            status = "not asked yet"
            while not status.startswith("finished") and time.monotonic() - start < timeout:
                poll = IN_PROCESS_STATUS_POLL_S if self.on_host is None else STATUS_POLL_S
                wait_for_run(logger, max(timeout - (time.monotonic() - start), 0.1), poll)
                status = self.run_status(run_id)
            if not status.startswith("finished"):
                self.flwr("stop", str(run_id), CONNECTION)
                status = f"timed out after {timeout:.0f} s ({status})"
        except BaseException:  # SIGTERM / Ctrl-C: the log stream ends with the run
            if logger is not None:
                logger.kill()
                logger.wait()
            raise
        if logger is not None:
            _finish(logger, grace=5.0)
        if self.active_run == run_id:
            self.active_run = None
        return RunOutcome(run_id, status, time.monotonic() - start)


# Each `flwr list` is a process that costs about a CPU-second — on 2 cores, a tenth of a round of
# the default recipe when asked every 10 s. The run's log stream ends when the run does, so the
# status is asked when it ends, and otherwise only as a safety net.
STATUS_SAFETY_POLL_S = 60.0
STATUS_POLL_S = 2.0  # without a log stream, or once it has ended
IN_PROCESS_STATUS_POLL_S = 0.2  # the same, asked from this process (milliseconds, no new process)


def wait_for_run(
    logger: subprocess.Popen[bytes] | None, remaining: float, poll: float = STATUS_POLL_S
) -> None:
    """Until ``logger`` (``flwr log --stream``) ends or a status poll is due (every ``poll``
    seconds without a stream), at most ``remaining``."""
    if logger is not None and logger.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            logger.wait(timeout=min(STATUS_SAFETY_POLL_S, remaining))
        if logger.poll() is not None:
            return  # the stream ended: ask for the status now
    else:
        time.sleep(min(poll, remaining))


#: Lines of a run's log stream that are third-party noise, not the run's progress: warnings (and
#: the source lines Python prints under them), Ray's tips, Flower's note on the default federation
#: size (the launchers always set it), transformers' loading bars.
NOISE = re.compile(
    r"Warning: |warnings\.warn\(|^\s*$|Loading weights|Since flwr 1\.32|To change federation size"
    r"|flwr federation simulation-config|gemm_4bit_forward|^\s+(?:\S+\s+)?[a-z_]+\(.*\)$"
    r"|^\(\w+ pid=\d+\)\s*$"
)


def filter_stream(source: IO[bytes], noise_file: Path) -> None:
    """Copy a log stream to stdout, third-party noise to ``noise_file`` instead."""
    with noise_file.open("a") as dropped:
        for raw in iter(source.readline, b""):
            line = raw.decode(errors="replace")
            plain = ANSI.sub("", line)
            if NOISE.search(plain):
                dropped.write(plain)
            else:
                sys.stdout.write(line)
                sys.stdout.flush()


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _finish(process: subprocess.Popen[bytes], grace: float) -> None:
    timer = threading.Timer(grace, process.terminate)
    timer.start()
    process.wait()
    timer.cancel()


def run_simulation(
    run_config: list[str],
    *,
    num_supernodes: int,
    cpus_per_client: int = 1,
    gpus_per_client: float = 0.0,
    flwr_home: Path = PROJECT_DIR / ".flwr",
    app: Path = PROJECT_DIR,
    timeout: float = 3600.0,
    stream: bool = True,
    ray_address: str = "",
) -> RunOutcome:
    federation_config = (
        f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client} "
        f"client-resources-num-gpus={gpus_per_client}"
    )
    with LocalSuperLink(flwr_home, ray_address=ray_address) as superlink:
        run_id = superlink.submit(app, run_config, federation_config)
        log.info("run %d submitted to %s (FLWR_HOME=%s)", run_id, superlink.address, superlink.flwr_home)
        return superlink.follow(run_id, timeout, stream=stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    parser.add_argument("--run-config", action="append", default=[], help="as for flwr run (repeatable)")
    parser.add_argument("--output-dir", default=str(PROJECT_DIR / "runs"))
    parser.add_argument(
        "--hub-mirror", default=None, help="default: $FEDSUBSPACE_HUB_MIRROR or ../shared/data/hub"
    )
    parser.add_argument("--flwr-home", type=Path, default=PROJECT_DIR / ".flwr")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    own_children()  # SIGTERM, Ctrl-C or our parent's death must still stop the SuperLink we started
    logging.basicConfig(level=logging.INFO, format="%(levelname)-7s %(name)s: %(message)s")

    mirror = default_hub_mirror() if args.hub_mirror is None else args.hub_mirror
    paths = f"output-dir='{Path(args.output_dir).resolve()}'"
    if mirror:
        paths += f" hub-mirror='{mirror}'"
    outcome = run_simulation(
        [paths, *args.run_config],
        num_supernodes=args.num_supernodes,
        cpus_per_client=args.cpus_per_client,
        gpus_per_client=args.gpus_per_client,
        flwr_home=args.flwr_home,
        timeout=args.timeout,
    )
    print(f"run {outcome.run_id}: {outcome.status} in {outcome.seconds:.0f} s", flush=True)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
