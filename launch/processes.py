"""Processes this launcher starts, each in its own process group, stopped with every descendant."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def console_script(name: str) -> str:
    """A console script of the running interpreter's environment."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def start_process(
    command: Sequence[str], env: dict[str, str], cwd: Path, log_file: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new process group (so :func:`stop_process` can end its children)."""
    if log_file is None:
        return subprocess.Popen(
            list(command), env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    with open(log_file, "ab") as output:  # the child holds its own descriptor
        return subprocess.Popen(
            list(command), env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process(
    process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, grace: float = 2.0
) -> None:
    """``sig`` (then, after ``grace`` seconds, SIGKILL) to the process group of ``process`` and to
    every descendant it spawned; see :func:`stop_processes`."""
    stop_processes([process], sig, grace)


def stop_processes(
    processes: Sequence[subprocess.Popen[bytes] | None], sig: int = signal.SIGTERM, grace: float = 2.0
) -> None:
    """``sig`` to the process group of each process and to every descendant it spawned (Ray
    workers and app processes may leave the group), all at once, noted before any signal so that a
    child whose parent dies first is still found; SIGKILL to whatever is left after ``grace``
    seconds; each process reaped."""
    started = [p for p in processes if p is not None]
    descendants = []
    for process in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            descendants += psutil.Process(process.pid).children(recursive=True)
    deadline = time.monotonic() + grace
    for process in started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.send_signal(sig)
    for process in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(deadline - time.monotonic(), 0.0))
    end_processes(descendants, None, max(deadline - time.monotonic(), 0.0))
    for process in started:
        if process.poll() is None or _group_alive(process.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
    for process in started:
        process.wait(timeout=5.0)


def end_processes(
    processes: list[psutil.Process], sig: int | None = signal.SIGTERM, grace: float = 2.0
) -> None:
    """``sig`` to each (None: already sent), SIGKILL to those alive after ``grace`` seconds; returns
    once each has ended (a zombie whose parent has yet to reap it counts as ended)."""
    for child in processes:
        with contextlib.suppress(psutil.Error):
            if sig is not None:
                child.send_signal(sig)
    alive = wait_ended(processes, grace)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    wait_ended(alive, 2.0)


def wait_ended(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``processes`` still running after at most ``timeout`` seconds; a zombie counts as
    ended (``psutil.wait_procs`` would wait out its timeout on a zombie its parent has yet to reap)."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in processes if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


#: The processes that run a ServerApp: deployment's, and the simulation's (ServerApp + Ray driver).
SERVERAPP_SCRIPTS = ("flwr-serverapp", "flwr-simulation")


def server_apps(root: int) -> list[psutil.Process]:
    """The ServerApp processes among ``root``'s descendants."""
    try:
        return [p for p in psutil.Process(root).children(recursive=True) if is_server_app(p)]
    except psutil.NoSuchProcess:
        return []


def is_server_app(process: psutil.Process) -> bool:
    """Started as one of :data:`SERVERAPP_SCRIPTS`, or forked and named as one (launch/warm_server.py)."""
    try:
        started_as = any(Path(part).name in SERVERAPP_SCRIPTS for part in process.cmdline()[:2])
        return started_as or process.name() in SERVERAPP_SCRIPTS
    except psutil.Error:
        return False


_PR_SET_PDEATHSIG = 1


def own_children() -> None:
    """Make this launcher answer for every process it starts, however it ends: SIGTERM unwinds like
    Ctrl-C (the launchers' context managers stop the run first, then the processes); the death of
    its parent sends it SIGTERM (Linux); and a watchdog process ends them all if this process is
    killed outright (SIGKILL runs no handler)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    watchdog = [sys.executable, "-m", "launch.watchdog", str(os.getpid())]
    subprocess.Popen(watchdog, stdin=subprocess.DEVNULL, start_new_session=True)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies waiting for init do not count)."""
    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False
