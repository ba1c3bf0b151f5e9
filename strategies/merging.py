"""Rules that fold each round's update into the frozen base weights (FLoRA, FedEx-LoRA).

The server's global state holds, per LoRA layer, the cumulative base delta ``D``
(``<prefix>.base_delta``, ``d_out × d_in``); every merge adds an exact low-rank increment,
``D ← D + L R``. A client keeps its own ``D`` and the *version* it holds (the server round of the
last merge in it, 0 for none) in its context, so a client that skipped rounds must catch up
before it trains. Per sampled node the server sends either

* nothing, when the node already holds the current version;
* the factors ``(L, R)`` of every merge the node missed (``base_sync: factors``, or ``auto`` when
  they are smaller than ``D``), applied in order with :func:`apply_increment` — the very function
  the server used, so both sides hold bit-identical bases;
* the dense ``D``, which replaces whatever the node held (version unknown, too far behind, or
  ``base_sync: dense``).

Nodes report the version they trained on; a node whose reply failed or was rejected is sent the
dense ``D`` next time, so a lost or restarted client can never train on a stale base.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord

from experiment_schema import MethodConfig, choice
from finetune.lora import (
    BASE_DELTA_SUFFIX,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    is_base_delta,
    is_lora,
    lora_layers,
    split_base_deltas,
    with_base_deltas,
)
from finetune.records import to_record
from strategies.averaging import finite_inputs
from strategies.client import ClientRule, ModelBaseline, State
from strategies.lowrank import dense_dtype
from strategies.nodes import NodeDirectory
from strategies.protocol import BASE_VERSION, Instruction, TrainReport, metric_int
from strategies.replies import Replies
from strategies.rule import ServerRule

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

UPDATE_INFIX = ".base_update."  # <prefix>.base_update.<version>.L / .R
MERGED_BASE = "merged-base"  # node state: the base deltas this node holds ...
MERGED_BASE_VERSION = "merged-base-version"  # ... and the server round of the last merge in them
BASE_SYNC_MODES = ("auto", "dense", "factors")


@dataclass
class MergedBaseConfig(MethodConfig):
    """How a client's merged base is brought up to date: ``factors`` sends each missed round's
    exact low-rank update, ``dense`` the whole base delta, ``auto`` the smaller."""

    base_sync: str = "auto"

    uploads_are_global = False
    no_server_optimizer = "each round's update is folded into the frozen base; no global array is stepped"
    no_robust_aggregate = (
        "the exact sum of the clients' products is merged into the frozen base; a coordinate-wise "
        "aggregate of the factors would merge an update no client made"
    )

    def validate(self) -> None:
        super().validate()
        choice(self.base_sync, BASE_SYNC_MODES, "method.base_sync")


Factors = dict[str, tuple[np.ndarray, np.ndarray]]  # layer prefix -> (L, R), L R = increment


@finite_inputs
def apply_increment(delta: np.ndarray, L: np.ndarray, R: np.ndarray) -> np.ndarray:
    """``D + L R`` in float64 (float32 for large layers), stored as float32; server and clients both
    call exactly this."""
    dtype = dense_dtype(*delta.shape)
    return (delta.astype(dtype) + L.astype(dtype) @ R.astype(dtype)).astype(np.float32)


def is_sync_key(key: str) -> bool:
    return is_base_delta(key) or UPDATE_INFIX in key


def sync_payload_keys(factors: Factors, version: int) -> dict[str, np.ndarray]:
    out = {}
    for prefix, (L, R) in factors.items():
        out[f"{prefix}{UPDATE_INFIX}{version}.L"] = L
        out[f"{prefix}{UPDATE_INFIX}{version}.R"] = R
    return out


def catch_up(
    held: Mapping[str, np.ndarray],
    held_version: int,
    sync: Mapping[str, np.ndarray],
    target_version: int,
    from_version: int,
) -> dict[str, np.ndarray]:
    """The client's new base deltas (``prefix -> D``) from what it holds and what it received.

    ``from_version`` -1 means ``sync`` holds the dense ``D``; otherwise it holds the factors of
    every merge after ``from_version``, which must be the version the client holds.
    """
    dense, updates = split_base_deltas(sync)[1], {k: v for k, v in sync.items() if UPDATE_INFIX in k}
    if from_version < 0:
        return {prefix: value.astype(np.float32) for prefix, value in dense.items()}
    if target_version == held_version:
        return dict(held)
    if held_version != from_version:
        raise RuntimeError(
            f"merged base out of sync: this client holds version {held_version}, the update starts "
            f"at {from_version}; the server will send the whole base next round"
        )
    by_version: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for key, value in updates.items():
        prefix, rest = key.split(UPDATE_INFIX)
        version_text, side = rest.split(".")
        by_version.setdefault(int(version_text), {}).setdefault(prefix, {})[side] = value
    out = dict(held)
    for version in sorted(by_version):
        for prefix, sides in by_version[version].items():
            if prefix not in out:
                out[prefix] = np.zeros((sides["L"].shape[0], sides["R"].shape[1]), np.float32)
            out[prefix] = apply_increment(out[prefix], sides["L"], sides["R"])
    return out


class BaseMergingStrategy(ServerRule):
    """Keeps ``D`` in the global state, the recent increments, and each node's version.

    A rule implements :meth:`merge`: the new global trainable state and this round's increment.
    """

    #: Whether LoRA factors are part of the global state (FedEx) or fresh every round (FLoRA).
    global_lora: ClassVar[bool] = True
    method: MergedBaseConfig

    def __init__(self, method: MergedBaseConfig | None = None, nodes: NodeDirectory | None = None) -> None:
        super().__init__(method, nodes)
        self._global: dict[str, np.ndarray] = {}
        self.base_sync = self.method.base_sync
        self.merged: list[int] = []  # server rounds that merged an increment, in order
        self.history: OrderedDict[int, Factors] = OrderedDict()  # recent merges' increments
        self.node_version: dict[int, int] = {}  # the version each node confirmed; -1 = unknown

    @property
    def version(self) -> int:
        return self.merged[-1] if self.merged else 0

    def merge(self, replies: Replies) -> tuple[dict[str, np.ndarray], Factors]:
        """The new global trainable state and ``{prefix: (L, R)}``, ``L R`` = this round's
        base increment."""
        raise NotImplementedError

    def initial_state(self, trainable: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        state = {k: v for k, v in trainable.items() if self.global_lora or not is_lora(k)}
        for prefix, (a_key, b_key) in lora_layers(trainable).items():
            d_out, d_in = trainable[b_key].shape[0], trainable[a_key].shape[1]
            state[prefix + BASE_DELTA_SUFFIX] = np.zeros((d_out, d_in), np.float32)
        return state

    # --- what each node receives and returns ---------------------------------------------
    def begin_round(self, server_round: int, global_state: dict[str, np.ndarray]) -> None:
        self._global = global_state

    def catch_up_from(self, node_id: int) -> int | None:
        """The version to send factors from, or None when the node gets the dense ``D``."""
        held = self.node_version.get(node_id, 0)  # a node never seen holds the pretrained base
        missed = [v for v in self.merged if v > held]
        if held < 0 or self.base_sync == "dense" or any(v not in self.history for v in missed):
            return None
        if self.base_sync == "auto" and missed:
            factor_bytes = sum(_nbytes(self.history[v]) for v in missed)
            if factor_bytes >= _nbytes_dense(self._global):
                return None
        return held

    def payload(self, node_id: int, global_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trainable, deltas = split_base_deltas(global_state)
        held = self.catch_up_from(node_id)
        if held is None:
            return with_base_deltas(trainable, deltas)
        updates = {}
        for version in (v for v in self.merged if v > held):
            updates.update(sync_payload_keys(self.history[version], version))
        return {**trainable, **updates}

    def instruction(self, node_id: int, common: Instruction) -> Instruction:
        held = self.catch_up_from(node_id)
        instruction = super().instruction(node_id, common)
        return dataclasses.replace(
            instruction, base_version=self.version, base_from=-1 if held is None else held
        )

    def encode_payload(self, payload: dict[str, np.ndarray]) -> ArrayRecord:
        """Base updates travel in float32 whatever the wire dtype: both sides must agree exactly."""
        record = to_record({k: v for k, v in payload.items() if not is_sync_key(k)}, self.method.wire_dtype)
        for key, array in to_record({k: v for k, v in payload.items() if is_sync_key(k)}).items():
            record[key] = array
        return record

    def expected_reply_shapes(
        self, node_id: int, payload: dict[str, np.ndarray], server_round: int
    ) -> dict[str, tuple[int, ...]]:
        shapes = {k: v.shape for k, v in payload.items() if not is_sync_key(k)}
        if not self.global_lora:  # a fresh adapter at the node's rank
            rank = self.nodes.rank(node_id)
            for prefix, (d_out, d_in) in self.layer_shapes().items():
                shapes[prefix + LORA_A_SUFFIX] = (rank, d_in)
                shapes[prefix + LORA_B_SUFFIX] = (d_out, rank)
        return shapes

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {prefix: d.shape for prefix, d in split_base_deltas(self._global)[1].items()}

    def accept_reply(self, node_id: int, metrics: dict[str, float]) -> None:
        version = metric_int(metrics, BASE_VERSION)
        self.node_version[node_id] = version if version == self.version else -1

    def node_failed(self, node_id: int) -> None:
        self.node_version[node_id] = -1

    # A resumed run knows its merges but not what its (new) node ids hold, nor past increments:
    # every node gets the dense D once, which reproduces its base bit for bit.
    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, state = super().checkpoint_state()
        return arrays, {**state, "merged": list(self.merged)}

    def restore_state(self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        super().restore_state(arrays, state)
        self.merged = [int(v) for v in state.get("merged", [])]

    # --- aggregation ---------------------------------------------------------------------
    def aggregate(self, replies: Replies) -> dict[str, np.ndarray]:
        deltas = split_base_deltas(replies.global_state)[1]
        new_trainable, increment = self.merge(replies)
        # The increment is applied as it travels (float32), so clients reproduce D bit for bit.
        increment = {p: (L.astype(np.float32), R.astype(np.float32)) for p, (L, R) in increment.items()}
        new_deltas = dict(deltas)
        for prefix, (L, R) in increment.items():
            new_deltas[prefix] = apply_increment(deltas[prefix], L, R)
        self.merged.append(replies.server_round)
        self.history[replies.server_round] = increment
        if self.base_sync == "auto":  # increments beyond a dense D's worth are never sent
            limit = _nbytes_dense(replies.global_state)
            while len(self.history) > 1 and sum(map(_nbytes, self.history.values())) > limit:
                self.history.popitem(last=False)
        return with_base_deltas(new_trainable, new_deltas)


def _nbytes(arrays: Factors) -> int:
    return sum(L.nbytes + R.nbytes for L, R in arrays.values())


def _nbytes_dense(global_state: Mapping[str, np.ndarray]) -> int:
    return sum(4 * d.size for d in split_base_deltas(global_state)[1].values())


class MergedBaseClient(ClientRule):
    """Keeps its merged base (the deltas and their version) in its node state, brings it to the
    server's version before training, and reports the version it trained on."""

    needs_base_weights = True
    private_model = True
    resynced_state = (MERGED_BASE, MERGED_BASE_VERSION)  # a resumed server sends every node the dense D
    #: FLoRA: a fresh adapter (seeded per round) every round instead of the received one.
    fresh_adapter: ClassVar[bool] = False

    def load(self, model: torch.nn.Module, received: State, baseline: ModelBaseline) -> None:
        from finetune.models import reinitialize_lora
        from finetune.state import set_base_deltas

        sync = {k: received.pop(k) for k in list(received) if is_sync_key(k)}
        super().load(model, received, baseline)
        set_base_deltas(model, baseline.base, self.update_merged_base(sync))
        if self.fresh_adapter:
            reinitialize_lora(model, seed=self.cfg.seed * 1_000_003 + self.job.instruction.server_round)

    def update_merged_base(self, sync: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This node's base deltas brought to the server's version (kept in its node state)."""
        instruction = self.job.instruction
        if instruction.base_version is None or instruction.base_from is None:
            raise ValueError(f"{self.cfg.method.name}: the server sent no merged-base version")
        record = self.node.values(MERGED_BASE_VERSION)
        held_version = int(record["version"]) if record is not None else 0
        held = self.node.arrays(MERGED_BASE)
        deltas = catch_up(held, held_version, sync, instruction.base_version, instruction.base_from)
        self.node.set_arrays(MERGED_BASE, deltas)
        self.node.set_values(MERGED_BASE_VERSION, {"version": instruction.base_version})
        return deltas

    def finish(self, model: torch.nn.Module, trained: State, report: TrainReport) -> State:
        report.base_version = self.job.instruction.base_version
        return super().finish(model, trained, report)
