"""FFA-LoRA (Sun et al., ICLR 2024, 2403.12313): A frozen at a shared seeded init, only B (and
the head) trained, uploaded and averaged. With one A for everyone,
``Σ p_k B_k A0 = (Σ p_k B_k) A0``: exact, at about half FedIT's upload."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from experiment_schema import ExperimentConfig, MethodConfig
from finetune.lora import is_lora_a
from finetune.spec import AdapterSpec
from strategies.averaging import State, Weights, finite_inputs, mean_of_allowed
from strategies.client import ClientRule
from strategies.registry import Family, Rule, register
from strategies.rule import ServerRule
from strategies.traffic import Traffic, every_round


@finite_inputs
def ffa_aggregate(states: Sequence[State], weights: Weights) -> dict[str, np.ndarray]:
    """``B̄ = Σ p_k B_k`` (and the head); a state carrying lora_A is a protocol error."""
    return mean_of_allowed(states, weights, shared, "FFA-LoRA uploads carry no lora_A")


def shared(key: str) -> bool:
    """B and the head travel; A never does (every process seeds the same A)."""
    return not is_lora_a(key)


class FFALoRA(ServerRule):
    """The weighted mean of B and the head; A is not part of the global state."""

    name = "ffa_lora"
    streamable = True
    traffic = Traffic(shares=shared, uploads=every_round(shared))
    rule = staticmethod(ffa_aggregate)


class FFALoRAClient(ClientRule):
    """Trains B and the head with A frozen at the shared seeded init; uploads no A."""

    @classmethod
    def default_adapter(cls, cfg: ExperimentConfig, rank: int | None = None) -> AdapterSpec:
        return dataclasses.replace(super().default_adapter(cfg, rank), freeze_lora_a=True)


RULE = register(
    Rule("ffa_lora", Family.LORA, "Sun et al., ICLR 2024, 2403.12313", MethodConfig, FFALoRA, FFALoRAClient)
)
