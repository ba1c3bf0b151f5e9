"""FedProx (Li et al., MLSys 2020, 1812.06127) on the LoRA adapter: clients add the proximal term
``μ/2 ‖w − w_t‖²`` to their loss, ``w`` the trainable arrays (LoRA A, B, head) and ``w_t`` the
global ones they received, which keeps skewed clients from drifting far from the global model;
the server averages as FedIT does. With ``μ = 0`` it is FedIT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from experiment_schema import ExperimentConfig, MethodConfig, require
from strategies.averaging import weighted_mean
from strategies.client import ClientRule, ModelBaseline, Regularizer, State
from strategies.registry import Family, Rule, register
from strategies.rule import ServerRule

if TYPE_CHECKING:
    import torch


@dataclass
class FedProxConfig(MethodConfig):
    """``proximal_mu``: the weight μ of the proximal term (the paper tries 0.001 to 1)."""

    name: str = "fedprox"
    proximal_mu: float = 0.01

    def validate(self) -> None:
        super().validate()
        require(self.proximal_mu >= 0, f"method.proximal_mu must be >= 0, got {self.proximal_mu}")

    def check_experiment(self, cfg: ExperimentConfig) -> None:
        require(
            not cfg.privacy.enabled,
            "privacy.enabled: fedprox's proximal term is not per-sample; DP-SGD cannot clip it",
        )


def proximal_term(
    params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """``μ/2 Σ ‖p − anchor_p‖²`` over the named parameters."""
    import torch

    total = sum(((params[name] - anchor[name]) ** 2).sum() for name in anchor)
    return 0.5 * mu * torch.as_tensor(total)


class FedProx(ServerRule):
    """The weighted mean of every trainable array, as FedIT."""

    name = "fedprox"
    streamable = True
    rule = staticmethod(weighted_mean)


class FedProxClient(ClientRule):
    """Remembers the global arrays it starts from and pulls its training towards them."""

    def load(self, model: torch.nn.Module, received: State, baseline: ModelBaseline) -> None:
        super().load(model, received, baseline)
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def regularizer(self) -> Regularizer:
        assert isinstance(self.cfg.method, FedProxConfig)
        mu, anchor = self.cfg.method.proximal_mu, self.anchor
        return lambda model: proximal_term(dict(model.named_parameters()), anchor, mu)


RULE = register(
    Rule("fedprox", Family.LORA, "Li et al., MLSys 2020, 1812.06127", FedProxConfig, FedProx, FedProxClient)
)
