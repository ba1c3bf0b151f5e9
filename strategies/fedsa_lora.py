"""FedSA-LoRA (Guo et al., ICLR 2025, 2410.01463): only A is shared and averaged; each client
keeps its own B and classifier head (personalisation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.averaging import State, weighted_mean
from strategies.base import FederatedStrategy
from strategies.lowrank import is_lora_a


def fedsa_aggregate(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """``Ā = Σ p_k A_k``; anything but lora_A in an upload is a protocol error."""
    for state in states:
        extra = [k for k in state if not is_lora_a(k)]
        if extra:
            raise ValueError(f"FedSA-LoRA uploads carry only lora_A, got {extra[:2]}")
    return weighted_mean(states, weights)


class FedSALoRA(FederatedStrategy):
    """Clients share A; B and the classifier head stay on each client (context state).
    Evaluation is personalised: each client's (Ā, B_k, head_k) on its own validation data."""

    name = "fedsa_lora"
    evaluate_on_clients = True

    @staticmethod
    def client_uploads(key: str) -> bool:
        return is_lora_a(key)

    @staticmethod
    def client_keeps(key: str) -> bool:
        return not is_lora_a(key)

    rule = staticmethod(fedsa_aggregate)
