"""Logging for our packages, on stdout (Flower mirrors a task process's stdout to `flwr log`), with
third-party noise — warnings, progress bars, libraries' own log lines — kept off the console: in
the run's ``debug.log`` where there is one (the ServerApp's run folder), dropped elsewhere."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

PACKAGES = ("experiment_schema", "finetune", "strategies", "server_app", "client_app", "launch", "benchmarks")
_MARK = "_fedsubspace"
DEBUG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def quiet_third_party() -> None:
    """Progress bars off, warnings and third-party log records routed to logging's root (which
    has no console handler). Call before the ML stack is imported: its import-time warnings count."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" too
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not any(getattr(h, _MARK, False) for h in root.handlers):
        handler = logging.NullHandler()  # keeps logging's last-resort stderr printer away
        setattr(handler, _MARK, True)
        root.addHandler(handler)


def setup_logging(level: int = logging.INFO, debug_file: Path | None = None, ml_stack: bool = True) -> None:
    """Our packages log to stdout at ``level``; with ``debug_file`` everything (ours at DEBUG, every
    library's records and warnings) also goes there. ``ml_stack=False`` for a handler that loads no
    data (a QUERY): it does not import ``datasets`` only to silence its progress bars."""
    quiet_third_party()
    if ml_stack:
        import datasets

        datasets.disable_progress_bars()  # per-map progress bars drown the round lines in `flwr log`
    formatter = logging.Formatter("%(levelname)-7s %(name)s: %(message)s")
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, _MARK, False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(formatter)
            setattr(handler, _MARK, True)
            logger.addHandler(handler)
        logger.propagate = False
    if debug_file is not None:
        add_debug_file(debug_file)


def add_debug_file(path: Path) -> None:
    """Everything that reaches logging's root, at DEBUG, into ``path``."""
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path) for h in root.handlers):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(DEBUG_FORMAT))
    handler.setLevel(logging.DEBUG)
    root.addHandler(handler)
    for name in PACKAGES:  # ours at DEBUG into the file (the console handler keeps its own level)
        logger = logging.getLogger(name)
        for console in (h for h in logger.handlers if getattr(h, _MARK, False)):
            console.setLevel(max(logger.level, logging.INFO))
        logger.setLevel(logging.DEBUG)
        logger.propagate = True
    root.setLevel(logging.INFO)  # libraries at INFO and above: their DEBUG chatter is not ours
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Flower runtime call
