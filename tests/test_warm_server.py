"""The SuperLink's warm SuperExec (``launch/warm_server.py``) starts a run with the command line
Flower's own executor would, and runs forked from its zygote are found and stopped as ServerApps."""

import subprocess

import psutil
import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec

from launch import warm_server
from launch.processes import is_server_app


@pytest.mark.parametrize("task_type", [TaskType.SERVER_APP, TaskType.SIMULATION])
@pytest.mark.parametrize("tls", [False, True])
def test_a_forked_run_gets_the_arguments_flowers_executor_would_give_it(monkeypatch, task_type, tls):
    spec = ExecutionSpec(
        task_type=task_type, runtime_api_address="127.0.0.1:9091", token="secret", insecure=not tls,
        root_certificates_path="/certs/ca.crt" if tls else None, runtime_dependency_install=False,
        parent_pid=4321, suppress_output=False, task_id=7,
    )  # fmt: skip
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kwargs: started.append(args))
    SubprocessExecutor().launch(spec)
    command = started[0][0]
    assert warm_server.flower_arguments(command, spec) == started[0]
    assert command in warm_server.ENTRY_POINTS


def test_a_process_named_as_a_serverapp_is_one_and_python_is_not():
    named = subprocess.Popen(
        ["python3", "-c", "import ctypes, time; ctypes.CDLL('libc.so.6').prctl(15, b'flwr-simulation'); "
         "print(flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        named.stdout.readline()  # named by now
        assert is_server_app(psutil.Process(named.pid))
        assert not is_server_app(psutil.Process())
    finally:
        named.kill()
        named.wait()
