"""LoRA bookkeeping by key: which arrays of a trainable state are LoRA factors, heads or merged
base deltas. The ML library and the rules both read states through these names.

PEFT layout for an ``nn.Linear`` with weight ``W0 ∈ R^{d_out×d_in}``: ``A = lora_A ∈ R^{r×d_in}``,
``B = lora_B ∈ R^{d_out×r}``, forward ``W0 x + s·B A x`` with ``s = alpha / r``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
BASE_DELTA_SUFFIX = ".base_delta"  # a merged update of a layer's frozen weight, d_out × d_in
LORA_LATENT_SUFFIX = ".lora_A.latent"  # LoRA-SB: the r × r matrix R between B and A (W0 + s B R A)


def is_lora_a(key: str) -> bool:
    return key.endswith(LORA_A_SUFFIX)


def is_lora_b(key: str) -> bool:
    return key.endswith(LORA_B_SUFFIX)


def is_lora(key: str) -> bool:
    return is_lora_a(key) or is_lora_b(key)


def is_lora_latent(key: str) -> bool:
    return key.endswith(LORA_LATENT_SUFFIX)


def is_base_delta(key: str) -> bool:
    return key.endswith(BASE_DELTA_SUFFIX)


def lora_scale(alpha: float, rank: int) -> float:
    return alpha / rank


def lora_layers(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``prefix -> (A key, B key)`` for every adapted layer; both factors must be present."""
    keys = set(keys)
    layers = {}
    for key in sorted(keys):
        if is_lora_a(key):
            prefix = key[: -len(LORA_A_SUFFIX)]
            b_key = prefix + LORA_B_SUFFIX
            if b_key not in keys:
                raise ValueError(f"{key} has no matching {b_key}")
            layers[prefix] = (key, b_key)
    orphans = [k for k in keys if is_lora_b(k) and k[: -len(LORA_B_SUFFIX)] not in layers]
    if orphans:
        raise ValueError(f"lora_B without lora_A: {orphans[:3]}")
    return layers


def split_state(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(LoRA factors, everything else)`` — the second part (heads) is averaged plainly."""
    lora = {k: v for k, v in state.items() if is_lora(k)}
    return lora, {k: v for k, v in state.items() if not is_lora(k)}


def split_base_deltas(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(trainable state, {layer prefix: base delta})`` of a global state."""
    deltas = {k[: -len(BASE_DELTA_SUFFIX)]: v for k, v in state.items() if is_base_delta(k)}
    return {k: v for k, v in state.items() if not is_base_delta(k)}, deltas


def with_base_deltas(
    trainable: Mapping[str, np.ndarray], deltas: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The inverse of :func:`split_base_deltas`."""
    return {**trainable, **{prefix + BASE_DELTA_SUFFIX: d for prefix, d in deltas.items()}}
