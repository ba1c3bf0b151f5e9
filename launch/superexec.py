"""Flower's own SuperExec (``flower-superexec``) with an executor of ours for its subprocess tasks:
the warm node runtime's (``launch/warm_node.py``) and the SuperLink's (``launch/warm_server.py``)."""

from __future__ import annotations

import logging
import sys
from typing import Any


def run_flower_superexec(executor: Any, arguments: list[str]) -> None:
    """``flower-superexec arguments`` whose subprocess executor is ``executor``; closes it at the end."""
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.cli.flower_superexec import flower_superexec

    flower_get_executor = superexec.get_executor

    def get_executor(executor_type: Any, *args: Any, **kwargs: Any) -> Any:
        from flwr.supercore.constant import ExecutorType

        logging.getLogger("httpx").setLevel(logging.WARNING)  # after Flower's logging set-up
        if executor_type == ExecutorType.SUBPROCESS:
            return executor
        return flower_get_executor(executor_type, *args, **kwargs)

    superexec.get_executor = get_executor
    sys.argv = [sys.argv[0], *arguments]
    try:
        flower_superexec()
    finally:
        executor.close()
