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


def writes_into_weight(layer: LoraLayer) -> bool:
    """Whether a merged delta is written into the layer's frozen weight (float32, not quantized) or,
    for a quantized or low-precision weight, kept beside it in float32 and added in the forward
    pass: re-quantizing (or rounding to bf16) every round would drift between server and clients."""
    weight = layer.get_base_layer().weight
    return type(weight) is torch.nn.Parameter and weight.dtype == torch.float32


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the frozen float32 weights under the LoRA layers (the ``W0`` that deltas are
    written onto); layers whose delta is added in the forward pass need none."""
    return {
        prefix: base_layer_weight(layer).detach().clone()
        for prefix, layer in lora_base_layers(model).items()
        if writes_into_weight(layer)
    }


def set_additive_delta(layer: LoraLayer, delta: torch.Tensor | None) -> None:
    """``y = base(x) + x Dᵀ`` with ``D`` (d_out × d_in, float32) kept beside the frozen weight."""
    base_layer = layer.get_base_layer()
    if not hasattr(base_layer, "_merged_delta_hook"):

        def add_delta(
            module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor:
            extra = getattr(module, "_merged_delta", None)
            if not isinstance(extra, torch.Tensor):
                return output
            return output + torch.nn.functional.linear(inputs[0].to(extra.dtype), extra).to(output.dtype)

        base_layer._merged_delta_hook = base_layer.register_forward_hook(add_delta)  # type: ignore[assignment]
    base_layer._merged_delta = delta  # type: ignore[assignment]


def merged_delta(layer: LoraLayer) -> torch.Tensor | None:
    """The delta added in the forward pass of a quantized / low-precision layer, if any."""
    return getattr(layer.get_base_layer(), "_merged_delta", None)


def set_base_deltas(
    model: torch.nn.Module, base: Mapping[str, torch.Tensor], deltas: Mapping[str, np.ndarray]
) -> None:
    """Every LoRA layer's frozen weight becomes ``W0 + D`` (``D`` = 0 where none is given): written
    into float32 weights, added in the forward pass of the others."""
    layers = lora_base_layers(model)
    unknown = sorted(set(deltas) - set(layers))
    if unknown:
        raise KeyError(f"base deltas for layers the model does not adapt: {unknown[:3]}")
    with torch.no_grad():
        for prefix, layer in layers.items():
            if not writes_into_weight(layer):
                device = base_layer_weight(layer).device
                given = deltas.get(prefix)
                set_additive_delta(
                    layer, None if given is None else torch.from_numpy(np.ascontiguousarray(given)).to(device)
                )
                continue
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
    if deltas or base:
        set_base_deltas(model, base, deltas)
