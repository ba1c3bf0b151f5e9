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


def stop_process(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """SIGTERM (then SIGKILL) the process group of ``process`` and every descendant it spawned
    (Ray workers and app processes may leave the group)."""
    if process is None:
        return
    pgid = process.pid
    try:
        descendants = psutil.Process(pgid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for signal_, wait in ((sig, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, signal_)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(pgid):
            break
        time.sleep(0.5)
    else:
        log.warning("processes of group %d survived SIGKILL", pgid)
    _, alive = psutil.wait_procs(descendants, timeout=15.0)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies waiting for init do not count)."""
    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False
