"""FedSA-LoRA (Guo et al., ICLR 2025, 2410.01463): only A is shared and averaged; each client
keeps its own B and classifier head (personalisation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from finetune.config import MethodConfig
from finetune.lora import is_lora_a
from strategies.averaging import State, Weights, finite_inputs, mean_of_allowed
from strategies.base import FederatedStrategy
from strategies.client import ClientRule
from strategies.registry import Family, Rule, register


@finite_inputs
def fedsa_aggregate(states: Sequence[State], weights: Weights) -> dict[str, np.ndarray]:
    """``Ā = Σ p_k A_k``; anything but lora_A in an upload is a protocol error."""
    return mean_of_allowed(states, weights, is_lora_a, "FedSA-LoRA uploads carry only lora_A")


def personal(key: str) -> bool:
    """B and the head never leave their client."""
    return not is_lora_a(key)


class FedSALoRA(FederatedStrategy):
    """The weighted mean of A. Evaluation is personalised: each client's (Ā, B_k, head_k) on its
    own validation share."""

    name = "fedsa_lora"
    streamable = True
    evaluate_on_clients = True
    shares = staticmethod(is_lora_a)
    rule = staticmethod(fedsa_aggregate)


class FedSALoRAClient(ClientRule):
    """Uploads A; keeps B and the head in its node state for its next round."""

    uploads = staticmethod(is_lora_a)
    keeps = staticmethod(personal)


RULE = register(
    Rule(
        "fedsa_lora",
        Family.LORA,
        "Guo et al., ICLR 2025, 2410.01463",
        MethodConfig,
        FedSALoRA,
        FedSALoRAClient,
    )
)
