"""markovmem: an LLM's memory as a sparse Markov transition matrix.

Grow the matrix with new tokens while certifying that nothing old changed.
"""

from __future__ import annotations

try:
    from . import _core
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "markovmem's compiled core (markovmem._core) is missing; reinstall with "
        "`pip install .` from a source checkout so the extension is built"
    ) from exc

from ._errors import ConvergenceWarning, DistributedError, InvariantError, SampleSizeWarning
from ._expansion import ExpansionCertificate, verify_expansion
from ._fit import AlphaFit, closed_form_alpha, fit_alpha
from ._matrix import Row, TransitionMatrix
from ._topk import softmax_topk

__version__ = getattr(_core, "__version__", "0.0.0")

__all__ = [
    "AlphaFit",
    "ConvergenceWarning",
    "DistributedError",
    "ExpansionCertificate",
    "InvariantError",
    "Row",
    "SampleSizeWarning",
    "TransitionMatrix",
    "__version__",
    "closed_form_alpha",
    "fit_alpha",
    "softmax_topk",
    "verify_expansion",
]
