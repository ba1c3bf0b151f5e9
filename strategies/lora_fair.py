"""LoRA-FAIR (Bian et al., ICCV 2025, 2411.14961): FedIT's means plus a server-side correction
ΔB minimising ``(1 − cos(ΔW, (B̄ + ΔB) Ā)) + λ ‖ΔB‖_F`` where ``ΔW = Σ p_k B_k A_k`` is the ideal
update; clients restart from ``(Ā, B̄ + ΔB)``. Cosine is scale-free, so λ keeps ΔB small."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from experiment_schema import MethodConfig, require
from finetune.lora import lora_layers
from strategies.averaging import Weights, finite_inputs, normalize_weights
from strategies.client import ClientRule
from strategies.lowrank import Matrices, dense_dtype, product_norm
from strategies.registry import Family, Rule, register
from strategies.replies import Replies
from strategies.rule import ServerRule


@dataclass
class LoRAFAIRConfig(MethodConfig):
    """The server-side correction of B̄: weight of ‖ΔB‖, descent steps, initial step size."""

    name: str = "lora_fair"
    fair_lambda: float = 0.01
    fair_steps: int = 100
    fair_lr: float = 0.01

    no_robust_aggregate = (
        "its server correction fits B to the exact weighted mean of the clients' products; a "
        "coordinate-wise aggregate of the factors leaves it no such target"
    )

    def validate(self) -> None:
        super().validate()
        require(self.fair_lambda >= 0, f"method.fair_lambda must be >= 0, got {self.fair_lambda}")
        require(self.fair_steps >= 0, f"method.fair_steps must be >= 0, got {self.fair_steps}")
        require(self.fair_lr > 0, f"method.fair_lr must be > 0, got {self.fair_lr}")


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    denom = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float((x * y).sum() / denom) if denom > 0 else 0.0


@finite_inputs
def lora_fair_correction(
    A_bar: np.ndarray,
    B_bar: np.ndarray,
    ideal: np.ndarray,
    lam: float = 0.01,
    steps: int = 100,
    lr: float = 0.01,
) -> np.ndarray:
    """ΔB by projected gradient descent with backtracking, so the objective never increases.

    Gradient of ``f(ΔB) = 1 − ⟨D, M⟩/(‖D‖‖M‖) + λ‖ΔB‖`` with ``M = (B̄ + ΔB) Ā``:
    ``∂f/∂M = −(D/(‖D‖‖M‖) − ⟨D,M⟩ M/(‖D‖‖M‖³))`` and ``∂f/∂ΔB = (∂f/∂M) Āᵀ + λ ΔB/‖ΔB‖``.
    """
    dtype = dense_dtype(*ideal.shape)  # M and D are dense: float32 for large layers
    A, B, D = A_bar.astype(dtype), B_bar.astype(dtype), ideal.astype(dtype)
    d_norm = np.linalg.norm(D)
    delta = np.zeros_like(B)
    if d_norm == 0 or np.linalg.norm(A) == 0:
        return delta

    def objective(dB: np.ndarray) -> float:
        return 1.0 - cosine(D, (B + dB) @ A) + lam * float(np.linalg.norm(dB))

    def gradient(delta: np.ndarray) -> np.ndarray | None:
        M = (B + delta) @ A
        m_norm = np.linalg.norm(M)
        if m_norm == 0:
            return None
        inner = float((D * M).sum())
        return -(D / (d_norm * m_norm) - inner * M / (d_norm * m_norm**3)) @ A.T

    return descend(objective, gradient, delta, lam, steps, lr)


def descend(
    objective: Callable[[np.ndarray], float],
    cosine_gradient: Callable[[np.ndarray], np.ndarray | None],
    delta: np.ndarray,
    lam: float,
    steps: int,
    lr: float,
) -> np.ndarray:
    """Gradient descent on ΔB with backtracking (the step grows ×1.5 after an accepted step and
    halves until the objective does not increase); ``cosine_gradient`` is ∂(1 − cos)/∂ΔB, None
    where it vanishes, and the λ‖ΔB‖ term's gradient is added here."""
    current = objective(delta)
    step = lr
    for _ in range(steps):
        grad = cosine_gradient(delta)
        if grad is None:
            break
        dn = np.linalg.norm(delta)
        if dn > 0:
            grad = grad + lam * delta / dn
        while step > 1e-12:
            candidate = delta - step * grad
            value = objective(candidate)
            if value <= current:
                delta, current = candidate, value
                step *= 1.5
                break
            step *= 0.5
        else:
            break
    return delta


