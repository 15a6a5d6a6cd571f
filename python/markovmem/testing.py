"""Assertion helpers for Markov invariants, for a user's own test suite.

Each helper raises AssertionError with a readable report; the pytest plugin
(registered automatically on install) rewrites this module's asserts and adds
the ``markov_invariants`` fixture and the ``--markovmem-expansion`` option.

Examples
--------
>>> from markovmem.testing import assert_expansion_preserves
>>> Q, _ = P.expand(new_rows)                    # doctest: +SKIP
>>> assert_expansion_preserves(P, Q)             # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np

from ._errors import InvariantError
from ._expansion import ExpansionCertificate, verify_expansion
from ._matrix import DEFAULT_TOL, TransitionMatrix
from .llm.testing import assert_no_forgetting  # needs torch only when called

__all__ = [
    "MatrixLike",
    "as_matrix",
    "assert_expansion_preserves",
    "assert_no_forgetting",
    "assert_row_stochastic",
    "assert_same_matrix",
    "assert_valid",
]

MatrixLike = Union[TransitionMatrix, str, "os.PathLike[str]"]
"""A TransitionMatrix or the path of a file written by TransitionMatrix.save."""


def as_matrix(m: MatrixLike) -> TransitionMatrix:
    """A TransitionMatrix as it is, or loaded (memory-mapped, fingerprint verified) from a path."""
    if isinstance(m, TransitionMatrix):
        return m
    if isinstance(m, (str, os.PathLike)):
        return TransitionMatrix.load(m, mmap=True, verify=True)
    raise TypeError(f"expected a markovmem.TransitionMatrix or a file path; got {type(m).__name__}")


def assert_valid(P: MatrixLike, *, tol: float = DEFAULT_TOL) -> None:
    """Assert every invariant of :meth:`TransitionMatrix.validate` holds."""
    P = as_matrix(P)
    try:
        P.validate(tol=tol)
    except InvariantError as exc:
        raise AssertionError(f"invalid transition matrix ({P!r}): {exc}") from None


def assert_row_stochastic(P: MatrixLike, *, tol: float = DEFAULT_TOL) -> None:
    """Assert each row's stored mass plus tail is 1 within ``tol`` (and every invariant holds)."""
    P = as_matrix(P)
    assert_valid(P, tol=tol)
    sums = np.add.reduceat(P.data.astype(np.float64), P.indptr[:-1]) if P.nnz else np.zeros(P.n_states)
    sums = np.where(np.diff(P.indptr) > 0, sums, 0.0) + P.tail
    err = np.abs(sums - 1.0)
    worst = int(np.argmax(err))
    if err[worst] > tol:
        raise AssertionError(f"row {worst} sums to {sums[worst]:.9g} (stored + tail), off 1 by more than {tol:g}")


def assert_expansion_preserves(
    before: MatrixLike, after: MatrixLike, *, max_leak: float = 0.0, tol: float = DEFAULT_TOL
) -> ExpansionCertificate:
    """Assert ``after`` extends ``before`` without changing any old transition.

    Recomputes the certificate with :func:`markovmem.verify_expansion` and fails
    with its full report unless ``certificate.ok``.  Returns the certificate.

    Parameters
    ----------
    before, after : TransitionMatrix or path
        The matrix before and after the expansion (files are loaded mapped and verified).
    max_leak : float
        For an open expansion (old states may move to new ones), the largest leak
        ``eps_v`` allowed; the default 0.0 accepts an open expansion only when no
        old row leaks.  A closed expansion must leak nothing whatever this is.
        The message of a failure names the worst row and its leak.
    tol : float
        Row-sum tolerance of the invariant checks.
    """
    cert = verify_expansion(as_matrix(before), as_matrix(after), max_leak=max_leak, tol=tol)
    if not cert.ok:
        head = "expansion does not preserve the old chain"
        if cert.open and cert.max_leak > max_leak:
            head = (
                f"open expansion leaks more than max_leak = {max_leak:g}: old row {cert.worst_leak_row} "
                f"moves {cert.max_leak:.6g} of its mass to new states "
                f"(forgetting {cert.forgetting_max_nats:.6g} nats)"
            )
        raise AssertionError(head + ":\n" + str(cert))
    return cert


def assert_same_matrix(a: MatrixLike, b: MatrixLike) -> None:
    """Assert two matrices are byte-identical (sizes, arrays and fingerprint)."""
    a, b = as_matrix(a), as_matrix(b)
    if (a.n_states, a.n_base, a.nnz) != (b.n_states, b.n_base, b.nnz):
        raise AssertionError(
            f"sizes differ: (n_states, n_base, nnz) = {(a.n_states, a.n_base, a.nnz)} vs {(b.n_states, b.n_base, b.nnz)}"
        )
    for name in ("indptr", "indices", "data", "tail"):
        x, y = getattr(a, name), getattr(b, name)
        if x.tobytes() != y.tobytes():
            differs = np.frombuffer(x.tobytes(), np.uint8) != np.frombuffer(y.tobytes(), np.uint8)
            first = int(np.flatnonzero(differs)[0]) // x.itemsize
            raise AssertionError(f"{name} differs first at position {first}: {x[first]!r} vs {y[first]!r}")
    if a.fingerprint() != b.fingerprint():  # pragma: no cover - equal bytes give equal hashes
        raise AssertionError(f"fingerprints differ: {a.fingerprint()} vs {b.fingerprint()}")
