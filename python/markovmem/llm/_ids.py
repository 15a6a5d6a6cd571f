"""One check for token ids given to the adapter: integers only (no floats, no bools),
so ``512.7`` or ``True`` is refused instead of being truncated or read as 1."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import integer

__all__ = ["as_id", "as_ids"]


def as_id(value: Any, name: str) -> int:
    """``value`` as a Python int; TypeError naming ``name`` unless it is an integer (bools refused)."""
    return integer(value, name)


def as_ids(values: Any, name: str) -> np.ndarray:
    """``values`` (sequence, array or tensor of integers) as a 1-D int64 array.

    Raises
    ------
    TypeError
        An entry is a float, a bool or not a number (the message names ``name`` and its position).
    """
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of integer ids; got the string {values!r}")
    if hasattr(values, "detach"):  # torch tensor: the one device -> host copy
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=object if isinstance(values, (list, tuple)) else None).reshape(-1)
    if arr.dtype != object:
        if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{name} must hold integer ids; got dtype {arr.dtype}")
        return arr.astype(np.int64)
    for k, v in enumerate(arr):
        if not -(2**63) <= as_id(v, f"{name}[{k}]") < 2**63:
            raise IndexError(f"{name}[{k}] = {v} is out of the int64 range")
    return np.array([int(v) for v in arr], dtype=np.int64)
