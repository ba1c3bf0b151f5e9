"""The Flower internals our runtime patches or calls, with what it expects of each.

The warm node runtime (``launch/warm_node.py``) replaces functions of Flower's ClientApp task
module, wraps its SuperExec's executor factory and replaces the SuperExec loop's ``time``; the
SuperNode entry point (``launch/supernode.py``) replaces the ``time`` module and three functions of
Flower's SuperNode loop and holds its Runtime API's task polls; the SuperLink entry point
(``launch/superlink.py``) holds its Fleet API's empty pulls; the launchers
(``launch/simulation.py``, ``launch/fab.py``) build the app bundle, start runs and read their
status as the ``flwr`` CLI does, from their own process. None of these is Flower's public API, so
an upgrade may move or rename them. :func:`broken` names every expectation the installed Flower no
longer meets; the test suite calls it, and so does the warm runtime before it patches anything, so
a breaking upgrade fails in seconds with the symbol's name instead of deep inside a run.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Expected:
    module: str
    name: str
    parameters: tuple[str, ...] = ()  # keyword parameters the caller passes (callables)
    why: str = ""

    def problem(self) -> str | None:
        where = f"{self.module}.{self.name}"
        try:
            module = importlib.import_module(self.module)
        except ImportError as error:
            return f"{where}: the module does not import ({error}); {self.why}"
        if not hasattr(module, self.name):
            return f"{where}: gone; {self.why}"
        if not self.parameters:
            return None
        try:
            signature = inspect.signature(getattr(module, self.name))
        except (TypeError, ValueError):
            return f"{where}: no longer a callable with a signature; {self.why}"
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
        lacking = [p for p in self.parameters if p not in signature.parameters and not accepts_any]
        return f"{where}: takes no {', '.join(lacking)} any more; {self.why}" if lacking else None


TASK = "flwr.supernode.runtime.run_clientapp"
SUPEREXEC = "flwr.supercore.superexec"
NODE_LOOP = "flwr.supernode.start_client_internal"

EXPECTED = (
    # the warm worker runs Flower's own task function in a long-lived process
    Expected(TASK, "run_clientapp", ("runtime_api_address", "token", "insecure", "certificates"),
             "the warm worker calls it for every task"),
    Expected(TASK, "flwr_exit", (), "the warm worker replaces it to keep its process"),
    Expected(TASK, "pull_task_input", (), "timed per task"),
    Expected(TASK, "pull_and_inflate_object_from_tree", ("initial_backoff", "backoff_cap"),
             "called with a shorter retry back-off"),
    Expected(TASK, "install_from_fab", (), "timed per task"),
    Expected(TASK, "get_load_client_app_fn", (), "wrapped to time loading and running the app"),
    Expected(TASK, "push_message", (), "timed per task"),
    Expected("flwr.supercore.exit.exit_handler", "trigger_exit_handlers", ("run_before_force_exit",),
             "the warm worker runs a task's exit handlers itself"),
    Expected("flwr.supercore.tls", "validate_and_resolve_root_certificates", (),
             "resolves a task's certificates"),
    # the warm executor stands in for Flower's subprocess executor
    Expected(f"{SUPEREXEC}.run_superexec", "get_executor", (), "wrapped to return the warm executor"),
    Expected(f"{SUPEREXEC}.executor.subprocess_executor", "SubprocessExecutor", (),
             "runs the tasks the warm worker cannot take"),
    Expected(f"{SUPEREXEC}.executor.types", "LaunchResult", (), "what the executor's launch returns"),
    Expected(f"{SUPEREXEC}.executor.types", "Executor", (), "the interface the warm executor implements"),
    Expected("flwr.supercore.constant", "TaskType", (), "which tasks go warm"),
    Expected("flwr.supercore.constant", "ExecutorType", (), "which executor the warm one replaces"),
    Expected("flwr.supercore.cli.flower_superexec", "flower_superexec", (), "the warm runtime's main loop"),
    Expected(f"{SUPEREXEC}.run_superexec", "time", (), "its task poll learns when tasks are due"),
    Expected(f"{SUPEREXEC}.run_superexec", "_get_task_poll_interval", (), "the task poll's cap"),
    # fedsubspace-supernode's waits follow the traffic
    Expected(NODE_LOOP, "time", (), "its sleeps back off or are capped (--idle-poll)"),
    Expected(NODE_LOOP, "_pull_and_store_message", (), "a pulled message is an arrival for the idle poll"),
    Expected(NODE_LOOP, "_push_messages", (), "a pushed reply starts the idle poll's quiet spell"),
    Expected(NODE_LOOP, "pull_objects", ("initial_backoff", "backoff_cap"), "missing objects retried sooner"),
    # the ServerApp's deployed Grid too (server_app/waits.py)
    Expected("flwr.superlink.grid.http_grid", "pull_objects", ("initial_backoff", "backoff_cap"),
             "a reply's missing objects retried sooner"),
    Expected("flwr.supernode.cli.flower_supernode", "flower_supernode", (), "fedsubspace-supernode runs it"),
    # long polls (launch/long_poll.py): the SuperLink holds a node's empty pull, the node its SuperExec's
    Expected("flwr.superlink.servicer.fleet.fleet_handlers", "pull_messages", ("request", "state", "store"),
             "held while no message waits for the node (fedsubspace-superlink)"),
    Expected("flwr.superlink.servicer.runtime.runtime_handlers", "push_messages", (),
             "the ServerApp's push ends the held pulls"),
    Expected("flwr.superlink.servicer.runtime.runtime_handlers", "pull_messages", (),
             "a ServerApp's pull for replies, held while none waits"),
    Expected("flwr.superlink.servicer.fleet.fleet_handlers", "push_messages", (),
             "a node's reply ends the ServerApp's held pull"),
    Expected("flwr.superlink.servicer.runtime.runtime_handlers", "acquire_task", (),
             "the SuperExec's ask for a run, held while none waits"),
    Expected("flwr.superlink.servicer.control.control_handlers", "start_run", (), "a started run ends it"),
    Expected("flwr.superlink.cli.flower_superlink", "flower_superlink", (), "fedsubspace-superlink runs it"),
    Expected("flwr.supernode.servicer.runtime.runtime_handlers", "acquire_task", ("request", "state"),
             "held while no task waits (fedsubspace-supernode)"),
    Expected("flwr.supernode.fleet_http_connection", "HEARTBEAT_DEFAULT_INTERVAL", (),
             "the interval the node declares to the SuperLink (--heartbeat-interval)"),
    Expected("flwr.supercore.heartbeat", "HEARTBEAT_DEFAULT_INTERVAL", (),
             "the node's heartbeats follow it (--heartbeat-interval)"),
    # the launchers start runs and ask their status through the Control API from their own process
    Expected("flwr.supercore.control", "ControlHttpClient", (), "the flwr CLI's Control API client"),
    Expected("flwr.cli.cli_client_interceptor", "CliClientHttpInterceptor", (), "the CLI's auth headers"),
    Expected("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor", ("component_name",),
             "the CLI's version header"),
    Expected("flwr.cli.build", "build_fab_from_files", (), "builds the FAB as flwr run does (launch/fab.py)"),
    Expected("flwr.cli.utils", "collect_files", (), "what launch/fab.py's walk stands in for"),
    Expected("flwr.cli.utils", "load_gitignore_patterns", (), "the folders launch/fab.py skips"),
    Expected("flwr.cli.utils", "build_pathspec", (), "the folders launch/fab.py skips"),
    Expected("flwr.supercore.constant", "APP_PUBLISH_EXCLUDE_PATTERNS", (), "what launch/fab.py skips"),
    Expected("flwr.cli.config_utils", "load_and_validate", (), "checks the app's pyproject.toml"),
    Expected("flwr.common.config", "parse_config_args", (), "parses run and federation config"),
    Expected("flwr.common.serde", "user_config_to_proto", (), "the run config override"),
    Expected("flwr.common.serde", "fab_to_proto", (), "the FAB in StartRun"),
    Expected("flwr.supercore.fab", "Fab", (), "the FAB in StartRun"),
    Expected("flwr.supercore.utils", "simulation_config_from_json", (), "the federation config override"),
)  # fmt: skip


def broken() -> list[str]:
    """Every expectation the installed Flower does not meet (empty when all hold)."""
    return [problem for expected in EXPECTED if (problem := expected.problem()) is not None]


def require() -> None:
    """Raise naming every broken expectation (a Flower upgrade moved what the runtime patches)."""
    problems = broken()
    if problems:
        import flwr

        raise RuntimeError(
            f"Flower {getattr(flwr, '__version__', '?')} lacks what FedSubspace's node runtime patches:\n  "
            + "\n  ".join(problems)
        )
