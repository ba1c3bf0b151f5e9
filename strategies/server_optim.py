"""Server-side optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): the rule's
aggregate minus the previous global state is a pseudo-gradient ``Δ``, and the server takes an
optimizer step on the global arrays with it instead of adopting the aggregate.

The maths follows Flower's own ``FedAvgM``, ``FedAdam``, ``FedYogi`` and ``FedAdagrad`` (the tests use
them as the oracle), per array key, over the arrays a round aggregated:

* ``avgm``: ``m ← μ m + (x − x̄)`` (``m`` starts at the first pseudo-gradient), ``x ← x − η m``;
  ``η = 1, μ = 0`` is plain averaging;
* ``adam``: ``m ← β₁ m + (1 − β₁) Δ``, ``v ← β₂ v + (1 − β₂) Δ²``,
  ``x ← x + η √(1 − β₂^{t+1}) / (1 − β₁^{t+1}) · m / (√v + τ)``;
* ``yogi``: as adam with ``v ← v − (1 − β₂) Δ² sign(v − Δ²)`` and no bias correction;
* ``adagrad``: as adam with ``v ← v + Δ²`` and no bias correction (Flower's FedAdagrad fixes
  ``β₁ = 0``: ``method.server_beta1=0`` reproduces it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from experiment_schema import SERVER_OPTIMIZERS, MethodConfig


@dataclass
class ServerOptimizer:
    """One optimizer's settings and its per-key state."""

    kind: str
    lr: float = 1.0
    momentum: float = 0.0  # avgm
    beta1: float = 0.9  # adam, yogi, adagrad
    beta2: float = 0.99  # adam, yogi
    tau: float = 1e-3  # adam, yogi, adagrad
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, method: MethodConfig) -> ServerOptimizer:
        return cls(
            method.server_optimizer, method.server_lr, method.server_momentum,
            method.server_beta1, method.server_beta2, method.server_tau,
        )  # fmt: skip

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The moments, for a checkpoint: ``m/<key>`` and ``v/<key>``."""
        return {**{f"m/{k}": v for k, v in self.m.items()}, **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.array(v) for k, v in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: np.array(v) for k, v in arrays.items() if k.startswith("v/")}

    def step(
        self, server_round: int, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The new values of the keys in ``aggregate`` (each also in ``current``), in float32."""
        if self.kind == "none":
            return dict(aggregate)
        out = {}
        for key, target in aggregate.items():
            x = current[key].astype(np.float64)
            delta = target.astype(np.float64) - x
            out[key] = self._step_key(key, server_round, x, delta).astype(np.float32)
        return out

    def _step_key(self, key: str, server_round: int, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        if self.kind == "avgm":
            pseudo = -delta  # Flower's FedAvgM: old − new
            self.m[key] = pseudo if key not in self.m else self.momentum * self.m[key] + pseudo
            return x - self.lr * (self.m[key] if self.momentum > 0 else pseudo)
        m = self.beta1 * self.m.get(key, np.zeros_like(x)) + (1 - self.beta1) * delta
        v = self.v.get(key, np.zeros_like(x))
        lr = self.lr
        if self.kind == "adam":
            v = self.beta2 * v + (1 - self.beta2) * delta**2
            lr = (
                lr
                * np.sqrt(1 - self.beta2 ** (server_round + 1.0))
                / (1 - self.beta1 ** (server_round + 1.0))
            )
        elif self.kind == "yogi":
            v = v - (1 - self.beta2) * delta**2 * np.sign(v - delta**2)
        elif self.kind == "adagrad":
            v = v + delta**2
        else:
            raise ValueError(
                f"unknown server optimizer {self.kind!r}; choose one of {list(SERVER_OPTIMIZERS)}"
            )
        self.m[key], self.v[key] = m, v
        return x + lr * m / (np.sqrt(v) + self.tau)
