"""The centralized upper bound: no federation. The ServerApp trains the same model with the same
training code on the union of the clients' data, processing as many examples per round as the
federation's sampled clients do together; this module only makes it selectable as a method."""

from __future__ import annotations

from dataclasses import dataclass

from experiment_schema import ExperimentConfig, MethodConfig, require
from strategies.averaging import weighted_mean
from strategies.client import ClientRule
from strategies.registry import Family, Rule, register
from strategies.rule import ServerRule


@dataclass
class CentralizedConfig(MethodConfig):
    name: str = "centralized"

    no_server_optimizer = "there is no federation (the server trains on the union of the data)"
    no_robust_aggregate = no_server_optimizer

    def check_experiment(self, cfg: ExperimentConfig) -> None:
        require(not cfg.privacy.enabled, "privacy.enabled: the centralized baseline trains without DP")


class Centralized(ServerRule):
    """Never messages a client (LoRA at ``method.rank``, like ``fedit``)."""

    name = "centralized"
    rule = staticmethod(weighted_mean)


RULE = register(
    Rule(
        "centralized",
        Family.BASELINE,
        "the union of the clients' data, trained in one place",
        CentralizedConfig,
        Centralized,
        ClientRule,
        centralized=True,
    )
)
