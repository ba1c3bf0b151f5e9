"""Aggregation rules: one module per rule (pure tensor function + Strategy subclass)."""

from strategies.base import FederatedStrategy
from strategies.centralized import Centralized
from strategies.fedex_lora import FedExLoRA
from strategies.fedit import FedIT
from strategies.fedsa_lora import FedSALoRA
from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.full import FullFineTuning
from strategies.galore import GaLore
from strategies.hetlora import HetLoRA
from strategies.hlora import HLoRA
from strategies.lora_fair import LoRAFAIR

RULES: tuple[type[FederatedStrategy], ...] = (
    FedIT, FFALoRA, FedSALoRA, FlexLoRA, HLoRA, HetLoRA, FLoRA, FedExLoRA, LoRAFAIR,
    FullFineTuning, GaLore, Centralized,
)  # fmt: skip
STRATEGIES: dict[str, type[FederatedStrategy]] = {cls.name: cls for cls in RULES}

__all__ = [
    "STRATEGIES",
    "Centralized",
    "FFALoRA",
    "FLoRA",
    "FedExLoRA",
    "FedIT",
    "FedSALoRA",
    "FederatedStrategy",
    "FlexLoRA",
    "FullFineTuning",
    "GaLore",
    "HLoRA",
    "HetLoRA",
    "LoRAFAIR",
]
