"""Moving model state between a model and numpy arrays.

Two kinds of state travel:

* the **trainable state**: the adapter (LoRA factors + head, peft's keys as saved by
  ``save_pretrained``) of a PEFT model, or the parameters that require grad of a plain model
  (full fine-tuning);
* **base deltas** ``D`` of the frozen weights under LoRA layers, for the rules that fold updates
  into the base (FLoRA, FedEx-LoRA): keyed ``<layer prefix>.base_delta``, always in the math
  layout ``d_out × d_in`` of ``B A``; the one place that writes them into a model,
  :func:`set_base_deltas`, transposes for ``fan_in_fan_out`` (GPT-2 ``Conv1D``) layers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from finetune.lora import split_base_deltas


def _trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model, PeftModel):
        return get_peft_model_state_dict(model)
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def trainable_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The trainable state as float32 numpy arrays."""
    return {
        key: value.detach().to("cpu", torch.float32).numpy().copy()
        for key, value in _trainable_tensors(model).items()
    }


def load_trainable_state(model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Overwrite the trainable state; every key must match exactly (no silent partial loads)."""
    current = _trainable_tensors(model)
    missing = sorted(set(current) - set(state))
    extra = sorted(set(state) - set(current))
    if missing or extra:
        raise KeyError(f"trainable state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    tensors = {}
    for key, value in state.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(current[key].shape)}")
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value)).to(current[key].dtype)
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, tensors)
    else:
        with torch.no_grad():
            for key, tensor in tensors.items():
                current[key].copy_(tensor)


def lora_base_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """``layer prefix -> LoRA layer``; prefixes match the adapter keys' ``<prefix>.lora_A.weight``."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def base_layer_weight(layer: LoraLayer) -> torch.Tensor:
    """The frozen weight under a LoRA layer."""
    weight = layer.get_base_layer().weight
    assert isinstance(weight, torch.Tensor)
    return weight


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the frozen weights under every LoRA layer (the ``W0`` that deltas add to)."""
    return {
        prefix: base_layer_weight(layer).detach().clone() for prefix, layer in lora_base_layers(model).items()
    }


def set_base_deltas(
    model: torch.nn.Module, base: Mapping[str, torch.Tensor], deltas: Mapping[str, np.ndarray]
) -> None:
    """Set every LoRA layer's frozen weight to ``W0 + D`` (``D`` = 0 where none is given)."""
    layers = lora_base_layers(model)
    unknown = sorted(set(deltas) - set(layers))
    if unknown:
        raise KeyError(f"base deltas for layers the model does not adapt: {unknown[:3]}")
    with torch.no_grad():
        for prefix, layer in layers.items():
            weight = base_layer_weight(layer)
            w0 = base[prefix]
            if prefix not in deltas:
                weight.copy_(w0)
                continue
            delta = torch.from_numpy(np.ascontiguousarray(deltas[prefix]))
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            if tuple(delta.shape) != tuple(w0.shape):
                raise ValueError(f"{prefix}: base delta {tuple(delta.shape)} != weight {tuple(w0.shape)}")
            weight.copy_(w0 + delta.to(device=w0.device, dtype=w0.dtype))


def load_global_state(
    model: torch.nn.Module,
    state: Mapping[str, np.ndarray],
    initial: Mapping[str, np.ndarray],
    base: Mapping[str, torch.Tensor],
) -> None:
    """Load a global state (trainable arrays, possibly partial, plus base deltas) into ``model``."""
    trainable, deltas = split_base_deltas(state)
    load_trainable_state(model, {**initial, **trainable})
    if base:
        set_base_deltas(model, base, deltas)
