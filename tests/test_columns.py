"""Two-sided evidence (markovmem.llm.columns): each piece against a direct computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import scipy.sparse as sp

import markovmem as mm
from markovmem import llm
from markovmem.llm.columns import column_evidence, row_loglik, two_sided_support
from markovmem.llm.selection import new_token_positions, occurrence_folds
from markovmem.llm.testing import tiny_model, tiny_tokenizer

V = 40


def _dense_rows(P: mm.TransitionMatrix) -> np.ndarray:
    """Every row over the base states with its tail spread over the unstored ones (DESIGN §1)."""
    n = P.n_base
    csr = P.to_scipy()
    out = np.zeros((n, n))
    for v in range(n):
        a, b = csr.indptr[v], csr.indptr[v + 1]
        k = b - a
        out[v, :] = float(P.tail[v]) / (n - k) if k < n else 0.0
        out[v, csr.indices[a:b]] = csr.data[a:b]
    return out


def test_row_loglik_is_the_log_likelihood_of_the_counts_under_each_row():
    rng = np.random.default_rng(0)
    k = 6
    idx = np.stack([rng.choice(V, k, replace=False) for _ in range(V)])
    probs = rng.dirichlet(np.ones(k), V) * rng.uniform(0.5, 1.0, (V, 1))  # tails of 0 .. 0.5
    P = mm.TransitionMatrix.from_topk(idx.astype(np.int32), probs.astype(np.float32))
    counts = sp.csr_array(rng.poisson(0.4, (3, V)).astype(np.float64))
    dense = _dense_rows(P)
    expect = counts.toarray() @ np.log(np.maximum(dense, 1e-12)).T
    np.testing.assert_allclose(row_loglik(P, counts), expect, rtol=1e-5, atol=1e-4)


def test_column_evidence_reads_the_base_model_before_each_occurrence():
    model = tiny_model("llama", V)
    base = copy.deepcopy(model)
    tok = tiny_tokenizer(V)
    ids = llm.add_tokens(model, tok, ["glorp", "blip"])
    seqs = [
        np.array([1, 5, 6, V, 7, 8, 9]),
        np.array([1, 11, V + 1, 12, 5]),
        np.array([V, 4, 5]),  # at position 0: no context, not summed
        np.array([1, 9, V + 1]),  # not followed by a base token: not an occurrence
        np.array([1, 5, V, 6]),
    ]
    ev = column_evidence(model, ids, seqs, folds=2)
    occ = new_token_positions(seqs, ids, V)
    fold = occurrence_folds(occ, 2)
    log_sums = np.zeros((2, 2, V))
    n = np.zeros((2, 2), dtype=np.int64)
    totals = np.zeros(V)
    with torch.no_grad():
        for (j, t, i), f in zip(occ, fold, strict=True):
            if t == 0:
                continue
            logits = base(torch.as_tensor(seqs[j][:t])[None]).logits[0, -1].double()
            log_sums[f, i] += torch.log_softmax(logits, -1).numpy()
            n[f, i] += 1
        for s in seqs:  # the positions whose context holds old tokens only
            old = int(np.argmax(s >= V)) if (s >= V).any() else len(s)
            used = min(old, len(s) - 1)
            if used:
                probs = torch.softmax(base(torch.as_tensor(s[:used])[None]).logits[0].double(), -1)
                totals += probs.sum(0).numpy()
    np.testing.assert_array_equal(ev.n, n)
    assert ev.n.tolist() == [[2, 1], [0, 0]]  # glorp at t = 3 and t = 2 (fold 0; t = 0 skipped), blip at t = 2
    np.testing.assert_allclose(ev.log_sums, log_sums, rtol=1e-5, atol=1e-4)
    # totals cover every position followed by a token: each adds a distribution over the old tokens,
    # and the positions with old-only contexts add the base model's
    assert ev.totals.shape == (V,) and np.all(ev.totals > 0)
    assert ev.totals.sum() == pytest.approx(sum(len(s) - 1 for s in seqs), rel=1e-6)
    assert np.all(ev.totals >= totals - 1e-6)
    both = ev.loglik()
    np.testing.assert_allclose(both, log_sums.sum(0) - n.sum(0)[:, None] * np.log(ev.totals), rtol=1e-5, atol=1e-4)
    only_fold1 = ev.loglik([0], exclude_fold=0)
    np.testing.assert_allclose(only_fold1[0], log_sums[1, 0] - n[1, 0] * np.log(ev.totals), rtol=1e-5, atol=1e-4)


def test_two_sided_support_picks_the_best_scores_and_skips_excluded_ids():
    score = np.array([[0.0, 5.0, 1.0, 9.0, 2.0], [3.0, 2.0, 1.0, 0.0, -1.0]])
    np.testing.assert_array_equal(two_sided_support(score, 2), [[3, 1], [0, 1]])
    np.testing.assert_array_equal(two_sided_support(score, 2, exclude=[3, 0]), [[1, 4], [1, 2]])
    with pytest.raises(ValueError, match="s is 5; expected 1 <= s <= 4"):
        two_sided_support(score, 5, exclude=[0])


def test_learn_tokens_two_sided_support_is_the_best_singleton_and_row_evidence_is_an_option():
    model = tiny_model("llama", V)
    tok = tiny_tokenizer(V)
    rng = np.random.default_rng(1)
    texts = [f"w{rng.integers(3, V)} w5 glorp w7 w{rng.integers(3, V)}" for _ in range(24)]
    res = llm.learn_tokens(model, tok, ["glorp"], texts, tune_steps=0, top_k=8, progress=False)
    # The support is the old token of highest two-sided log-likelihood (special tokens excluded).
    seqs = [np.asarray(tok(t)["input_ids"]) for t in texts]
    ev = column_evidence(model, res.ids, seqs)
    score = row_loglik(res.matrix, res.counts) + ev.loglik()
    score[:, :3] = -np.inf
    assert res.alpha.indices.tolist() == [int(np.argmax(score[0]))]
    assert res.config.evidence == "two-sided"
    row = llm.learn_tokens(
        tiny_model("llama", V),
        tiny_tokenizer(V),
        ["glorp"],
        texts,
        tune_steps=0,
        top_k=8,
        evidence="row",
        progress=False,
    )
    assert row.config.evidence == "row" and row.alpha.nnz == 1
    with pytest.raises(ValueError, match="evidence is 'left'"):
        llm.LearnTokensConfig(evidence="left")
