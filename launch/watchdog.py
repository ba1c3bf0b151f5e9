"""Ends a launcher's processes when the launcher is killed outright (SIGKILL runs no handler):

    python -m launch.watchdog <launcher pid>

Started by :func:`launch.processes.own_children` in a session of its own. Every half second it
notes the launcher's descendants; once the launcher is gone it ends the run's ServerApp first
(SIGTERM, SIGKILL after 0.5 s), then the rest (SIGTERM, SIGKILL after 2 s), and exits. A launcher
that ends normally has stopped them already: nothing is left.
"""

from __future__ import annotations

import contextlib
import sys
import time

import psutil

from launch.processes import end_processes, is_server_app


def descendants(launcher: psutil.Process) -> dict[tuple[int, float], psutil.Process]:
    """The launcher's descendants but this watchdog, keyed by (pid, start time) against PID reuse."""
    found = {}
    with contextlib.suppress(psutil.Error):
        for child in launcher.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.pid != psutil.Process().pid:
                    found[(child.pid, child.create_time())] = child
    return found


def watch(pid: int, interval: float = 0.5) -> None:
    try:
        launcher = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[tuple[int, float], psutil.Process] = {}
    while launcher.is_running() and launcher.status() != psutil.STATUS_ZOMBIE:
        seen = {key: p for key, p in seen.items() if p.is_running()} | descendants(launcher)
        time.sleep(interval)
    left = [p for p in seen.values() if p.is_running()]
    for process in list(left):  # and whatever they started since the last look
        with contextlib.suppress(psutil.Error):
            left += process.children(recursive=True)
    end_processes([p for p in left if is_server_app(p)], grace=0.5)  # no round after the stop
    end_processes(left)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
