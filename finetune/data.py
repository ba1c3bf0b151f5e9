"""The one place that loads, partitions and batches data (how examples become model inputs is the
task's: ``finetune/tasks``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from flwr_datasets.partitioner import (  # its plotting is deferred (finetune/__init__.py)
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from experiment_schema import CLUSTER_FIELD, ConfigError, DatasetConfig, ExperimentConfig, PartitionConfig
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
    missing = [c for c in cfg.input_fields if c not in dataset.column_names]
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


def split_off_tuning(
    dataset: datasets.Dataset, cfg: DatasetConfig
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training split without its tuning rows, and the tuning rows (``cfg.tuning_examples`` of
    them, drawn with ``cfg.tuning_seed``; the same for every run seed)."""
    if cfg.tuning_examples >= len(dataset):
        raise ConfigError(
            f"dataset.tuning_examples={cfg.tuning_examples} leaves nothing of the {len(dataset)} "
            f"training examples of {cfg.name!r} to train on"
        )
    order = np.random.default_rng(cfg.tuning_seed).permutation(len(dataset))
    tuning, rest = np.sort(order[: cfg.tuning_examples]), np.sort(order[cfg.tuning_examples :])
    return dataset.select(rest), dataset.select(tuning)


def load_train_split(cfg: DatasetConfig, mirror: Path | None, seed: int) -> datasets.Dataset:
    """The training split (less the tuning split, when there is one), seeded-subsampled."""
    dataset = load_split(cfg, cfg.train_split, mirror)
    if cfg.tuning_examples:
        dataset, _ = split_off_tuning(dataset, cfg)
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
    missing = [f for f in cfg.input_fields if f not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"node data {path} lacks the dataset's fields {missing}; it has {dataset.column_names}"
        )
    return dataset


def load_eval_split(cfg: DatasetConfig, mirror: Path | None, seed: int) -> datasets.Dataset:
    """What the global model is scored on: the validation split, or the tuning split
    (``dataset.evaluate_on``), seeded-subsampled to ``max_eval_examples``."""
    if cfg.evaluate_on == "tuning":
        _, tuning = split_off_tuning(load_split(cfg, cfg.train_split, mirror), cfg)
        return subsample(tuning, cfg.max_eval_examples, seed)
    dataset = load_split(cfg, cfg.eval_split, mirror)
    if cfg.is_classification and (np.asarray(dataset[cfg.label_field]) < 0).all():
        raise ConfigError(
            f"split {cfg.eval_split!r} of {cfg.name!r} has no labels (all -1); "
            "choose a labelled dataset.eval_split"
        )
    return subsample(dataset, cfg.max_eval_examples, seed)


def make_partitioner(cfg: PartitionConfig, field: str | None) -> Partitioner:
    if cfg.name == "iid":
        return IidPartitioner(num_partitions=cfg.num_clients)
    if field is None:
        raise ConfigError(
            f"partition {cfg.name!r} needs a field to split by (partition.by / partition.clusters)"
        )
    if cfg.name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=cfg.num_clients,
            partition_by=field,
            alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=False,
            seed=cfg.seed,
        )
    if cfg.name == "pathological":
        return PathologicalPartitioner(
            num_partitions=cfg.num_clients,
            partition_by=field,
            num_classes_per_partition=cfg.classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=cfg.seed,
        )
    if cfg.name == "natural":
        return NaturalIdPartitioner(partition_by=field)
    raise ConfigError(f"unknown partition {cfg.name!r}")


def example_texts(dataset: datasets.Dataset, cfg: DatasetConfig) -> list[str]:
    """The text clustering reads: the text fields (classification) or the prompt (causal LM)."""
    if cfg.task == "causal_lm":
        return list(dataset[cfg.prompt_field])
    if cfg.task == "text_classification":
        columns = [dataset[name] for name in cfg.text_fields]
        return [" ".join(parts) for parts in zip(*columns, strict=True)]
    raise ConfigError(f"partition.clusters groups texts; {cfg.name!r} is {cfg.task}")


@lru_cache(maxsize=4)
def _fit_clusters(texts: tuple[str, ...], k: int, seed: int) -> Any:
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline

    if k > len(texts):
        raise ConfigError(f"partition.clusters={k} exceeds the {len(texts)} training examples")
    model = make_pipeline(
        TfidfVectorizer(max_features=20_000, stop_words="english", sublinear_tf=True),
        KMeans(n_clusters=k, n_init=3, random_state=seed),
    )
    return model.fit(list(texts))


