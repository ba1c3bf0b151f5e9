"""FFA-LoRA (Sun et al., ICLR 2024, 2403.12313): A frozen at a shared seeded init, only B (and
the head) trained, uploaded and averaged. With one A for everyone,
``Σ p_k B_k A0 = (Σ p_k B_k) A0``: exact, at about half FedIT's upload."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.averaging import State, weighted_mean
from strategies.base import FederatedStrategy
from strategies.lowrank import is_lora_a


def ffa_aggregate(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """``B̄ = Σ p_k B_k`` (and the head); a state carrying lora_A is a protocol error."""
    for state in states:
        carried = [k for k in state if is_lora_a(k)]
        if carried:
            raise ValueError(f"FFA-LoRA uploads carry no lora_A, got {carried[:2]}")
    return weighted_mean(states, weights)


class FFALoRA(FederatedStrategy):
    """Clients freeze A (seeded, identical everywhere) and upload B and the head only."""

    name = "ffa_lora"
    freeze_lora_a = True

    @staticmethod
    def client_uploads(key: str) -> bool:
        return not is_lora_a(key)

    rule = staticmethod(ffa_aggregate)
