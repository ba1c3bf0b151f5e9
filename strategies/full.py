"""Direct weight averaging of full fine-tuning ("Why Gradient Subspace?", 2024): clients train
the full weights of the targeted modules (or every weight) and the server takes their weighted
mean — FedAvg on the weights themselves, exact by construction."""

from __future__ import annotations

from strategies.averaging import weighted_mean
from strategies.base import FederatedStrategy


class FullFineTuning(FederatedStrategy):
    """Weighted mean of every trained weight."""

    name = "full"
    full_finetune = True
    rule = staticmethod(weighted_mean)
