"""Aggregation rules: one module per rule (pure tensor function + Strategy subclass)."""

from strategies.base import FederatedStrategy
from strategies.fedit import FedIT

STRATEGIES: dict[str, type[FederatedStrategy]] = {cls.name: cls for cls in (FedIT,)}

__all__ = ["STRATEGIES", "FedIT", "FederatedStrategy"]
