"""Exception and warning types of markovmem."""

from __future__ import annotations

from . import _core

#: A Markov invariant is broken (a ValueError).  ``.row`` names the first
#: offending row, or is None when no single row is at fault.
InvariantError = _core.InvariantError
InvariantError.__module__ = "markovmem"


class ConvergenceWarning(RuntimeWarning):
    """An iterative method stopped at its iteration limit before its tolerance."""


class DistributedError(RuntimeError):
    """A rank of a distributed run failed, or lost contact with the others.

    Every rank raises it, with the failing rank's number, exception type and message;
    on the rank where the error happened, the original exception is its ``__cause__``.
    """


class SampleSizeWarning(UserWarning):
    """A fit has fewer samples than its sparsity needs (e.g. fewer than 10 s contexts for a new token)."""


def invariant_error(message: str, row: int | None = None) -> Exception:
    """Build an InvariantError carrying ``row`` (as the core's errors do)."""
    err = InvariantError(message)
    err.row = row
    return err
