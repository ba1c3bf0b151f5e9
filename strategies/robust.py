"""Robust aggregates of the uploads, for the rules whose aggregate is a weighted mean of them:
coordinate-wise median, trimmed mean, Krum and Multi-Krum, computed by Flower's own functions
(``flwr.server.strategy.aggregate``) on the arrays in sorted key order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

from strategies.averaging import State, Weights


@dataclass(frozen=True)
class RobustAggregate:
    """``name``: one of ``experiment_schema.ROBUST_AGGREGATES``; ``trim``: the fraction cut from each end per
    coordinate (trimmed mean); ``byzantine``: the f of Krum (how many replies may be bad);
    ``keep``: how many replies Multi-Krum averages (0: all but f)."""

    name: str = "none"
    trim: float = 0.1
    byzantine: int = 1
    keep: int = 0

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    def combine(self, states: Sequence[State], weights: Weights) -> dict[str, np.ndarray]:
        """The robust aggregate of the uploads (weights matter only to Multi-Krum's mean)."""
        keys = sorted(states[0])
        counts = [max(round(float(w)), 1) for w in weights]  # Flower's functions take example counts
        results = [([np.asarray(s[k]) for k in keys], n) for s, n in zip(states, counts, strict=True)]
        if self.name == "median":
            arrays = aggregate_median(results)
        elif self.name == "trimmed_mean":
            arrays = aggregate_trimmed_avg(results, self.trim)
        elif self.name == "krum":
            arrays = aggregate_krum(results, self.byzantine, 0)
        elif self.name == "multi_krum":
            arrays = aggregate_krum(results, self.byzantine, self.keep or len(states) - self.byzantine)
        else:
            raise ValueError(f"no robust aggregate named {self.name!r}")
        dtypes = {k: np.asarray(states[0][k]).dtype for k in keys}
        return {k: np.asarray(a).astype(dtypes[k]) for k, a in zip(keys, arrays, strict=True)}
