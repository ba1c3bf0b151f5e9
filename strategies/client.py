"""The client half of a rule: the hooks the ClientApp calls, and the node state they may use.

For every TRAIN (or EVALUATE) message the ClientApp builds the rule's :class:`ClientRule` with the
message's :class:`ClientRound`, then calls, in order:

1. :meth:`ClientRule.adapter` — what the model trains (the ClientApp builds or reuses it);
2. :meth:`ClientRule.load` — bring the shared model object to this client's starting point, from
   the payload and what the node kept;
3. :meth:`ClientRule.optimizer` and :meth:`ClientRule.regularizer` — the local optimizer and a
   term added to the task loss;
4. after training, :meth:`ClientRule.finish` — what goes up, what the node keeps, what it reports.

A QUERY message calls :meth:`ClientRule.describe` (the node's LoRA rank, where ranks differ).
Everything a rule needs to know about a node comes in :class:`ClientRound`; the ClientApp itself
holds no rule-specific logic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from experiment_schema import ExperimentConfig
from finetune.records import from_record, to_record
from finetune.spec import AdapterSpec, GaLoreSettings, Regularizer
from strategies.protocol import Instruction, TrainReport
from strategies.traffic import Traffic

if TYPE_CHECKING:  # the ML stack loads only where a client trains, not where configs compose
    import datasets
    import torch

    from finetune.data import Collate

State = dict[str, np.ndarray]

KEPT_ARRAYS = "local-arrays"  # node state: the arrays a rule keeps on the node between rounds
OPTIMIZER_STATE = "optimizer-state"  # node state: the serialized optimizer (train.keep_optimizer_state)


class NodeState:
    """What a node keeps between the rounds of a run (backed by Flower's ``Context.state``)."""

    def __init__(self, records: RecordDict) -> None:
        self.records = records

    def arrays(self, key: str) -> State:
        record = self.records.array_records.get(key)
        return from_record(record) if record is not None else {}

    def set_arrays(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        self.records[key] = to_record(arrays)

    def values(self, key: str) -> dict[str, Any] | None:
        record = self.records.config_records.get(key)
        return dict(record) if record is not None else None

    def set_values(self, key: str, values: Mapping[str, Any]) -> None:
        self.records[key] = ConfigRecord(dict(values))

    def blob(self, key: str) -> np.ndarray | None:
        record = self.records.array_records.get(key)
        return record["blob"].numpy() if record is not None else None

    def set_blob(self, key: str, blob: np.ndarray) -> None:
        self.records[key] = ArrayRecord({"blob": Array(blob)})


@dataclass
class NodeFacts:
    """What the SuperNode's operator configured (``--node-config``) and what the machine has."""

    node_config: Mapping[str, Any]
    memory_gb: Callable[[], float]


@dataclass
class ClientRound:
    """One message as the rule's client half sees it."""

    cfg: ExperimentConfig
    instruction: Instruction
    partition_id: int
    node: NodeState


@dataclass
class ModelBaseline:
    """What the model looked like when it was built: its seeded trainable init and copies of the
    frozen weights under the LoRA layers (for rules that merge into the base)."""

    initial: State
    base: dict[str, torch.Tensor]


class ClientRule:
    """A LoRA client: trains the adapter at ``method.rank``; of the trained arrays it uploads and
    keeps on the node what the rule's :class:`~strategies.traffic.Traffic` says."""

    #: Whether the node needs copies of the pretrained weights under the LoRA layers.
    needs_base_weights: ClassVar[bool] = False
    #: The rule changes the model object beyond its trainable arrays (merged base weights, which
    #: factors train): a process never hands such a model to another rule.
    private_model: ClassVar[bool] = False
    #: Node-state records the server resends after a resume (large, and rebuilt exactly): not
    #: kept on the node's disk between runs.
    resynced_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, job: ClientRound, traffic: Traffic | None = None) -> None:
        self.job = job
        self.traffic = traffic if traffic is not None else Traffic()
        self.cfg = job.cfg
        self.node = job.node

    # --- QUERY --------------------------------------------------------------------------
    @classmethod
    def describe(
        cls, cfg: ExperimentConfig, partition_id: int, node: NodeState, facts: NodeFacts
    ) -> int | None:
        """The LoRA rank this node trains at, for rules whose nodes each have one (else None)."""
        return None

    # --- building and loading -------------------------------------------------------------
    @classmethod
    def default_adapter(cls, cfg: ExperimentConfig, rank: int | None = None) -> AdapterSpec:
        method = cfg.method
        return AdapterSpec(rank=rank or method.rank, alpha=method.alpha, dropout=method.dropout)

    def adapter(self) -> AdapterSpec:
        return self.default_adapter(self.cfg)

    def load(self, model: torch.nn.Module, received: State, baseline: ModelBaseline) -> None:
        """Overwrite every trainable array: the model object serves many clients in turn."""
        from finetune.state import load_trainable_state

        load_trainable_state(model, {**baseline.initial, **self.node.arrays(KEPT_ARRAYS), **received})

    # --- training -------------------------------------------------------------------------
    def optimizer(self) -> GaLoreSettings | None:
        """None: AdamW; GaLore settings: GaLoreAdamW."""
        return None

    def regularizer(self) -> Regularizer | None:
        return None

    def setup(self, model: torch.nn.Module, data: datasets.Dataset, collate: Collate) -> State:
        """What this node contributes to the rule's one-off set-up before round 1 (the server's
        :meth:`~strategies.rule.ServerRule.setup`); rules without one never get asked."""
        raise NotImplementedError(f"{self.cfg.method.name} has no set-up exchange")

    # --- after training -------------------------------------------------------------------
    def finish(self, model: torch.nn.Module, trained: State, report: TrainReport) -> State:
        """Keep what the node keeps, add the rule's fields to ``report``; return the upload."""
        kept = {k: v for k, v in trained.items() if self.traffic.keeps(k)}
        if kept:
            self.node.set_arrays(KEPT_ARRAYS, kept)
        server_round = self.job.instruction.server_round
        return {k: v for k, v in trained.items() if self.traffic.uploads(server_round, k)}
