"""Held-out scoring of new-token rows by cross-fitting: the occurrences of each new token are split
into folds; alpha is fitted on the other folds' next-token counts and E^T alpha is scored by the model's
loss right after the token on the held-out fold.  learn_tokens uses it to report the held-out gain of
E^T alpha over the mean init, and with ``link='auto'`` to choose link and s per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .model import _require_expansion, alpha_to_embeddings, set_embeddings

__all__ = ["CrossFit", "cross_fit", "forward_batches", "new_token_positions", "occurrence_folds", "position_losses"]


def forward_batches(
    model: nn.Module, seqs: Sequence[np.ndarray], order: Sequence[int], batch_size: int = 32, device: Any = None
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Logits of the sequences ``order`` names, right-padded into batches: yields (chunk, logits).

    ``chunk`` lists the sequence indices of the batch, in row order; ``logits`` is
    (len(chunk), longest, vocabulary).  Runs under ``torch.no_grad`` in eval mode.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for a in range(0, len(order), batch_size):
                chunk = [int(j) for j in order[a : a + batch_size]]
                length = max(len(seqs[j]) for j in chunk)
                ids = np.zeros((len(chunk), length), dtype=np.int64)
                attend = np.zeros_like(ids)
                for r, j in enumerate(chunk):
                    ids[r, : len(seqs[j])] = seqs[j]
                    attend[r, : len(seqs[j])] = 1
                logits = model(
                    input_ids=torch.as_tensor(ids, device=dev),
                    attention_mask=torch.as_tensor(attend, device=dev),
                    use_cache=False,
                ).logits
                yield chunk, logits
    finally:
        model.train(was_training)


def position_losses(
    model: nn.Module,
    seqs: Sequence[np.ndarray],
    positions: Sequence[tuple[int, int]],
    batch_size: int = 32,
    device: Any = None,
) -> np.ndarray:
    """Next-token loss ``-log p(seq[t + 1] | seq[:t + 1])`` (nats) at each ``(sequence, t)`` of ``positions``.

    Sequences are right-padded into batches of ``batch_size``; only the sequences named in
    ``positions`` are run.  Returns a float64 array aligned with ``positions``.
    """
    out = np.zeros(len(positions))
    by_seq: dict[int, list[tuple[int, int]]] = {}
    for k, (j, t) in enumerate(positions):
        by_seq.setdefault(int(j), []).append((k, int(t)))
    for chunk, logits in forward_batches(model, seqs, sorted(by_seq), batch_size, device):
        rows, cols, nxt, where = [], [], [], []
        for r, j in enumerate(chunk):
            for k, t in by_seq[j]:
                rows.append(r)
                cols.append(t)
                nxt.append(int(seqs[j][t + 1]))
                where.append(k)
        picked = logits[torch.as_tensor(rows), torch.as_tensor(cols)].float()
        loss = torch.logsumexp(picked, -1) - picked[torch.arange(len(rows)), torch.as_tensor(nxt)]
        out[np.asarray(where)] = loss.cpu().numpy()
    return out


@dataclass
class CrossFit:
    """Held-out losses of candidate fits, per new token.

    Attributes
    ----------
    candidates : list of (str, int)
        The (link, s) pairs scored.
    loss : (n_candidates, m) float64
        Mean held-out loss right after each token with E^T alpha fitted on the other folds
        (NaN where a token has fewer than two occurrences).
    mean_loss : (m,) float64
        The same positions scored with the mean base embedding as the token's row.
    n_heldout : (m,) int64
        Held-out positions per token (each occurrence is held out once).
    """

    candidates: list[tuple[str, int]]
    loss: np.ndarray
    mean_loss: np.ndarray
    n_heldout: np.ndarray

    def best(self, default: int = 0) -> list[int]:
        """Index of the candidate with the lowest held-out loss per token (``default`` where none is finite);
        ties go to the earlier candidate."""
        out = []
        for i in range(self.loss.shape[1]):
            col = self.loss[:, i]
            out.append(int(np.nanargmin(col)) if np.isfinite(col).any() else default)
        return out


def new_token_positions(seqs: Sequence[np.ndarray], ids: Sequence[int], n_base: int) -> list[tuple[int, int, int]]:
    """(sequence, position, index into ``ids``) of every occurrence of a new token followed by a base token."""
    index = {int(t): i for i, t in enumerate(ids)}
    out = []
    for j, s in enumerate(seqs):
        for t in range(len(s) - 1):
            i = index.get(int(s[t]))
            if i is not None and int(s[t + 1]) < n_base:
                out.append((j, t, i))
    return out


def occurrence_folds(occurrences: Sequence[tuple[int, int, int]], folds: int) -> np.ndarray:
    """Fold of each occurrence of :func:`new_token_positions`: a token's k-th occurrence goes to fold ``k % folds``."""
    seen: dict[int, int] = {}
    out = np.zeros(len(occurrences), dtype=np.int64)
    for k, (_, _, i) in enumerate(occurrences):
        n = seen.get(i, 0)
        out[k] = n % folds
        seen[i] = n + 1
    return out


