"""The one place that loads, partitions and tokenizes data."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from finetune.config import ConfigError, DatasetConfig, PartitionConfig
from finetune.hub import mirrored_dataset_dir

log = logging.getLogger(__name__)


class DataNotFoundError(FileNotFoundError):
    """Neither the local mirror nor the Hub could provide a dataset split."""


def load_split(cfg: DatasetConfig, split: str, mirror: Path | None) -> datasets.Dataset:
    """Load one split of ``cfg.repo_id``/``cfg.subset``: the local mirror first, else the Hub."""
    folder = mirrored_dataset_dir(mirror, cfg.repo_id, cfg.subset)
    if folder is not None:
        files = sorted(str(path) for path in folder.glob(f"{split}-*.parquet"))
        if not files:
            available = sorted({p.name.split("-")[0] for p in folder.glob("*.parquet")})
            raise DataNotFoundError(
                f"split {split!r} of {cfg.repo_id}/{cfg.subset} is not in the mirror {folder}; "
                f"it has {available}"
            )
        dataset = datasets.load_dataset("parquet", data_files={split: files}, split=split)
    else:
        try:
            dataset = datasets.load_dataset(cfg.repo_id, cfg.subset, split=split)
        except Exception as error:  # offline, unknown id, gated, ...
            where = (
                f"under the mirror {mirror}"
                if mirror
                else "(no mirror set: hub_mirror / $FEDSUBSPACE_HUB_MIRROR)"
            )
            raise DataNotFoundError(
                f"cannot load {cfg.repo_id}/{cfg.subset} split {split!r}: no local copy {where} "
                f"and the Hub failed: {type(error).__name__}: {error}"
            ) from error
    missing = [c for c in (*cfg.text_fields, cfg.label_field) if c not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"dataset {cfg.name!r} has no column(s) {missing}; columns are {dataset.column_names}"
        )
    return dataset


def subsample(dataset: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    """A seeded random subset of at most ``limit`` rows (the whole dataset when None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


def load_train_split(cfg: DatasetConfig, mirror: Path | None, seed: int) -> datasets.Dataset:
    dataset = load_split(cfg, cfg.train_split, mirror)
    return subsample(dataset, cfg.max_train_examples, seed)


LOCAL_FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def load_local_data(path: Path, cfg: DatasetConfig) -> datasets.Dataset:
    """A data owner's own training data (parquet / csv / json lines) with the dataset's fields."""
    if path.suffix not in LOCAL_FORMATS:
        raise ConfigError(
            f"node data {path}: unsupported format {path.suffix!r}; use one of {sorted(LOCAL_FORMATS)}"
        )
    if not path.is_file():
        raise ConfigError(f"node data {path} does not exist on this node")
    dataset = datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    missing = [f for f in [*cfg.text_fields, cfg.label_field] if f not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"node data {path} lacks the dataset's fields {missing}; it has {dataset.column_names}"
        )
    return dataset


def load_eval_split(cfg: DatasetConfig, mirror: Path | None, seed: int) -> datasets.Dataset:
    dataset = load_split(cfg, cfg.eval_split, mirror)
    labels = np.asarray(dataset[cfg.label_field])
    if (labels < 0).all():
        raise ConfigError(
            f"split {cfg.eval_split!r} of {cfg.name!r} has no labels (all -1); "
            "choose a labelled dataset.eval_split"
        )
    return subsample(dataset, cfg.max_eval_examples, seed)


def make_partitioner(cfg: PartitionConfig, label_field: str) -> Partitioner:
    if cfg.name == "iid":
        return IidPartitioner(num_partitions=cfg.num_clients)
    if cfg.name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=cfg.num_clients,
            partition_by=label_field,
            alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=False,
            seed=cfg.seed,
        )
    if cfg.name == "pathological":
        return PathologicalPartitioner(
            num_partitions=cfg.num_clients,
            partition_by=label_field,
            num_classes_per_partition=cfg.classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=cfg.seed,
        )
    raise ConfigError(f"unknown partition {cfg.name!r}")


class PartitionedDataset:
    """A training split divided among ``cfg.num_clients`` clients by a flwr-datasets partitioner."""

    def __init__(self, train: datasets.Dataset, cfg: PartitionConfig, label_field: str) -> None:
        if cfg.num_clients > len(train):
            raise ConfigError(
                f"partition.num_clients={cfg.num_clients} exceeds the {len(train)} training examples"
            )
        self.cfg = cfg
        self.partitioner = make_partitioner(cfg, label_field)
        self.partitioner.dataset = train

    def partition(self, partition_id: int) -> datasets.Dataset:
        if not 0 <= partition_id < self.cfg.num_clients:
            raise ConfigError(
                f"partition id {partition_id} is outside [0, {self.cfg.num_clients}) (partition.num_clients)"
            )
        try:
            part = self.partitioner.load_partition(partition_id)
        except ValueError as error:  # e.g. Dirichlet min_partition_size never met
            raise ConfigError(f"cannot partition with {self.cfg}: {error}") from error
        return part

    def sizes(self) -> list[int]:
        """Examples per client; raises ConfigError when a client would get no data."""
        sizes = [len(self.partition(i)) for i in range(self.cfg.num_clients)]
        empty = [i for i, size in enumerate(sizes) if size == 0]
        if empty:
            raise ConfigError(
                f"partition {self.cfg.name!r} leaves clients {empty} with no training data; "
                "use fewer clients, a larger alpha, or more examples"
            )
        return sizes


def label_histogram(dataset: datasets.Dataset, label_field: str, num_labels: int) -> list[int]:
    labels = np.asarray(dataset[label_field], dtype=np.int64)
    return np.bincount(labels[labels >= 0], minlength=num_labels).tolist()


def tokenize(
    dataset: datasets.Dataset,
    cfg: DatasetConfig,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> datasets.Dataset:
    """Token ids without padding (padding happens per batch) plus ``labels``."""

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        texts = [batch[field] for field in cfg.text_fields]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        encoded["labels"] = batch[cfg.label_field]
        return encoded

    keep = {"input_ids", "attention_mask", "token_type_ids", "labels"}
    tokenized = dataset.map(encode, batched=True, remove_columns=dataset.column_names)
    return tokenized.remove_columns([c for c in tokenized.column_names if c not in keep])


def iterate_batches(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over ``dataset`` in dynamically padded batches: shuffled (seeded) for training,
    else sorted by length, which pads least and leaves order-free metrics unchanged."""
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(dataset))
    else:
        order = np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")
    for start in range(0, len(order), batch_size):
        yield _collate_rows(dataset, order[start : start + batch_size], collate)


def poisson_batches(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, sample_rate: float, seed: int
) -> Iterator[dict[str, torch.Tensor] | None]:
    """Endless Poisson-sampled batches — each example joins each batch independently with
    probability ``sample_rate``, the sampling DP-SGD's accounting assumes; None for an empty draw."""
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    rng = np.random.default_rng(seed)
    while True:
        chosen = np.flatnonzero(rng.random(len(dataset)) < sample_rate)
        yield _collate_rows(dataset, chosen, collate) if len(chosen) else None


def _collate_rows(
    dataset: datasets.Dataset, indices: np.ndarray, collate: DataCollatorWithPadding
) -> dict[str, torch.Tensor]:
    rows = dataset[indices]
    features = [{k: rows[k][i] for k in rows} for i in range(len(rows["input_ids"]))]
    return dict(collate(features))
