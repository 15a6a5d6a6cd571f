"""Expansion certificates: proof, recomputed from two matrices, that an
expansion kept every old transition and sent no old mass to new states, or,
for an open expansion, exactly how much mass each old state now sends there."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from . import _core
from ._matrix import DEFAULT_TOL, TransitionMatrix, _max_leak, _threads, _tol

__all__ = ["ExpansionCertificate", "verify_expansion"]


@dataclass(frozen=True)
class ExpansionCertificate:
    """What :func:`verify_expansion` measured for ``before -> after``.

    ``ok`` is True exactly when every figure is what an exact expansion
    requires (DESIGN §1): the old block is byte-identical, no old row moves to
    a new state, new rows are distributions over base states only.

    For an *open* expansion (``open``: ``after`` lets old states move to new
    ones, see :meth:`TransitionMatrix.expand` with ``incoming``) ``ok`` requires
    instead of a zero leak: the old stored bytes identical, every leak
    ``eps_v < 1`` put on new states only, and ``max_leak <= leak_bound`` when a
    bound was given.  What it then proves: for every old state ``v`` and old
    state ``x``, ``p_after(x | v) = (1 - eps_v) p_before(x | v)`` exactly, so the
    forgetting of row ``v``, ``KL(p_before(.|v) || p_after(.|v))`` over the old
    states, is ``-log(1 - eps_v)`` nats, reported as ``forgetting_max_nats``.

    Attributes
    ----------
    n_old, n_new, n_base : int
        States before, states added, base states.
    same_n_base : bool
        ``after.n_base == before.n_base`` (otherwise old tails would spread onto new states).
    old_block_identical : bool
        Rows ``[0, n_old)`` of ``after`` equal ``before`` byte for byte (indptr, indices, data, tail).
    max_abs_diff_old : float
        max |p_after(x|v) - p_before(x|v)| over old v and old x, tail included, of the
        stored rows (for an open expansion: the distributions given an old next state) (0.0 required).
    leaked_mass_to_new : float
        Largest mass an old row of ``after`` puts on the new states (0.0 required for a
        closed expansion; equal to ``max_leak`` for an open one).
    new_to_new_mass : float
        Largest mass a new row puts on states ``>= n_base`` (0.0 required).
    max_row_sum_error : float
        max |stored + tail - 1| over every row of ``after``.
    fingerprint_before, fingerprint_after_old, fingerprint_after : str
        Fingerprints of ``before``, of the first ``n_old`` rows of ``after`` (equal
        to ``fingerprint_before`` for an exact expansion) and of all of ``after``.
    after_valid : bool
        The rows of ``after`` the check covers pass every invariant (the new rows
        when the old block is identical, else every row).
    after_violation : str
        The first broken invariant, empty when ``after_valid``.
    ok : bool
        Every figure holds as an exact (or, for an open expansion, a bounded-leak) expansion requires.
    open : bool
        ``after`` carries old->new blocks ``before`` does not (an open expansion).
    max_leak, mean_leak : float
        Largest and mean ``eps_v`` over the old rows: the mass each moves to the new
        states (0.0 for a closed expansion).  Per row: ``after.leak`` for a closed ``before``.
    worst_leak_row : int
        An old row with the largest leak (-1 when no row leaks).
    forgetting_max_nats, forgetting_mean_nats : float
        Largest and mean ``-log(1 - eps_v)`` over the old rows: exactly the per-row
        KL(p_before(.|v) || p_after(.|v)) over the old states.
    leak_bound : float or None
        The ``max_leak`` the check was asked to enforce (None: no bound).
    """

    n_old: int
    n_new: int
    n_base: int
    same_n_base: bool
    old_block_identical: bool
    max_abs_diff_old: float
    leaked_mass_to_new: float
    new_to_new_mass: float
    max_row_sum_error: float
    fingerprint_before: str
    fingerprint_after_old: str
    fingerprint_after: str
    after_valid: bool
    after_violation: str
    ok: bool
    # Open expansion figures (after ``ok`` so the closed certificate's fields keep their order).
    open: bool
    max_leak: float
    mean_leak: float
    worst_leak_row: int
    forgetting_max_nats: float
    forgetting_mean_nats: float
    leak_bound: float | None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ExpansionCertificate:
        """Build from a mapping with exactly the field names (as the core returns)."""
        names = {f.name for f in fields(cls)}
        missing = names - set(values)
        if missing:
            raise ValueError(f"certificate is missing {sorted(missing)}")
        out = {k: values[k] for k in names}
        if out["leak_bound"] is not None and out["leak_bound"] == float("inf"):
            out["leak_bound"] = None  # no bound; None keeps to_dict() valid JSON
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every figure (JSON-serialisable)."""
        return asdict(self)

    def failures(self) -> list[str]:
        """Human-readable reasons ``ok`` is False (empty when it is True)."""
        out = []
        if not self.same_n_base:
            out.append("n_base changed: old tails would spread onto new states")
        if not self.old_block_identical:
            out.append("old rows are not byte-identical")
        if self.max_abs_diff_old != 0.0:
            out.append(f"old transition probabilities changed by up to {self.max_abs_diff_old:.3g}")
        if self.open:
            if self.leak_bound is not None and self.max_leak > self.leak_bound:
                out.append(
                    f"old row {self.worst_leak_row} leaks {self.max_leak:.6g} to new states, "
                    f"above max_leak = {self.leak_bound:.6g}"
                )
        elif self.leaked_mass_to_new != 0.0:
            out.append(f"an old row puts mass {self.leaked_mass_to_new:.3g} on new states")
        if self.new_to_new_mass != 0.0:
            out.append(f"a new row puts mass {self.new_to_new_mass:.3g} on states >= n_base")
        if self.fingerprint_before != self.fingerprint_after_old:
            out.append("fingerprint of the old block changed")
        if not self.after_valid:
            out.append(f"expanded matrix is invalid: {self.after_violation}")
        if self.ok and out:  # pragma: no cover - the core and this list disagree
            out.append("(the core reported ok)")
        if not self.ok and not out:
            out.append(f"a row's stored mass plus tail is off 1 by {self.max_row_sum_error:.3g}")
        return out

    def __str__(self) -> str:
        status = "OK" if self.ok else "FAILED: " + "; ".join(self.failures())
        rows = [
            ("states", f"{self.n_old} -> {self.n_old + self.n_new} (+{self.n_new}), n_base {self.n_base}"),
            ("old block byte-identical", str(self.old_block_identical)),
            ("max |delta p| on old rows", f"{self.max_abs_diff_old:.3g}"),
            ("mass leaked old -> new", f"{self.leaked_mass_to_new:.3g}"),
            *(
                [
                    ("open expansion: max leak", f"{self.max_leak:.6g} (row {self.worst_leak_row})"),
                    ("open expansion: mean leak", f"{self.mean_leak:.6g}"),
                    ("forgetting max (nats)", f"{self.forgetting_max_nats:.6g}"),
                    ("forgetting mean (nats)", f"{self.forgetting_mean_nats:.6g}"),
                    ("leak bound", "none" if self.leak_bound is None else f"{self.leak_bound:.6g}"),
                ]
                if self.open
                else []
            ),
            ("mass new -> new", f"{self.new_to_new_mass:.3g}"),
            ("max row-sum error", f"{self.max_row_sum_error:.3g}"),
            ("fingerprint before", self.fingerprint_before),
            ("fingerprint after (old rows)", self.fingerprint_after_old),
            ("fingerprint after (all)", self.fingerprint_after),
            ("certificate", status),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def verify_expansion(
    before: TransitionMatrix,
    after: TransitionMatrix,
    *,
    max_leak: float | None = None,
    tol: float = DEFAULT_TOL,
    n_threads: int | None = None,
) -> ExpansionCertificate:
    """Recompute the expansion certificate from two matrices, whatever produced ``after``.

    Compares the first ``before.n_states`` rows of ``after`` with ``before`` byte
    for byte, measures the mass old rows put on new states and new rows put on
    states ``>= n_base``, row-sum errors, and fingerprints.  O(nnz) at most;
    when the old block is identical only the new rows are scanned beyond a memcmp
    and two hashes.  An open expansion (``after`` carries old->new blocks, see
    :meth:`TransitionMatrix.expand`) is certified by its leak: old stored bytes
    identical, each old row's leak ``eps_v`` and forgetting ``-log(1 - eps_v)``
    measured from ``after``'s blocks (not taken from any input), and with
    ``max_leak`` the largest leak must not exceed it for ``ok``.

    Parameters
    ----------
    before, after : TransitionMatrix
        The matrix before and after the expansion(s).
    max_leak : float, optional
        For an open expansion, the largest leak ``ok`` allows (None: any leak < 1).
    tol : float
        Row-sum tolerance of the invariant checks.

    Raises
    ------
    TypeError
        An argument is not a TransitionMatrix.
    ValueError
        ``after`` has fewer states than ``before``, or ``max_leak`` is negative.
    """
    for name, m in (("before", before), ("after", after)):
        if not isinstance(m, TransitionMatrix):
            raise TypeError(f"{name} must be a markovmem.TransitionMatrix; got {type(m).__name__}")
    return ExpansionCertificate.from_dict(
        _core.verify_expansion(before._m, after._m, _tol(tol), _threads(n_threads), _max_leak(max_leak))
    )
