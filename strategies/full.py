"""Direct weight averaging of full fine-tuning ("Why Gradient Subspace?", 2024): clients train
the full weights of the targeted modules (or every weight) and the server takes their weighted
mean — FedAvg on the weights themselves, exact by construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from experiment_schema import ExperimentConfig, MethodConfig, choice, require
from finetune.spec import AdapterSpec
from strategies.averaging import weighted_mean
from strategies.client import ClientRule
from strategies.registry import Family, Rule, register
from strategies.rule import ServerRule

FULL_SCOPES = ("targets", "all")


@dataclass
class FullConfig(MethodConfig):
    """``full_scope``: fine-tune the LoRA target modules and the head (``targets``) or every
    weight (``all``). ``rank`` and ``alpha`` are unused (no adapter)."""

    name: str = "full"
    full_scope: str = "targets"

    def validate(self) -> None:
        super().validate()
        choice(self.full_scope, FULL_SCOPES, "method.full_scope")

    def check_experiment(self, cfg: ExperimentConfig) -> None:
        require(
            cfg.model.quantization == "none",
            f"method={self.name} trains the base weights themselves, which a quantized base "
            f"(model.quantization={cfg.model.quantization}) cannot: set model.quantization=none, or train "
            "an adapter on the quantized base (method=fedit, ffa_lora, ...)",
        )


class FullFineTuning(ServerRule):
    """Weighted mean of every trained weight."""

    name = "full"
    streamable = True
    rule = staticmethod(weighted_mean)


class FullClient(ClientRule):
    """Trains the selected weights themselves."""

    @classmethod
    def default_adapter(cls, cfg: ExperimentConfig, rank: int | None = None) -> AdapterSpec:
        assert isinstance(cfg.method, FullConfig)
        return dataclasses.replace(
            super().default_adapter(cfg, rank), kind="full", full_scope=cfg.method.full_scope
        )


RULE = register(
    Rule(
        "full",
        Family.FULL,
        '"Why Gradient Subspace?", arXiv 2410.23111',
        FullConfig,
        FullFineTuning,
        FullClient,
    )
)
