"""Pure tensor math shared by the aggregation rules (numpy in, numpy out)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ParamSpec, TypeVar

import numpy as np

P = ParamSpec("P")
R = TypeVar("R")
State = Mapping[str, np.ndarray]
Weights = Sequence[float] | np.ndarray  # one non-negative weight per client


def _arrays_in(value: object) -> Iterator[np.ndarray]:
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _arrays_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _arrays_in(item)


def finite_inputs(function: Callable[P, R]) -> Callable[P, R]:
    """Refuse NaN or Inf in any array argument (alone, in a sequence or in a state) with a clear
    error: the rules' maths would pass it on, re-weight every client by it, or never return (a
    dense SVD of an Inf matrix does not converge). Replies are validated before aggregation too;
    this keeps the pure functions safe on their own."""

    @functools.wraps(function)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        for position, value in enumerate([*args, *kwargs.values()]):
            for array in _arrays_in(value):
                if np.issubdtype(array.dtype, np.number) and not np.isfinite(array).all():
                    raise ValueError(f"{function.__name__}: argument {position} holds NaN or Inf")
        return function(*args, **kwargs)

    return checked


def normalize_weights(weights: Weights) -> np.ndarray:
    """Non-negative weights scaled to sum to one."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError("need a non-empty 1-D sequence of weights")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {w.tolist()}")
    return w / w.sum()


@finite_inputs
def mean_of_allowed(
    states: Sequence[State], weights: Weights, allowed: Callable[[str], bool], rule: str
) -> dict[str, np.ndarray]:
    """:func:`weighted_mean`, refusing states that hold a key the rule's uploads never carry."""
    for state in states:
        if bad := [k for k in state if not allowed(k)]:
            raise ValueError(f"{rule}: unexpected arrays in an upload {bad[:2]}")
    return weighted_mean(states, weights)


@finite_inputs
def weighted_mean(states: Sequence[State], weights: Weights) -> dict[str, np.ndarray]:
    """Key-wise ``sum_k p_k x_k`` with ``p = weights / sum(weights)``, accumulated in float64.

    Every state must hold the same keys with the same shapes; the result keeps the dtype of
    the first state (float32 for model weights).
    """
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    p = normalize_weights(weights)
    keys = list(states[0])
    for state in states[1:]:
        if set(state) != set(keys):
            raise ValueError("states hold different keys")
    mean: dict[str, np.ndarray] = {}
    for key in keys:
        acc = np.zeros(states[0][key].shape, dtype=np.float64)
        for pk, state in zip(p, states, strict=True):
            if state[key].shape != acc.shape:
                raise ValueError(f"{key}: shape {state[key].shape} != {acc.shape}")
            acc += pk * state[key].astype(np.float64)
        mean[key] = acc.astype(states[0][key].dtype)
    return mean
