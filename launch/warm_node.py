"""A warm SuperNode runtime: Flower's SuperExec, with its ClientApp tasks run one after another in a
long-lived worker process instead of a fresh ``flwr-clientapp`` process per message.

Flower 1.41 starts one ClientApp process per message (its issue #3670), so each round would import
torch and transformers, load the model and prepare the data again. Here the SuperNode runs with
``--isolation process`` and this process takes the place of the ``flower-superexec`` beside it:

    flower-supernode --isolation process --port 9094 ... &
    python -m launch.warm_node --runtime-api-address 127.0.0.1:9094 --insecure [--threads 8] [--gpu 0]

It is Flower's own SuperExec (the same task acquisition, tokens and Runtime API) with one change,
the executor: a ClientApp task is handed to the worker, which runs Flower's own task function
(``run_clientapp``: pull the message, load the app, call it, push the reply) in-process, so the
imported modules and the ClientApp's model cache (``client_app/session.py``) outlive the task.

* One task at a time: while the worker is busy, ClientApp tasks wait at the SuperNode (two runs on
  a node take turns; a private model — merged bases — is never shared between runs).
* A new app version (FAB hash) gets a fresh worker, so a run never executes another run's code.
* Faults: a worker that dies is restarted for the next task (the task it held fails, and the
  server rejects that reply as for any failed node); a task running longer than
  ``--task-timeout`` is taken as a hung worker, which is killed; a worker that cannot start (e.g.
  ``--gpu`` names a device this machine lacks) leaves the task to a fresh ``flwr-clientapp``
  process, as stock Flower runs it (slow, logged). The worker dies with this process (Linux
  parent-death signal).
* ``--threads`` and ``--gpu`` bind the worker to its share of the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from launch.polling import OBJECT_RETRY, SUPEREXEC_TASK_POLL_ENV, Poll, PollingTime

log = logging.getLogger("launch.warm_node")  # named: run as __main__ (and __mp_main__ in the worker)
READY = "ready"
WORKER_START_TIMEOUT_S = 300.0
# Flower polls its SuperNode's Runtime API for tasks every 1 s (SUPEREXEC_TASK_POLL_ENV sets it); here at
# most every TASK_POLL_CAP s (or the variable's value), and often once the next task is due — as
# long after the last task ended as that one came (server_app/waits.py). Each poll costs the
# SuperNode a request (at 10 a second the two processes spent ~8 % of a core idling: an ad-hoc
# psutil sample, script not kept).
TASK_POLL_CAP = 0.5
FIRST_TASK_POLL = 0.01


@dataclass(frozen=True)
class WorkerSettings:
    threads: int = 0  # torch threads (0: torch's default)
    gpu: str | None = None  # CUDA device index the worker may use
    task_timeout_s: float = 0.0  # a task running longer is a hung worker (0: no limit)


@dataclass(frozen=True)
class TaskOrder:
    """What the worker needs to run one ClientApp task (from Flower's ExecutionSpec)."""

    task_id: int
    runtime_api_address: str
    token: str
    insecure: bool
    root_certificates_path: str | None


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (a SIGKILLed SuperExec leaves no worker)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def bind(settings: WorkerSettings) -> None:
    """Restrict this process to its share of the machine; refuse a GPU it does not have."""
    if settings.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.gpu
    if settings.threads:
        os.environ["OMP_NUM_THREADS"] = str(settings.threads)
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.gpu is not None and not torch.cuda.is_available():
        raise RuntimeError(f"--gpu {settings.gpu}: no such CUDA device on this machine")


def worker_main(connection: Connection, settings: WorkerSettings) -> None:
    """The worker: bind, import the heavy stack once, then run each task it is sent."""
    die_with_parent()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # force: importing launch.polling gave the root a NullHandler (server_app quiets third-party logs),
    # which would make a plain basicConfig do nothing
    logging.basicConfig(level=logging.INFO, format="%(levelname)-7s %(name)s: %(message)s", force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        bind(settings)
        import datasets  # noqa: F401  (the imports a ClientApp task would otherwise pay each round)
        import peft  # noqa: F401
        import transformers  # noqa: F401
        from flwr.supercore.exit.exit_handler import trigger_exit_handlers
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime import run_clientapp as flower_task
    except BaseException as error:
        connection.send(f"failed: {type(error).__name__}: {error}")
        return
    exit_codes: list[int] = []

    def finish_task(code: int, *args: Any, **kwargs: Any) -> None:
        """Flower's task function ends with ``flwr_exit``: run its exit handlers (push the task's
        status, stop the heartbeat), keep the code, and keep the process."""
        trigger_exit_handlers(run_before_force_exit=True)
        trigger_exit_handlers(run_before_force_exit=False)
        exit_codes.append(int(code))

    flower_task.flwr_exit = finish_task  # type: ignore[assignment]
    phases = time_phases(flower_task)
    connection.send(READY)
    while True:
        order: TaskOrder | None = connection.recv()
        if order is None:
            return
        started = time.monotonic()
        phases.clear()
        try:
            flower_task.run_clientapp(
                runtime_api_address=order.runtime_api_address,
                token=order.token,
                insecure=order.insecure,
                certificates=validate_and_resolve_root_certificates(
                    order.root_certificates_path, order.insecure
                ),
                parent_pid=None,
                runtime_dependency_install=False,
            )
            code = exit_codes.pop() if exit_codes else 0
        except Exception:  # Flower's task function handles the ClientApp's own errors; this is ours
            log.exception("task %d failed in the warm worker", order.task_id)
            code = -1
        spent = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items())
        log.info("task %d: %s", order.task_id, spent)
        connection.send({"task_id": order.task_id, "exit_code": code, "seconds": time.monotonic() - started})


def time_phases(flower_task: Any) -> dict[str, float]:
    """Time the steps of Flower's task function (pull the inputs, install the FAB, load the app,
    run it, push the reply) into the returned dict, which the worker logs per task."""
    phases: dict[str, float] = {}

    def timed(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return function(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.monotonic() - start

        return wrapper

    flower_get_load = flower_task.get_load_client_app_fn

    def get_load_client_app_fn(*args: Any, **kwargs: Any) -> Any:
        load = flower_get_load(*args, **kwargs)

        def load_app(*a: Any, **k: Any) -> Any:
            app = timed("load app", load)(*a, **k)
            return timed("run app", app)

        return load_app

    flower_task.pull_task_input = timed("pull", flower_task.pull_task_input)
    # The SuperExec can start a task before its SuperNode holds all of the message's objects;
    # Flower then waits 1 s, 2 s, ... per missing object. Retry sooner: each retry is one loopback
    # request.
    first, longest = OBJECT_RETRY
    flower_pull = flower_task.pull_and_inflate_object_from_tree
    flower_task.pull_and_inflate_object_from_tree = timed(
        "inflate", functools.partial(flower_pull, initial_backoff=first, backoff_cap=longest)
    )
    flower_task.install_from_fab = timed("install fab", flower_task.install_from_fab)
    flower_task.get_load_client_app_fn = get_load_client_app_fn
    flower_task.push_message = timed("push", flower_task.push_message)
    return phases


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, settings: WorkerSettings, fab_hash: str | None) -> None:
        self.settings = settings
        self.fab_hash = fab_hash
        context = multiprocessing.get_context("spawn")  # a clean interpreter, not a fork of the SuperExec
        self.connection, child = context.Pipe()
        self.process = context.Process(target=worker_main, args=(child, settings), name="fedsubspace-worker")
        self.process.start()
        child.close()
        self.task: TaskOrder | None = None
        self.task_started = 0.0

    def wait_ready(self, timeout: float) -> None:
        if not self.connection.poll(timeout):
            raise RuntimeError(f"the worker did not start within {timeout:.0f} s")
        answer = self.connection.recv()
        if answer != READY:
            raise RuntimeError(str(answer))

    @property
    def busy(self) -> bool:
        return self.task is not None

    def run(self, order: TaskOrder) -> None:
        self.connection.send(order)
        self.task, self.task_started = order, time.monotonic()

    def poll(self) -> bool:
        """Collect a finished task's result, if there is one (True when there was)."""
        finished = False
        with contextlib.suppress(EOFError, OSError):
            while self.connection.poll():
                result = self.connection.recv()
                log.info(
                    "task %s done in the warm worker (pid %d) in %.1f s, exit code %s",
                    result["task_id"], self.process.pid, result["seconds"], result["exit_code"],
                )  # fmt: skip
                self.task, finished = None, True
        return finished

    def stop(self, grace: float = 10.0) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.connection.send(None)
        self.process.join(grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class WarmExecutor:
    """Flower's executor interface (``flwr.supercore.superexec.executor.types.Executor``):
    ClientApp tasks go to the warm worker, anything else (and a task the worker cannot take) to
    Flower's own subprocess executor."""

    def __init__(self, settings: WorkerSettings, task_poll: Poll | None = None) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.settings = settings
        self.task_poll = task_poll  # a launched task arrived; a finished one starts a quiet spell
        self.cold = SubprocessExecutor()
        self.worker: Worker | None = None
        # app versions a worker could not start for: their tasks go cold without trying again
        # (each try imports the whole stack before it fails)
        self.failed_for: set[str | None] = set()

    # --- the Executor protocol ---------------------------------------------------------
    def get_eligible_capacity(
        self,
        supported_task_types: set[Any],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[Any], set[str]]:
        from flwr.supercore.constant import TaskType

        eligible = set(supported_task_types)
        if self.worker is not None and self.worker.busy:
            eligible.discard(TaskType.CLIENT_APP)  # the next one waits at the SuperNode
        return eligible, set()

    def wait_for_capacity(self, task_type: Any = None, **kwargs: Any) -> None:
        return None

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if self.task_poll is not None:
            self.task_poll.arrived()
        if spec.task_type != TaskType.CLIENT_APP:
            return self.cold.launch(spec)
        self.reconcile()  # the loop's last look may be a held poll old: the worker may have died since
        worker = self.ready_worker(spec.fab_hash)
        if worker is None:
            log.warning("task %d: no warm worker, running it in a fresh flwr-clientapp process", spec.task_id)
            return self.cold.launch(spec)
        worker.run(
            TaskOrder(
                spec.task_id, spec.runtime_api_address, spec.token, spec.insecure, spec.root_certificates_path
            )
        )
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        worker = self.worker
        if worker is None:
            return
        if worker.poll() and self.task_poll is not None:
            self.task_poll.start()
        if not worker.process.is_alive():
            log.error(
                "the warm worker (pid %d) died (exit code %s)%s; a new one starts with the next task",
                worker.process.pid, worker.process.exitcode,
                f" while running task {worker.task.task_id}" if worker.task else "",
            )  # fmt: skip
            self.worker = None
            return
        timeout = self.settings.task_timeout_s
        if worker.busy and timeout and time.monotonic() - worker.task_started > timeout:
            log.error("task %s ran over --task-timeout %.0f s: killing the hung worker", worker.task, timeout)
            worker.process.kill()
            worker.process.join(5)
            self.worker = None

    def idle(self, seconds: float) -> None:
        """The SuperExec loop's sleep: ``seconds``, or until the busy worker reports its task done
        (then the loop takes the node's next task at once instead of at its next poll)."""
        worker = self.worker
        if worker is not None and worker.busy:
            multiprocessing.connection.wait([worker.connection], timeout=seconds)
        else:
            time.sleep(seconds)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    # --- the worker ---------------------------------------------------------------------
    def ready_worker(self, fab_hash: str | None) -> Worker | None:
        """The idle worker for this app version, started (or restarted for a new version) as
        needed; None when one cannot start."""
        worker = self.worker
        if worker is not None and worker.fab_hash != fab_hash and fab_hash is not None:
            log.info("a new app version (%s): restarting the warm worker", fab_hash[:12])
            worker.stop()
            self.worker = worker = None
        if worker is not None:
            return worker
        if fab_hash in self.failed_for:
            return None
        try:
            worker = Worker(self.settings, fab_hash)
            worker.wait_ready(WORKER_START_TIMEOUT_S)
        except Exception as error:  # any failure means: fall back to cold tasks
            log.error("the warm worker could not start: %s", error)
            if worker is not None:
                worker.process.kill()
            self.failed_for.add(fab_hash)
            return None
        log.info(
            "warm worker started (pid %d, threads %s)", worker.process.pid, self.settings.threads or "all"
        )
        self.worker = worker
        return worker


class SuperExecTime(PollingTime):
    """The ``time`` of Flower's SuperExec loop: its one sleep (between polls for a task) waits for
    the task poll's next wait or the worker's report, whichever comes first — or not at all after
    a poll its SuperNode held (``launch/long_poll.py``)."""

    def __init__(self, executor: WarmExecutor) -> None:
        assert executor.task_poll is not None
        super().__init__(executor.task_poll, idle_above=0.0, short=0.0)
        self.executor = executor

    def sleep(self, seconds: float) -> None:
        if not self.was_held():  # a held ask for a task: ask again at once
            self.executor.idle(self.poll.next_wait())
        self.awake_since = time.monotonic()


def parse_own_arguments(argv: list[str]) -> tuple[WorkerSettings, list[str]]:
    """Our options; everything else is ``flower-superexec``'s."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--gpu", default=None)
    parser.add_argument("--task-timeout", type=float, default=0.0)
    own, rest = parser.parse_known_args(argv)
    return WorkerSettings(own.threads, own.gpu, own.task_timeout), rest


def main(argv: list[str] | None = None) -> None:
    """``flower-superexec`` with the warm executor (same arguments, plus ours)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)-7s %(name)s: %(message)s", force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per Runtime API poll otherwise
    settings, rest = parse_own_arguments(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault(SUPEREXEC_TASK_POLL_ENV, str(TASK_POLL_CAP))
    from launch.flower_contract import require

    require()
    import flwr.supercore.superexec.run_superexec as superexec

    from launch.superexec import run_flower_superexec

    cap = superexec._get_task_poll_interval()  # Flower's validation of the variable
    task_poll = Poll(min(FIRST_TASK_POLL, cap), cap)
    executor = WarmExecutor(settings, task_poll)
    superexec.time = SuperExecTime(executor)  # type: ignore[assignment]

    run_flower_superexec(executor, rest)


if __name__ == "__main__":
    main()
