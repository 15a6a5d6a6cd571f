"""Property tests (hypothesis) of the sparse fit on small random dictionaries and targets.

Invariants: at most s nonzeros per row; mixture alpha on the simplex; logit
alpha inside the ball; the reported KL equals the objective at alpha and is
>= 0; predict() rows are distributions that P.expand accepts; the fixed-support
refit of a fit's own support does not increase its KL.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import markovmem as mm
from markovmem._fit import objective


@st.composite
def problems(draw):
    T = draw(st.integers(min_value=4, max_value=40))
    k = draw(st.integers(min_value=1, max_value=min(T - 1, 8)))  # a full row could not keep a tail
    m = draw(st.integers(min_value=1, max_value=4))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    rng = np.random.default_rng(seed)
    idx = np.argsort(rng.random((T, T)), axis=1)[:, :k]
    probs = rng.dirichlet(np.ones(k), size=T) * rng.uniform(0.3, 1.0, (T, 1))
    P = mm.TransitionMatrix.from_topk(idx, probs.astype(np.float32))
    counts = rng.poisson(rng.uniform(0.2, 3.0), (m, T)).astype(float)
    counts[np.arange(m), rng.integers(0, T, m)] += 1  # no empty row
    s = draw(st.integers(min_value=1, max_value=5))
    link = draw(st.sampled_from(["logit", "mixture"]))
    bound = draw(st.sampled_from([0.5, 10.0]))
    return P, sp.csr_array(counts), s, link, bound


@settings(max_examples=40, deadline=None)
@given(problems())
def test_fit_invariants(problem):
    P, counts, s, link, bound = problem
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # rows with few candidates are reported, not errors
            fit = mm.fit_alpha(P, counts, s=s, link=link, bound=bound)
    m = counts.shape[0]
    assert np.all(np.diff(fit.alpha.indptr) <= s)
    assert np.all(np.diff(fit.alpha.indptr) <= fit.n_candidates)
    assert np.all(fit.kl >= -1e-9)
    if link == "mixture":
        assert np.all(fit.alpha.data >= 0)
        rows = np.diff(fit.alpha.indptr) > 0
        np.testing.assert_allclose(np.asarray(fit.alpha.sum(axis=1)).ravel()[rows], 1.0, atol=1e-9)
    else:
        norms = np.sqrt(np.asarray(fit.alpha.multiply(fit.alpha).sum(axis=1)).ravel())
        assert np.all(norms <= bound * (1 + 1e-9))
    has = np.diff(fit.alpha.indptr) > 0
    if has.any():
        kl, _ = objective(P, counts[has], fit.alpha[has], link)
        np.testing.assert_allclose(kl, fit.kl[has], rtol=1e-9, atol=1e-12)
    rows = fit.predict()
    assert rows.shape == (m, P.n_base)
    assert np.all(rows.data >= 0)
    assert np.all(np.asarray(rows.sum(axis=1)).ravel() <= 1 + 1e-5)
    _, cert = P.expand(fit)
    assert cert.ok


@settings(max_examples=30, deadline=None)
@given(problems())
def test_refit_on_own_support_does_not_increase_kl(problem):
    P, counts, s, link, bound = problem
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fit = mm.fit_alpha(P, counts, s=s, link=link, bound=bound)
    has = np.diff(fit.alpha.indptr) > 0
    if not has.any():
        return
    refit = mm.fit_alpha(P, counts[has], support=fit.alpha[has], link=link, bound=bound)
    assert np.all(refit.kl <= fit.kl[has] + 1e-7 * np.maximum(1.0, fit.kl[has]))


@pytest.mark.parametrize("link", ["logit", "mixture"])
def test_thread_count_does_not_change_results_on_random_problems(link):
    rng = np.random.default_rng(5)
    T, k = 60, 6
    idx = np.argsort(rng.random((T, T)), axis=1)[:, :k]
    probs = rng.dirichlet(np.ones(k), size=T) * 0.9
    P = mm.TransitionMatrix.from_topk(idx, probs.astype(np.float32))
    counts = sp.csr_array(rng.poisson(1.0, (12, T)).astype(float) + np.eye(12, T))
    a = mm.fit_alpha(P, counts, s=4, link=link, n_threads=1, seed=3)
    b = mm.fit_alpha(P, counts, s=4, link=link, n_threads=2, seed=3)
    np.testing.assert_array_equal(a.alpha.toarray(), b.alpha.toarray())
