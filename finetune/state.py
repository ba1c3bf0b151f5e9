"""Moving the trainable state (LoRA factors + head) between a model and numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict


def trainable_state(model: PeftModel) -> dict[str, np.ndarray]:
    """The adapter's state as float32 numpy arrays (peft's keys, as saved by save_pretrained)."""
    return {
        key: value.detach().to("cpu", torch.float32).numpy().copy()
        for key, value in get_peft_model_state_dict(model).items()
    }


def load_trainable_state(model: PeftModel, state: Mapping[str, np.ndarray]) -> None:
    """Overwrite the adapter's state; every key must match exactly (no silent partial loads)."""
    current = get_peft_model_state_dict(model)
    missing = sorted(set(current) - set(state))
    extra = sorted(set(state) - set(current))
    if missing or extra:
        raise KeyError(f"adapter state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    tensors = {}
    for key, value in state.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(current[key].shape)}")
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value)).to(current[key].dtype)
    set_peft_model_state_dict(model, tensors)
