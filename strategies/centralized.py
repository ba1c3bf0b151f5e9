"""The centralized upper bound: no federation. The ServerApp trains the same model with the same
training code on the union of the clients' data, processing as many examples per round as the
federation's sampled clients do together; this class only makes it selectable as a method."""

from __future__ import annotations

from strategies.averaging import weighted_mean
from strategies.base import FederatedStrategy


class Centralized(FederatedStrategy):
    """Selects the centralized baseline (LoRA at ``method.rank``, like ``fedit``)."""

    name = "centralized"
    centralized = True
    rule = staticmethod(weighted_mean)  # never called: no client ever trains
