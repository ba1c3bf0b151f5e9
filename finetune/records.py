"""Conversions between Flower records and plain numpy state dicts."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

WIRE_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def to_record(state: Mapping[str, np.ndarray], wire_dtype: str = "float32") -> ArrayRecord:
    """An ArrayRecord of ``state`` with floating arrays cast to the wire dtype."""
    dtype = WIRE_NUMPY_DTYPES[wire_dtype]
    return ArrayRecord(
        {
            key: Array(np.ascontiguousarray(value.astype(dtype, copy=False)))
            if np.issubdtype(value.dtype, np.floating)
            else Array(np.ascontiguousarray(value))
            for key, value in state.items()
        }
    )


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Plain numpy arrays, floating ones as float32 whatever their wire dtype."""
    state = {}
    for key, array in record.items():
        value = array.numpy()
        floating = np.issubdtype(value.dtype, np.floating)
        state[key] = value.astype(np.float32, copy=False) if floating else value  # np.load's: owned
    return state
