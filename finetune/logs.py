"""Logging for our packages, on stdout (Flower mirrors a task process's stdout to `flwr log`)."""

from __future__ import annotations

import logging
import sys

PACKAGES = ("finetune", "strategies", "server_app", "client_app", "launch")


def setup_logging(level: int = logging.INFO) -> None:
    import datasets

    datasets.disable_progress_bars()  # per-map progress bars drown the round lines in `flwr log`
    formatter = logging.Formatter("%(levelname)-7s %(name)s: %(message)s")
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, "_fedsubspace", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(formatter)
            handler._fedsubspace = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.propagate = False
