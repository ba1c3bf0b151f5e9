"""The server half of an aggregation rule, and the one declaration of what travels.

A rule is not a Flower Strategy: :class:`strategies.engine.Engine` runs the rounds (sampling,
messages, validation, statistics, checkpoints, evaluation) and calls the hooks of one
:class:`ServerRule`. Most rules set :attr:`ServerRule.rule` to their pure tensor function and
declare their :class:`Traffic`; the others override a hook or two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord

from experiment_schema import ExperimentConfig, MethodConfig, method_config_type
from finetune.lora import lora_scale
from finetune.records import to_record
from finetune.spec import AdapterSpec
from strategies.averaging import State, Weights
from strategies.nodes import NodeDirectory
from strategies.protocol import Instruction
from strategies.replies import Replies
from strategies.server_optim import ServerOptimizer
from strategies.traffic import Traffic

#: Sends one kind of message with an empty payload to every connected node and returns their
#: uploads (Fed-SB's set-up exchange); the engine counts the bytes.
Ask = Callable[[str], list[dict[str, np.ndarray]]]


class ServerRule:
    """The hooks a rule's server half may override; the defaults are FedIT's."""

    name: ClassVar[str] = "base"
    traffic: ClassVar[Traffic] = Traffic()
    #: The model is personal (part of it never leaves the client): evaluate on the clients.
    evaluate_on_clients: ClassVar[bool] = False
    #: Each node trains at its own LoRA rank: the engine learns it and tells the node every round.
    heterogeneous_ranks: ClassVar[bool] = False
    #: The aggregate is a weighted mean of the uploads, so replies can be folded as they arrive.
    streamable: ClassVar[bool] = False
    #: The rule exchanges messages with the nodes once before round 1 (:meth:`setup`).
    has_setup: ClassVar[bool] = False

    def __init__(self, method: MethodConfig | None = None, nodes: NodeDirectory | None = None) -> None:
        self.method = method if method is not None else method_config_type(self.name)()
        self.nodes = nodes if nodes is not None else NodeDirectory(ranked=self.heterogeneous_ranks)
        self.server_optimizer = ServerOptimizer.of(self.method)

    @classmethod
    def resolve(cls, cfg: ExperimentConfig) -> MethodConfig:
        """The rule's config with defaults that depend on the rest of the experiment filled in."""
        return cfg.method

    @classmethod
    def global_adapter(cls, cfg: ExperimentConfig, client: AdapterSpec) -> AdapterSpec:
        """The adapter of the server's model, whose trainable state holds the global state; by
        default the clients' own."""
        return client

    # --- before round 1 ------------------------------------------------------------------
    def initial_state(self, trainable: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global state before round 1, from the server model's trainable state."""
        return {key: value for key, value in trainable.items() if self.traffic.shares(key)}

    def setup(self, ask: Ask, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global state round 1 starts from, after a one-off exchange (``has_setup``)."""
        return state

    # --- each round, down ------------------------------------------------------------------
    def begin_round(self, server_round: int, global_state: dict[str, np.ndarray]) -> None:
        """Called once per training round before any payload (FlexLoRA decomposes here)."""

    def payload(self, node_id: int, global_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What ``node_id`` receives this round; by default the whole global state."""
        return global_state

    def encode_payload(self, payload: dict[str, np.ndarray]) -> ArrayRecord:
        """The payload as it travels (training and client-side evaluation alike)."""
        return to_record(payload, self.method.wire_dtype)

    def instruction(self, node_id: int, common: Instruction) -> Instruction:
        """The config ``node_id`` receives: the round's common one, plus its rank where ranks differ."""
        if not self.heterogeneous_ranks:
            return common
        return dataclasses.replace(common, rank=self.nodes.rank(node_id))

    def expected_reply_shapes(
        self, node_id: int, payload: dict[str, np.ndarray], server_round: int
    ) -> dict[str, tuple[int, ...]]:
        """Keys and shapes a valid reply from ``node_id`` holds: what the traffic uploads of what
        it was sent."""
        return {k: v.shape for k, v in payload.items() if self.traffic.uploads(server_round, k)}

    def lora_scale(self, rank: int) -> float:
        """The LoRA scale of a node's factors of rank ``rank`` (the update bound measures
        ``s B A``)."""
        return lora_scale(self.method.alpha, rank)

    # --- each round, up --------------------------------------------------------------------
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
        return self.step(
            replies.server_round, replies.global_state, self.rule(replies.states, replies.weights)
        )

    def step(
        self, server_round: int, global_state: dict[str, np.ndarray], combined: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The server optimizer's step from ``combined`` (the clients' aggregate), then finalize."""
        stepped = self.server_optimizer.step(server_round, global_state, combined)
        return self.finalize(server_round, {**global_state, **stepped})

    def finalize(self, server_round: int, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A last transformation of the new global state (FedSVD re-orthogonalises); none here."""
        return state

    # --- checkpoints -----------------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """What the rule carries from round to round besides the global arrays (arrays, and
        JSON-able values)."""
        return self.server_optimizer.state_arrays(), {}

    def restore_state(self, arrays: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
        """The inverse of :meth:`checkpoint_state`, before the first resumed round."""
        self.server_optimizer.load_state_arrays(arrays)
