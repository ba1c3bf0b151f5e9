"""Confidence intervals for paired benchmark runs, the verdicts they support, and the decision guide.

A seed fixes the partition, the client draws and the data order for every method of a cell, so two
methods' runs with the same seed are a pair; their difference's interval is the t interval of the
per-seed differences (a paired t interval), narrower than comparing two independent means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided ``LEVEL`` t interval over ``n`` values (no interval when n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def resolved(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def points(self, scale: float = 100.0) -> str:
        """``mean ± half-width`` (percentage points by default)."""
        if self.n < 2:
            return f"{self.mean * scale:.1f} (1 seed)"
        return f"{self.mean * scale:.1f} ± {(self.high - self.mean) * scale:.1f}"

    def bounds(self, scale: float = 100.0) -> str:
        mean = _signed(self.mean * scale)
        if self.n < 2:
            return f"{mean} (1 seed, no interval)"
        return f"{mean} [{_signed(self.low * scale)}, {_signed(self.high * scale)}]"


def _signed(value: float) -> str:
    """``+1.2`` / ``-0.3``; a difference that rounds to nothing is ``±0.0``, not ``-0.0``."""
    return "±0.0" if abs(value) < 0.05 else f"{value:+.1f}"


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The mean and its t interval: mean ± t_{(1+level)/2, n-1} · s / √n."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values")
    mean = float(array.mean())
    if array.size < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf((1 + level) / 2, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size))
    return Interval(mean, mean - half, mean + half, int(array.size))


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL
) -> Interval | None:
    """The interval of a − b over the seeds both ran (None when they share none)."""
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        return None
    return mean_interval([a[s] - b[s] for s in seeds], level)


class Verdict(Enum):
    HELD = "held"
    DID_NOT_HOLD = "did not hold"
    NOT_RESOLVED = "not resolved"


def verdict(difference: Interval) -> Verdict:
    """A claim "a is at least as good as / better than b" given the interval of a − b: held or not
    only when the interval excludes zero."""
    if not difference.resolved:
        return Verdict.NOT_RESOLVED
    return Verdict.HELD if difference.low > 0 else Verdict.DID_NOT_HOLD


@dataclass(frozen=True)
class Advice:
    scenario: str
    best: str
    runner_up: str | None
    difference: Interval | None  # best − runner-up, paired

    def text(self, unit: str = "pp") -> str:
        if self.runner_up is None or self.difference is None:
            return f"**{self.scenario}**: only `{self.best}` ran."
        shown = self.difference.bounds()
        if self.difference.resolved:
            return (
                f"**{self.scenario}**: use `{self.best}` — it beats the runner-up `{self.runner_up}` by "
                f"{shown} {unit} (paired, {self.difference.n} seeds, {LEVEL:.0%} interval)."
            )
        return (
            f"**{self.scenario}**: not resolved — `{self.best}` leads `{self.runner_up}` by {shown} {unit} "
            f"({self.difference.n} seeds, {LEVEL:.0%} interval spans zero); either will do on this evidence."
        )


def advise(scenario: str, scores: Mapping[str, Mapping[int, float]]) -> Advice | None:
    """The method with the best mean score in ``scores`` (method → seed → score, higher is better)
    and how its paired lead over the runner-up stands."""
    ranked = sorted(scores, key=lambda m: -float(np.mean(list(scores[m].values()))))
    if not ranked:
        return None
    if len(ranked) == 1:
        return Advice(scenario, ranked[0], None, None)
    best, runner_up = ranked[0], ranked[1]
    return Advice(scenario, best, runner_up, paired_difference(scores[best], scores[runner_up]))
