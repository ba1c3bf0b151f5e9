"""Message plumbing shared by every aggregation rule.

:class:`FederatedStrategy` samples live nodes (without Flower's wait-forever loop), builds one
message per node, rejects and logs bad replies, enforces a quorum and counts the bytes that
actually travel. A rule subclasses it and implements :meth:`FederatedStrategy.aggregate`, a
call into the rule's pure tensor function.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from finetune.config import ExperimentConfig, MethodConfig, clients_per_round, method_config_type
from finetune.lora import split_state
from finetune.records import from_record, to_record
from finetune.spec import AdapterSpec
from strategies import protocol
from strategies.averaging import State, Weights, weighted_mean
from strategies.protocol import ARRAYS, CONFIG, MAX_METRICS, METRICS, NUM_EXAMPLES, SUM_METRICS, Instruction
from strategies.server_optim import ServerOptimizer
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


#: ``stream_aggregation=auto`` folds replies as they arrive above this global-state size.
STREAM_ABOVE_BYTES = 256 * 2**20


@dataclass
class StreamFold:
    """``Σ w_k x_k`` of the replies, folded in client order: a reply that arrives before the ones
    ahead of it waits, so the sums are the same whatever the arrival order, while the server holds
    only the replies that arrived early (typically few) instead of all of them."""

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


class FederatedStrategy(Strategy):
    """Sampling, per-node messages, reply validation, quorum and byte accounting."""

    name = "base"

    #: The model is personal (part of it never leaves the client): evaluate on the clients.
    evaluate_on_clients: ClassVar[bool] = False
    #: Each node trains at its own LoRA rank: the server learns it and tells the node every round.
    heterogeneous_ranks: ClassVar[bool] = False
    #: The aggregate is a weighted mean of the uploads, so replies can be folded as they arrive.
    streamable: ClassVar[bool] = False

    @staticmethod
    def shares(key: str) -> bool:
        """Whether a trainable array is part of the global state (clients upload exactly these)."""
        return True

    def __init__(
        self,
        method: MethodConfig | None = None,
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_replies: int = 1,
        seed: int = 0,
        connect_timeout_s: float = 300.0,
        query_timeout_s: float = 120.0,
        query_all_up_to: int = 100,
    ) -> None:
        self.method = method if method is not None else method_config_type(self.name)()
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_replies = min_replies
        self.weighting = self.method.weighting
        self.wire_dtype = self.method.wire_dtype
        self.seed = seed
        self.connect_timeout_s = connect_timeout_s
        self.query_timeout_s = query_timeout_s
        self.query_all_up_to = query_all_up_to
        self.registration_rank: dict[int, int] = {}  # where a node's partition is not known yet
        self.server_optimizer = ServerOptimizer.of(self.method)
        self.node_ranks: dict[int, int] = {}
        self.node_partitions: dict[int, int] = {}
        self.restored_ranks: dict[int, int] = {}  # partition -> rank, from a checkpoint
        self.rounds: dict[int, RoundStats] = {}
        self._outbox: list[Message] = []
        self._expected: dict[int, dict[str, tuple[int, ...]]] = {}
        self._global: dict[str, np.ndarray] = {}
        self.server_round = 0  # the round configure_train last prepared
        self._stream: StreamFold | None = None

    @classmethod
    def from_experiment(cls, cfg: ExperimentConfig) -> FederatedStrategy:
        """The strategy of ``cfg``: the rule's own config (resolved) and the federation settings."""
        federation = cfg.federation
        strategy = cls(
            cls.resolve(cfg),
            fraction_train=federation.fraction_train,
            min_train_nodes=federation.min_train_clients,
            min_replies=federation.min_replies,
            seed=cfg.seed,
            connect_timeout_s=federation.connect_timeout_s,
            query_all_up_to=federation.query_all_up_to,
        )
        if cfg.evaluation.where == "clients":
            strategy.evaluate_on_clients = True  # type: ignore[misc]
        return strategy

    @classmethod
    def resolve(cls, cfg: ExperimentConfig) -> MethodConfig:
        """The rule's config with defaults that depend on the rest of the experiment filled in."""
        return cfg.method

    @classmethod
    def global_adapter(cls, cfg: ExperimentConfig, client: AdapterSpec) -> AdapterSpec:
        """The adapter of the server's model, whose trainable state holds the global state; by
        default the clients' own."""
        return client

    # --- hooks for the rules -------------------------------------------------------------
    def setup(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord:
        """A one-off exchange with the nodes before round 1, returning the global arrays round 1
        starts from (Fed-SB estimates its initialisation); most rules have none."""
        return arrays

    #: (bytes down, bytes up) of :meth:`setup`'s messages.
    setup_bytes: tuple[int, int] = (0, 0)

    def initial_state(self, trainable: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global state before round 1, from the server model's trainable state."""
        return {key: value for key, value in trainable.items() if self.shares(key)}

    def payload(self, node_id: int, global_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What ``node_id`` receives this round; by default the whole global state."""
        return global_state

    def expected_reply_shapes(
        self, node_id: int, payload: dict[str, np.ndarray]
    ) -> dict[str, tuple[int, ...]]:
        """Keys and shapes a valid reply from ``node_id`` holds; by default those it was sent."""
        return {key: value.shape for key, value in payload.items()}

    def instruction(self, node_id: int, common: Instruction) -> Instruction:
        """The config ``node_id`` receives: the round's common one, plus its rank where ranks differ."""
        if not self.heterogeneous_ranks:
            return common
        rank = self.node_ranks.get(node_id)
        if rank is None:
            raise RuntimeError(f"node {node_id} did not report its LoRA rank")
        return dataclasses.replace(common, rank=rank)

    def encode_payload(self, payload: dict[str, np.ndarray]) -> ArrayRecord:
        return to_record(payload, self.wire_dtype)

    def accept_reply(self, node_id: int, metrics: dict[str, float]) -> None:
        """Called with the metrics of every reply that is aggregated."""

    def node_failed(self, node_id: int) -> None:
        """Called for every sampled node whose reply was rejected or did not come."""

    @staticmethod
    def rule(states: Sequence[State], weights: Weights) -> dict[str, np.ndarray]:
        """The rule's pure function of (client states, weights), for rules that need nothing more
        (they set ``rule = staticmethod(<their function>)``); others override :meth:`aggregate`."""
        raise NotImplementedError

    def aggregate(self, replies: Replies) -> dict[str, np.ndarray]:
        r"""The new global state from the round's valid replies: the rule's aggregate of what the
        clients uploaded, stepped by the server optimizer when there is one, then
        :meth:`finalize`\ d; arrays no client uploaded keep their global values."""
        combined = self.rule(replies.states, replies.weights)
        stepped = self.server_optimizer.step(replies.server_round, replies.global_state, combined)
        return self.finalize(replies.server_round, {**replies.global_state, **stepped})

    def finalize(self, server_round: int, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A last transformation of the new global state (FedSVD re-orthogonalises); none here."""
        return state

    # --- checkpoints ---------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """What the strategy carries from round to round besides the global arrays (arrays, and
        JSON-able values); facts about nodes are keyed by partition id, which outlives node ids."""
        state: dict[str, Any] = {}
        if self.heterogeneous_ranks:
            known = {n: r for n, r in self.node_ranks.items() if n in self.node_partitions}
            ranks = {**self.restored_ranks, **{self.node_partitions[n]: r for n, r in known.items()}}
            state["partition_ranks"] = {str(p): r for p, r in sorted(ranks.items())}
        return self.server_optimizer.state_arrays(), state

    def restore_state(self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        """The inverse of :meth:`checkpoint_state`, before the first resumed round."""
        self.server_optimizer.load_state_arrays(arrays)
        self.restored_ranks = {int(p): int(r) for p, r in state.get("partition_ranks", {}).items()}

    # --- sampling ------------------------------------------------------------------------
    def connected_nodes(self, grid: Grid) -> list[int]:
        """The nodes connected now; waits (bounded) for ``min_train_nodes`` of them."""
        deadline = time.monotonic() + self.connect_timeout_s
        nodes = list(grid.get_node_ids())
        while len(nodes) < self.min_train_nodes and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(grid.get_node_ids())
        if not nodes:
            raise RuntimeError(f"no client node connected within {self.connect_timeout_s:.0f} s")
        return nodes

    def sample_nodes(self, nodes: Sequence[int], server_round: int) -> list[int]:
        """This round's seeded sample of the connected nodes, in client order."""
        if len(nodes) < self.min_train_nodes:
            log.warning(
                "round %d: only %d node(s) connected (min_train_nodes=%d); training with them",
                server_round,
                len(nodes),
                self.min_train_nodes,
            )
        ordered = sorted(nodes, key=self.client_order)
        count = clients_per_round(len(ordered), self.fraction_train, self.min_train_nodes)
        # Sample positions, not ids: node ids are unsigned 64-bit and would not survive numpy.
        rng = np.random.default_rng([self.seed, server_round])
        return [ordered[i] for i in sorted(rng.choice(len(ordered), size=count, replace=False))]

    def learn_nodes(self, grid: Grid, nodes: Sequence[int], config: ConfigRecord) -> None:
        """Ask each node not described yet for its partition id and LoRA rank (a QUERY message).

        Node ids are drawn anew whenever a SuperNode (or a simulation) starts; partition ids are
        what the data owners configured, so sampling and summation follow them and a seed means
        the same clients in every run.
        """
        unknown = [n for n in nodes if not self.described(n)]
        if not unknown:
            return
        messages = [
            Message(
                RecordDict({CONFIG: ConfigRecord(dict(config))}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in unknown
        ]
        refusals: dict[int, str] = {}
        for reply in grid.send_and_receive(messages, timeout=self.query_timeout_s):
            node_id = reply.metadata.src_node_id
            metrics = None if reply.has_error() else reply.content.metric_records.get(METRICS)
            described = None if metrics is None else protocol.NodeDescription.from_metrics(metrics)
            if described is not None:
                self.node_partitions.setdefault(node_id, described.partition_id)
                if described.rank is not None and self.heterogeneous_ranks:
                    self.node_ranks.setdefault(node_id, described.rank)  # keeps HetLoRA pruning
                    restored = self.restored_ranks.get(self.node_partitions[node_id])
                    if restored is not None:  # a resumed run: the rank the checkpoint held
                        self.node_ranks[node_id] = restored
            if not self.described(node_id):
                reason = str(reply.error.reason) if reply.has_error() else "no partition id or LoRA rank"
                refusals[node_id] = reason
                log.warning("node %d did not describe itself: %s", node_id, reason)
        fail_on_common_config_error(refusals, unknown, "describe itself")
        holders: dict[int, list[int]] = {}
        for node_id in nodes:
            if node_id in self.node_partitions:
                holders.setdefault(self.node_partitions[node_id], []).append(node_id)
        for partition, same in holders.items():
            if len(same) > 1 and not set(same).isdisjoint(unknown):
                log.warning("nodes %s all hold partition %d: check their --node-config", same, partition)
        log.info("partition per new node: %s", {n: self.node_partitions.get(n) for n in unknown})
        if self.heterogeneous_ranks:
            log.info("LoRA rank per new node: %s", {n: self.node_ranks.get(n) for n in unknown})

    def sample_learnt(
        self, grid: Grid, nodes: Sequence[int], config: ConfigRecord, server_round: int
    ) -> list[int]:
        """This round's sample, every sampled node described (partition, rank): a small federation
        is asked whole first; a large one only in the nodes the round samples."""
        unknown = [n for n in nodes if not self.described(n)]
        if len(unknown) <= self.query_all_up_to:
            self.learn_nodes(grid, nodes, config)
            return self.sample_nodes(nodes, server_round)
        self.learn_registration_order(grid, unknown)
        sampled = self.sample_nodes(nodes, server_round)
        self.learn_nodes(grid, sampled, config)
        return sampled

    def described(self, node_id: int) -> bool:
        """Whether the node told its partition id (and its rank, where ranks differ)."""
        has_rank = not self.heterogeneous_ranks or node_id in self.node_ranks
        return node_id in self.node_partitions and has_rank

    def client_order(self, node_id: int) -> tuple[int, int, int]:
        """Sort key of a node: its partition id (stable across runs) — or, not asked yet, its rank
        in registration order, which is its partition id in a simulation — then its node id."""
        partition = self.node_partitions.get(node_id, self.registration_rank.get(node_id))
        return (0, partition, node_id) if partition is not None else (1, 0, node_id)

    def learn_registration_order(self, grid: Grid, unknown: Sequence[int]) -> None:
        """Rank the nodes not described yet by when they registered with the SuperLink."""
        order = {info.node_id: (info.registered_at, info.node_id) for info in grid.get_nodes()} if hasattr(
            grid, "get_nodes"
        ) else {}  # fmt: skip
        ranked = sorted(unknown, key=lambda n: order.get(n, ("", n)))
        self.registration_rank.update({n: rank for rank, n in enumerate(ranked)})

    # --- Strategy API --------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self.connected_nodes(grid)
        self._global = from_record(arrays)
        self.server_round = server_round
        stats = self.rounds[server_round] = RoundStats(
            sampled=self.sample_learnt(grid, nodes, config, server_round)
        )
        common = common_instruction(config, server_round)
        self._outbox, self._expected = [], {}
        for node_id in stats.sampled:
            payload = self.payload(node_id, self._global)
            record = self.encode_payload(payload)
            message = self.node_message(node_id, record, common, MessageType.TRAIN)
            self._outbox.append(message)
            self._expected[node_id] = self.expected_reply_shapes(node_id, payload)
            stats.bytes_down[node_id] = record.count_bytes()
            stats.payload_down[node_id] = raw_bytes(record)
        return self._outbox

    def node_message(self, node_id: int, record: ArrayRecord, common: Instruction, kind: str) -> Message:
        """One node's message (its own records: never shared between messages)."""
        content = RecordDict({ARRAYS: record, CONFIG: self.instruction(node_id, common).to_config()})
        return Message(content, dst_node_id=node_id, message_type=kind, group_id=str(common.server_round))

    # --- aggregating as replies arrive ----------------------------------------------------
    def start_streaming(self, server_round: int, mode: str) -> bool:
        """Whether this round folds replies into running sums as they arrive (``receive``) instead
        of holding them all: ``on``, or ``auto`` for a global state over ``STREAM_ABOVE_BYTES``;
        only rules whose aggregate is a weighted mean of the uploads can."""
        size = sum(a.nbytes for a in self._global.values())
        self._stream = None
        if self.streamable and (mode == "on" or (mode == "auto" and size > STREAM_ABOVE_BYTES)):
            stats = self.rounds[server_round]
            self._stream = StreamFold(sorted(stats.sampled, key=self.client_order))
        return self._stream is not None

    def receive(self, reply: Message) -> None:
        """Validate one reply and fold it into the round's sums (the reply is not kept)."""
        assert self._stream is not None
        node_id = self._node_of(reply)
        parsed = self._parse_reply(self.server_round, node_id, reply, self.rounds[self.server_round])
        if parsed is None:
            self._stream.settle(node_id)
            return
        state, metrics = parsed
        self._stream.add(node_id, state, self._weight(metrics), metrics)

    def _node_of(self, reply: Message) -> int:
        node_of_message = {m.metadata.message_id: m.metadata.dst_node_id for m in self._outbox}
        return node_of_message.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _weight(self, metrics: dict[str, float]) -> float:
        return float(metrics[NUM_EXAMPLES]) if self.weighting == "examples" else 1.0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        if self._stream is not None:
            return self._aggregate_stream(server_round, replies, stats)
        states, weights, node_ids, metrics = [], [], [], []
        for reply in replies:
            node_id = self._node_of(reply)
            parsed = self._parse_reply(server_round, node_id, reply, stats)
            if parsed is None:
                continue
            state, reply_metrics = parsed
            states.append(state)
            metrics.append(reply_metrics)
            node_ids.append(node_id)
            weights.append(self._weight(reply_metrics))
        if not self._settle_round(server_round, stats, node_ids, metrics):
            return None, None
        # Arrival order and fresh node ids must not change the float sums: sum in client order.
        order = sorted(range(len(node_ids)), key=lambda i: self.client_order(node_ids[i]))
        states, weights = [states[i] for i in order], [weights[i] for i in order]
        node_ids, metrics = [node_ids[i] for i in order], [metrics[i] for i in order]
        stats.aggregated = node_ids
        new_state = self.aggregate(
            Replies(server_round, self._global, states, np.asarray(weights, dtype=np.float64), node_ids)
        )
        return to_record(new_state), aggregate_metrics(metrics, weights)

    def _aggregate_stream(
        self, server_round: int, replies: Iterable[Message], stats: RoundStats
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stream = self._stream
        assert stream is not None
        for reply in replies:  # any the loop did not hand over as they arrived
            self.receive(reply)
        stream.finish()
        self._stream = None
        stats.peak_held_replies = stream.peak_pending
        if not self._settle_round(server_round, stats, stream.folded, stream.metrics):
            return None, None
        stats.aggregated = list(stream.folded)
        combined = stream.mean()
        stepped = self.server_optimizer.step(server_round, self._global, combined)
        new_state = self.finalize(server_round, {**self._global, **stepped})
        return to_record(new_state), aggregate_metrics(stream.metrics, stream.weights)

    def _settle_round(
        self, server_round: int, stats: RoundStats, node_ids: list[int], metrics: list[dict[str, float]]
    ) -> bool:
        """Record who was left out and why, tell the rule; False when the round keeps the previous
        global state (fewer valid replies than the quorum)."""
        for node_id in stats.sampled:
            if node_id not in node_ids and node_id not in stats.rejected:
                stats.rejected[node_id] = "no reply (not delivered, or none before the round timeout)"
                log.warning("round %d: node %d rejected: %s", server_round, node_id, stats.rejected[node_id])
        for node_id in stats.rejected:
            self.node_failed(node_id)
        for node_id, reply_metrics in zip(node_ids, metrics, strict=True):
            self.accept_reply(node_id, reply_metrics)
            stats.client_seconds[node_id] = float(reply_metrics.get(protocol.TRAIN_SECONDS, 0.0))
            if protocol.HANDLER_SECONDS in reply_metrics:
                stats.handler_seconds[node_id] = float(reply_metrics[protocol.HANDLER_SECONDS])
        self._outbox = []
        stats.aggregated = node_ids
        if not node_ids:
            fail_on_common_config_error(stats.rejected, stats.sampled, f"train in round {server_round}")
        if len(node_ids) < self.min_replies:
            stats.kept_previous = True
            log.warning(
                "round %d: %d valid repl%s < min_replies=%d; keeping the previous global state",
                server_round,
                len(node_ids),
                "y" if len(node_ids) == 1 else "ies",
                self.min_replies,
            )
            return False
        return True

    def _parse_reply(
        self, server_round: int, node_id: int, reply: Message, stats: RoundStats
    ) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
        """The reply's state and metrics, or None after logging why it was rejected."""
        problem: str | None
        if node_id not in self._expected:
            problem = "reply from a node that was not sampled this round"
        elif reply.has_error():
            problem = f"client error: {reply.error.reason}"
        elif ARRAYS not in reply.content.array_records or METRICS not in reply.content.metric_records:
            problem = f"reply lacks an '{ARRAYS}' ArrayRecord or a '{METRICS}' MetricRecord"
        else:
            record = reply.content.array_records[ARRAYS]
            stats.bytes_up[node_id] = record.count_bytes()
            stats.payload_up[node_id] = raw_bytes(record)
            state = from_record(record)
            metrics = dict(reply.content.metric_records[METRICS])
            problem = reply_problem(state, self._expected[node_id], metrics.get(NUM_EXAMPLES))
            if problem is None:
                return state, {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        stats.rejected[node_id] = problem
        log.warning("round %d: node %d rejected: %s", server_round, node_id, problem)
        return None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Personalised rules evaluate every connected client on its own data; others use the
        server-side evaluation of the global model and send nothing."""
        if not self.evaluate_on_clients:
            return []
        nodes = list(grid.get_node_ids())
        self.learn_nodes(grid, nodes, config)  # round 0 evaluates before any training round
        state = from_record(arrays)
        common = common_instruction(config, server_round)
        return [
            self.node_message(
                node_id,
                to_record(self.payload(node_id, state), self.wire_dtype),
                common,
                MessageType.EVALUATE,
            )
            for node_id in sorted(nodes, key=self.client_order)
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' metrics (FedSA-LoRA's personalised average)."""
        metrics, weights = [], []
        for reply in sorted(replies, key=lambda r: self.client_order(r.metadata.src_node_id)):
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

    def summary(self) -> None:
        log.info(
            "%s: fraction_train=%s min_train_nodes=%d min_replies=%d weighting=%s wire=%s",
            type(self).__name__,
            self.fraction_train,
            self.min_train_nodes,
            self.min_replies,
            self.weighting,
            self.wire_dtype,
        )


#: Errors a client raises for a configuration problem (its own, or the experiment's on its data).
CONFIG_ERROR_TYPES = ("ConfigError", "DataNotFoundError", "PrivacyBudgetExhausted")


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


def common_instruction(config: ConfigRecord, server_round: int) -> Instruction:
    """The round's instruction, common to every node (the loop's config record, this round)."""
    return dataclasses.replace(Instruction.from_config(config), server_round=server_round)


def raw_bytes(record: ArrayRecord) -> int:
    """The bytes of the record's array elements alone (what the method must move, no framing)."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in record.values())


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
