"""Prepared (tokenized) partitions kept on the node's disk, so a fresh process — the first round,
a restarted worker, Flower's process-per-message fallback — maps them from disk instead of
tokenizing again.

An entry is keyed by everything that decides its rows: the model's tokenizer and length limit, the
dataset and its subsampling and tuning split, the partitioning, the seed, which client's share (or
a node's own file, by content) and a format version. It is written to a hidden folder and renamed
into place, so a crash leaves a whole entry or none; a damaged entry is rebuilt. Where:
``$FEDSUBSPACE_CACHE_DIR``, else ``~/.cache/fedsubspace/prepared``; ``FEDSUBSPACE_CACHE_DIR=off``
turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from experiment_schema import ExperimentConfig

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when a task's prepare() changes what it produces
CACHE_ENV = "FEDSUBSPACE_CACHE_DIR"


def cache_root() -> Path | None:
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() == "off":
        return None
    return Path(value) if value else Path.home() / ".cache" / "fedsubspace" / "prepared"


def prepared_key(cfg: ExperimentConfig, share: str, extra: dict[str, Any] | None = None) -> str:
    """The cache key of one prepared share (``share``: e.g. ``train-3``, ``eval-3``)."""
    model = cfg.model
    parts = {
        "version": FORMAT_VERSION,
        "share": share,
        "tokenizer": model.tokenizer or model.source,
        "gguf_file": model.gguf_file,
        "max_length": model.max_length,
        "image_size": model.image_size,
        "dataset": vars(cfg.dataset),
        "partition": vars(cfg.partition),
        "seed": cfg.seed,
        **(extra or {}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_on_disk(key: str, make: Callable[[], datasets.Dataset]) -> datasets.Dataset:
    """The prepared dataset stored under ``key``, made (and stored) when missing or damaged."""
    root = cache_root()
    if root is None:
        return make()
    entry = root / key
    if entry.is_dir():
        try:
            return datasets.load_from_disk(str(entry))
        except Exception as error:  # a damaged entry: rebuild it
            log.warning("prepared-data cache entry %s unreadable (%s); rebuilding it", entry, error)
            shutil.rmtree(entry, ignore_errors=True)
    prepared = make()
    staging = root / f".{key}.{uuid.uuid4().hex}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        prepared.save_to_disk(str(staging))
        try:
            staging.rename(entry)
        except OSError:  # another process stored it first
            shutil.rmtree(staging, ignore_errors=True)
        return datasets.load_from_disk(str(entry))
    except OSError as error:  # a full or read-only disk: train from memory
        log.warning("cannot store prepared data in %s (%s); keeping it in memory", root, error)
        shutil.rmtree(staging, ignore_errors=True)
        return prepared
