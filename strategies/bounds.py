"""How far one reply moves the model, and bounding it: the norm of a client's update measured on
what it changes in the model, ``‖s_k B_k A_k − s B A‖`` for LoRA factors (from r × r Gram
matrices: the dense d × d product is never formed) and the array difference for everything else.

``reference`` is what the node started from (its payload, plus the server's frozen arrays the
payload leaves out, e.g. FFA-LoRA's A); a factor the node did not upload is its reference value.
A layer whose reference lacks a factor started from a zero product (a fresh adapter, B = 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from finetune.lora import LORA_A_SUFFIX, LORA_B_SUFFIX, is_lora_a, is_lora_b

State = Mapping[str, np.ndarray]
#: The LoRA scale of a factor pair of rank r (``α / r`` for most rules).
ScaleOf = Callable[[int], float]


def _f64(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64, copy=False)


def product_gram(B1: np.ndarray, A1: np.ndarray, B2: np.ndarray, A2: np.ndarray) -> float:
    """``⟨B1 A1, B2 A2⟩_F = Σ (B1ᵀ B2) ⊙ (A1 A2ᵀ)``: r1 × r2 matrices only (ranks may differ)."""
    return float(np.sum((_f64(B1).T @ _f64(B2)) * (_f64(A1) @ _f64(A2).T)))


def pairs(keys: set[str]) -> dict[str, tuple[str, str]]:
    """``prefix -> (A key, B key)`` of every layer with at least one factor among ``keys``."""
    prefixes = {k[: -len(LORA_A_SUFFIX)] for k in keys if is_lora_a(k)}
    prefixes |= {k[: -len(LORA_B_SUFFIX)] for k in keys if is_lora_b(k)}
    return {p: (p + LORA_A_SUFFIX, p + LORA_B_SUFFIX) for p in sorted(prefixes)}


def squared_update_norms(reference: State, reply: State, scale_of: ScaleOf) -> dict[str, float]:
    """Each part's squared update norm: one entry per LoRA layer (its prefix) and per other array."""
    parts: dict[str, float] = {}
    layers = pairs(set(reply))
    in_layers = {key for pair in layers.values() for key in pair}
    for prefix, (a_key, b_key) in layers.items():
        A, B = reply.get(a_key, reference.get(a_key)), reply.get(b_key, reference.get(b_key))
        if A is None or B is None:  # the partner factor is unknown here (kept on the node)
            parts.update(_array_parts(reference, {k: reply[k] for k in (a_key, b_key) if k in reply}))
            continue
        s = scale_of(A.shape[0])
        squared = s * s * product_gram(B, A, B, A)
        A0, B0 = reference.get(a_key), reference.get(b_key)
        if A0 is not None and B0 is not None:
            s0 = scale_of(A0.shape[0])
            squared += s0 * s0 * product_gram(B0, A0, B0, A0) - 2 * s * s0 * product_gram(B, A, B0, A0)
        parts[prefix] = max(squared, 0.0)
    parts.update(_array_parts(reference, {k: v for k, v in reply.items() if k not in in_layers}))
    return parts


def _array_parts(reference: State, arrays: State) -> dict[str, float]:
    out = {}
    for key, value in arrays.items():
        before = reference.get(key)
        delta = _f64(value)
        if before is not None and before.shape == value.shape:
            delta = delta - _f64(before)
        out[key] = float(np.sum(delta * delta))
    return out


def update_norm(reference: State, reply: State, scale_of: ScaleOf) -> float:
    """``‖update‖_F`` over the whole reply (every LoRA layer's product change and every array's)."""
    return float(np.sqrt(sum(squared_update_norms(reference, reply, scale_of).values())))


def shrink(reference: State, reply: State, c: float) -> dict[str, np.ndarray]:
    """The reply moved ``c`` of the way from its reference (arrays with no reference of their shape
    are scaled by ``c``): every array's and one-factor layer's update scales by exactly ``c``."""
    out = {}
    for key, value in reply.items():
        before = reference.get(key)
        if before is not None and before.shape == value.shape:
            out[key] = (_f64(before) + c * (_f64(value) - _f64(before))).astype(value.dtype)
        else:
            out[key] = (c * _f64(value)).astype(value.dtype)
    return out


def clip_update(
    reference: State, reply: State, scale_of: ScaleOf, max_norm: float, norm: float | None = None
) -> tuple[dict[str, np.ndarray], float]:
    """The reply with its update norm brought to at most ``max_norm``, and the factor applied to
    its arrays' updates (1.0: unchanged). Where both factors of a layer move, the product's change
    is not linear in the factor, so it is found by bisection on the measured norm."""
    norm = update_norm(reference, reply, scale_of) if norm is None else norm
    if norm <= max_norm:
        return dict(reply), 1.0
    guess = max_norm / norm  # exact where every update is linear in the factor (one moving factor)
    at_guess = update_norm(reference, shrink(reference, reply, guess), scale_of)
    if abs(at_guess - max_norm) <= 1e-6 * max_norm:
        return shrink(reference, reply, guess), guess
    if at_guess <= max_norm:
        lo, hi = guess, 1.0
    else:
        lo, hi = 0.0, guess
    for _ in range(60):
        if hi - lo <= 1e-12 * hi:
            break
        mid = (lo + hi) / 2
        if update_norm(reference, shrink(reference, reply, mid), scale_of) <= max_norm:
            lo = mid
        else:
            hi = mid
    return shrink(reference, reply, lo), lo


def outliers(norms: Mapping[int, float], k: float) -> dict[int, float]:
    """The replies whose norm exceeds ``k`` × the round's median norm: node -> that median."""
    if not norms:
        return {}
    median = float(np.median(list(norms.values())))
    return {node: median for node, n in norms.items() if n > k * median}


@dataclass(frozen=True)
class UpdateBound:
    """``federation.update_bound``: ``off``; ``reject`` a reply whose update norm exceeds ``k`` ×
    the round's median norm; or ``clip`` every update to ``max_norm``."""

    mode: str = "off"
    k: float = 3.0
    max_norm: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.mode != "off"
