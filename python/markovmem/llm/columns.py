"""Two-sided evidence for a new token: what comes before it (its column) as well as what comes after it
(its row).

A new token ``u`` seen in texts carries two kinds of evidence about the old token ``v`` it behaves like:

- **its row**, the tokens that follow it, scored by ``v``'s dictionary row:
  ``sum_x C[u, x] log P[v, x]`` (:func:`row_loglik`);
- **its column**, the contexts that lead to it, scored on the reversed chain: by Bayes,
  ``p(ctx_i | next token is v) = p(v | ctx_i) p(ctx_i) / p(v)``, and with the marginal
  ``p(v) ~ c_v = sum_j p(v | ctx_j)`` over every position ``j`` of the texts this is, up to terms
  free of ``v``, ``sum_i [log p(v | ctx_i) - log c_v]`` over the contexts ``i`` just before ``u``
  (:func:`column_evidence`).

Under "``u`` behaves as ``v``" both are log-likelihoods of the same occurrences, so their sum is the
log-likelihood of both sides of each occurrence.  The row alone cannot tell apart words followed by the
same tokens ("so" and "very" before "happy"); the contexts before them can, and the base model already
knows which word it expects there.  :func:`two_sided_support` picks, per new token, the ``s`` old tokens
with the highest two-sided log-likelihood; learn_tokens fits alpha's weights on that support.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._matrix import TransitionMatrix
from .model import _require_expansion
from .selection import forward_batches, new_token_positions, occurrence_folds

__all__ = [
    "ColumnEvidence",
    "OutputInit",
    "RowLogs",
    "column_evidence",
    "output_init",
    "row_loglik",
    "two_sided_support",
]

#: Floor of a probability whose log is taken (DESIGN §1: the documented 1e-12 mass).
_FLOOR = 1e-12


@dataclass
class ColumnEvidence:
    """The contexts before each new token, as the base model reads them (see the module docstring).

    Attributes
    ----------
    log_sums : (folds, m, n_base) float32
        Per fold of :func:`~markovmem.llm.selection.occurrence_folds` and new token: the sum over its
        occurrences of ``log p(v | context just before it)``, over the old tokens ``v``.
    n : (folds, m) int64
        Occurrences summed (those with a context: not at position 0).
    totals : (n_base,) float64
        ``c_v``: the sum of ``p(v | context)`` over every position of the texts.
    """

    log_sums: np.ndarray
    n: np.ndarray
    totals: np.ndarray

    def loglik(self, tokens: Sequence[int] | np.ndarray | None = None, exclude_fold: int | None = None) -> np.ndarray:
        """(r, n_base) float64: ``sum_i [log p(v | ctx_i) - log c_v]`` for the new tokens ``tokens``
        (indices; default all), over the occurrences of every fold but ``exclude_fold``."""
        keep = [f for f in range(self.log_sums.shape[0]) if f != exclude_fold]
        rows = np.arange(self.log_sums.shape[1]) if tokens is None else np.asarray(tokens, dtype=np.int64)
        sums = np.zeros((rows.size, self.log_sums.shape[2]))
        for f in keep:  # one fold's rows at a time: no copy of every fold's (m, n_base) block
            sums += self.log_sums[f, rows]
        n = self.n[keep][:, rows].sum(0)
        return sums - n[:, None] * np.log(np.maximum(self.totals, _FLOOR))[None, :]


def column_evidence(
    model: nn.Module,
    ids: Sequence[int],
    seqs: Sequence[np.ndarray],
    *,
    folds: int = 1,
    batch_size: int = 32,
    device: Any = None,
) -> ColumnEvidence:
    """Read the contexts before every occurrence of the new tokens ``ids`` in ``seqs`` (one forward pass).

    ``model`` carries the expansion of ``ids``; ``seqs`` are token-id arrays of the texts, tokenized
    with the new tokens.  The occurrences are those of
    :func:`~markovmem.llm.selection.new_token_positions` (followed by an old token), split into
    ``folds`` as :func:`~markovmem.llm.selection.cross_fit` splits them.  The distributions are over
    the old tokens only; they are the base model's own wherever the context holds old tokens only
    (old logits are bitwise the base model's), and read earlier new tokens through their current rows.

    Memory: ``folds x m x n_base x 4`` bytes for the sums (120 MB for 100 new tokens over a
    151,936-token vocabulary with two folds).
    """
    state = _require_expansion(model)
    n_base, m = state.n_base, len(ids)
    occ = new_token_positions(seqs, ids, n_base)
    fold = occurrence_folds(occ, folds)
    at: dict[int, list[tuple[int, int, int]]] = {}
    for (j, t, i), f in zip(occ, fold, strict=True):
        if t > 0:
            at.setdefault(j, []).append((t - 1, i, int(f)))
    log_sums = np.zeros((folds, m, n_base), dtype=np.float32)
    n = np.zeros((folds, m), dtype=np.int64)
    totals = np.zeros(n_base, dtype=np.float64)
    order = [j for j in range(len(seqs)) if len(seqs[j]) >= 2]
    for chunk, logits in forward_batches(model, seqs, order, batch_size, device):
        logp = torch.log_softmax(logits[..., :n_base].float(), dim=-1)
        for r, j in enumerate(chunk):
            used = len(seqs[j]) - 1  # positions followed by a token: the contexts of the texts
            totals += logp[r, :used].exp().sum(0, dtype=torch.float64).cpu().numpy()
            for t, i, f in at.get(j, ()):
                log_sums[f, i] += logp[r, t].cpu().numpy()
                n[f, i] += 1
    return ColumnEvidence(log_sums=log_sums, n=n, totals=totals)


class RowLogs:
    """The log-rows of a dictionary, built once for any number of :meth:`loglik` calls.

    ``log P[v, x]`` is the stored entry's log, else the log of the row's tail spread over its
    unstored base states (DESIGN §1), floored at 1e-12 before the log; kept as a per-row fill
    plus a sparse correction on the stored entries, so nothing dense of size n_base^2 is built.
    """

    def __init__(self, P: TransitionMatrix) -> None:
        import scipy.sparse as sp

        n_base = P.n_base
        csr = P.to_scipy()
        if csr.shape != (n_base, n_base):
            csr = csr[:n_base, :n_base].tocsr()
        k = np.diff(csr.indptr)
        tail = np.asarray(P.tail, dtype=np.float64)[:n_base]
        self.log_fill = np.log(np.maximum(tail / np.maximum(n_base - k, 1), _FLOOR))
        rows = np.repeat(np.arange(n_base), k)
        delta = sp.csr_array(
            (np.log(np.maximum(csr.data.astype(np.float64), _FLOOR)) - self.log_fill[rows], csr.indices, csr.indptr),
            shape=(n_base, n_base),
        )
        self._delta_t = sp.csr_array(delta.T)

    def loglik(self, counts: Any) -> np.ndarray:
        """(m, n_base) float64: ``sum_x counts[u, x] log P[v, x]`` for every new token ``u`` and old token ``v``."""
        import scipy.sparse as sp

        c = sp.csr_array(counts, dtype=np.float64)
        totals = np.asarray(c.sum(axis=1)).reshape(-1)
        return totals[:, None] * self.log_fill[None, :] + (c @ self._delta_t).toarray()


def row_loglik(P: TransitionMatrix, counts: Any) -> np.ndarray:
    """(m, n_base) float64: ``sum_x counts[u, x] log P[v, x]`` for every new token ``u`` and old token ``v``.

    ``P[v, x]`` as in :class:`RowLogs`; one sparse product with the matrix.  Several calls on one
    matrix share the log-rows through ``RowLogs(P).loglik``.
    """
    return RowLogs(P).loglik(counts)


def two_sided_support(score: np.ndarray, s: int, exclude: Sequence[int] = ()) -> np.ndarray:
    """(m, s) int64: per row of ``score`` (m, n_base), the ``s`` old tokens of highest score, best first;
    the ids in ``exclude`` (special tokens) are never picked."""
    score = np.array(score, dtype=np.float64)
    if exclude:
        score[:, np.asarray(list(exclude), dtype=np.int64)] = -np.inf
    s = int(s)
    if not 1 <= s <= score.shape[1] - len(set(exclude)):
        raise ValueError(f"s is {s}; expected 1 <= s <= {score.shape[1] - len(set(exclude))} (the eligible old tokens)")
    top = np.argpartition(-score, s - 1, axis=1)[:, :s]
    order = np.argsort(-np.take_along_axis(score, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1).astype(np.int64)


@dataclass
class OutputInit:
    """Output rows of new tokens fitted as the dual of alpha (see :func:`output_init`).

    Attributes
    ----------
    support : (m, 1) int64
        Per new token, the old token whose column (the contexts that lead to it) best explains the
        new token's contexts: ``beta`` puts weight 1 on it.
    rows : (m, d) tensor
        ``W^T beta``: the support token's row of the base output head.
    bias : (m,) float64
        The new logits' bias: the maximum-likelihood value given the row, for which the expected
        number of occurrences of the token over the texts' positions equals the observed number.
    observed : (m,) int64
        Occurrences of each new token in the texts.
    """

    support: np.ndarray
    rows: torch.Tensor
    bias: np.ndarray
    observed: np.ndarray


def output_init(
    model: nn.Module,
    ids: Sequence[int],
    seqs: Sequence[np.ndarray],
    columns: ColumnEvidence,
    *,
    exclude: Sequence[int] = (),
    batch_size: int = 32,
    device: Any = None,
) -> OutputInit:
    """Output rows and biases for new tokens the model may generate: the dual of alpha.

    Alpha writes a new token's *row* (what follows it) as old rows; its *column* (which contexts
    lead to it) is written here as an old token's column: ``beta`` puts weight 1 on the old token
    ``v`` of highest column log-likelihood (``columns.loglik()``, the reversed chain's fit at
    ``s = 1``), so the new logit is ``h . W_v + b``: the new token is predicted where ``v`` is,
    scaled by ``exp(b)``.  ``b`` is the maximum-likelihood bias given that row: the one for which
    ``sum_j p(u | ctx_j)`` over every position of ``seqs`` equals the occurrences of ``u``, with
    ``p(u | ctx_j) = sigmoid(log p(v | ctx_j) + b)`` (bisection in float64; the other new tokens'
    mass is left out).  ``exclude``: ids never chosen (special tokens).
    """
    state = _require_expansion(model)
    n_base, m = state.n_base, len(ids)
    score = columns.loglik()
    support = two_sided_support(score, 1, exclude=exclude)
    head = state.output_layer.base_layer
    rows = head.weight.detach()[torch.as_tensor(support[:, 0])].clone()
    targets = np.concatenate([np.asarray(x[1:], dtype=np.int64) for x in seqs] + [np.zeros(0, np.int64)])
    index = np.full(max(int(max(ids)), int(targets.max(initial=0))) + 1, m, dtype=np.int64)
    index[np.asarray(ids, dtype=np.int64)] = np.arange(m)
    observed = np.bincount(index[targets], minlength=m + 1)[:m]  # slot m: every other token
    cols = torch.as_tensor(support[:, 0])
    parts = []
    order = [j for j in range(len(seqs)) if len(seqs[j]) >= 2]
    for chunk, logits in forward_batches(model, seqs, order, batch_size, device):
        logp = torch.log_softmax(logits[..., :n_base].float(), dim=-1)[..., cols.to(logits.device)]
        for r, j in enumerate(chunk):
            parts.append(logp[r, : len(seqs[j]) - 1].double().cpu().numpy())
    logp_all = np.concatenate(parts) if parts else np.zeros((0, m))
    bias = np.array([_ml_bias(logp_all[:, i], int(observed[i])) for i in range(m)])
    return OutputInit(support=support, rows=rows, bias=bias, observed=observed)


def _ml_bias(logp: np.ndarray, n: int) -> float:
    """``b`` with ``sum sigmoid(logp + b) = n`` (bisection; ``n`` clipped into (0, len))."""
    if logp.size == 0:
        return 0.0
    target = min(max(float(n), 0.5), logp.size - 0.5)

    def expected(b: float) -> float:
        return float(np.sum(1.0 / (1.0 + np.exp(-(logp + b)))))

    lo, hi = -60.0, 60.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if expected(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
