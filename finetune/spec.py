"""What a rule asks of the ML library, as plain values: the adapter a model trains and the local
optimizer's projection. Light on purpose (no torch): the rules' configs and the command line import
it before anything heavy loads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: A term added to the task loss (HetLoRA's rank self-pruning, FedProx's proximal term).
Regularizer = Callable[["torch.nn.Module"], "torch.Tensor"]


@dataclass(frozen=True)
class AdapterSpec:
    """What a model trains on top of its frozen pretrained weights: a LoRA adapter (rank, alpha,
    dropout; A optionally frozen at its seeded init); for ``kind="lora_latent"`` frozen A and B with
    a trainable r × r latent R between them, ``W0 + s B R A`` (LoRA-SB's and LoRA-XS's layer); for
    ``kind="full"`` the weights of the LoRA target modules and the head (``full_scope="targets"``)
    or every weight (``"all"``). ``init``: ``seeded`` (peft's: Kaiming-uniform A from the run's
    seed, zero B) or ``principal`` (PiSSA, Meng et al. 2024: ``B A`` the top-r singular part of
    each base weight divided by the LoRA scale, the base left holding the residual, so the model
    is unchanged)."""

    kind: str = "lora"  # lora | lora_latent | full
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    freeze_lora_a: bool = False
    full_scope: str = "targets"
    init: str = "seeded"


#: How a LoRA adapter starts (``AdapterSpec.init``) -> peft's ``init_lora_weights``.
LORA_INITS = {"seeded": True, "principal": "pissa"}


@dataclass(frozen=True)
class GaLoreSettings:
    """GaLoreAdamW's projection: rank, subspace refresh period (optimizer steps), update scale,
    projection side, and whether every 2-D layer weight is projected or only the LoRA targets'."""

    rank: int
    update_proj_gap: int = 50
    scale: float = 4.0
    proj_type: str = "std"
    every_layer: bool = False


GALORE_PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
