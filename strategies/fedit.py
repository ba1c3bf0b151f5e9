"""FedIT (Zhang et al., 2305.05644): FedAvg of the LoRA factors and the trained head.

The global effective update ``s B̄ Ā`` differs from the mean of the client updates
``s Σ p_k B_k A_k`` (cross terms ``p_i p_j B_i A_j``): FedIT is inexact unless all clients hold
the same A. It is the baseline every other LoRA rule is compared against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from experiment_schema import MethodConfig
from strategies.averaging import State, Weights, finite_inputs, weighted_mean
from strategies.client import ClientRule
from strategies.registry import Family, Rule, register
from strategies.rule import ServerRule


@finite_inputs
def fedit_aggregate(states: Sequence[State], weights: Weights) -> dict[str, np.ndarray]:
    """``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k`` and the same for every other trained array."""
    return weighted_mean(states, weights)


class FedIT(ServerRule):
    """Weighted mean of every trainable array (LoRA A, B, classifier head)."""

    name = "fedit"
    streamable = True
    rule = staticmethod(fedit_aggregate)


RULE = register(Rule("fedit", Family.LORA, "Zhang et al., 2305.05644", MethodConfig, FedIT, ClientRule))
