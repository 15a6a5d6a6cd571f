"""Test helpers shared by the test modules: dense numpy references for the tail
rule, a random valid CSR generator, and a writer for hand-crafted files."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

import markovmem as mm


def dense_reference(n_states: int, n_base: int, indptr, indices, data) -> np.ndarray:
    """(n_states, n_states) float64 p(x | v) written from the DESIGN §1 tail rule.

    Stored entries as given (float32 values widened), every unstored base state
    gets (1 - sum(stored)) / (n_base - k_v) (0 when the tail is negative or no
    base state is free), states >= n_base get 0 unless stored.
    """
    indptr = np.asarray(indptr)
    out = np.zeros((n_states, n_states))
    for v in range(n_states):
        a, b = int(indptr[v]), int(indptr[v + 1])
        cols = np.asarray(indices[a:b], dtype=np.int64)
        vals = np.asarray(data[a:b], dtype=np.float32).astype(np.float64)
        tail = max(0.0, 1.0 - float(vals.sum()))
        free = n_base - cols.size
        if free > 0:
            out[v, :n_base] = tail / free
        out[v, cols] = vals
    return out


def dense_of(P: mm.TransitionMatrix) -> np.ndarray:
    """dense_reference for a built matrix, from its own arrays (not to_dense)."""
    return dense_reference(P.n_states, P.n_base, P.indptr, P.indices, P.data)


def random_csr(
    rng: np.random.Generator, n_states: int, n_base: int | None = None, *, density: float = 0.4, full_rows: bool = False
) -> sp.csr_array:
    """A random valid (n_states, n_states) CSR over the first n_base columns.

    Each row stores a random subset of base columns with a random total mass in
    [0.3, 1); rows storing every base column, and with ``full_rows`` about half
    the others, sum to 1 (before the float32 cast).
    """
    n_base = n_states if n_base is None else n_base
    rows, cols, vals = [], [], []
    for v in range(n_states):
        k = int(rng.binomial(n_base, density))
        if k == 0:
            continue
        c = np.sort(rng.choice(n_base, size=k, replace=False))
        w = rng.random(k) + 0.05
        # A row storing every base state has no free state for a tail: it must sum to 1.
        mass = 1.0 if (k == n_base or (full_rows and rng.random() < 0.5)) else rng.uniform(0.3, 0.999)
        w = w / w.sum() * mass
        rows += [v] * k
        cols += c.tolist()
        vals += w.tolist()
    return sp.csr_array((np.asarray(vals, dtype=np.float32), (rows, cols)), shape=(n_states, n_states))


def write_matrix_file(
    path: Path,
    *,
    n_states: int,
    n_base: int,
    indptr: Any,
    indices: Any,
    data: Any,
    tail: Any = None,
    meta: dict[str, str] | None = None,
    edit: Callable[[dict], None] | None = None,
    misalign: int = 0,
) -> Path:
    """Write a markovmem-format safetensors file by hand (no library code).

    ``tail`` defaults to max(0, 1 - row sum); ``meta`` entries override the
    __metadata__ written; ``edit`` may mutate the header dict before it is
    serialised; the header is space-padded so the data starts 8-byte aligned,
    plus ``misalign`` extra spaces.
    """
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if tail is None:
        sums = np.array([data[indptr[v] : indptr[v + 1]].astype(np.float64).sum() for v in range(n_states)])
        tail = np.maximum(0.0, 1.0 - sums)
    tail = np.ascontiguousarray(tail, dtype=np.float64)
    arrays = [("indptr", "I64", indptr), ("tail", "F64", tail), ("indices", "I32", indices), ("data", "F32", data)]
    metadata = {
        "format": "markovmem.TransitionMatrix",
        "format_version": "1",
        "n_states": str(n_states),
        "n_base": str(n_base),
        "nnz": str(indices.size),
        "fingerprint": "0000000000000000",
    }
    metadata.update(meta or {})
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, arr in arrays:
        header[name] = {"dtype": dtype, "shape": [int(arr.size)], "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    if edit is not None:
        edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    pad = (-(len(text) + 8)) % 8 + misalign
    text += b" " * pad
    blob = struct.pack("<Q", len(text)) + text + b"".join(arr.tobytes() for _, _, arr in arrays)
    path.write_bytes(blob)
    return path


def tinystories_path() -> Path:
    """The TinyStories sample: MARKOVMEM_TEST_DATA (the file, or the directory holding
    tinystories-sample.txt), else ../shared/data beside the project."""
    import os

    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(os.environ.get("MARKOVMEM_TEST_DATA", default))
    return path / "tinystories-sample.txt" if path.is_dir() else path


def forge(src: Path, dst: Path, *, tensors: dict | None = None, meta: dict | None = None, resign: bool = True) -> Path:
    """Rewrite an expansion file (markovmem.llm) with tensors/metadata changed (None values
    delete), re-signed like a forger would unless ``resign`` is False.  Needs torch."""
    from safetensors.torch import save as st_save

    from markovmem.llm import _stfile

    st = _stfile.parse(src.read_bytes(), "src")
    t, m = dict(st.tensors), dict(st.metadata)
    for store, edits in ((t, tensors or {}), (m, meta or {})):
        for k, v in edits.items():
            if v is None:
                store.pop(k, None)
            else:
                store[k] = v
    if resign:
        records = [(k, _stfile.tensor_record(v)) for k, v in t.items()]
        m["content_fingerprint"] = _stfile.content_fingerprint(records, m, "content_fingerprint")
    dst.write_bytes(st_save(t, metadata=m))
    return dst
