"""Local optimizers: AdamW, or GaLore's AdamW with the projection really switched on.

galore-torch projects a parameter's gradient only when its parameter group carries ``rank``
(``"rank" in group`` in ``GaLoreAdamW.step``). The "Why Gradient Subspace?" code passes groups
without it, so its "GaLore" runs as plain AdamW; here the targeted 2-D weights get a group with
``rank``, ``update_proj_gap``, ``scale`` and ``proj_type``, everything else a plain group.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from experiment_schema import ExperimentConfig
from finetune.models import head_modules, is_target
from finetune.spec import GaLoreSettings


def galore_targets(model: torch.nn.Module, cfg: ExperimentConfig, every_layer: bool) -> list[str]:
    """The trainable 2-D weights GaLore projects: those of the LoRA target modules, or with
    ``every_layer`` every 2-D weight of the encoder/decoder layers (as in the GaLore paper:
    attention and MLP; embeddings and the head keep plain AdamW)."""
    heads = set(head_modules(cfg))
    names = []
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        parts = set(module.split("."))
        embedding = bool(parts & {"embeddings", "embed_tokens", "wte", "wpe"})
        if not p.requires_grad or p.dim() != 2 or embedding or parts & heads:
            continue
        in_layers = bool(parts & {"layer", "layers", "h", "blocks", "_blocks"})
        if is_target(module, cfg.model.lora_targets) or (every_layer and in_layers):
            names.append(name)
    return names


def build_optimizer(
    model: torch.nn.Module, lr: float, cfg: ExperimentConfig, galore: GaLoreSettings | None = None
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, or GaLoreAdamW projecting the ``galore`` targets."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if galore is None:
        return torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=cfg.train.weight_decay)
    from galore_torch import GaLoreAdamW

    projected = set(galore_targets(model, cfg, galore.every_layer))
    if not projected:
        raise ValueError(
            f"GaLore found no trainable 2-D weight in model.lora_targets {cfg.model.lora_targets}"
        )
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in named if n not in projected]},
        {
            "params": [p for n, p in named if n in projected],
            "rank": galore.rank,
            "update_proj_gap": galore.update_proj_gap,
            "scale": galore.scale,
            "proj_type": galore.proj_type,
        },
    ]
    return GaLoreAdamW([g for g in groups if g["params"]], lr=lr, weight_decay=cfg.train.weight_decay)


def _tensors(value: object) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif hasattr(value, "ortho_matrix"):  # a GaLoreProjector
        yield from _tensors(value.ortho_matrix)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state: moments (full or projected) plus GaLore's projection matrices."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in _tensors(state))


def save_optimizer_state(optimizer: torch.optim.Optimizer) -> np.ndarray:
    """The optimizer's state as bytes (uint8), to keep in a Flower context between rounds."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()


def load_optimizer_state(optimizer: torch.optim.Optimizer, blob: np.ndarray) -> None:
    # weights_only=False: GaLore keeps its projectors as Python objects. The blob was written
    # by this same client process family into its own context, never received from elsewhere.
    state = torch.load(io.BytesIO(blob.tobytes()), weights_only=False)
    optimizer.load_state_dict(state)
