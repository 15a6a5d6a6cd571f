"""softmax_topk: row-wise softmax + top-k of dense float32 logits in the C++ core.

One streaming pass per row (max, log-sum-exp, threshold-based candidates), in
parallel over rows and without the GIL.  Used by ``markovmem.llm.distill`` on CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core
from ._checks import integer
from ._matrix import _threads

__all__ = ["softmax_topk"]


def _rows_ok(arr: np.ndarray) -> bool:
    """Rows contiguous and at ascending, non-overlapping addresses (the core takes a row stride)."""
    s0, s1 = arr.strides
    v = arr.shape[1]
    return (v == 1 or s1 == 4) and (arr.shape[0] == 1 or (s0 >= 4 * v and s0 % 4 == 0)) and arr.flags.aligned


def softmax_topk(logits: Any, k: int, n_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable entries of ``softmax(logits)`` per row.

    Parameters
    ----------
    logits : (B, V) float32 array
        Logits whose rows are each contiguous (row-major, or a column slice of
        it such as ``x[:, :n]``; other layouts are copied; other dtypes raise).
        ``-inf`` entries have probability 0.  A row of only ``-inf``, or with
        ``+inf`` or NaN, gets NaN probabilities (as softmax does).
    k : int
        Entries kept per row, ``1 <= k <= V``.
    n_threads : int, optional
        OpenMP threads (default: the OpenMP default).

    Returns
    -------
    indices : (B, k) int32
        Column ids, by descending probability; ties (equal logits) by smaller id.
    probs : (B, k) float32
        ``exp(logit - logsumexp(row))``, the log-sum-exp accumulated in double.

    Raises
    ------
    TypeError
        ``logits`` is not float32.
    ValueError
        ``logits`` is not 2-D, has no columns, or ``k`` is out of range.
    """
    arr = np.asarray(logits)
    if arr.dtype != np.float32:
        raise TypeError(f"logits must be float32; got dtype {arr.dtype} (cast with .astype(np.float32))")
    if arr.ndim != 2:
        raise ValueError(f"logits must be 2-D (rows, vocab); got shape {arr.shape}")
    k = integer(k, "k")
    v = arr.shape[1]
    if v < 1:
        raise ValueError("logits has no columns; expected at least one")
    if not 1 <= k <= v:
        raise ValueError(f"k is {k}; expected 1 <= k <= {v}")
    if arr.shape[0] and not _rows_ok(arr):
        arr = np.ascontiguousarray(arr)
    return _core.softmax_topk(arr, k, _threads(n_threads))