def cluster_ids(texts: list[str], fit_texts: list[str], k: int, seed: int) -> list[int]:
    """k-means cluster of each of ``texts`` (TF-IDF vectors), the clusters fitted on ``fit_texts``
    (the training split; seeded, so every process derives the same split)."""
    return _fit_clusters(tuple(fit_texts), k, seed).predict(texts).tolist()


class PartitionedDataset:
    """``data`` (the training split) divided among ``partition.num_clients`` clients by a
    flwr-datasets partitioner, split by the experiment's partition field (labels, a named field, or
    k-means clusters of the text); other splits follow it through :meth:`shares_of`."""

    def __init__(self, data: datasets.Dataset, cfg: ExperimentConfig) -> None:
        part = cfg.partition
        if part.num_clients > len(data):
            raise ConfigError(f"partition.num_clients={part.num_clients} exceeds the {len(data)} examples")
        self.field = cfg.partition_field if part.name != "iid" else None
        if part.clusters:
            fit = example_texts(data, cfg.dataset)
            data = data.add_column(CLUSTER_FIELD, cluster_ids(fit, fit, part.clusters, part.seed))
        if self.field is not None and self.field not in data.column_names:
            raise ConfigError(f"partition.by={self.field!r} is not a field of the data: {data.column_names}")
        self.cfg = part
        self.dataset_cfg = cfg.dataset
        self.fit_texts = fit if part.clusters else None
        self.partitioner = make_partitioner(part, self.field)
        self.partitioner.dataset = data
        if part.name == "natural" and self.partitioner.num_partitions != part.num_clients:
            raise ConfigError(
                f"partition.name=natural gives one client per value of {self.field!r}: "
                f"{self.partitioner.num_partitions} values, but partition.num_clients={part.num_clients}"
            )

    def partition(self, partition_id: int) -> datasets.Dataset:
        if not 0 <= partition_id < self.cfg.num_clients:
            raise ConfigError(
                f"partition id {partition_id} is outside [0, {self.cfg.num_clients}) (partition.num_clients)"
            )
        try:
            return self.partitioner.load_partition(partition_id)
        except ValueError as error:
            if not (self.cfg.name == "dirichlet" and "max number of attempts" in str(error)):
                raise ConfigError(f"cannot partition with {self.cfg}: {error}") from error
        # flwr-datasets redraws until every client has min_partition_size examples and gives up
        # after 10 draws, which for large federations is the rule: repair one draw instead.
        data = self.partitioner.dataset
        self.partitioner = RepairedDirichlet(data, self.field or "", self.cfg)
        return self.partitioner.load_partition(partition_id)

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

    def shares_of(self, other: datasets.Dataset) -> list[datasets.Dataset]:
        """``other`` (another split, e.g. validation) divided among the clients so that each share
        holds every value of the split field in the proportion the client holds it here (largest
        remainder), so that a client's validation share looks like its training data; partitioning
        ``other`` on its own would draw unrelated label proportions for the same client. A client
        whose quota rounds to nothing gets one example of its most common value; values that no
        client trains on are left out."""
        n = self.cfg.num_clients
        if self.field is None:
            held = {"": np.asarray(self.sizes(), dtype=np.float64)}
            keys = np.full(len(other), "")
        else:
            if self.fit_texts is not None:
                texts = example_texts(other, self.dataset_cfg)
                ids = cluster_ids(texts, self.fit_texts, self.cfg.clusters, self.cfg.seed)
                other = other.add_column(CLUSTER_FIELD, ids)
            keys = np.asarray([str(v) for v in other[self.field]])
            held = {}
            for client, histogram in enumerate(self.histograms()):
                for key, count in histogram.items():
                    held.setdefault(key, np.zeros(n))[client] += count
        rng = np.random.default_rng(self.cfg.seed)
        pools: dict[str, list[np.ndarray]] = {}
        for key in sorted(set(keys.tolist()) & held.keys()):
            rows = np.flatnonzero(keys == key)
            rng.shuffle(rows)
            bounds = np.concatenate([[0], np.cumsum(_quotas(len(rows), held[key] / held[key].sum(), rng))])
            pools[key] = [rows[bounds[i] : bounds[i + 1]] for i in range(n)]
        for client in range(n):  # a share of nothing would leave the client unable to evaluate
            if not any(len(parts[client]) for parts in pools.values()):
                common = [k for k in sorted(pools, key=lambda k: -held[k][client]) if held[k][client]]
                if common:
                    parts = pools[common[0]]
                    donor = max(range(n), key=lambda i: len(parts[i]))
                    if len(parts[donor]) > 1:
                        parts[client], parts[donor] = parts[donor][:1], parts[donor][1:]
        return [
            other.select(sorted(np.concatenate([p[i] for p in pools.values()] or [np.zeros(0)]).astype(int)))
            for i in range(n)
        ]

    def histograms(self) -> list[dict[str, int]]:
        """Examples per value of the split field, for every client ({} for iid)."""
        if self.field is None:
            return [{} for _ in range(self.cfg.num_clients)]
        result = []
        for i in range(self.cfg.num_clients):
            values, counts = np.unique(np.asarray(self.partition(i)[self.field]), return_counts=True)
            result.append({str(v): int(c) for v, c in zip(values, counts, strict=True)})
        return result


