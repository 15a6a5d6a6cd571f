"""TransitionMatrix: the public Python class over the C++ core's sparse Markov matrix.

Arguments are checked and converted here once (dtype, shape, contiguity); the
core re-checks what memory safety depends on and runs without the GIL.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import _core
from ._checks import integer, real, threads
from ._errors import ConvergenceWarning, invariant_error

if TYPE_CHECKING:  # _expansion imports this module; the name is needed for annotations only
    from ._expansion import ExpansionCertificate

__all__ = ["Row", "TransitionMatrix"]

#: Header keys the file format writes itself (never copied from a loaded matrix into a new save).
_RESERVED_METADATA = frozenset({"format", "format_version", "n_states", "n_base", "nnz", "fingerprint", "open_blocks"})

#: Default tolerance on row sums (a row may sum to at most 1 + tol).
DEFAULT_TOL = 1e-5
#: Mass used in place of an exact zero wherever a log is taken (DESIGN §1).
LOG_FLOOR = 1e-12
_INT32_MAX = np.iinfo(np.int32).max


class Row(NamedTuple):
    """One row p(. | v): stored entries (read-only views) and the tail mass.

    ``indices`` (k,) int32 sorted, ``probs`` (k,) float32, ``tail`` the mass
    spread uniformly over the ``n_base - k`` base states the row does not store.
    """

    indices: np.ndarray
    probs: np.ndarray
    tail: float


_threads = threads


def _as_int32_ids(values: Any, name: str, upper: int) -> np.ndarray:
    """``values`` as a C-contiguous int32 array after checking every id is in [0, upper)."""
    arr = np.asarray(values)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers; got dtype {arr.dtype}")
    if arr.dtype != np.int32 and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= upper:
            pos = int(np.flatnonzero((arr < 0) | (arr >= upper))[0])
            raise IndexError(f"{name}[{pos}] = {int(arr.flat[pos])} is out of range [0, {upper})")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _fs_path(path: Any) -> bytes:
    """``path`` (str, bytes or os.PathLike) as the bytes the OS sees; a str need not be UTF-8
    encodable (os.fsencode undoes the surrogate escapes of os.fsdecode)."""
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise ValueError(f"path {os.fsdecode(raw)!r} contains a null byte")
    return raw


def _tol(tol: float) -> float:
    tol = real(tol, "tol")
    if not (np.isfinite(tol) and tol >= 0.0):
        raise ValueError(f"tol is {tol}; expected a finite number >= 0")
    return tol


def _as_int64_ids(values: np.ndarray, name: str, upper: int) -> np.ndarray:
    """``values`` (an integer array) as C-contiguous int64, after checking every id is in [0, upper).

    The check runs on the original dtype so an unsigned id beyond int64 is reported as given.
    """
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{name} must hold integer state ids; got dtype {values.dtype}")
    if values.size:
        bad = (values >= upper) if values.dtype.kind == "u" else ((values < 0) | (values >= upper))
        if bad.any():
            pos = int(np.flatnonzero(bad.ravel())[0])
            raise IndexError(f"{name}[{pos}] = {values.ravel()[pos]} is out of range [0, n_states = {upper})")
    return np.ascontiguousarray(values, dtype=np.int64).ravel()


def _csr_parts(
    matrix: Any, n_cols: int | None, what: str
) -> tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray]:
    """Shape and (indptr int64, indices int32, data float32) of a sparse or dense 2-D input.

    CSR input is taken as it is (unsorted or duplicate indices are reported, not
    repaired); other sparse formats and dense arrays are converted to CSR once.
    """
    import scipy.sparse as sp

    if sp.issparse(matrix):
        if matrix.ndim != 2:
            raise ValueError(f"{what} must be 2-D; got a {matrix.ndim}-D sparse array of shape {matrix.shape}")
        csr = matrix if matrix.format == "csr" else matrix.tocsr()
    else:
        dense = np.asarray(matrix)
        if dense.ndim != 2:
            raise ValueError(f"{what} must be 2-D; got shape {dense.shape}")
        if dense.dtype.kind not in "biuf":
            raise TypeError(f"{what} must hold real numbers; got dtype {dense.dtype}")
        if dense.size and not np.all(np.isfinite(dense)):
            r = int(np.argwhere(~np.isfinite(dense))[0, 0])
            raise invariant_error(f"{what} row {r}: probability is not finite", r)
        csr = sp.csr_array(dense)
    shape = (int(csr.shape[0]), int(csr.shape[1]))
    if n_cols is not None and shape[1] != n_cols:
        raise ValueError(f"{what} has shape {shape}; expected {n_cols} columns")
    indices = np.asarray(csr.indices)
    if indices.size and (int(indices.max()) > _INT32_MAX or int(indices.min()) < 0):
        raise IndexError(f"{what} has column indices outside [0, {_INT32_MAX}]")
    data = np.asarray(csr.data)
    if not (np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.integer)):
        raise TypeError(f"{what} must hold real numbers; got dtype {data.dtype}")
    return (
        shape,
        np.ascontiguousarray(csr.indptr, dtype=np.int64),
        np.ascontiguousarray(indices, dtype=np.int32),
        np.ascontiguousarray(data, dtype=np.float32),
    )


def _flatten_sequences(seqs: Any, upper: int, name: str = "sequences") -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, offsets int64) from one 1-D id array or an iterable of id sequences.

    Ids are checked against [0, upper) in their own dtype (one max over the
    joined ids; a position is searched only when something is out of range), so
    an id that does not fit int32 is reported as given, never wrapped.
    """
    if isinstance(seqs, np.ndarray) and seqs.ndim == 1:
        parts: list[np.ndarray] = [seqs]
    elif isinstance(seqs, np.ndarray) and seqs.ndim == 2:
        parts = list(seqs)
    else:
        if isinstance(seqs, (str, bytes)):
            raise TypeError(f"{name} must be token-id sequences, not a string")
        parts = [np.asarray(s) for s in seqs]
    if not parts:
        raise ValueError(f"{name} is empty; expected at least one sequence")
    lengths = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
    for i, p in enumerate(parts):
        if p.ndim != 1:
            raise ValueError(f"{name}[{i}] must be 1-D; got shape {p.shape}")
        if p.size and not np.issubdtype(p.dtype, np.integer):
            raise TypeError(f"{name}[{i}] must hold integer token ids; got dtype {p.dtype}")
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    full = [p for p in parts if p.size]
    if not full:
        return np.zeros(0, dtype=np.int32), offsets

    def out_of_range(ids: np.ndarray) -> np.ndarray:
        return (ids >= upper) if ids.dtype.kind == "u" else ((ids < 0) | (ids >= upper))

    def report(ids: np.ndarray, start: int) -> None:
        # ids (original values) begin at token position `start`; one of them is out of range.
        pos = start + int(np.flatnonzero(out_of_range(ids))[0])
        s = int(np.searchsorted(offsets, pos, side="right") - 1)
        value = int(ids[pos - start])
        raise IndexError(f"{name}[{s}][{pos - offsets[s]}] = {value} is out of range [0, n_states = {upper})")

    def joined_view(arrays: list[np.ndarray]) -> np.ndarray | None:
        # The sequences as one view (no copy) when they are consecutive pieces of one
        # contiguous 1-D array, as slices of one token stream or np.split give; else None.
        base = arrays[0].base
        if (
            len(arrays) > 4096
            or not isinstance(base, np.ndarray)
            or base.ndim != 1
            or not base.flags.c_contiguous
            or base.dtype != arrays[0].dtype
        ):
            return None
        step = base.itemsize
        start = end = arrays[0].__array_interface__["data"][0]
        for p in arrays:
            if p.base is not base or p.dtype != base.dtype or p.strides != (step,):
                return None
            if p.__array_interface__["data"][0] != end:
                return None
            end += p.nbytes
        first = (start - base.__array_interface__["data"][0]) // step
        view = base[first : first + (end - start) // step]
        ok = view.__array_interface__["data"][0] == start and view.nbytes == end - start
        return view if ok else None

    dtypes = {p.dtype for p in full}
    narrow = all(d.itemsize <= 4 if d.kind == "i" else d.itemsize <= 2 for d in dtypes)
    if narrow or len(dtypes) == 1:
        # Join in int32 when every id fits it, else in the (one) input dtype, then one range test.
        if isinstance(seqs, np.ndarray) and seqs.ndim == 2:
            ids = seqs.reshape(-1)
        elif len(full) == 1:
            ids = full[0]
        else:
            joined = joined_view(full)
            ids = joined if joined is not None else np.concatenate(full, dtype=np.int32 if narrow else None)
        width = ids.dtype.itemsize
        if ids.dtype.kind == "u":
            bad = int(ids.max()) >= upper
        elif ids.dtype.isnative and upper <= 2 ** (8 * width - 1):
            # Seen as unsigned, a negative id is >= 2^(bits - 1) >= upper: one max tests both bounds.
            bad = int(ids.view(f"u{width}").max()) >= upper
        else:
            bad = int(ids.max()) >= upper or int(ids.min()) < 0
        if bad:
            report(ids, 0)
        return np.ascontiguousarray(ids, dtype=np.int32), offsets
    # Mixed dtypes with a wide one: test each sequence in its own dtype, then join.
    for p, start in zip(parts, offsets[:-1], strict=True):
        if p.size and (int(p.max()) >= upper or (p.dtype.kind == "i" and int(p.min()) < 0)):
            report(p, int(start))
    return np.concatenate(full, dtype=np.int32, casting="unsafe"), offsets


class TransitionMatrix:
    """A sparse Markov transition matrix over ``n_states`` token states.

    Row ``v`` is the next-token distribution p(. | v), stored as its largest
    entries (sorted int32 column indices, float32 probabilities) plus a float64
    *tail mass* ``r_v = 1 - sum(stored)``, spread uniformly over the
    ``n_base - k_v`` base states the row does not store.  States ``>= n_base``
    (tokens added by :meth:`expand`) never receive tail mass, and no row stores
    mass on them.  The matrix is immutable: arrays it hands out are read-only
    views, and :meth:`expand` returns a new matrix.

    An *open* expansion (``expand(new_rows, incoming=...)``) lets old states move
    to the new ones: the stored rows then keep their bytes and are the
    distributions *given* an old next state, row ``v`` moves mass :attr:`leak`
    ``[v]`` to new states (:attr:`incoming` holds those entries), and every other
    transition of row ``v`` is scaled by ``1 - leak[v]``.  :meth:`prob`,
    :meth:`log_prob`, :meth:`to_dense`, :meth:`step`, :meth:`stationary`,
    :meth:`log_likelihood` and :meth:`sample` use the true probabilities;
    :meth:`row`, :meth:`to_scipy` and the array properties show the stored bytes.

    Build one with :meth:`from_scipy`, :meth:`from_topk`, :meth:`from_sequences`
    or :meth:`load`; the constructor is private.
    """

    __slots__ = ("__weakref__", "_m", "_metadata")

    def __init__(self, core: Any, metadata: Mapping[str, str] | None = None) -> None:
        if not isinstance(core, _core.TransitionMatrix):
            raise TypeError(
                "TransitionMatrix is built with TransitionMatrix.from_scipy, from_topk, from_sequences or load"
            )
        self._m = core
        self._metadata = dict(metadata or {})

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_scipy(
        cls, matrix: Any, n_base: int | None = None, *, tol: float = DEFAULT_TOL, n_threads: int | None = None
    ) -> TransitionMatrix:
        """Build from a square scipy.sparse matrix (any format) or a dense array.

        Parameters
        ----------
        matrix : (n_states, n_states) sparse or array-like of probabilities
            Row ``v`` holds the stored entries of p(. | v).  CSR input must have
            sorted, unique column indices per row; other formats are converted
            once.  Values are stored as float32.
        n_base : int, optional
            Number of base states (default ``n_states``).  Columns ``>= n_base``
            must be empty.
        tol : float
            A row may sum to at most ``1 + tol``; the tail is ``max(0, 1 - sum)``.

        Raises
        ------
        InvariantError
            A negative, non-finite, unsorted or duplicate entry, a row summing
            above ``1 + tol``, or mass on a state ``>= n_base`` (``.row`` says which).
        ValueError
            The matrix is not square or ``n_base`` is out of range.
        """
        shape, indptr, indices, data = _csr_parts(matrix, None, "matrix")
        if shape[0] != shape[1]:
            raise ValueError(f"matrix has shape {shape}; a transition matrix must be square")
        n_states = shape[0]
        n_base = n_states if n_base is None else integer(n_base, "n_base")
        return cls(
            _core.TransitionMatrix.copy_csr(n_states, n_base, indptr, indices, data, _tol(tol), _threads(n_threads))
        )

    @classmethod
    def from_topk(
        cls,
        indices: Any,
        probs: Any,
        n_base: int | None = None,
        *,
        tol: float = DEFAULT_TOL,
        n_threads: int | None = None,
    ) -> TransitionMatrix:
        """Build from per-state top-k arrays, as distillation produces them.

        Parameters
        ----------
        indices : (n_states, k) int32 or int64
            Column ids of each row's stored entries, in any order, unique per row.
        probs : (n_states, k) float32 (other float dtypes are converted)
            Their probabilities.  The rest of each row's mass is its tail.
        n_base : int, optional
            Number of base states (default ``n_states``); ids must be below it.

        Raises
        ------
        InvariantError
            An id out of range, a duplicate id in a row, a non-finite or negative
            probability, a row summing above ``1 + tol``.
        """
        idx = np.asarray(indices)
        pr = np.asarray(probs)
        if idx.ndim != 2 or pr.ndim != 2:
            raise ValueError(f"indices and probs must be 2-D (n_states, k); got shapes {idx.shape} and {pr.shape}")
        if idx.shape != pr.shape:
            raise ValueError(f"indices has shape {idx.shape} but probs has shape {pr.shape}")
        if idx.shape[0] == 0:
            raise ValueError("indices has no rows; expected at least one state")
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must hold integers; got dtype {idx.dtype}")
        if not (np.issubdtype(pr.dtype, np.floating) or np.issubdtype(pr.dtype, np.integer)):
            raise TypeError(f"probs must hold real numbers; got dtype {pr.dtype}")
        n_states = idx.shape[0]
        n_base = n_states if n_base is None else integer(n_base, "n_base")
        idx = np.ascontiguousarray(idx, dtype=np.int32 if idx.dtype == np.int32 else np.int64)
        pr = np.ascontiguousarray(pr, dtype=np.float32)
        return cls(_core.TransitionMatrix.from_topk(n_states, n_base, idx, pr, _tol(tol), _threads(n_threads)))

    @classmethod
    def from_sequences(
        cls,
        sequences: Any,
        n_states: int,
        *,
        top_k: int | None = None,
        smoothing: float = 0.0,
        n_threads: int | None = None,
    ) -> TransitionMatrix:
        """Estimate a first-order chain from token-id sequences (bigram counts).

        p(x | v) = (c(v, x) + a) / (c(v) + a * n_states) with ``a = smoothing``.
        Counting runs in parallel in the core (OpenMP) without the GIL.

        Parameters
        ----------
        sequences : 1-D int array, 2-D int array (one sequence per row) or iterable of 1-D int sequences
            Transitions are counted within each sequence, never across two.
        n_states : int
            Vocabulary size; every id must lie in [0, n_states).
        top_k : int, optional
            Keep the ``top_k`` largest counts per row (ties: smaller id first);
            the mass of the rest becomes the tail.
        smoothing : float
            Add-``a`` pseudo-count on every state.  Exact through the tail rule:
            the unseen states share the tail uniformly, each getting ``a / (c(v) + a n)``.

        Notes
        -----
        A state never followed by another has an empty row with tail 1: it
        moves uniformly over all states.
        """
        n_states = integer(n_states, "n_states", low=1)
        top_k = None if top_k is None else integer(top_k, "top_k", low=1)
        smoothing = real(smoothing, "smoothing")
        tokens, offsets = _flatten_sequences(sequences, n_states)
        return cls(
            _core.TransitionMatrix.count_transitions(
                tokens, offsets, n_states, top_k or 0, smoothing, _threads(n_threads)
            )
        )

    # ------------------------------------------------------------------ file format
    def save(self, path: str | bytes | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> None:
        """Write a safetensors file atomically (temporary file, fsync, rename).

        An existing file at ``path`` is replaced only once the new one is
        complete, so an error mid-save leaves it intact.  The temporary file is
        ``path.tmp-<pid>-<n>``; one left by a save that was killed is removed by
        the next save to ``path`` once its writer process is gone (a live
        writer's is never touched).  ``metadata`` (str -> str) is stored in the
        header next to the format version, sizes, the arrays' fingerprint and a
        fingerprint of the metadata itself (checked by ``load(verify=True)``),
        after the matrix's own :attr:`metadata` (e.g. how ``llm.distill`` made
        it); a key in both takes the value given here.
        """
        merged = {
            k: v for k, v in self._metadata.items() if k not in _RESERVED_METADATA and not k.startswith("markovmem.")
        }
        merged.update(metadata or {})
        extra = []
        for k, v in merged.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str to str; got {k!r}: {v!r}")
            extra.append((k, v))
        _core.save(self._m, _fs_path(path), extra)

    @classmethod
    def load(
        cls,
        path: str | bytes | os.PathLike[str],
        *,
        mmap: bool = True,
        verify: bool = False,
        n_threads: int | None = None,
    ) -> TransitionMatrix:
        """Read a file written by :meth:`save`.

        With ``mmap=True`` the probabilities and tails view a read-only memory
        map (no copy; pages are read on demand) and the row pointers and column
        indices are read into memory (4 bytes per stored entry).  Sizes, dtypes,
        offsets and the CSR structure are always checked, so a truncated,
        bit-flipped or hand-crafted file raises ``ValueError`` instead of
        crashing.  ``verify=True`` also checks every probability and tail, that
        the stored fingerprint matches, and that the header metadata matches its
        stored fingerprint.

        A file that another process rewrites in place while it is mapped can
        change the probabilities and tails read later, never the structure
        that every address is computed from: no call reads or writes outside
        the arrays.  Truncating a mapped file is different: the operating system
        delivers SIGBUS to a process reading a page past the new end, so write a
        new file and rename it over the old one (as :meth:`save` does), or load
        with ``mmap=False`` (the whole file is read into memory).

        Parameters
        ----------
        path : str, bytes or os.PathLike
            A regular file; bytes paths need not be UTF-8.
        mmap : bool
            Map the file instead of reading it.
        verify : bool
            Check values, tails and both fingerprints.  A file written before the
            metadata fingerprint existed loads with a UserWarning saying its
            metadata was not checked.
        n_threads : int, optional
            Threads for the checks (None: the OpenMP default).

        Raises
        ------
        FileNotFoundError, PermissionError, IsADirectoryError, OSError
            The file cannot be opened or read, or is not a regular file (a FIFO
            is refused at once, not waited on).
        ValueError, InvariantError
            The file is not a valid markovmem matrix (the message names it).
        """
        core, meta, metadata_verified = _core.load(_fs_path(path), bool(mmap), bool(verify), _threads(n_threads))
        if verify and not metadata_verified:
            warnings.warn(
                f"{os.fsdecode(path)!r} has no metadata fingerprint (written by an earlier markovmem): verify=True "
                "checked the arrays and their fingerprint, not the metadata; save it again to add one",
                UserWarning,
                stacklevel=2,
            )
        return cls(core, dict(meta))

    @property
    def metadata(self) -> dict[str, str]:
        """Metadata of this matrix: the header of the file it was loaded from, or what its maker
        recorded (``llm.distill`` records how the rows were made); empty otherwise."""
        return dict(self._metadata)

    @classmethod
    def _with_metadata(cls, other: TransitionMatrix, metadata: Mapping[str, str]) -> TransitionMatrix:
        """The same matrix (shared storage) carrying ``metadata`` besides its own."""
        return cls(other._m, {**other._metadata, **metadata})

    # ------------------------------------------------------------------ shape and storage
    @property
    def n_states(self) -> int:
        """Number of states (base plus added)."""
        return self._m.n_states

    @property
    def n_base(self) -> int:
        """Number of base states; states ``>= n_base`` were added by expansions."""
        return self._m.n_base

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_states, n_states)``."""
        return (self.n_states, self.n_states)

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return self._m.nnz

    @property
    def nbytes(self) -> int:
        """Bytes held by the four arrays (indptr, indices, data, tail) and the open blocks."""
        return self._m.storage_bytes

    @property
    def is_open(self) -> bool:
        """True when an open expansion let old states move to added ones (:attr:`incoming` is not empty)."""
        return bool(self._m.open_blocks)

    @property
    def leak(self) -> np.ndarray:
        """(n_states,) float64: per row, the mass moved to added states by open expansions.

        0 for every row of a closed matrix.  After one open expansion ``leak[v]`` is
        the row sum of ``incoming[v]``, exactly; after several, ``eps_K + (1 - eps_K)
        * leak_before``, newest block last.  The forgetting of row ``v`` (the KL of
        the old distribution from the new one over the old states) is
        ``-log1p(-leak[v])`` nats.
        """
        return self._m.total_leak()

    @property
    def incoming(self) -> Any:
        """The old->new transitions of open expansions as a ``(n_states, n_states)`` ``scipy.sparse.csr_array``.

        Entry ``(v, u)`` is the true p~(u | v) for an added state ``u`` reached
        through an open expansion (so row ``v`` sums to :attr:`leak` ``[v]``); empty
        for a closed matrix.  A copy (float64), built from the blocks each open
        expansion stored: block ``k``'s entries scaled by ``1 - eps`` of every later block.
        """
        import scipy.sparse as sp

        n = self.n_states
        blocks = self._m.open_blocks
        if not blocks:
            return sp.csr_array((n, n), dtype=np.float64)
        rows, cols, vals = [], [], []
        for k, (n_rows, _m, indptr, indices, data, _leak) in enumerate(blocks):
            scale = np.ones(n_rows)
            for later in blocks[k + 1 :]:
                scale *= 1.0 - later[5][:n_rows]
            r = np.repeat(np.arange(n_rows), np.diff(indptr))
            rows.append(r)
            cols.append(indices.astype(np.int64))
            vals.append(data.astype(np.float64) * scale[r])
        return sp.csr_array(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n), dtype=np.float64
        )

    @property
    def indptr(self) -> np.ndarray:
        """(n_states + 1,) int64 row pointers (read-only view)."""
        return self._m.indptr

    @property
    def indices(self) -> np.ndarray:
        """(nnz,) int32 sorted column indices per row (read-only view)."""
        return self._m.indices

    @property
    def data(self) -> np.ndarray:
        """(nnz,) float32 stored probabilities (read-only view)."""
        return self._m.data

    @property
    def tail(self) -> np.ndarray:
        """(n_states,) float64 tail masses ``1 - sum(stored)`` (read-only view)."""
        return self._m.tail

    def __repr__(self) -> str:
        mean_k = self.nnz / self.n_states
        return (
            f"TransitionMatrix(n_states={self.n_states}, n_base={self.n_base}, nnz={self.nnz}, "
            f"mean_k={mean_k:.1f}, nbytes={self.nbytes})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # The stored tail travels too: recomputed from the float32 data it can differ in the
        # last bits from the stored one (a file's, an expansion's), and so would the fingerprint.
        # So do the open blocks, as stored (leak included).
        blocks = [(n_rows, m, *(np.array(a) for a in arrays)) for n_rows, m, *arrays in self._m.open_blocks]
        return (
            _rebuild,
            (
                self.n_states,
                self.n_base,
                np.array(self.indptr),
                np.array(self.indices),
                np.array(self.data),
                self.metadata,
                np.array(self.tail),
                blocks,
            ),
        )

    # ------------------------------------------------------------------ queries
    def _state(self, v: Any, name: str) -> int:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an integer state id; got {type(v).__name__}")
        v = int(v)
        if not 0 <= v < self.n_states:
            raise IndexError(f"{name} = {v} is out of range [0, n_states = {self.n_states})")
        return v

    def row(self, v: int) -> Row:
        """Row ``v``: stored ``indices``/``probs`` as read-only zero-copy views, and its ``tail``.

        These are the stored bytes.  After an open expansion they are the
        distribution given an old next state: the true probabilities are
        ``(1 - leak[v])`` times them (see :attr:`leak`, :attr:`incoming`, :meth:`prob`).
        """
        v = self._state(v, "v")
        a, b = int(self.indptr[v]), int(self.indptr[v + 1])
        return Row(self.indices[a:b], self.data[a:b], float(self.tail[v]))

    def _pairs(self, v: Any, x: Any, log: bool, n_threads: int | None) -> Any:
        if np.isscalar(v) and np.isscalar(x):
            iv, ix = self._state(v, "v"), self._state(x, "x")
            return self._m.log_prob(iv, ix) if log else self._m.prob(iv, ix)
        va, xa = np.broadcast_arrays(np.asarray(v), np.asarray(x))
        out = self._m.prob_many(
            _as_int64_ids(va, "v", self.n_states), _as_int64_ids(xa, "x", self.n_states), log, _threads(n_threads)
        )
        return out.reshape(va.shape)

    def prob(self, v: Any, x: Any, *, n_threads: int | None = None) -> Any:
        """p(x | v), tail included; ``v`` and ``x`` are ints or broadcastable int arrays.

        After an open expansion this is the true p~(x | v): ``(1 - leak[v])`` times
        the stored row's value for a state the row covers, the :attr:`incoming`
        entry for an added state reached through an open expansion.

        Returns a float for two ints, else a float64 array of the broadcast shape.
        Raises IndexError for an id outside [0, n_states).
        """
        return self._pairs(v, x, False, n_threads)

    def log_prob(self, v: Any, x: Any, *, n_threads: int | None = None) -> Any:
        """log p(x | v), with ``log(1e-12)`` in place of an exact zero; vectorised like :meth:`prob`."""
        return self._pairs(v, x, True, n_threads)

    def to_scipy(self) -> Any:
        """The stored entries as a ``scipy.sparse.csr_array`` sharing ``data`` and ``indices``.

        The tail is not part of it (see :meth:`to_dense` for small matrices), nor
        are open expansions' old->new entries (:attr:`incoming`): after an open
        expansion these are the stored, unscaled rows.  The
        int64 row pointers are narrowed to int32 (a copy of n_states + 1 values)
        when scipy would otherwise widen the int32 indices.
        """
        import scipy.sparse as sp

        indptr = self.indptr
        if self.nnz <= _INT32_MAX:
            indptr = indptr.astype(np.int32)
        else:
            raise ValueError("more than 2**31 - 1 entries cannot share int32 indices with scipy")
        out = sp.csr_array((self.n_states, self.n_states), dtype=np.float32)
        out.indptr = indptr
        out.indices = self.indices
        out.data = self.data
        out.has_sorted_indices = True
        out.has_canonical_format = True
        return out

    def to_dense(self, max_states: int = 20_000) -> np.ndarray:
        """The full (n_states, n_states) float64 matrix of true probabilities, tail spread in
        and open expansions applied (rows scaled by ``1 - leak``, :attr:`incoming` added); small matrices only."""
        max_states = integer(max_states, "max_states")
        if self.n_states > max_states:
            raise ValueError(
                f"n_states = {self.n_states} exceeds max_states = {max_states}; a dense copy would be too large"
            )
        n, nb = self.n_states, self.n_base
        counts = np.diff(self.indptr)
        free = nb - counts
        uniform = np.divide(self.tail, free, out=np.zeros(n), where=free > 0)
        dense = np.zeros((n, n))
        dense[:, :nb] = uniform[:, None]
        rows = np.repeat(np.arange(n), counts)
        dense[rows, self.indices] = self.data
        if self.is_open:
            dense *= (1.0 - self.leak)[:, None]
            dense += self.incoming.toarray()
        return dense

    def step(self, distribution: Any, *, n_threads: int | None = None) -> np.ndarray:
        """One step of the chain: ``distribution @ P`` (tail included), (n_states,) float64."""
        d = np.asarray(distribution)
        if d.dtype.kind not in "biuf":
            raise TypeError(f"distribution must hold real numbers; got dtype {d.dtype}")
        d = np.ascontiguousarray(d, dtype=np.float64)
        if d.shape != (self.n_states,):
            raise ValueError(f"distribution has shape {d.shape}; expected ({self.n_states},)")
        if not np.all(np.isfinite(d)):
            raise ValueError("distribution has non-finite entries")
        return self._m.step(d, _threads(n_threads))

    def stationary(self, *, tol: float = 1e-10, max_iter: int = 10_000, n_threads: int | None = None) -> np.ndarray:
        """Stationary distribution by power iteration on the lazy chain ``(I + P) / 2``.

        The lazy chain has the same stationary distributions and does not
        oscillate on periodic chains.  Starts from uniform over base states; stops
        when the L1 change falls below ``tol``.  Warns with ConvergenceWarning
        when ``max_iter`` is reached first.
        """
        pi, n_iter, residual, converged = self._m.stationary(
            real(tol, "tol"), integer(max_iter, "max_iter", low=1), _threads(n_threads)
        )
        if not converged:
            warnings.warn(
                f"stationary: L1 change {residual:.3g} after {n_iter} iterations is above tol = {tol:g}; "
                "raise max_iter",
                ConvergenceWarning,
                stacklevel=2,
            )
        return pi

    def log_likelihood(self, sequences: Any, *, n_threads: int | None = None) -> float:
        """Total log-likelihood (nats) of the transitions within each sequence."""
        tokens, offsets = _flatten_sequences(sequences, self.n_states)
        return float(self._m.log_likelihood(tokens, offsets, _threads(n_threads)).sum())

    def perplexity(self, sequences: Any, *, n_threads: int | None = None) -> float:
        """``exp(-log_likelihood / number of transitions)`` over the given sequences."""
        tokens, offsets = _flatten_sequences(sequences, self.n_states)
        n_trans = int(np.maximum(np.diff(offsets) - 1, 0).sum())
        if n_trans == 0:
            raise ValueError("sequences hold no transition (every sequence is shorter than 2)")
        ll = float(self._m.log_likelihood(tokens, offsets, _threads(n_threads)).sum())
        return float(np.exp(-ll / n_trans))

    def sample(self, start: int, length: int, *, seed: int | None = None) -> np.ndarray:
        """A path of ``length`` states from ``start`` (included), (length,) int32.

        The same ``seed`` gives the same path on every machine; ``None`` draws one.
        """
        start = self._state(start, "start")
        length = integer(length, "length", low=1)
        seed = int(np.random.default_rng().integers(0, 2**63)) if seed is None else integer(seed, "seed")
        return self._m.sample(start, length, seed & (2**64 - 1))

    # ------------------------------------------------------------------ invariants
    def validate(self, *, tol: float = DEFAULT_TOL, n_threads: int | None = None) -> None:
        """Check every invariant; raise InvariantError naming the first offending row.

        Checks: row pointers non-decreasing; column indices sorted, unique, in
        range, below ``n_base``; probabilities finite, non-negative, summing to at
        most ``1 + tol``; tail equal to ``1 - sum`` within ``tol``; each open block's
        entries on added states only, finite, non-negative, row sums below 1 and
        equal to the stored leak.  O(nnz), parallel.
        """
        found = self._m.find_violation(_tol(tol), _threads(n_threads))  # open blocks included
        if found is not None:
            row, reason = found
            raise invariant_error(reason, row if row >= 0 else None)

    def fingerprint(self) -> str:
        """Stable content hash (16 hex digits, XXH64 tree hash): same bytes, same value everywhere.

        Covers the stored rows and, after an open expansion, its old->new blocks (a
        closed matrix's value does not depend on them existing)."""
        return self._m.fingerprint()

    def clear_cache(self) -> None:
        """Free the data that :func:`markovmem.fit_alpha` derives from this matrix and keeps.

        The first fit on a matrix builds its per-row constants, the logit
        deviations ``log p(x|v) - log u_v`` (8 bytes per stored entry) and, per
        link, an inverted index (CSC, 8 bytes per stored entry); later calls reuse
        them.  A matrix never changes, so they never go stale: an expanded or
        reloaded matrix starts without any.  Call this to give the memory back;
        the next fit builds them again.  It also frees the per-thread scratch the
        fit functions keep between calls, whatever matrix they served (25 bytes
        per state and thread: 3.2 MB per thread at 131k states).
        """
        self._m.clear_derived()
        _core.release_fit_workspaces()

    # ------------------------------------------------------------------ expansion
    def expand(
        self,
        new_rows: Any,
        *,
        incoming: Any = None,
        max_leak: float | None = None,
        tol: float = DEFAULT_TOL,
        n_threads: int | None = None,
    ) -> tuple[TransitionMatrix, ExpansionCertificate]:
        """Grow the state space by ``m`` new states (the paper's Markov expansion).

        Parameters
        ----------
        new_rows : (m, n_base) sparse or dense array, or an object with ``predict()`` (an AlphaFit)
            Row ``i`` is the next-token distribution of new state ``n_states + i``
            over the base states; a row summing below 1 leaves the rest as tail,
            spread over base states.
        incoming : (n_states, m) sparse or dense array, optional
            An *open* expansion: entry ``(v, j)`` is p~(new state ``n_states + j`` | v),
            the mass old state ``v`` moves to the new state ``j``.  Its row sum is the
            row's leak ``eps_v``, in [0, 1).  Old rows keep their stored bytes and every
            other transition of row ``v`` becomes ``(1 - eps_v) p(x | v)``: given an old
            next state, nothing old changes, and the forgetting of row ``v`` is exactly
            ``-log(1 - eps_v)`` nats (DESIGN §1).  Stored as float32; ``eps_v`` is the
            double sum of the stored entries.  Omitted: the expansion is closed
            (``p(new | old) = 0``).
        max_leak : float, optional
            With ``incoming``: ``certificate.ok`` requires every ``eps_v <= max_leak``
            (the certificate still reports the leak; nothing is refused).

        Returns
        -------
        Q : TransitionMatrix
            ``n_states + m`` states; old rows byte-identical; no row puts mass on a new state.
            When this matrix owns spare capacity (built here, not memory-mapped) and no
            other live expansion holds it, the new rows are appended in place and Q
            *shares* the old rows' memory: nothing old is copied, the cost is O(new rows
            + n_states).  Otherwise the old rows are copied once (compared and hashed in
            the same pass).
        certificate : ExpansionCertificate
            Recomputed from P and Q by :func:`verify_expansion`: ``certificate.ok``; for an
            open expansion also the leak and forgetting figures (``max_leak``,
            ``mean_leak``, ``worst_leak_row``, ``forgetting_max_nats``).

        Raises
        ------
        InvariantError
            A new row is not a distribution over base states (``.row`` is its index in
            ``new_rows``); an ``incoming`` entry is negative or not finite, or a row of
            ``incoming`` sums to 1 or more (``.row`` is the old state).
        ValueError
            ``incoming`` does not have shape ``(n_states, m)``, or ``max_leak`` is negative.
        IndexError
            A sparse ``incoming`` holds a column index outside ``[0, m)``.
        """
        from ._expansion import ExpansionCertificate

        if hasattr(new_rows, "predict") and callable(new_rows.predict):
            new_rows = new_rows.predict()
        shape, indptr, indices, data = _csr_parts(new_rows, self.n_base, "new_rows")
        if shape[0] == 0:
            raise ValueError("new_rows has no rows; expected at least one new state")
        bound = _max_leak(max_leak)
        if incoming is None:
            core, cert = _core.expand(self._m, indptr, indices, data, _tol(tol), _threads(n_threads), max_leak=bound)
        else:
            in_indptr, in_indices, in_data = _incoming_parts(incoming, self.n_states, shape[0])
            core, cert = _core.expand(
                self._m, indptr, indices, data, _tol(tol), _threads(n_threads), in_indptr, in_indices, in_data, bound
            )
        return TransitionMatrix(core), ExpansionCertificate.from_dict(cert)


def _max_leak(max_leak: float | None) -> float:
    """``max_leak`` checked, with ``None`` (no bound) as infinity."""
    if max_leak is None:
        return float("inf")
    bound = real(max_leak, "max_leak")
    if not bound >= 0.0:
        raise ValueError(f"max_leak is {bound}; expected a number >= 0 (None: no bound)")
    return bound


def _incoming_parts(incoming: Any, n_old: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR parts (int64, int32 relative columns, float32) of an open expansion's (n_old, m) block.

    Checks what a message can name best here: the shape, every column in [0, m),
    every entry finite and >= 0 (row and column named), every row sum below 1.
    """
    import scipy.sparse as sp

    if not sp.issparse(incoming):
        incoming = np.asarray(incoming)
    if tuple(incoming.shape) != (n_old, m):
        raise ValueError(
            f"incoming has shape {tuple(incoming.shape)}; expected (n_states, m) = ({n_old}, {m}): "
            "row v holds the mass old state v moves to each new state"
        )
    if isinstance(incoming, np.ndarray) and incoming.dtype.kind in "biuf" and incoming.size:
        bad = ~np.isfinite(incoming) | (incoming < 0)
        if bad.any():
            r, c = (int(i) for i in np.argwhere(bad)[0])
            raise invariant_error(
                f"incoming row {r}, column {c}: probability is {incoming[r, c]}; expected a finite number >= 0", r
            )
    _, indptr, indices, data = _csr_parts(incoming, None, "incoming")
    rows = np.repeat(np.arange(n_old), np.diff(indptr)) if data.size else np.zeros(0, dtype=np.int64)
    if indices.size and int(indices.max()) >= m:
        j = int(np.flatnonzero(indices >= m)[0])
        raise IndexError(f"incoming row {int(rows[j])}: column {int(indices[j])} is out of range [0, m = {m})")
    bad = ~np.isfinite(data) | (data < 0)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise invariant_error(
            f"incoming row {int(rows[j])}, column {int(indices[j])}: probability is {data[j]}; "
            "expected a finite number >= 0",
            int(rows[j]),
        )
    sums = np.bincount(rows, weights=data.astype(np.float64), minlength=n_old)
    if (sums >= 1.0).any():
        r = int(np.flatnonzero(sums >= 1.0)[0])
        raise invariant_error(
            f"incoming row {r} sums to {sums[r]:.9g}; the leak to new states must be < 1 "
            "(the old states keep 1 - leak)",
            r,
        )
    return indptr, indices, data


def _rebuild(
    n_states: int,
    n_base: int,
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    metadata: dict[str, str],
    tail: np.ndarray | None = None,
    open_blocks: list[tuple[Any, ...]] | None = None,
) -> TransitionMatrix:
    # tol = 1: the pickled matrix was valid; the checks that remain are the structure
    # (memory safety) and every tail finite in [0, 1].  Pickles without a tail recompute it.
    # Open blocks are checked in full (values and leaks) by the core.
    core = _core.TransitionMatrix.copy_csr(n_states, n_base, indptr, indices, data, 1.0, 0, tail)
    if open_blocks:
        core = core.with_open_blocks(open_blocks, DEFAULT_TOL)
    return TransitionMatrix(core, metadata)