def cross_fit(
    model: nn.Module,
    ids: Sequence[int],
    seqs: Sequence[np.ndarray],
    fit: Callable[..., Any],
    candidates: Sequence[tuple[str, int]],
    *,
    folds: int = 2,
    device: Any = None,
) -> CrossFit:
    """Score each candidate (link, s) on held-out occurrences of every new token (see the module docstring).

    ``fit(counts, link, s, tokens, fold)`` returns an AlphaFit for an (r, n_base) CSR of counts: the
    next-token counts of the new tokens ``tokens`` (indices into ``ids``) over every fold but ``fold``
    (:func:`occurrence_folds` assigns them).  The new rows of ``model`` are overwritten; the caller
    writes the final rows afterwards.
    """
    import scipy.sparse as sp

    state = _require_expansion(model)
    n_base, m = state.n_base, len(ids)
    occ = new_token_positions(seqs, ids, n_base)
    fold_of = occurrence_folds(occ, folds)
    seen = np.bincount(np.array([i for _, _, i in occ], dtype=np.int64), minlength=m)
    tok = np.array([i for _, _, i in occ], dtype=np.int64)
    nxt = np.array([int(seqs[j][t + 1]) for j, t, _ in occ], dtype=np.int64)
    positions = [(j, t) for j, t, _ in occ]
    weight = state.input_layer.base_layer.weight.detach()
    mean_row = weight[:n_base].mean(0, keepdim=True).repeat(m, 1)
    set_embeddings(model, ids, mean_row)
    mean_at = position_losses(model, seqs, positions, device=device)
    loss = np.full((len(candidates), m), np.nan)
    valid = seen >= 2
    for c, (link, s) in enumerate(candidates):
        sums = np.zeros(m)
        for f in range(folds):
            train = fold_of != f
            counts = sp.csr_array((np.ones(int(train.sum())), (tok[train], nxt[train])), shape=(m, n_base))
            counts.sum_duplicates()
            rows_ok = np.flatnonzero(np.diff(counts.indptr) > 0)
            rows = mean_row.clone()
            if rows_ok.size:
                sub = fit(sp.csr_array(counts[rows_ok]), link, s, rows_ok, f)
                rows[torch.as_tensor(rows_ok)] = alpha_to_embeddings(model, sub.alpha).to(rows.dtype)
            set_embeddings(model, ids, rows)
            held = np.flatnonzero(fold_of == f)
            if held.size:
                got = position_losses(model, seqs, [positions[k] for k in held], device=device)
                np.add.at(sums, tok[held], got)
        loss[c] = np.where(valid, sums / np.maximum(seen, 1), np.nan)
    mean_loss = np.zeros(m)
    np.add.at(mean_loss, tok, mean_at)
    mean_loss = np.where(seen > 0, mean_loss / np.maximum(seen, 1), np.nan)
    return CrossFit(list(candidates), loss, mean_loss, seen)
