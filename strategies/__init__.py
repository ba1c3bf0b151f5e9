"""Aggregation rules: one module per rule (pure tensor function + Strategy subclass)."""

from strategies.base import FederatedStrategy
from strategies.fedit import FedIT
from strategies.fedsa_lora import FedSALoRA
from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.hetlora import HetLoRA
from strategies.hlora import HLoRA
from strategies.lora_fair import LoRAFAIR

STRATEGIES: dict[str, type[FederatedStrategy]] = {
    cls.name: cls for cls in (FedIT, FFALoRA, FedSALoRA, FlexLoRA, HLoRA, HetLoRA, LoRAFAIR)
}

__all__ = [
    "STRATEGIES",
    "FFALoRA",
    "FedIT",
    "FedSALoRA",
    "FederatedStrategy",
    "FlexLoRA",
    "HLoRA",
    "HetLoRA",
    "LoRAFAIR",
]
