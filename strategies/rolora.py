"""RoLoRA (Chen et al., NeurIPS 2025, 2502.01755): alternating optimisation. In odd rounds A is
frozen: clients train B (and the head), upload it, and the server averages it,
``Σ p_k s B_k A = s B̄ A``; in even rounds B is frozen and A is trained and averaged,
``Σ p_k s B A_k = s B Ā``. Each round's aggregate is exact, and each upload carries one factor.
Round 1 trains B: with LoRA's zero B, A's gradient would be zero.

No official code was found; the head (a new classifier) trains and is averaged every round, as for
every other rule here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from experiment_schema import MethodConfig
from finetune.lora import is_lora_a, is_lora_b
from strategies.averaging import weighted_mean
from strategies.client import ClientRule, ModelBaseline, State
from strategies.registry import Family, Rule, register
from strategies.rule import ServerRule
from strategies.traffic import Traffic

if TYPE_CHECKING:
    import torch


@dataclass
class RoLoRAConfig(MethodConfig):
    name: str = "rolora"


def frozen_factor(server_round: int) -> str:
    """``"A"`` in odd rounds (B trains), ``"B"`` in even rounds (A trains)."""
    return "A" if server_round % 2 else "B"


def trained_in(server_round: int, key: str) -> bool:
    """Whether ``key`` trains (and travels up) in ``server_round``: the head always, one factor."""
    frozen = is_lora_a if frozen_factor(server_round) == "A" else is_lora_b
    return not frozen(key)


class RoLoRA(ServerRule):
    """The weighted mean of the round's factor and the head; the other factor stays."""

    name = "rolora"
    streamable = True
    traffic = Traffic(uploads=trained_in)
    rule = staticmethod(weighted_mean)


class RoLoRAClient(ClientRule):
    """Freezes the round's frozen factor on the model, trains the other and the head."""

    private_model = True  # it toggles which factor requires grad on the shared model object

    def load(self, model: torch.nn.Module, received: State, baseline: ModelBaseline) -> None:
        super().load(model, received, baseline)
        frozen = frozen_factor(self.job.instruction.server_round)
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.requires_grad_(f".lora_{frozen}." not in name)


RULE = register(
    Rule("rolora", Family.LORA, "Chen et al., NeurIPS 2025, 2502.01755", RoLoRAConfig, RoLoRA, RoLoRAClient)
)
