"""What comes back in a round: each reply checked (or rejected with its reason), the valid ones
in client order, the round's statistics, and the sums that fold replies as they arrive."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, MetricRecordValues

from finetune.lora import split_state
from finetune.records import from_record
from finetune.wire import packed_bytes
from strategies.averaging import Weights, weighted_mean
from strategies.protocol import (
    ARRAYS,
    HANDLER_SECONDS,
    MAX_METRICS,
    METRICS,
    NUM_EXAMPLES,
    SUM_METRICS,
    TRAIN_SECONDS,
)
from strategies.validation import reply_problem

log = logging.getLogger(__name__)


@dataclass
class RoundStats:
    """What one training round moved and who was left out."""

    sampled: list[int] = field(default_factory=list)
    bytes_down: dict[int, int] = field(default_factory=dict)  # serialized array records
    bytes_up: dict[int, int] = field(default_factory=dict)
    payload_down: dict[int, int] = field(default_factory=dict)  # raw bytes of the arrays alone
    payload_up: dict[int, int] = field(default_factory=dict)
    client_seconds: dict[int, float] = field(default_factory=dict)  # each client's training time
    handler_seconds: dict[int, float] = field(default_factory=dict)  # ... and its whole train handler
    aggregated: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    kept_previous: bool = False
    peak_held_replies: int = 0  # aggregating as replies arrive: the most replies held at once
    update_norms: dict[int, float] = field(default_factory=dict)  # federation.update_bound on
    clipped: dict[int, float] = field(default_factory=dict)  # node -> the factor its update was scaled by
    ignored: list[str] = field(default_factory=list)  # replies dropped without deciding their node's outcome

    def settle(self, node_ids: list[int], metrics: list[dict[str, float]]) -> list[int]:
        """Record the replies aggregated and their clients' times; the sampled nodes that never
        answered are rejected, and returned."""
        silent = [n for n in self.sampled if n not in node_ids and n not in self.rejected]
        for node_id in silent:
            self.rejected[node_id] = "no reply (not delivered, or none before the round timeout)"
        for node_id, reply_metrics in zip(node_ids, metrics, strict=True):
            self.client_seconds[node_id] = float(reply_metrics.get(TRAIN_SECONDS, 0.0))
            if HANDLER_SECONDS in reply_metrics:
                self.handler_seconds[node_id] = float(reply_metrics[HANDLER_SECONDS])
        self.aggregated = list(node_ids)
        return silent


@dataclass(frozen=True)
class Replies:
    """A round's valid replies in client order, with the global state they trained from."""

    server_round: int
    global_state: dict[str, np.ndarray]
    states: list[dict[str, np.ndarray]]
    weights: np.ndarray  # one per reply (example counts, or ones)
    node_ids: list[int]

    def factors(self, a_key: str, b_key: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every client's ``(A, B)`` of one LoRA layer."""
        return [s[a_key] for s in self.states], [s[b_key] for s in self.states]

    def mean_of_heads(self) -> dict[str, np.ndarray]:
        """The weighted mean of everything but the LoRA factors (the heads), {} when none."""
        heads = [split_state(state)[1] for state in self.states]
        return weighted_mean(heads, self.weights) if heads[0] else {}


@dataclass
class WeightedFold:
    """The one aggregation path of the weighted-mean rules, held or streamed: ``Σ w_k x_k / Σ w_k``
    folded in client order (float64 sums). A reply that arrives before the ones ahead of it waits,
    so the sums are the same whatever the arrival order — and the same whether the replies were
    folded as they arrived or all at the round's end — while a streamed round holds only the
    replies that arrived early (typically few) instead of all of them."""

    order: list[int]  # the sampled nodes in client order
    position: int = 0
    pending: dict[int, tuple[dict[str, np.ndarray], float, dict[str, float]]] = field(default_factory=dict)
    settled: set[int] = field(default_factory=set)  # rejected: never folded
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    total: float = 0.0
    folded: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    peak_pending: int = 0

    def add(
        self, node_id: int, state: dict[str, np.ndarray], weight: float, metrics: dict[str, float]
    ) -> None:
        self.pending[node_id] = (state, weight, metrics)
        self.peak_pending = max(self.peak_pending, len(self.pending))
        self._advance(final=False)

    def settle(self, node_id: int) -> None:
        self.settled.add(node_id)
        self._advance(final=False)

    def finish(self) -> None:
        """The round is over: fold what waits, skipping who never answered."""
        self._advance(final=True)

    def _advance(self, final: bool) -> None:
        while self.position < len(self.order):
            node = self.order[self.position]
            if node in self.pending:
                self._fold(node, *self.pending.pop(node))
            elif not (final or node in self.settled):
                return
            self.position += 1

    def _fold(
        self, node: int, state: dict[str, np.ndarray], weight: float, metrics: dict[str, float]
    ) -> None:
        for key, value in state.items():
            if key not in self.sums:
                self.sums[key] = np.zeros(value.shape, dtype=np.float64)
            self.sums[key] += weight * value.astype(np.float64)
        self.total += weight
        self.folded.append(node)
        self.weights.append(weight)
        self.metrics.append(metrics)

    def mean(self) -> dict[str, np.ndarray]:
        return {key: (acc / self.total).astype(np.float32) for key, acc in self.sums.items()}


def parse_reply(
    reply: Message, expected: dict[str, tuple[int, ...]] | None, stats: RoundStats, node_id: int
) -> tuple[dict[str, np.ndarray], dict[str, float]] | str:
    """The reply's state and numeric metrics, or the reason it is rejected (``expected``: the keys
    and shapes a valid reply holds; None: the node was not sampled). Counts the bytes up."""
    if expected is None:
        return "reply from a node that was not sampled this round"
    if reply.has_error():
        return f"client error: {reply.error.reason}"
    if ARRAYS not in reply.content.array_records or METRICS not in reply.content.metric_records:
        return f"reply lacks an '{ARRAYS}' ArrayRecord or a '{METRICS}' MetricRecord"
    record = reply.content.array_records[ARRAYS]  # unpacked on receipt (server_app.loop.exchange)
    stats.bytes_up[node_id] = packed_bytes(record)  # what travelled: the packed record
    stats.payload_up[node_id] = raw_bytes(record)
    state = from_record(record)
    metrics = dict(reply.content.metric_records[METRICS])
    problem = reply_problem(state, expected, metrics.get(NUM_EXAMPLES))
    if problem is not None:
        return problem
    return state, {k: v for k, v in metrics.items() if isinstance(v, int | float)}


#: Errors a client raises for a configuration problem (its own, or the experiment's on its data).
CONFIG_ERROR_TYPES = ("ConfigError", "DataNotFoundError", "PrivacyBudgetExhausted", "WireFormatError")


def fail_on_common_config_error(reasons: dict[int, str], nodes: Sequence[int], what: str) -> None:
    """End the run when every node refused with a configuration error: no round can succeed, so
    rejecting every reply of every round would only hide it. One bad node among good ones is left
    out and named by the caller's log instead."""
    if not nodes or set(nodes) - set(reasons):
        return
    config_errors = [r for r in reasons.values() if any(t in r for t in CONFIG_ERROR_TYPES)]
    if len(config_errors) == len(reasons):
        raise RuntimeError(
            f"every node ({len(reasons)}) refused to {what} with a configuration error; the first said: "
            f"{config_errors[0]}"
        )


def raw_bytes(record: ArrayRecord) -> int:
    """The bytes of the record's array elements alone (what the method must move, no framing)."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in record.values())


def evaluation_metrics(server_round: int, replies: Sequence[Message]) -> MetricRecord | None:
    """The example-weighted mean of the clients' evaluation metrics; a reply without metrics or
    with no examples is logged and left out."""
    metrics, weights = [], []
    for reply in replies:
        record = None if reply.has_error() else reply.content.metric_records.get(METRICS)
        count = None if record is None else record.get(NUM_EXAMPLES)
        if record is None or not isinstance(count, int | float) or count <= 0:
            reason = reply.error.reason if reply.has_error() else "no metrics or num-examples"
            log.warning("round %d: evaluation reply of node %d ignored: %s", server_round,
                        reply.metadata.src_node_id, reason)  # fmt: skip
            continue
        metrics.append({k: v for k, v in record.items() if isinstance(v, int | float)})
        weights.append(float(count))
    return aggregate_metrics(metrics, weights) if metrics else None


def aggregate_metrics(metrics: Sequence[dict[str, float]], weights: Weights) -> MetricRecord:
    """Weighted mean of each reply metric; sums for counts, maxima for times and memory."""
    p = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    keys = set().union(*metrics)
    out: dict[str, MetricRecordValues] = {}
    for key in sorted(keys):
        values = [(pk, m[key]) for pk, m in zip(p, metrics, strict=True) if key in m]
        if key in SUM_METRICS:
            out[key] = int(sum(v for _, v in values))
        elif key in MAX_METRICS:
            out[key] = float(max(v for _, v in values))
        else:
            total = sum(pk for pk, _ in values)
            out[key] = float(sum(pk * v for pk, v in values) / total) if total > 0 else 0.0
    return MetricRecord(out)
