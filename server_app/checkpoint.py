"""Server checkpoints: everything a run needs to continue exactly where a round ended.

``<run folder>/checkpoints/round-00003/`` holds ``arrays.safetensors`` (the global arrays),
``strategy.safetensors`` (the strategy's own arrays: server-optimizer moments, …) and
``state.json`` (the round, the resolved config and its hash, the strategy's other state keyed by
partition id — node ids are drawn anew at every start —, central-DP releases, the metrics rows so
far, and the SHA-256 of both array files). A checkpoint is written into a hidden folder and renamed
into place, so a crash leaves either the whole checkpoint or none; a damaged one (a disk fault, a
truncated copy) fails its digest and the previous one is used, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from experiment_schema import ConfigError, ExperimentConfig, resume_differences
from finetune.digest import file_sha256

log = logging.getLogger(__name__)

FORMAT = 1
FOLDER = "checkpoints"
PREFIX = "round-"
ARRAYS_FILE, STRATEGY_FILE, STATE_FILE = "arrays.safetensors", "strategy.safetensors", "state.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint (none written, or every one damaged)."""


@dataclass
class Checkpoint:
    """The state of a run after ``round`` complete rounds."""

    round: int
    arrays: dict[str, np.ndarray]
    config: dict[str, Any]
    config_hash: str
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    strategy_state: dict[str, Any] = field(default_factory=dict)
    releases: list[tuple[float, float, int]] = field(default_factory=list)  # central DP
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl so far


def checkpoint_root(run_folder: Path) -> Path:
    return run_folder / FOLDER


def round_folders(run_folder: Path) -> list[Path]:
    """Complete checkpoint folders, newest first."""
    root = checkpoint_root(run_folder)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[6:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _contiguous(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def write_checkpoint(run_folder: Path, checkpoint: Checkpoint, keep: int) -> tuple[int, float]:
    """Write ``checkpoint`` atomically, drop all but the newest ``keep``; (bytes, seconds)."""
    start = time.perf_counter()
    root = checkpoint_root(run_folder)
    root.mkdir(exist_ok=True)
    name = f"{PREFIX}{checkpoint.round:05d}"
    partial = root / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file(_contiguous(checkpoint.arrays), str(partial / ARRAYS_FILE))
    save_file(_contiguous(checkpoint.strategy_arrays), str(partial / STRATEGY_FILE))
    state = {
        "format": FORMAT,
        "round": checkpoint.round,
        "config_hash": checkpoint.config_hash,
        "config": checkpoint.config,
        "strategy": checkpoint.strategy_state,
        "releases": [list(r) for r in checkpoint.releases],
        "rows": checkpoint.rows,
        "sha256": {f: file_sha256(partial / f) for f in (ARRAYS_FILE, STRATEGY_FILE)},
    }
    (partial / STATE_FILE).write_text(json.dumps(state))
    for file in (ARRAYS_FILE, STRATEGY_FILE, STATE_FILE):
        _fsync(partial / file)
    target = root / name
    if target.exists():  # a resumed run writes a round again: replace it whole
        shutil.rmtree(target)
    os.rename(partial, target)
    _fsync(root)
    for old in round_folders(run_folder)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    size = sum(p.stat().st_size for p in target.iterdir())
    return size, time.perf_counter() - start


def read_checkpoint(folder: Path) -> Checkpoint:
    """One checkpoint folder, verified against its digests; raises on any damage."""
    state = json.loads((folder / STATE_FILE).read_text())
    if state.get("format") != FORMAT:
        found = state.get("format")
        raise CheckpointError(f"{folder}: checkpoint format {found!r}; this version reads {FORMAT}")
    for file, expected in state["sha256"].items():
        if file_sha256(folder / file) != expected:
            raise CheckpointError(f"{folder / file}: its SHA-256 does not match the one recorded")
    return Checkpoint(
        round=int(state["round"]),
        arrays=load_file(str(folder / ARRAYS_FILE)),
        config=state["config"],
        config_hash=state["config_hash"],
        strategy_arrays=load_file(str(folder / STRATEGY_FILE)),
        strategy_state=state["strategy"],
        releases=[(float(s), float(q), int(n)) for s, q, n in state["releases"]],
        rows=state["rows"],
    )


def latest_checkpoint(run_folder: Path) -> Checkpoint:
    """The newest checkpoint that reads back intact; older ones stand in for damaged ones."""
    folders = round_folders(run_folder)
    if not folders:
        raise CheckpointError(
            f"{run_folder} has no checkpoint ({FOLDER}/{PREFIX}<n>/): nothing to resume "
            "(was it run with checkpoint.enabled=false, or did it stop before its first round ended?)"
        )
    for folder in folders:
        try:
            checkpoint = read_checkpoint(folder)
        except (OSError, ValueError, KeyError, TypeError, CheckpointError) as error:
            log.warning("checkpoint %s is damaged (%s); trying the one before", folder, error)
            continue
        if folder != folders[0]:
            log.warning("resuming from %s, not the newest checkpoint %s", folder.name, folders[0].name)
        return checkpoint
    raise CheckpointError(f"every checkpoint in {checkpoint_root(run_folder)} is damaged")


def newest_saved_config(run_folder: Path) -> tuple[int, dict[str, Any]]:
    """(round, config) of the newest checkpoint whose state reads (no digests: a quick look for
    the launcher; the ServerApp verifies the arrays)."""
    for folder in round_folders(run_folder):
        try:
            state = json.loads((folder / STATE_FILE).read_text())
            return int(state["round"]), state["config"]
        except (OSError, ValueError, KeyError):
            continue
    raise CheckpointError(f"{run_folder} has no readable checkpoint ({FOLDER}/{PREFIX}<n>/state.json)")


def refuse_unless_resumable(
    run_folder: Path, saved_round: int, saved_config: dict[str, Any], cfg: ExperimentConfig
) -> None:
    """Raise a ConfigError naming why ``cfg`` cannot continue the checkpointed run."""
    differences = resume_differences(saved_config, cfg.to_dict())
    if differences:
        raise ConfigError(
            f"cannot resume {run_folder}: this config differs from its checkpoint's in "
            + "; ".join(differences)
            + " (a resume may change only the number of rounds, timeouts, logging and paths)"
        )
    if saved_round >= cfg.federation.num_rounds:
        raise ConfigError(
            f"cannot resume {run_folder}: its checkpoint is after round {saved_round}, and the run has "
            f"{cfg.federation.num_rounds} rounds; pass federation.num_rounds=<more> to continue it"
        )