class RepairedDirichlet(Partitioner):
    """One Dirichlet(α) draw per value of the split field over the clients (the same label skew as
    flwr-datasets' partitioner), then the clients below ``min_partition_size`` take examples from
    the largest ones until every client has its minimum. Seeded: every process derives the same
    split. Used where flwr-datasets' redraws give up."""

    def __init__(self, data: datasets.Dataset, field: str, cfg: PartitionConfig) -> None:
        super().__init__()
        n, minimum = cfg.num_clients, cfg.min_partition_size
        if n * minimum > len(data):
            raise ConfigError(
                f"partition.num_clients={n} clients of at least partition.min_partition_size={minimum} "
                f"examples need {n * minimum} examples; the data has {len(data)}: lower "
                "partition.min_partition_size or use fewer clients"
            )
        self.dataset = data
        rng = np.random.default_rng(cfg.seed)
        values = np.asarray([str(v) for v in data[field]])
        assigned: list[list[int]] = [[] for _ in range(n)]
        for value in sorted(set(values.tolist())):
            rows = np.flatnonzero(values == value)
            rng.shuffle(rows)
            bounds = np.concatenate([[0], np.cumsum(_quotas(len(rows), rng.dirichlet([cfg.alpha] * n), rng))])
            for client in range(n):
                assigned[client].extend(rows[bounds[client] : bounds[client + 1]].tolist())
        moved = 0
        for client in np.argsort([len(a) for a in assigned], kind="stable"):
            while len(assigned[client]) < minimum:
                donor = max(range(n), key=lambda i: len(assigned[i]))
                take = min(minimum - len(assigned[client]), len(assigned[donor]) - minimum)
                assigned[client].extend(assigned[donor][-take:])
                del assigned[donor][-take:]
                moved += take
        log.warning(
            "Dirichlet(%.3g) over %d clients: %d examples moved from the largest clients so that each has "
            "partition.min_partition_size=%d (flwr-datasets' redraws gave up)", cfg.alpha, n, moved, minimum,
        )  # fmt: skip
        self.indices = [sorted(a) for a in assigned]

    @property
    def num_partitions(self) -> int:
        return len(self.indices)

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        return self.dataset.select(self.indices[partition_id])


Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


def _quotas(total: int, proportions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``total`` items split in ``proportions`` by largest remainder (sums to ``total``); equal
    remainders are ordered at random, so that no client is favoured value after value."""
    exact = total * proportions
    counts = np.floor(exact + 1e-9).astype(int)
    counts[np.lexsort((rng.permutation(len(exact)), -(exact - counts)))[: total - counts.sum()]] += 1
    return counts


def iterate_batches(
    dataset: datasets.Dataset,
    collate: Collate,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    order: np.ndarray | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over ``dataset``: shuffled (seeded) for training, else in ``order`` (the task's:
    by length for text, which pads least and leaves order-free metrics unchanged)."""
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(dataset))
    elif order is None:
        order = np.arange(len(dataset))
    for start in range(0, len(order), batch_size):
        yield _collate_rows(dataset, order[start : start + batch_size], collate)


def poisson_batches(
    dataset: datasets.Dataset, collate: Collate, sample_rate: float, seed: int
) -> Iterator[dict[str, torch.Tensor] | None]:
    """Endless Poisson-sampled batches — each example joins each batch independently with
    probability ``sample_rate``, the sampling DP-SGD's accounting assumes; None for an empty draw."""
    rng = np.random.default_rng(seed)
    while True:
        chosen = np.flatnonzero(rng.random(len(dataset)) < sample_rate)
        yield _collate_rows(dataset, chosen, collate) if len(chosen) else None


def _collate_rows(
    dataset: datasets.Dataset, indices: np.ndarray, collate: Collate
) -> dict[str, torch.Tensor]:
    rows = dataset[indices]
    features = [{k: rows[k][i] for k in rows} for i in range(len(indices))]
    return collate(features)
