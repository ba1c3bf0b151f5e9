"""What the engine does to each reply before it counts, and how a round settles: a reply must
answer this round's message to its node (not stale, misaddressed or a second answer), be well
formed (``strategies.validation``) and stay within the update bound (``strategies.bounds``:
clipped, or rejected as an outlier of the round); a round keeps the previous global state when
fewer valid replies than the quorum remain."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Message

from strategies.bounds import UpdateBound, clip_update, outliers, update_norm
from strategies.replies import RoundStats, fail_on_common_config_error, parse_reply

if TYPE_CHECKING:
    from strategies.rule import ServerRule

log = logging.getLogger(__name__)

#: A valid reply held for the round's aggregate: (node, uploaded state, metrics).
HeldReply = tuple[int, dict[str, np.ndarray], dict[str, float]]
State = dict[str, np.ndarray]


class ReplyScreen:
    """One round's screening of replies: what each node was sent and must send back."""

    def __init__(self, bound: UpdateBound, lora_scale: Callable[[int], float]) -> None:
        self.bound, self.lora_scale = bound, lora_scale
        self.frozen: State = {}  # server arrays no payload carries (FFA-LoRA's A)
        self.sent: dict[int, State] = {}  # each node's payload this round
        self.expected: dict[int, dict[str, tuple[int, ...]]] = {}  # each node's reply: keys, shapes
        self.answered: set[int] = set()
        self.outbox: list[Message] = []  # the round's messages (their ids are set when sent)

    def open_round(self) -> None:
        self.sent, self.expected, self.answered, self.outbox = {}, {}, set(), []

    def expect(self, message: Message, payload: State, shapes: dict[str, tuple[int, ...]]) -> None:
        node_id = message.metadata.dst_node_id
        self.sent[node_id], self.expected[node_id] = payload, shapes
        self.outbox.append(message)

    def node_of(self, reply: Message) -> int:
        """The node whose message ``reply`` answers (an error the SuperLink writes for a dead node
        comes from the SuperLink, not from the node)."""
        node_of_message = {m.metadata.message_id: m.metadata.dst_node_id for m in self.outbox}
        return node_of_message.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def parse(
        self, server_round: int, node_id: int, reply: Message, stats: RoundStats
    ) -> tuple[State, dict[str, float]] | None:
        """The reply's state and metrics, or None after logging why it was rejected. A reply that
        does not answer this round's message to the node, or answers it a second time, is ignored:
        the node's first genuine reply decides its outcome."""
        problem = misaddressed(reply, node_id, server_round)
        if problem is None and node_id in self.answered:
            problem = "a second reply to this round's message (a duplicate)"
        if problem is not None:
            stats.ignored.append(f"node {node_id}: {problem}, ignored")
            log.warning("round %d: a reply for node %d ignored: %s", server_round, node_id, problem)
            return None
        self.answered.add(node_id)
        parsed = parse_reply(reply, self.expected.get(node_id), stats, node_id)
        if not isinstance(parsed, str):
            return parsed
        stats.rejected[node_id] = parsed
        log.warning("round %d: node %d rejected: %s", server_round, node_id, parsed)
        return None

    def reference(self, node_id: int) -> State:
        """What ``node_id`` started this round from: its payload and the server's frozen arrays."""
        return {**self.frozen, **self.sent.get(node_id, {})}

    def clip(self, server_round: int, node_id: int, state: State, stats: RoundStats) -> State:
        """``state`` with its update clipped to the bound (``clip``); records its norm either way."""
        reference = self.reference(node_id)
        norm = stats.update_norms[node_id] = update_norm(reference, state, self.lora_scale)
        if self.bound.mode != "clip":
            return state
        clipped, factor = clip_update(reference, state, self.lora_scale, self.bound.max_norm, norm)
        if factor < 1.0:
            stats.clipped[node_id] = factor
            log.warning(
                "round %d: node %d's update norm %.4g clipped to %.4g (its arrays' updates scaled by %.4g)",
                server_round, node_id, norm, self.bound.max_norm, factor,
            )  # fmt: skip
        return clipped

    def bounded(self, server_round: int, stats: RoundStats, held: list[HeldReply]) -> list[HeldReply]:
        """The held replies within the bound: clipped (``clip``), or without the ones whose norm
        exceeds k × the round's median (``reject``, recorded and logged as rejected)."""
        bounded = [(n, self.clip(server_round, n, state, stats), m) for n, state, m in held]
        if self.bound.mode != "reject":
            return bounded
        far = outliers({node_id: stats.update_norms[node_id] for node_id, _, _ in held}, self.bound.k)
        for node_id, median in far.items():
            stats.rejected[node_id] = (
                f"update norm {stats.update_norms[node_id]:.4g} exceeds {self.bound.k:g} × the round's "
                f"median norm {median:.4g} (federation.update_bound=reject)"
            )
            log.warning("round %d: node %d rejected: %s", server_round, node_id, stats.rejected[node_id])
        return [item for item in bounded if item[0] not in far]


def settle_round(
    rule: ServerRule,
    server_round: int,
    stats: RoundStats,
    accepted: tuple[list[int], list[dict[str, float]]],
    min_replies: int,
) -> bool:
    """Record who was left out and why, tell the rule; False when the round keeps the previous
    global state (fewer valid replies than the quorum)."""
    node_ids, metrics = accepted
    for node_id in stats.settle(node_ids, metrics):
        log.warning("round %d: node %d rejected: %s", server_round, node_id, stats.rejected[node_id])
    for node_id in stats.rejected:
        rule.node_failed(node_id)
    for node_id, reply_metrics in zip(node_ids, metrics, strict=True):
        rule.accept_reply(node_id, reply_metrics)
    if not node_ids:
        fail_on_common_config_error(stats.rejected, stats.sampled, f"train in round {server_round}")
    if len(node_ids) >= min_replies:
        return True
    stats.kept_previous = True
    replies = f"{len(node_ids)} valid repl{'y' if len(node_ids) == 1 else 'ies'}"
    log.warning(
        "round %d: %s < min_replies=%d; keeping the previous global state", server_round, replies, min_replies
    )
    return False


def misaddressed(reply: Message, node_id: int, server_round: int) -> str | None:
    """Why a reply does not answer this round's message to ``node_id``: sent by another node, or
    answering another round's message (a replayed or stale reply). Error replies the SuperLink
    writes itself carry neither and are judged by their error."""
    if reply.has_error():
        return None
    source, group = reply.metadata.src_node_id, reply.metadata.group_id
    if source != node_id:
        return f"answers node {node_id}'s message but came from node {source}"
    if group != str(server_round):
        return f"answers a message of round {group or '?'} in round {server_round} (stale or replayed)"
    return None
