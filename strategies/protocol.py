"""The wire protocol: every record, config and metric key that crosses between the ServerApp and a
ClientApp, with the typed encode/decode helpers both sides use. Nothing else names these keys.

A server message carries an ``arrays`` ArrayRecord (the payload) and a ``config`` ConfigRecord
(:class:`Instruction`); a reply carries ``arrays`` (the upload) and a ``metrics`` MetricRecord
(:class:`TrainReport`, or evaluation metrics); a QUERY reply carries :class:`NodeDescription`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from flwr.app import ConfigRecord, ConfigRecordValues, MetricRecord, MetricRecordValues

# --- records of a message ---------------------------------------------------------------------
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

#: A rule's one-off exchange before round 1 (Fed-SB's gradient estimate), a QUERY with arrays.
SETUP_MESSAGE = "query.setup"

# --- config keys (server → client) --------------------------------------------------------------
EXPERIMENT = "experiment"  # the resolved experiment config, as JSON
LR = "lr"  # this round's learning rate
SERVER_ROUND = "server-round"
RANK = "lora-rank"  # the LoRA rank this node trains at (rules with per-node ranks)
BASE_VERSION = "base-version"  # merged-base rules: the version the payload brings the node to ...
BASE_FROM = "base-from"  # ... and the version its factors start from; -1 = the dense base delta

# --- metric keys (client → server) --------------------------------------------------------------
NUM_EXAMPLES = "num-examples"
EXAMPLES_SEEN = "examples-seen"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
HANDLER_SECONDS = "handler-seconds"
# where a round's time goes before training: the process's own start (interpreter, imports, Flower
# pulling the task) when this is its first message, else 0; the model and rule set-up; the data
STARTUP_SECONDS = "startup-seconds"
SETUP_SECONDS = "setup-seconds"
DATA_SECONDS = "data-seconds"
SAMPLES_PER_SECOND = "samples-per-second"
PEAK_MEMORY_MB = "peak-memory-mb"
PARTITION_ID = "partition-id"
OPTIMIZER_STATE_BYTES = "optimizer-state-bytes"
DP_EPSILON = "dp-epsilon"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
NEXT_RANK = "next-rank"  # HetLoRA: the rank a node pruned itself to, from its next round on
# BASE_VERSION also comes back: the merged-base version the node trained on.

#: Reply metrics combined by sum or max instead of the example-weighted mean.
SUM_METRICS = frozenset({NUM_EXAMPLES, EXAMPLES_SEEN})
MAX_METRICS = frozenset(
    {TRAIN_SECONDS, HANDLER_SECONDS, STARTUP_SECONDS, SETUP_SECONDS, DATA_SECONDS, PEAK_MEMORY_MB,
     OPTIMIZER_STATE_BYTES, DP_EPSILON}
)  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    """The config record of a TRAIN / EVALUATE / QUERY message."""

    experiment: str
    server_round: int = 0
    lr: float = 0.0
    rank: int | None = None
    base_version: int | None = None
    base_from: int | None = None

    def to_config(self) -> ConfigRecord:
        values: dict[str, ConfigRecordValues] = {
            EXPERIMENT: self.experiment,
            SERVER_ROUND: self.server_round,
            LR: self.lr,
        }
        for key, value in ((RANK, self.rank), (BASE_VERSION, self.base_version), (BASE_FROM, self.base_from)):
            if value is not None:
                values[key] = value
        return ConfigRecord(values)

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> Instruction:
        def optional(key: str) -> int | None:
            return int(config[key]) if key in config else None  # type: ignore[call-overload]

        return cls(
            experiment=str(config.get(EXPERIMENT, "")),
            server_round=int(config.get(SERVER_ROUND, 0)),  # type: ignore[call-overload]
            lr=float(config.get(LR, 0.0)),  # type: ignore[arg-type]
            rank=optional(RANK),
            base_version=optional(BASE_VERSION),
            base_from=optional(BASE_FROM),
        )


@dataclass
class TrainReport:
    """The metrics record of a TRAIN reply."""

    num_examples: int
    examples_seen: int
    train_loss: float
    train_seconds: float
    samples_per_second: float
    peak_memory_mb: float
    partition_id: int
    optimizer_state_bytes: int
    handler_seconds: float = 0.0
    startup_seconds: float | None = None
    setup_seconds: float | None = None
    data_seconds: float | None = None
    dp_epsilon: float | None = None
    dp_noise_multiplier: float | None = None
    next_rank: int | None = None
    base_version: int | None = None

    _KEYS: ClassVar[dict[str, str]] = {
        "num_examples": NUM_EXAMPLES,
        "examples_seen": EXAMPLES_SEEN,
        "train_loss": TRAIN_LOSS,
        "train_seconds": TRAIN_SECONDS,
        "samples_per_second": SAMPLES_PER_SECOND,
        "peak_memory_mb": PEAK_MEMORY_MB,
        "partition_id": PARTITION_ID,
        "optimizer_state_bytes": OPTIMIZER_STATE_BYTES,
        "handler_seconds": HANDLER_SECONDS,
        "startup_seconds": STARTUP_SECONDS,
        "setup_seconds": SETUP_SECONDS,
        "data_seconds": DATA_SECONDS,
        "dp_epsilon": DP_EPSILON,
        "dp_noise_multiplier": DP_NOISE_MULTIPLIER,
        "next_rank": NEXT_RANK,
        "base_version": BASE_VERSION,
    }

    def to_metrics(self) -> MetricRecord:
        values: dict[str, MetricRecordValues] = {}
        for attr, key in self._KEYS.items():
            if (value := getattr(self, attr)) is not None:
                values[key] = value
        return MetricRecord(values)


def metric_int(metrics: Mapping[str, object], key: str) -> int | None:
    """An integer metric of a reply, None when absent or not a number."""
    value = metrics.get(key)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class NodeDescription:
    """A QUERY reply: the node's partition id and, where the rule gives nodes their own ranks,
    the rank it trains at."""

    partition_id: int
    rank: int | None = None

    def to_metrics(self) -> MetricRecord:
        values: dict[str, MetricRecordValues] = {PARTITION_ID: self.partition_id}
        if self.rank is not None:
            values[RANK] = self.rank
        return MetricRecord(values)

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, object]) -> NodeDescription | None:
        partition = metric_int(metrics, PARTITION_ID)
        return None if partition is None else cls(partition, metric_int(metrics, RANK))
