"""The SuperLink's warm SuperExec (``python -m launch.warm_server``): Flower's ``flower-superexec``
whose ServerApp and simulation processes are forked from a zygote that has already imported the
heavy stack, instead of started fresh.

A fresh ``flwr-serverapp`` / ``flwr-simulation`` process spends about 7 CPU-seconds importing torch,
transformers, peft, datasets and Ray before the ServerApp's first line: a sweep, a cluster that
takes several runs and the test suite pay it for every run. The zygote imports those third-party
packages once (never this app's own modules: each run still loads its own version from its FAB)
and runs no torch operation, so a fork of it is a clean process that starts at once. Each run is
still its own process, with Flower's own entry point and arguments; it is named after the command it
stands for (``/proc/<pid>/comm``), which is how the launchers find a run's ServerApp to stop it. A
zygote that cannot start or dies sends runs to Flower's own subprocess executor.

    python -m launch.warm_server --insecure --runtime-api-address 127.0.0.1:9091 --parent-pid N
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
from typing import IO, Any

log = logging.getLogger("launch.warm_server")

#: Flower's entry points of the commands forked from the zygote
ENTRY_POINTS = {
    "flwr-serverapp": ("flwr.superlink.cli", "flwr_serverapp"),
    "flwr-simulation": ("flwr.simulation.app", "flwr_simulation"),
}
#: what the zygote imports once (third-party only: a run loads this app's modules from its FAB)
PRELOADED = (
    "torch", "transformers", "peft", "datasets", "flwr_datasets", "safetensors", "hydra", "omegaconf",
    "ray", *(module for module, _ in ENTRY_POINTS.values()),
)  # fmt: skip
READY = "ready"
ZYGOTE_START_TIMEOUT_S = 300.0
_PR_SET_NAME, _PR_SET_PDEATHSIG = 15, 1


def _prctl(option: int, value: Any) -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)


def zygote_main(replies: IO[str]) -> None:
    """Import the stack, then fork a run for each command line read from stdin; each child's pid
    goes to ``replies``. Children are reaped by the kernel (SIGCHLD ignored here)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with its SuperExec
    for module in PRELOADED:
        with contextlib.suppress(Exception):
            importlib.import_module(module)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    replies.write(READY + "\n")
    replies.flush()
    for line in sys.stdin:
        argv = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.close(replies.fileno())  # the zygote's pipes are not the run's
            run_forked(argv)  # never returns
        replies.write(f"{pid}\n")
        replies.flush()


def run_forked(argv: list[str]) -> None:
    """In the forked child: become ``argv[0]`` and run Flower's entry point with ``argv``."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # Ray and subprocess wait for their children
        _prctl(_PR_SET_PDEATHSIG, 0)
        _prctl(_PR_SET_NAME, argv[0].encode()[:15])
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # not the zygote's command pipe
        os.dup2(2, 1)  # nor its reply pipe
        sys.stdin = open(os.devnull)  # noqa: SIM115
        sys.stdout = sys.stderr
        module, function = ENTRY_POINTS[argv[0]]
        sys.argv = list(argv)
        try:
            getattr(importlib.import_module(module), function)()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        atexit._run_exitfuncs()  # what a normal interpreter exit would run (Ray's shutdown)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


class Zygote:
    """The SuperExec's handle on its zygote process."""

    def __init__(self) -> None:
        command = [sys.executable, "-m", "launch.warm_server", "--zygote"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = False

    def wait_ready(self, timeout: float = ZYGOTE_START_TIMEOUT_S) -> bool:
        """Whether the zygote has imported the stack (waiting for it at most ``timeout`` seconds)."""
        if not self.ready:
            assert self.process.stdout is not None
            answered, _, _ = select.select([self.process.stdout], [], [], timeout)
            self.ready = bool(answered) and self.process.stdout.readline().strip() == READY
        return self.ready

    def fork(self, argv: list[str]) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(argv) + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        self.process.wait()


class ForkingExecutor:
    """Flower's executor interface: ServerApp and simulation tasks forked from the zygote, anything
    else (and every task once the zygote has failed) by Flower's own subprocess executor."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.cold = SubprocessExecutor()
        self.zygote: Zygote | None = Zygote()

    def get_eligible_capacity(
        self, supported_task_types: set[Any], **kwargs: Any
    ) -> tuple[set[Any], set[str]]:
        return set(supported_task_types), set()

    def wait_for_capacity(self, task_type: Any = None, **kwargs: Any) -> None:
        return None

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TASK_TYPE_TO_COMMAND
        from flwr.supercore.superexec.executor.types import LaunchResult

        command = TASK_TYPE_TO_COMMAND[spec.task_type]
        if command not in ENTRY_POINTS or self.zygote is None:
            return self.cold.launch(spec)
        try:
            if not self.zygote.wait_ready():
                raise RuntimeError(
                    f"not ready within {ZYGOTE_START_TIMEOUT_S:.0f} s ({self.zygote.process.poll()})"
                )
            pid = self.zygote.fork(flower_arguments(command, spec))
        except Exception as error:  # the zygote is broken: every run goes cold from now on
            log.error("the ServerApp zygote failed (%s): runs start as fresh processes", error)
            self.zygote.stop()
            self.zygote = None
            return self.cold.launch(spec)
        log.info("task %d: %s forked from the zygote (pid %d)", spec.task_id, command, pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        if self.zygote is not None and self.zygote.ready and not self.zygote.alive():
            log.error("the ServerApp zygote died (exit code %s)", self.zygote.process.poll())
            self.zygote = None

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.stop()
            self.zygote = None


def flower_arguments(command: str, spec: Any) -> list[str]:
    """The command line Flower's subprocess executor would start for ``spec``."""
    argv = [command, "--runtime-api-address", spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        argv.append("--insecure")
    elif spec.root_certificates_path is not None:
        argv += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        argv.append("--allow-runtime-dependency-installation")
    return argv


def main(argv: list[str] | None = None) -> None:
    """``flower-superexec`` with the forking executor (same arguments)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments == ["--zygote"]:
        replies = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # stray prints of an import go to stderr, not into the reply pipe
        sys.stdout = sys.stderr
        zygote_main(replies)
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)-7s %(name)s: %(message)s", force=True)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the SuperExec's database set-up
    from launch.flower_contract import require

    require()
    from launch.superexec import run_flower_superexec

    run_flower_superexec(ForkingExecutor(), arguments)


if __name__ == "__main__":
    main()
