"""Checks that keep a bad client update out of the mean."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def reply_problem(
    arrays: Mapping[str, np.ndarray],
    expected_shapes: Mapping[str, tuple[int, ...]],
    num_examples: object,
) -> str | None:
    """Why a client's reply must be rejected, or None when it is fit to aggregate."""
    missing = sorted(set(expected_shapes) - set(arrays))
    if missing:
        return f"missing arrays {missing[:3]}{'...' if len(missing) > 3 else ''} ({len(missing)})"
    extra = sorted(set(arrays) - set(expected_shapes))
    if extra:
        return f"unexpected arrays {extra[:3]}{'...' if len(extra) > 3 else ''} ({len(extra)})"
    for key, shape in expected_shapes.items():
        if tuple(arrays[key].shape) != tuple(shape):
            return f"array {key} has shape {tuple(arrays[key].shape)}, expected {tuple(shape)}"
    for key, value in arrays.items():
        if not np.issubdtype(value.dtype, np.floating) and not np.issubdtype(value.dtype, np.integer):
            return f"array {key} has non-numeric dtype {value.dtype}"
        if not np.isfinite(value).all():
            return f"array {key} contains NaN or Inf"
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | float):
        return f"num-examples is {num_examples!r}, not a number"
    if not math.isfinite(num_examples) or num_examples <= 0:
        return f"num-examples is {num_examples}, must be > 0"
    return None
