"""FedSA-LoRA (Guo et al., ICLR 2025, 2410.01463): only A is shared and averaged; each client
keeps its own B and classifier head (personalisation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from experiment_schema import MethodConfig
from finetune.lora import is_lora_a
from strategies.averaging import State, Weights, finite_inputs, mean_of_allowed
from strategies.client import ClientRule
from strategies.registry import Family, Rule, register
from strategies.rule import ServerRule
from strategies.traffic import Traffic, every_round


@finite_inputs
def fedsa_aggregate(states: Sequence[State], weights: Weights) -> dict[str, np.ndarray]:
    """``Ā = Σ p_k A_k``; anything but lora_A in an upload is a protocol error."""
    return mean_of_allowed(states, weights, is_lora_a, "FedSA-LoRA uploads carry only lora_A")


def personal(key: str) -> bool:
    """B and the head never leave their client."""
    return not is_lora_a(key)


class FedSALoRA(ServerRule):
    """The weighted mean of A. Evaluation is personalised: each client's (Ā, B_k, head_k) on its
    own validation share."""

    name = "fedsa_lora"
    streamable = True
    evaluate_on_clients = True
    # A goes up; B and the head stay with their client
    traffic = Traffic(shares=is_lora_a, uploads=every_round(is_lora_a), keeps=personal)
    rule = staticmethod(fedsa_aggregate)


RULE = register(
    Rule(
        "fedsa_lora",
        Family.LORA,
        "Guo et al., ICLR 2025, 2410.01463",
        MethodConfig,
        FedSALoRA,
        ClientRule,
    )
)
