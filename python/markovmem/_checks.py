"""Argument checks shared by the public API: integers (no bools, no silently truncated
floats), real numbers (no strings) and thread counts, each error naming the argument."""

from __future__ import annotations

import numbers
import operator
from typing import Any

import numpy as np

from . import _core


def integer(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int after checking it is an integer (not a bool, not a float) in [low, high].

    Raises TypeError for a non-integer (``2.5``, ``2.0``, ``"2"``, ``True``) and ValueError
    for an integer out of range.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer; got a bool ({value!r})")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer; got {type(value).__name__} {value!r}") from None
    if low is not None and v < low:
        raise ValueError(f"{name} is {v}; expected an integer >= {low}")
    if high is not None and v > high:
        raise ValueError(f"{name} is {v}; expected an integer <= {high}")
    return v


def real(value: Any, name: str) -> float:
    """``value`` as a float after checking it is a real number (not a bool, a string or complex)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    return float(value)


def threads(n_threads: Any) -> int:
    """The core's thread count for ``n_threads``: None or 0 means the OpenMP default (0).

    At most 4 x the processors available to the process: each thread gets its own
    workspace, and OpenMP cannot start hundreds of thousands of threads.
    """
    if n_threads is None:
        return 0
    cap = _core.max_threads()
    n = integer(n_threads, "n_threads")
    if not 0 <= n <= cap:
        raise ValueError(
            f"n_threads is {n}; expected None or 0 (the OpenMP default) or 1 to {cap} "
            f"(4 x the {cap // 4} processors available)"
        )
    return n
