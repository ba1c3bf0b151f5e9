"""The engine every rule runs in: one Flower Strategy that knows no rule.

It samples live nodes (without Flower's wait-forever loop), builds one message per node from the
rule's payload, rejects and logs bad replies (malformed, stale, duplicated, or an update out of
bounds), enforces a quorum, counts the bytes that travel, folds replies as they arrive where the
rule's aggregate is a weighted mean (or replaces that mean by a robust aggregate), and evaluates
on the clients where the model is personal. The rule (:class:`strategies.rule.ServerRule`) says what
travels and how replies combine.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from finetune.records import from_record, to_record
from finetune.wire import pack, packed_bytes, unpack
from strategies.bounds import UpdateBound
from strategies.protocol import ARRAYS, CONFIG, NUM_EXAMPLES, Instruction
from strategies.replies import (
    Replies,
    RoundStats,
    WeightedFold,
    aggregate_metrics,
    evaluation_metrics,
    raw_bytes,
)
from strategies.robust import RobustAggregate
from strategies.rule import ServerRule
from strategies.screening import HeldReply, ReplyScreen, settle_round

log = logging.getLogger(__name__)
#: ``stream_aggregation=auto`` folds replies as they arrive above this global-state size.
STREAM_ABOVE_BYTES = 256 * 2**20


class Engine(Strategy):
    """Rounds, sampling, messages, validation, statistics and evaluation around one rule."""

    def __init__(
        self,
        rule: ServerRule,
        *,
        min_replies: int = 1,
        evaluate_on_clients: bool | None = None,
        bound: UpdateBound | None = None,
        robust: RobustAggregate | None = None,
    ) -> None:
        self.rule = rule
        self.bound = bound if bound is not None else UpdateBound()
        self.screen = ReplyScreen(self.bound, rule.lora_scale)  # what each reply must be
        self.robust = robust if robust is not None else RobustAggregate()
        self.nodes = rule.nodes  # sampling settings and what the nodes told (strategies.nodes)
        self.min_replies = min_replies
        self.evaluate_on_clients = (
            rule.evaluate_on_clients if evaluate_on_clients is None else evaluate_on_clients
        )
        self.rounds: dict[int, RoundStats] = {}
        self.server_round = 0  # the round configure_train last prepared
        self.setup_bytes = (0, 0)  # (bytes down, bytes up) of the set-up exchange
        self._global: dict[str, np.ndarray] = {}
        self._fold: WeightedFold | None = None
        self._streaming = False

    @property
    def node_partitions(self) -> dict[int, int]:
        return self.nodes.partitions

    def initial_state(self, trainable: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        state = self.rule.initial_state(trainable)
        keeps = self.rule.traffic.keeps
        self.screen.frozen = {k: v for k, v in trainable.items() if k not in state and not keeps(k)}
        return state

    # --- the one-off set-up exchange -------------------------------------------------------
    def setup(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord:
        """The global arrays round 1 starts from: the rule's set-up exchange, where it has one."""
        if not self.rule.has_setup:
            return arrays
        nodes = self.nodes.connected(grid)
        self.nodes.learn(grid, nodes, config)
        common = common_instruction(config, 0)

        def ask(kind: str) -> list[dict[str, np.ndarray]]:
            messages = [self.node_message(n, ArrayRecord(), common, kind) for n in nodes]
            replies = [
                r
                for r in grid.send_and_receive(messages, timeout=self.nodes.query_timeout_s)
                if not r.has_error()
            ]
            records = [r.content.array_records[ARRAYS] for r in replies]
            self.setup_bytes = (
                self.setup_bytes[0],
                self.setup_bytes[1] + sum(r.count_bytes() for r in records),
            )
            return [from_record(unpack(r)) for r in records]

        return to_record(self.rule.setup(ask, from_record(arrays)))

    # --- checkpoints -----------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, state = self.rule.checkpoint_state()
        return arrays, {**state, **self.nodes.checkpoint_state()}

    def restore_state(self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        self.rule.restore_state(arrays, state)
        self.nodes.restore_state(state)

    # --- Strategy API: training --------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self.nodes.connected(grid)
        self._global = from_record(arrays)
        self.server_round = server_round
        stats = self.rounds[server_round] = RoundStats(
            sampled=self.nodes.sample_learnt(grid, nodes, config, server_round)
        )
        self.rule.begin_round(server_round, self._global)
        self._streaming = False
        # the weighted-mean rules fold (held or streamed); a robust aggregate or the reject bound
        # compares the round's replies, which are then all held
        folds = self.rule.streamable and not (self.robust.enabled or self.bound.mode == "reject")
        self._fold = WeightedFold(list(stats.sampled)) if folds else None  # sampled: client order
        common = common_instruction(config, server_round)
        self.screen.open_round()
        outbox = []
        for node_id in stats.sampled:
            payload = self.rule.payload(node_id, self._global)
            record = self.rule.encode_payload(payload)
            outbox.append(self.node_message(node_id, record, common, MessageType.TRAIN))
            shapes = self.rule.expected_reply_shapes(node_id, payload, server_round)
            self.screen.expect(outbox[-1], payload, shapes)
            stats.bytes_down[node_id] = packed_bytes(record)  # what travels: the packed record
            stats.payload_down[node_id] = raw_bytes(record)
        return outbox

    def planned_bytes(self, server_round: int) -> int:
        """The array bytes the round configured last will move: its payloads down and the uploads
        its nodes are expected to send (at the wire dtype)."""
        stats = self.rounds[server_round]
        itemsize = 2 if self.rule.method.wire_dtype == "float16" else 4
        expected = self.screen.expected.values()
        up = sum(int(np.prod(shape)) * itemsize for shapes in expected for shape in shapes.values())
        return sum(stats.payload_down.values()) + up

    def expected_shapes(self, node_id: int) -> dict[str, tuple[int, ...]]:
        """The keys and shapes a valid reply of ``node_id`` holds this round ({}: not sampled)."""
        return dict(self.screen.expected.get(node_id, {}))

    def node_message(self, node_id: int, record: ArrayRecord, common: Instruction, kind: str) -> Message:
        """One node's message (its own records: never shared between messages), its arrays packed
        into one (finetune.wire)."""
        content = RecordDict(
            {ARRAYS: pack(record), CONFIG: self.rule.instruction(node_id, common).to_config()}
        )
        return Message(content, dst_node_id=node_id, message_type=kind, group_id=str(common.server_round))

    def start_streaming(self, server_round: int, mode: str) -> bool:
        """Whether this round folds replies into running sums as they arrive (``receive``) instead
        of holding them all: ``on``, or ``auto`` for a global state over ``STREAM_ABOVE_BYTES``;
        only rules whose aggregate is a weighted mean of the uploads can (and not while a robust
        aggregate or the reject bound needs every reply of the round)."""
        size = sum(a.nbytes for a in self._global.values())
        self._streaming = self._fold is not None and (
            mode == "on" or (mode == "auto" and size > STREAM_ABOVE_BYTES)
        )
        return self._streaming

    def receive(self, reply: Message) -> None:
        """Validate one reply and fold it into the round's sums (the reply is not kept)."""
        assert self._fold is not None
        node_id = self.screen.node_of(reply)
        parsed = self.screen.parse(self.server_round, node_id, reply, self.rounds[self.server_round])
        if parsed is None:
            if node_id in self.rounds[self.server_round].rejected:
                self._fold.settle(node_id)
            return
        state, metrics = parsed
        if self.bound.enabled:
            state = self.screen.clip(self.server_round, node_id, state, self.rounds[self.server_round])
        self._fold.add(node_id, state, self._weight(metrics), metrics)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.rounds.setdefault(server_round, RoundStats())
        if self._fold is not None:  # held or streamed, one fold: bit for bit the same aggregate
            return self._aggregate_folded(server_round, replies, stats)
        held: list[HeldReply] = []
        for reply in replies:
            node_id = self.screen.node_of(reply)
            parsed = self.screen.parse(server_round, node_id, reply, stats)
            if parsed is not None:
                held.append((node_id, *parsed))
        # Arrival order and fresh node ids must not change the float sums: sum in client order.
        held.sort(key=lambda item: self.nodes.client_order(item[0]))
        if self.bound.enabled:
            held = self.screen.bounded(server_round, stats, held)
        node_ids = [node_id for node_id, _, _ in held]
        metrics = [reply_metrics for _, _, reply_metrics in held]
        if not self._settle(server_round, stats, node_ids, metrics):
            return None, None
        weights = [self._weight(m) for m in metrics]
        states = [state for _, state, _ in held]
        if self.robust.enabled:  # in place of the rule's weighted mean (validated: it has one)
            new_state = self.rule.step(server_round, self._global, self.robust.combine(states, weights))
        else:
            new_state = self.rule.aggregate(
                Replies(server_round, self._global, states, np.asarray(weights, dtype=np.float64), node_ids)
            )
        return to_record(new_state), aggregate_metrics(metrics, weights)

    def _aggregate_folded(
        self, server_round: int, replies: Iterable[Message], stats: RoundStats
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        fold = self._fold
        assert fold is not None
        for reply in replies:  # all of them (held), or any the loop did not hand over as they arrived
            self.receive(reply)
        fold.finish()
        self._fold = None
        if self._streaming:
            stats.peak_held_replies = fold.peak_pending
        if not self._settle(server_round, stats, fold.folded, fold.metrics):
            return None, None
        new_state = self.rule.step(server_round, self._global, fold.mean())
        return to_record(new_state), aggregate_metrics(fold.metrics, fold.weights)

    def _weight(self, metrics: dict[str, float]) -> float:
        return float(metrics[NUM_EXAMPLES]) if self.rule.method.weighting == "examples" else 1.0

    def _settle(
        self, server_round: int, stats: RoundStats, node_ids: list[int], metrics: list[dict[str, float]]
    ) -> bool:
        self.screen.outbox = []  # the round is over: a late reply counts as its sender's
        return settle_round(self.rule, server_round, stats, (node_ids, metrics), self.min_replies)

    # --- Strategy API: evaluation ------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Personalised rules evaluate every connected client on its own data, sent what training
        sends (the rule's payload in the rule's encoding); others use the server-side evaluation
        of the global model and send nothing."""
        if not self.evaluate_on_clients:
            return []
        nodes = list(grid.get_node_ids())
        self.nodes.learn(grid, nodes, config)  # round 0 evaluates before any training round
        state = from_record(arrays)
        self.rule.begin_round(server_round, state)
        common = common_instruction(config, server_round)
        return [
            self.node_message(
                node_id,
                self.rule.encode_payload(self.rule.payload(node_id, state)),
                common,
                MessageType.EVALUATE,
            )
            for node_id in sorted(nodes, key=self.nodes.client_order)
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' metrics (FedSA-LoRA's personalised average)."""
        ordered = sorted(replies, key=lambda r: self.nodes.client_order(r.metadata.src_node_id))
        return evaluation_metrics(server_round, ordered)

    def summary(self) -> None:
        method, nodes = self.rule.method, self.nodes
        log.info(
            "%s: fraction_train=%s min_train_nodes=%d min_replies=%d weighting=%s wire=%s",
            type(self.rule).__name__, nodes.fraction_train, nodes.min_train_nodes, self.min_replies,
            method.weighting, method.wire_dtype,
        )  # fmt: skip


def common_instruction(config: ConfigRecord, server_round: int) -> Instruction:
    """The round's instruction, common to every node (the loop's config record, this round)."""
    return dataclasses.replace(Instruction.from_config(config), server_round=server_round)
