"""Exception and warning types of markovmem."""

from __future__ import annotations

from . import _core

#: A Markov invariant is broken (a ValueError).  ``.row`` names the first
#: offending row, or is None when no single row is at fault.
InvariantError = _core.InvariantError
InvariantError.__module__ = "markovmem"


class ConvergenceWarning(RuntimeWarning):
    """An iterative method stopped at its iteration limit before its tolerance."""


class SampleSizeWarning(UserWarning):
    """A fit has fewer samples than its sparsity needs (e.g. fewer than 10 s contexts for a new token)."""


def invariant_error(message: str, row: int | None = None) -> Exception:
    """Build an InvariantError carrying ``row`` (as the core's errors do)."""
    err = InvariantError(message)
    err.row = row
    return err
