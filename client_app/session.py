"""What a client process keeps between rounds: the model (loaded once per process / Ray
actor), the task (tokenizer or image settings) and the prepared partitions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch

from experiment_schema import ExperimentConfig
from finetune.data import PartitionedDataset, load_eval_split, load_local_data, load_train_split
from finetune.digest import file_sha256
from finetune.models import build_model
from finetune.precision import device
from finetune.prepared_cache import cached_on_disk, prepared_key
from finetune.spec import AdapterSpec
from finetune.state import base_weights, trainable_state
from finetune.tasks import Task, build_task
from strategies.client import ModelBaseline

log = logging.getLogger(__name__)


@dataclass
class ClientSession:
    cfg: ExperimentConfig
    mirror: Path | None
    model: torch.nn.Module
    task: Task
    train_raw: datasets.Dataset
    partitions: PartitionedDataset
    initial_state: dict[str, np.ndarray]  # the seeded init: what a client starts from
    _base: dict[str, torch.Tensor] | None = None  # pretrained weights under the LoRA layers
    _prepared: OrderedDict[int | str, datasets.Dataset] = field(default_factory=OrderedDict)
    _eval_shares: list[datasets.Dataset] | None = None
    _eval_prepared: OrderedDict[int | str, datasets.Dataset] = field(default_factory=OrderedDict)

    def baseline(self, with_base_weights: bool) -> ModelBaseline:
        """The seeded init and, when asked, the pristine weights under the LoRA layers (copied on
        first request, before any rule has merged anything into them)."""
        if with_base_weights and self._base is None:
            self._base = base_weights(self.model)
        return ModelBaseline(self.initial_state, self._base or {})

    def eval_partition(self, partition_id: int) -> datasets.Dataset:
        """This client's share of the validation split, in its training data's proportions."""
        if self._eval_shares is None:
            raw = load_eval_split(self.cfg.dataset, self.mirror, self.cfg.seed)
            self._eval_shares = self.partitions.shares_of(raw)
        shares = self._eval_shares
        return cached(
            self._eval_prepared,
            partition_id,
            lambda: self.on_disk(
                f"eval-{partition_id}", lambda: self.task.prepare(shares[partition_id], partition_id)
            ),
        )

    def local_data(self, path: Path, partition_id: int) -> datasets.Dataset:
        """A node's own data file (node config ``data-path``), prepared once."""

        def make() -> datasets.Dataset:
            return self.task.prepare(load_local_data(path, self.cfg.dataset), client=partition_id)

        return cached(
            self._prepared,
            f"local:{path}",
            lambda: self.on_disk(f"local-{partition_id}", make, {"file": file_sha256(path)}),
        )

    def partition(self, partition_id: int) -> datasets.Dataset:
        def make() -> datasets.Dataset:
            return self.task.prepare(self.partitions.partition(partition_id), client=partition_id)

        return cached(self._prepared, partition_id, lambda: self.on_disk(f"train-{partition_id}", make))

    def on_disk(
        self, share: str, make: Callable[[], datasets.Dataset], extra: dict[str, str] | None = None
    ) -> datasets.Dataset:
        """``make()``'s prepared data, from the node's disk cache when an earlier process stored it."""
        if not self.task.cache_prepared:
            return make()
        return cached_on_disk(prepared_key(self.cfg, share, extra), make)


#: Prepared partitions a process keeps (least recently used dropped): an actor that serves many of
#: a large federation's clients in turn stays flat in memory.
MAX_PREPARED = 32


def cached(
    store: OrderedDict[int | str, datasets.Dataset], key: int | str, make: Callable[[], datasets.Dataset]
) -> datasets.Dataset:
    if key in store:
        store.move_to_end(key)
        return store[key]
    while len(store) >= MAX_PREPARED:
        store.popitem(last=False)
    store[key] = make()
    return store[key]


def session_key(cfg: ExperimentConfig, mirror: Path | None, adapter: AdapterSpec, owner: str) -> str:
    """Sessions are reused while model, adapter, data and partitioning stay the same; a model that
    a rule changes beyond its trainable arrays (``owner``: merged base weights, toggled factors) is
    never handed to another rule."""
    parts = cfg.to_dict()
    keep = {k: parts[k] for k in ("seed", "model", "dataset", "partition")}
    keep.update(mirror=str(mirror), adapter=dataclasses.asdict(adapter), owner=owner, device=str(device()))
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


MAX_SESSIONS = 4  # a process serving clients of several LoRA ranks keeps one model per rank
_SESSIONS: dict[str, ClientSession] = {}


def get_session(
    cfg: ExperimentConfig, mirror: Path | None, adapter: AdapterSpec, owner: str = ""
) -> ClientSession:
    """The process-wide session for ``cfg`` and ``adapter`` (``owner``: the rule that changes the
    model beyond its trainable arrays, if it does): built on first use, least recently used
    dropped."""
    key = session_key(cfg, mirror, adapter, owner)
    session = _SESSIONS.pop(key, None)
    if session is None:
        while len(_SESSIONS) >= MAX_SESSIONS:
            _SESSIONS.pop(next(iter(_SESSIONS)))  # free a model before building the next
        log.info(
            "loading %s (%s rank %d) and %s/%s",
            cfg.model.source, adapter.kind, adapter.rank, cfg.dataset.repo_id, cfg.dataset.subset,
        )  # fmt: skip
        model = build_model(cfg, mirror, adapter).to(device())
        train = load_train_split(cfg.dataset, mirror, cfg.seed)
        session = ClientSession(
            cfg,
            mirror,
            model,
            build_task(cfg, mirror),
            train,
            PartitionedDataset(train, cfg),
            trainable_state(model),
        )
    _SESSIONS[key] = session  # most recently used last
    session.cfg = cfg  # train / federation settings may change between runs
    return session
