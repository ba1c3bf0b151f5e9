"""Fault injection: a Grid wrapper through which one node's replies arrive as a faulty or hostile
node would send them, for the fault-injection tests and benchmark. It changes what the ServerApp
receives, nothing else: the nodes train as usual.

Switched on by the run-config key ``inject-fault`` (``kind:partition[:scale]``); a run with a
fault says so in its log and summary. Kinds (``FAULT_KINDS``):

- ``scaled``: the node's update × ``scale``;
- ``sign_flipped``: its update negated;
- ``replayed``: its previous round's upload sent again as its reply to this round (a stale update);
- ``duplicated``: a second reply to the node's message after the genuine one, its update × ``scale``;
- ``stopped``: the node stops mid-upload (the error reply the SuperLink writes instead of its own).

An update is the reply's arrays minus the arrays the node was sent (an array it was not sent
counts whole).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Error, Message, MessageType

from experiment_schema import ConfigError
from finetune.records import from_record, to_record
from finetune.wire import pack, unpack
from strategies.protocol import ARRAYS, METRICS, PARTITION_ID

log = logging.getLogger(__name__)

FAULT_KINDS = ("scaled", "sign_flipped", "replayed", "duplicated", "stopped")


@dataclass(frozen=True)
class Fault:
    """``kind`` injected into the replies of the node that holds ``partition``."""

    kind: str
    partition: int
    scale: float = 1e3

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ConfigError(f"unknown fault kind {self.kind!r}; one of {list(FAULT_KINDS)}")

    @classmethod
    def parse(cls, text: str) -> Fault | None:
        """``kind:partition[:scale]`` (the ``inject-fault`` run-config key); "" = none."""
        if not text:
            return None
        parts = text.split(":")
        try:
            return cls(parts[0], int(parts[1]), *(float(x) for x in parts[2:3]))
        except (IndexError, ValueError) as error:
            raise ConfigError(f"inject-fault={text!r}: expected kind:partition[:scale] ({error})") from error

    def __str__(self) -> str:
        return f"{self.kind}:{self.partition}:{self.scale:g}"


def moved(sent: dict[str, np.ndarray], upload: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    """``upload`` with its update (``upload − sent``) multiplied by ``factor``."""
    out = {}
    for key, value in upload.items():
        before = sent.get(key)
        base = before if before is not None and before.shape == value.shape else np.zeros_like(value)
        out[key] = (base + factor * (value.astype(np.float64) - base)).astype(value.dtype)
    return out


class FaultyGrid:
    """``grid`` with ``fault`` applied to the train replies of the node holding its partition
    (learnt from the nodes' answers to the engine's queries as they pass)."""

    def __init__(self, grid: Any, fault: Fault) -> None:
        self.grid, self.fault = grid, fault
        self.node_id: int | None = None
        self._sent: dict[str, Message] = {}  # message id -> the train message to the faulty node
        self._previous: dict[str, np.ndarray] | None = None  # its last upload, for ``replayed``
        self.injected: list[tuple[str, str, int]] = []  # (round, kind, node id) of every fault applied

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        self._note(messages)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return self._arrived(self.grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self._note(messages)  # the grid gave them their ids as it pushed them
        return self._arrived(replies)

    def _note(self, messages: list[Message]) -> None:
        for message in messages:
            meta = message.metadata
            if meta.dst_node_id == self.node_id and meta.message_type == MessageType.TRAIN:
                self._sent[meta.message_id] = message

    def _arrived(self, replies: Iterable[Message]) -> list[Message]:
        out = []
        for reply in replies:
            metrics = None if reply.has_error() else reply.content.metric_records.get(METRICS)
            if metrics is not None and metrics.get(PARTITION_ID) == self.fault.partition:
                self.node_id = reply.metadata.src_node_id
            message = self._sent.pop(reply.metadata.reply_to_message_id, None)
            if message is None or reply.has_error():
                out.append(reply)
            else:
                out.extend(self._inject(message, reply))
        return out

    def _inject(self, message: Message, reply: Message) -> list[Message]:
        kind, scale = self.fault.kind, self.fault.scale
        sent = from_record(unpack(message.content.array_records[ARRAYS]))
        upload = from_record(unpack(reply.content.array_records[ARRAYS]))
        previous, self._previous = self._previous, upload
        if kind == "replayed" and previous is None:
            return [reply]  # nothing to replay in the node's first round
        self.injected.append((message.metadata.group_id, kind, message.metadata.dst_node_id))
        log.warning(
            "round %s: fault injected into node %d's reply: %s", message.metadata.group_id, self.node_id, kind
        )
        if kind == "stopped":
            return [
                Message(
                    Error(code=0, reason="the node stopped mid-upload (fault injected)"), reply_to=message
                )
            ]
        if kind == "duplicated":
            return [reply, with_arrays(reply, moved(sent, upload, scale))]
        if kind == "replayed":
            assert previous is not None
            return [with_arrays(reply, previous)]
        factor = scale if kind == "scaled" else -1.0
        return [with_arrays(reply, moved(sent, upload, factor))]


def with_arrays(reply: Message, arrays: dict[str, np.ndarray]) -> Message:
    """A copy of ``reply`` (metadata and metrics) carrying ``arrays`` (as float32)."""
    out = copy.deepcopy(reply)
    out.content.array_records[ARRAYS] = pack(to_record(arrays))
    return out