@finite_inputs
def lora_fair_correction_factored(
    A_bar: np.ndarray,
    B_bar: np.ndarray,
    As: Matrices,
    Bs: Matrices,
    p: np.ndarray,
    lam: float = 0.01,
    steps: int = 100,
    lr: float = 0.01,
) -> np.ndarray:
    """:func:`lora_fair_correction` without a d_out × d_in matrix: with ``C = B̄ + ΔB``,
    ``⟨D, C Ā⟩ = Σ (D Āᵀ) ∘ C``, ``‖C Ā‖² = Σ (CᵀC) ∘ (ĀĀᵀ)``, ``M Āᵀ = C (ĀĀᵀ)`` and
    ``D Āᵀ = Σ_k p_k B_k (A_k Āᵀ)``, so each step costs O(d_out r²) instead of O(d_out d_in r)
    (12 layers × 100 steps took most of a round's server time on MiniLM). Same iterates to
    rounding."""
    A, B = A_bar.astype(np.float64), B_bar.astype(np.float64)
    gram = A @ A.T
    d_at = sum(
        pk * (Bk.astype(np.float64) @ (Ak.astype(np.float64) @ A.T))
        for pk, Ak, Bk in zip(p, As, Bs, strict=True)
    )
    lefts = np.concatenate([pk * Bk.astype(np.float64) for pk, Bk in zip(p, Bs, strict=True)], axis=1)
    rights = np.concatenate([Ak.astype(np.float64) for Ak in As], axis=0)
    d_norm = product_norm(rights, lefts)
    delta = np.zeros_like(B)
    if d_norm == 0 or np.linalg.norm(A) == 0:
        return delta

    def inner_and_norm(C: np.ndarray) -> tuple[float, float]:
        return float((d_at * C).sum()), float(np.sqrt(max(float(((C.T @ C) * gram).sum()), 0.0)))

    def objective(dB: np.ndarray) -> float:
        inner, m_norm = inner_and_norm(B + dB)
        cos = inner / (d_norm * m_norm) if m_norm > 0 else 0.0
        return 1.0 - cos + lam * float(np.linalg.norm(dB))

    def gradient(delta: np.ndarray) -> np.ndarray | None:
        C = B + delta
        inner, m_norm = inner_and_norm(C)
        if m_norm == 0:
            return None
        return -(d_at / (d_norm * m_norm) - inner * (C @ gram) / (d_norm * m_norm**3))

    return descend(objective, gradient, delta, lam, steps, lr)


@finite_inputs
def lora_fair_aggregate(
    As: Matrices, Bs: Matrices, weights: Weights, lam: float = 0.01, steps: int = 100, lr: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """``(Ā, B̄ + ΔB)`` for one layer (the correction in factored form, no dense matrix)."""
    p = normalize_weights(weights)
    A_bar = sum(pk * A.astype(np.float64) for pk, A in zip(p, As, strict=True))
    B_bar = sum(pk * B.astype(np.float64) for pk, B in zip(p, Bs, strict=True))
    return A_bar, B_bar + lora_fair_correction_factored(A_bar, B_bar, As, Bs, p, lam, steps, lr)


class LoRAFAIR(ServerRule):
    """FedIT's means with the server-side correction of B̄ on every LoRA layer."""

    name = "lora_fair"
    method: LoRAFAIRConfig

    def aggregate(self, replies: Replies) -> dict[str, np.ndarray]:
        out = replies.mean_of_heads()
        fair = self.method
        for a_key, b_key in lora_layers(replies.states[0]).values():
            As, Bs = replies.factors(a_key, b_key)
            A, B = lora_fair_aggregate(
                As, Bs, replies.weights, fair.fair_lambda, fair.fair_steps, fair.fair_lr
            )
            out[a_key], out[b_key] = A.astype(np.float32), B.astype(np.float32)
        return out


RULE = register(
    Rule("lora_fair", Family.LORA, "Bian et al., ICCV 2025, 2411.14961", LoRAFAIRConfig, LoRAFAIR, ClientRule)
)
