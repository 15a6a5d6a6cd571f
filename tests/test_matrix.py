"""TransitionMatrix: constructors, queries against dense numpy references
(tail rule included), counting, chain operations, sampling, fingerprint and
pickling, and every bad-input kind of the public constructors and queries."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import dense_of, dense_reference, random_csr

import markovmem as mm

CHAIN4_FINGERPRINT = "6122d7bb495e0b4c"


def raw(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def same_bytes(P: mm.TransitionMatrix, Q: mm.TransitionMatrix) -> bool:
    return all(raw(getattr(P, n)) == raw(getattr(Q, n)) for n in ("indptr", "indices", "data", "tail"))


# ---------------------------------------------------------------- constructors and storage


def test_chain4_storage(chain4):
    P = chain4
    assert (P.n_states, P.n_base, P.shape, P.nnz) == (4, 4, (4, 4), 4)
    assert P.indptr.dtype == np.int64 and P.indices.dtype == np.int32
    assert P.data.dtype == np.float32 and P.tail.dtype == np.float64
    np.testing.assert_array_equal(P.indptr, [0, 2, 3, 4, 4])
    np.testing.assert_array_equal(P.indices, [0, 1, 2, 0])
    np.testing.assert_array_equal(P.data, np.float32([0.5, 0.25, 1.0, 0.1]))
    np.testing.assert_allclose(P.tail, [0.25, 0.0, 1 - float(np.float32(0.1)), 1.0], rtol=0, atol=1e-15)
    assert P.nbytes == 5 * 8 + 4 * 8 + 4 * (4 + 4)
    assert P.metadata == {}
    assert repr(P).startswith("TransitionMatrix(n_states=4, n_base=4, nnz=4")


@pytest.mark.parametrize(
    "convert",
    [sp.csr_array, sp.csr_matrix, sp.csc_array, sp.coo_array, sp.lil_array, np.asarray, lambda d: d.tolist()],
    ids=["csr_array", "csr_matrix", "csc", "coo", "lil", "dense", "list"],
)
def test_from_scipy_any_format_gives_same_matrix(rng, convert):
    ref = random_csr(rng, 7)
    dense = ref.toarray().astype(np.float64)
    P = mm.TransitionMatrix.from_scipy(convert(dense))
    Q = mm.TransitionMatrix.from_scipy(ref)
    assert same_bytes(P, Q)
    assert P.fingerprint() == Q.fingerprint()


def test_from_scipy_coo_duplicates_are_summed():
    coo = sp.coo_array((np.array([0.25, 0.25, 0.5]), ([0, 0, 1], [1, 1, 0])), shape=(2, 2))
    P = mm.TransitionMatrix.from_scipy(coo)
    assert P.prob(0, 1) == 0.5
    assert P.prob(0, 0) == 0.5  # tail 0.5 on the single free state


def test_from_scipy_n_base_and_tail_skips_new_states():
    dense = np.zeros((4, 4))
    dense[0, 0] = 0.4
    dense[3, 1] = 1.0
    P = mm.TransitionMatrix.from_scipy(dense, n_base=2)
    assert (P.n_states, P.n_base) == (4, 2)
    assert P.prob(0, 1) == pytest.approx(0.6)  # whole tail on the one free base state
    assert P.prob(0, 2) == 0.0 and P.prob(0, 3) == 0.0
    assert P.prob(1, 0) == P.prob(1, 1) == pytest.approx(0.5)  # empty row: uniform over base
    np.testing.assert_allclose(P.to_dense().sum(axis=1), 1.0)


def test_from_scipy_explicit_zero_is_stored_not_tail():
    csr = sp.csr_array((np.float32([0.0, 0.5]), np.int32([1, 2]), np.array([0, 2, 2, 2])), shape=(3, 3))
    P = mm.TransitionMatrix.from_scipy(csr)
    assert P.nnz == 2
    assert P.prob(0, 1) == 0.0
    assert P.prob(0, 0) == 0.5  # the tail goes only to the one unstored state


def test_from_scipy_tol_allows_small_excess():
    dense = np.array([[0.5, 0.500004], [1.0, 0.0]])
    P = mm.TransitionMatrix.from_scipy(dense)
    assert P.tail[0] == 0.0
    with pytest.raises(mm.InvariantError, match="above 1"):
        mm.TransitionMatrix.from_scipy(dense, tol=1e-7)


def test_from_topk_sorts_each_row_and_matches_from_scipy():
    idx = np.array([[2, 0], [1, 3], [3, 2], [0, 1]])
    pr = np.array([[0.2, 0.3], [0.5, 0.5], [0.1, 0.6], [0.0, 0.25]])
    P = mm.TransitionMatrix.from_topk(idx, pr)
    dense = np.zeros((4, 4), dtype=np.float32)
    for v in range(4):
        dense[v, idx[v]] = pr[v]
    np.testing.assert_array_equal(P.indices, [0, 2, 1, 3, 2, 3, 0, 1])
    np.testing.assert_array_equal(P.data, np.float32([0.3, 0.2, 0.5, 0.5, 0.6, 0.1, 0.0, 0.25]))
    np.testing.assert_allclose(P.to_dense(), dense_reference(4, 4, P.indptr, P.indices, P.data), rtol=1e-12)
    assert P.prob(3, 0) == 0.0  # a stored zero is not tail
    assert P.prob(3, 2) == pytest.approx(0.375)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.int8])
def test_from_topk_index_dtypes_agree(dtype):
    idx = np.array([[1, 0], [0, 2], [2, 1]])
    pr = np.float32([[0.5, 0.25], [0.1, 0.2], [0.3, 0.7]])
    base = mm.TransitionMatrix.from_topk(idx.astype(np.int64), pr)
    assert mm.TransitionMatrix.from_topk(idx.astype(dtype), pr).fingerprint() == base.fingerprint()
    assert (
        mm.TransitionMatrix.from_topk(idx.astype(np.int64), pr.astype(np.float64)).fingerprint() == base.fingerprint()
    )


def test_from_topk_k0_is_uniform():
    P = mm.TransitionMatrix.from_topk(np.zeros((3, 0), dtype=np.int64), np.zeros((3, 0)))
    assert P.nnz == 0
    np.testing.assert_allclose(P.to_dense(), np.full((3, 3), 1 / 3))


def test_from_topk_n_base():
    P = mm.TransitionMatrix.from_topk(np.array([[0], [1], [0]]), np.array([[0.5], [0.5], [1.0]]), n_base=2)
    assert (P.n_states, P.n_base) == (3, 2)
    np.testing.assert_allclose(P.to_dense(), [[0.5, 0.5, 0], [0.5, 0.5, 0], [1, 0, 0]])


# ---------------------------------------------------------------- queries vs numpy


def test_row_views(chain4):
    r = chain4.row(0)
    assert isinstance(r, mm.Row)
    np.testing.assert_array_equal(r.indices, [0, 1])
    np.testing.assert_array_equal(r.probs, np.float32([0.5, 0.25]))
    assert r.tail == 0.25
    assert np.shares_memory(r.indices, chain4.indices) and np.shares_memory(r.probs, chain4.data)
    assert not r.indices.flags.writeable and not r.probs.flags.writeable
    empty = chain4.row(np.int64(3))
    assert empty.indices.size == 0 and empty.tail == 1.0


def test_prob_scalar_matches_dense_reference(chain4):
    ref = dense_of(chain4)
    for v in range(4):
        for x in range(4):
            p = chain4.prob(v, x)
            assert isinstance(p, float)
            assert p == pytest.approx(ref[v, x], rel=1e-12, abs=1e-15)
            assert chain4.log_prob(v, x) == pytest.approx(np.log(max(ref[v, x], 1e-12)), rel=1e-12)
    assert chain4.prob(0, 2) == 0.125 and chain4.prob(3, 1) == 0.25


def test_prob_vectorised_and_broadcast(rng):
    P = mm.TransitionMatrix.from_scipy(random_csr(rng, 9, full_rows=True))
    ref = dense_of(P)
    v = rng.integers(0, 9, size=(5, 1))
    x = rng.integers(0, 9, size=(1, 4))
    out = P.prob(v, x)
    assert out.shape == (5, 4) and out.dtype == np.float64
    np.testing.assert_allclose(out, ref[v, x], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(P.log_prob(v, x), np.log(np.maximum(ref[v, x], 1e-12)), rtol=1e-12)
    vv, xx = np.meshgrid(np.arange(9), np.arange(9), indexing="ij")
    np.testing.assert_allclose(P.prob(vv.astype(np.int32), xx.astype(np.uint8)), ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(P.prob(2, np.arange(9)), ref[2], rtol=1e-12, atol=1e-15)
    assert P.prob(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).shape == (0,)


def test_log_prob_floor():
    P = mm.TransitionMatrix.from_scipy(np.array([[1.0, 0.0], [0.5, 0.5]]))
    assert P.prob(0, 1) == 0.0
    assert P.log_prob(0, 1) == np.log(1e-12)
    assert P.log_prob(np.array([0, 0]), np.array([0, 1])).tolist() == [0.0, np.log(1e-12)]


def test_prob_on_expanded_matrix(expanded6):
    _, Q = expanded6
    ref = dense_of(Q)
    assert Q.n_base == 4 and Q.n_states == 6
    vv, xx = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    np.testing.assert_allclose(Q.prob(vv, xx), ref, rtol=1e-12, atol=1e-15)
    assert np.all(Q.prob(vv, xx)[:, 4:] == 0.0)  # states >= n_base get no tail mass
    np.testing.assert_allclose(Q.prob(5, np.arange(4)), [0.2, 0.8 / 3, 0.8 / 3, 0.8 / 3], rtol=1e-6)


def test_to_dense_matches_reference_and_sums_to_one(rng):
    P = mm.TransitionMatrix.from_scipy(random_csr(rng, 12, density=0.3))
    np.testing.assert_allclose(P.to_dense(), dense_of(P), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(P.to_dense().sum(axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds max_states = 5"):
        P.to_dense(max_states=5)


def test_to_scipy_shares_memory_and_holds_stored_entries(chain4):
    A = chain4.to_scipy()
    assert isinstance(A, sp.csr_array) and A.shape == (4, 4) and A.dtype == np.float32
    assert np.shares_memory(A.data, chain4.data)
    assert np.shares_memory(A.indices, chain4.indices)
    np.testing.assert_array_equal(A.indptr, chain4.indptr)
    dense = np.zeros((4, 4), dtype=np.float32)
    dense[0, :2] = [0.5, 0.25]
    dense[1, 2] = 1.0
    dense[2, 0] = 0.1
    np.testing.assert_array_equal(A.toarray(), dense)
    np.testing.assert_allclose(A @ np.ones(4), dense.sum(axis=1))
    np.testing.assert_allclose(A.sum(axis=1) + chain4.tail, 1.0)
    with pytest.raises(ValueError, match="read-only"):
        A.data[0] = 0.0


@pytest.mark.parametrize("name", ["indptr", "indices", "data", "tail"])
def test_array_views_are_read_only_and_zero_copy(chain4, name):
    a = getattr(chain4, name)
    assert not a.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        a[0] = 0
    with pytest.raises(ValueError, match="WRITEABLE"):
        a.flags.writeable = True
    assert np.shares_memory(a, getattr(chain4, name))


def test_views_outlive_the_matrix():
    P = mm.TransitionMatrix.from_scipy(np.array([[0.25, 0.75], [1.0, 0.0]]))
    data, row = P.data, P.row(0)
    del P
    np.testing.assert_array_equal(data, np.float32([0.25, 0.75, 1.0]))
    assert row.probs.tolist() == [0.25, 0.75]


# ---------------------------------------------------------------- chain operations


def test_step_matches_dense(rng):
    P = mm.TransitionMatrix.from_scipy(random_csr(rng, 10, density=0.3))
    Q, _ = P.expand(np.eye(3, 10) * 0.5)
    for M in (P, Q):
        d = rng.random(M.n_states)
        d /= d.sum()
        np.testing.assert_allclose(M.step(d), d @ dense_of(M), rtol=1e-12, atol=1e-15)
        signed = rng.standard_normal(M.n_states)  # step is linear, not only for distributions
        np.testing.assert_allclose(M.step(signed), signed @ dense_of(M), rtol=1e-10, atol=1e-12)
        assert M.step(d).sum() == pytest.approx(1.0)
        assert M.step(d, n_threads=2).tolist() == M.step(d, n_threads=2).tolist()  # deterministic
        np.testing.assert_allclose(M.step(d, n_threads=1), M.step(d, n_threads=2), rtol=1e-14)


def test_step_matrix_power(ergodic3):
    d = np.array([1.0, 0.0, 0.0])
    for _ in range(5):
        d = ergodic3.step(d)
    expected = np.array([1.0, 0.0, 0.0]) @ np.linalg.matrix_power(dense_of(ergodic3), 5)
    np.testing.assert_allclose(d, expected, rtol=1e-12)


def _eigen_stationary(dense: np.ndarray) -> np.ndarray:
    w, vecs = np.linalg.eig(dense.T)
    pi = np.real(vecs[:, np.argmin(np.abs(w - 1.0))])
    return pi / pi.sum()


@pytest.mark.parametrize("which", ["ergodic3", "chain4", "random"])
def test_stationary_matches_eigenvector(request, rng, which):
    if which == "random":
        P = mm.TransitionMatrix.from_scipy(random_csr(rng, 15, density=0.3))
    else:
        P = request.getfixturevalue(which)
    pi = P.stationary(tol=1e-13, n_threads=1)
    ref = _eigen_stationary(dense_of(P))
    np.testing.assert_allclose(pi, ref, atol=1e-9)
    assert pi.sum() == pytest.approx(1.0) and np.all(pi >= 0)
    np.testing.assert_allclose(P.step(pi), pi, atol=1e-9)


def test_stationary_periodic_chain_converges():
    flip = mm.TransitionMatrix.from_scipy(np.array([[0.0, 1.0], [1.0, 0.0]]))
    np.testing.assert_allclose(flip.stationary(n_threads=1), [0.5, 0.5])
    np.testing.assert_allclose(flip.stationary(), [0.5, 0.5])  # default thread count


def test_stationary_expanded_puts_no_mass_on_new_states(expanded6):
    P, Q = expanded6
    pi = Q.stationary(n_threads=1)
    np.testing.assert_allclose(pi[:4], P.stationary(n_threads=1), atol=1e-9)
    assert np.all(pi[4:] == 0.0)


def test_stationary_warns_when_not_converged(ergodic3):
    with pytest.warns(mm.ConvergenceWarning, match="raise max_iter"):
        pi = ergodic3.stationary(tol=1e-15, max_iter=1)
    assert pi.shape == (3,) and pi.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"tol": 0.0}, "tol is 0"), ({"max_iter": 0}, "max_iter is 0")], ids=["tol", "max_iter"]
)
def test_stationary_bad_arguments(ergodic3, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ergodic3.stationary(**kwargs)


def _ll_reference(dense: np.ndarray, seqs) -> tuple[float, int]:
    ll, n = 0.0, 0
    for s in seqs:
        s = np.asarray(s)
        if s.size > 1:
            ll += float(np.log(np.maximum(dense[s[:-1], s[1:]], 1e-12)).sum())
            n += s.size - 1
    return ll, n


def test_log_likelihood_and_perplexity_match_numpy(rng):
    P = mm.TransitionMatrix.from_scipy(random_csr(rng, 8, density=0.4))
    seqs = [rng.integers(0, 8, size=n) for n in (1, 0, 5, 30, 2)]
    ll, n = _ll_reference(dense_of(P), seqs)
    assert P.log_likelihood(seqs) == pytest.approx(ll, rel=1e-12)
    assert P.perplexity(seqs) == pytest.approx(np.exp(-ll / n), rel=1e-12)
    flat = np.concatenate(seqs[2:4])
    assert P.log_likelihood(flat) == pytest.approx(_ll_reference(dense_of(P), [flat])[0], rel=1e-12)
    block = rng.integers(0, 8, size=(3, 6))
    assert P.log_likelihood(block) == pytest.approx(_ll_reference(dense_of(P), list(block))[0], rel=1e-12)


def test_log_likelihood_uses_floor_for_impossible_transitions():
    P = mm.TransitionMatrix.from_scipy(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert P.log_likelihood([[0, 1, 1]]) == pytest.approx(np.log(1e-12))
    assert P.perplexity([[0, 0, 0]]) == 1.0


# ---------------------------------------------------------------- from_sequences vs numpy


def _bigram_reference(seqs, n: int, top_k: int | None, a: float):
    """(stored mask, stored float32 values, dense p) from numpy bigram counts."""
    C = np.zeros((n, n), dtype=np.int64)
    for s in seqs:
        s = np.asarray(s, dtype=np.int64)
        if s.size > 1:
            np.add.at(C, (s[:-1], s[1:]), 1)
    stored = C > 0
    if top_k is not None:
        for v in range(n):
            seen = np.flatnonzero(C[v])
            if seen.size > top_k:
                order = np.lexsort((seen, -C[v, seen]))  # largest count, then smaller id
                stored[v] = False
                stored[v, seen[order[:top_k]]] = True
    totals = C.sum(axis=1)
    denom = totals + a * n
    values = np.zeros((n, n), dtype=np.float32)
    dense = np.zeros((n, n))
    for v in range(n):
        if totals[v] == 0:
            dense[v] = 1.0 / n
            continue
        vals = ((C[v] + a) / denom[v]).astype(np.float32)
        values[v, stored[v]] = vals[stored[v]]
        kept = vals[stored[v]].astype(np.float64)
        free = n - int(stored[v].sum())
        if free:
            dense[v] = max(0.0, 1.0 - kept.sum()) / free
        dense[v, stored[v]] = kept
    return stored, values, dense


@pytest.mark.parametrize(("top_k", "smoothing"), [(None, 0.0), (2, 0.0), (None, 0.5), (3, 1.0), (1, 0.01)])
def test_from_sequences_matches_bigram_counts(rng, top_k, smoothing):
    n = 7
    seqs = [rng.integers(0, 5, size=m) for m in (40, 1, 0, 25, 60)]  # states 5, 6 never seen
    P = mm.TransitionMatrix.from_sequences(seqs, n, top_k=top_k, smoothing=smoothing)
    stored, values, dense = _bigram_reference(seqs, n, top_k, smoothing)
    assert (P.n_states, P.n_base) == (n, n)
    A = P.to_scipy()
    np.testing.assert_array_equal(A.toarray() != 0, stored)  # no stored zero: stored == seen and kept
    np.testing.assert_array_equal(A.toarray(), values)  # float32((c + a) / (c(v) + a n)), bit for bit
    np.testing.assert_allclose(P.to_dense(), dense, rtol=1e-12, atol=1e-15)
    if top_k is not None:
        assert np.diff(P.indptr).max() <= top_k
    P.validate()


@pytest.mark.parametrize("a", [0.5, 1.0, 2.5])
def test_from_sequences_smoothing_is_add_k(rng, a):
    n = 6
    seqs = [rng.integers(0, n, size=30), rng.integers(0, 3, size=10)]
    C = np.zeros((n, n))
    for s in seqs:
        np.add.at(C, (s[:-1], s[1:]), 1)
    add_k = (C + a) / (C.sum(axis=1, keepdims=True) + a * n)
    P = mm.TransitionMatrix.from_sequences(seqs, n, smoothing=a)
    # Exact up to the float32 storage of the seen entries (unseen ones come from the tail).
    np.testing.assert_allclose(P.to_dense(), add_k, rtol=2e-7, atol=1e-7)
    vv, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    np.testing.assert_allclose(P.prob(vv, xx), add_k, rtol=2e-7, atol=1e-7)


def test_from_sequences_top_k_ties_prefer_smaller_ids():
    P = mm.TransitionMatrix.from_sequences([[0, 3, 0, 1, 0, 2, 0, 3, 0, 1]], 4, top_k=1)
    # after 0: 3 twice, 1 twice, 2 once -> keep 1 (tie with 3, smaller id)
    np.testing.assert_array_equal(P.row(0).indices, [1])
    assert P.row(0).probs[0] == np.float32(0.4)
    assert P.row(0).tail == pytest.approx(0.6)


def test_from_sequences_counts_within_sequences_only():
    P = mm.TransitionMatrix.from_sequences([[0, 1], [2, 0]], 3)
    assert P.prob(1, 2) == pytest.approx(1 / 3)  # state 1 has no successor: uniform
    assert P.prob(0, 1) == 1.0 and P.prob(2, 0) == 1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda s: s,
        lambda s: [list(x) for x in s],
        lambda s: (np.asarray(x, dtype=np.int16) for x in s),
        lambda s: [np.asarray(x, dtype=np.uint64) for x in s],
    ],
    ids=["arrays", "lists", "generator-int16", "uint64"],
)
def test_from_sequences_input_kinds(rng, make):
    seqs = [rng.integers(0, 5, size=20), rng.integers(0, 5, size=7)]
    ref = mm.TransitionMatrix.from_sequences(seqs, 5)
    assert mm.TransitionMatrix.from_sequences(make(seqs), 5).fingerprint() == ref.fingerprint()


def test_from_sequences_thread_count_does_not_change_result(rng):
    seqs = [rng.integers(0, 50, size=int(m)) for m in rng.integers(0, 200, size=40)]
    one = mm.TransitionMatrix.from_sequences(seqs, 50, top_k=4, n_threads=1)
    two = mm.TransitionMatrix.from_sequences(seqs, 50, top_k=4, n_threads=2)
    assert one.fingerprint() == two.fingerprint()


# ---------------------------------------------------------------- sampling


def test_sample_deterministic_per_seed(chain4):
    a = chain4.sample(0, 200, seed=7)
    b = chain4.sample(0, 200, seed=7)
    c = chain4.sample(0, 200, seed=8)
    assert a.dtype == np.int32 and a.shape == (200,)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a[0] == 0 and a.min() >= 0 and a.max() < 4
    assert chain4.sample(2, 1, seed=1).tolist() == [2]
    assert chain4.sample(0, 50, seed=-1).shape == (50,)  # negative seeds are taken modulo 2**64


def test_sample_golden_path(chain4):
    """The documented promise "same seed, same path on every machine", pinned to the
    current algorithm (splitmix64 draws): update deliberately if the algorithm changes."""
    assert chain4.sample(0, 16, seed=7).tolist() == [0, 0, 0, 3, 1, 2, 3, 3, 2, 1, 2, 3, 0, 1, 2, 2]
    assert chain4.sample(3, 16, seed=2**63 + 5).tolist() == [3, 3, 1, 2, 2, 1, 2, 1, 2, 1, 2, 2, 1, 2, 3, 3]


def test_sample_follows_impossible_transitions_never(chain4):
    path = chain4.sample(1, 500, seed=3)
    after_one = path[1:][path[:-1] == 1]
    assert after_one.size > 0 and np.all(after_one == 2)  # row 1 is deterministic


def test_sample_empirical_frequencies_match_rows(rng):
    P = mm.TransitionMatrix.from_scipy(random_csr(rng, 5, density=0.4))
    dense = dense_of(P)
    path = P.sample(0, 40_000, seed=12345)
    for v in range(5):
        nxt = path[1:][path[:-1] == v]
        assert nxt.size > 2000
        observed = np.bincount(nxt, minlength=5)
        expected = dense[v] * nxt.size
        assert np.all(observed[expected == 0] == 0)
        pos = expected > 0
        chi2 = float(((observed[pos] - expected[pos]) ** 2 / expected[pos]).sum())
        assert chi2 < 40.0, (v, observed, expected)


def test_sample_expanded_never_reaches_new_states_from_old(expanded6):
    _, Q = expanded6
    assert Q.sample(0, 2000, seed=1).max() < 4
    path = Q.sample(5, 2000, seed=2)
    assert path[0] == 5 and path[1:].max() < 4


# ---------------------------------------------------------------- fingerprint, copies, pickling


def test_fingerprint_golden_and_stable_across_processes(chain4):
    """Same bytes, same hash across runs and machines: pinned (update deliberately with the format)."""
    fp = chain4.fingerprint()
    assert fp == CHAIN4_FINGERPRINT
    code = (
        "import numpy as np, markovmem as mm;"
        "print(mm.TransitionMatrix.from_scipy(np.array([[0.5,0.25,0,0],[0,0,1.0,0],[0.1,0,0,0],[0,0,0,0]])).fingerprint())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == fp


@pytest.mark.parametrize("how", ["copy", "deepcopy", *(f"pickle{p}" for p in range(pickle.HIGHEST_PROTOCOL + 1))])
def test_copies_keep_bytes_and_fingerprint(rng, how):
    P = mm.TransitionMatrix.from_scipy(random_csr(rng, 9, full_rows=True))
    Q, _ = P.expand(np.eye(2, 9) * 0.5)
    if how == "copy":
        R = copy.copy(Q)
    elif how == "deepcopy":
        R = copy.deepcopy(Q)
    else:
        R = pickle.loads(pickle.dumps(Q, protocol=int(how[len("pickle") :])))
    assert R is not Q and (R.n_states, R.n_base) == (Q.n_states, Q.n_base)
    assert same_bytes(R, Q)
    assert R.fingerprint() == Q.fingerprint()
    R.validate()


def test_pickle_keeps_metadata(tmp_path, chain4):
    chain4.save(tmp_path / "m.safetensors", metadata={"source": "unit test"})
    L = mm.TransitionMatrix.load(tmp_path / "m.safetensors")
    R = pickle.loads(pickle.dumps(L))
    assert R.metadata == L.metadata and R.metadata["source"] == "unit test"
    assert R.fingerprint() == L.fingerprint()


def test_fingerprint_changes_with_any_content():
    dense = np.array([[0.5, 0.25, 0.0], [0.0, 0.0, 1.0], [0.1, 0.0, 0.0]], dtype=np.float32)
    base = mm.TransitionMatrix.from_scipy(dense).fingerprint()
    assert len(base) == 16 and int(base, 16) >= 0
    one_ulp = dense.copy()
    one_ulp[2, 0] = np.nextafter(np.float32(0.1), np.float32(1))
    moved = dense.copy()
    moved[2, 0], moved[2, 1] = 0.0, 0.1
    bigger = np.zeros((4, 4), dtype=np.float32)
    bigger[:3, :3] = dense
    others = {
        "one ulp": mm.TransitionMatrix.from_scipy(one_ulp).fingerprint(),
        "moved entry": mm.TransitionMatrix.from_scipy(moved).fingerprint(),
        "extra state": mm.TransitionMatrix.from_scipy(bigger).fingerprint(),
        "n_base": mm.TransitionMatrix.from_scipy(bigger, n_base=3).fingerprint(),
    }
    assert base not in others.values()
    assert len(set(others.values())) == len(others)


def test_validate_accepts_constructed_matrices(chain4, expanded6, rng):
    chain4.validate()
    expanded6[1].validate(n_threads=1)
    mm.TransitionMatrix.from_sequences([rng.integers(0, 9, size=100)], 9, top_k=2, smoothing=0.1).validate()


def test_constructor_is_private():
    with pytest.raises(TypeError, match="from_scipy, from_topk, from_sequences or load"):
        mm.TransitionMatrix(np.eye(2))


# ---------------------------------------------------------------- bad input


def csr(data, indices, indptr, shape):
    return sp.csr_array(
        (np.asarray(data, dtype=np.float32), np.asarray(indices, dtype=np.int32), np.asarray(indptr)), shape=shape
    )


BAD_FROM_SCIPY = [
    # (matrix, kwargs, exception, match, row)
    (np.array([[0.5, -0.1], [0.0, 0.0]]), {}, mm.InvariantError, "row 0: negative probability", 0),
    (
        csr([0.5, np.nan], [0, 1], [0, 0, 2], (2, 2)),
        {},
        mm.InvariantError,
        "row 1: probability at column 1 is not finite",
        1,
    ),
    (csr([np.inf], [0], [0, 0, 0, 1], (3, 3)), {}, mm.InvariantError, "row 2: .* not finite", 2),
    (np.array([[0.5, 0.0], [np.nan, 0.0]]), {}, mm.InvariantError, "row 1: probability is not finite", 1),
    (np.array([[0.5, 0.6], [0.0, 0.0]]), {}, mm.InvariantError, "row 0: probabilities sum to 1.1", 0),
    (csr([0.2, 0.3], [1, 0], [0, 0, 2], (2, 2)), {}, mm.InvariantError, "row 1: column indices are not sorted", 1),
    (csr([0.2, 0.3], [1, 1], [0, 2, 2], (2, 2)), {}, mm.InvariantError, "row 0: duplicate column index 1", 0),
    (
        np.array([[0.0, 0.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]),
        {"n_base": 2},
        mm.InvariantError,
        "row 1: puts mass on state 2, a new state",
        1,
    ),
    (np.eye(2)[:1], {}, ValueError, r"shape \(1, 2\); a transition matrix must be square", None),
    (np.zeros((0, 0)), {}, ValueError, "n_states is 0", None),
    (np.zeros(3), {}, ValueError, r"must be 2-D; got shape \(3,\)", None),
    (np.zeros((2, 2, 2)), {}, ValueError, "must be 2-D", None),
    (np.eye(2), {"n_base": 0}, ValueError, "n_base is 0; expected 1 <= n_base <= n_states = 2", None),
    (np.eye(2), {"n_base": 3}, ValueError, "n_base is 3", None),
    (np.eye(2) * 1j, {}, TypeError, "must hold real numbers; got dtype complex128", None),
]


@pytest.mark.parametrize(
    ("matrix", "kwargs", "exc", "match", "row"),
    BAD_FROM_SCIPY,
    ids=[
        "negative",
        "nan",
        "inf",
        "nan-dense",
        "sum>1",
        "unsorted",
        "duplicate",
        "mass-on-new-state",
        "not-square",
        "empty",
        "1-D",
        "3-D",
        "n_base-0",
        "n_base-too-big",
        "complex",
    ],
)
def test_from_scipy_rejects(matrix, kwargs, exc, match, row):
    with pytest.raises(exc, match=match) as info:
        mm.TransitionMatrix.from_scipy(matrix, **kwargs)
    if exc is mm.InvariantError:
        assert isinstance(info.value, ValueError)
        assert info.value.row == row


def test_from_scipy_rejects_columns_beyond_int32():
    bad = sp.csr_array((np.float32([0.5]), np.array([2**31], dtype=np.int64), np.array([0, 1, 1])), shape=(2, 2))
    with pytest.raises(IndexError, match="column indices outside"):
        mm.TransitionMatrix.from_scipy(bad)


IDX2 = np.array([[0, 1], [1, 0]])
P2 = np.array([[0.5, 0.2], [0.1, 0.1]])

BAD_FROM_TOPK = [
    (np.array([[0, 0], [1, 0]]), P2, {}, mm.InvariantError, "row 0: duplicate column index 0", 0),
    (
        np.array([[0, 1], [1, 2]]),
        P2,
        {},
        mm.InvariantError,
        r"row 1: index 2 at position 1 is out of range \[0, n_base = 2\)",
        1,
    ),
    (np.array([[0, -1], [1, 0]]), P2, {}, mm.InvariantError, "row 0: index -1 at position 1 is out of range", 0),
    (np.array([[0], [1], [2]]), np.ones((3, 1)), {"n_base": 2}, mm.InvariantError, "row 2: index 2", 2),
    (IDX2, np.array([[0.5, 0.5], [0.1, np.nan]]), {}, mm.InvariantError, "row 1: .* not finite", 1),
    (IDX2, np.array([[0.5, np.inf], [0.1, 0.1]]), {}, mm.InvariantError, "row 0: .* not finite", 0),
    (IDX2, np.array([[0.5, 0.5], [0.1, -0.1]]), {}, mm.InvariantError, "row 1: negative probability", 1),
    (IDX2, np.array([[0.5, 0.5], [0.9, 0.2]]), {}, mm.InvariantError, "row 1: probabilities sum to", 1),
    (IDX2, P2[:1], {}, ValueError, r"indices has shape \(2, 2\) but probs has shape \(1, 2\)", None),
    (IDX2[0], P2[0], {}, ValueError, "must be 2-D", None),
    (np.zeros((0, 2), dtype=int), np.zeros((0, 2)), {}, ValueError, "indices has no rows", None),
    (np.zeros((2, 3), dtype=int), np.zeros((2, 3)), {}, ValueError, "k is 3; expected 0 <= k <= n_base = 2", None),
    (IDX2.astype(float), P2, {}, TypeError, "indices must hold integers; got dtype float64", None),
    (IDX2, P2.astype(str), {}, TypeError, "probs must hold real numbers", None),
    (IDX2, P2, {"n_base": 5}, ValueError, "n_base is 5", None),
]


@pytest.mark.parametrize(
    ("indices", "probs", "kwargs", "exc", "match", "row"),
    BAD_FROM_TOPK,
    ids=[
        "duplicate",
        "id-too-big",
        "id-negative",
        "id>=n_base",
        "nan",
        "inf",
        "negative",
        "sum>1",
        "shape-mismatch",
        "1-D",
        "empty",
        "k>n_base",
        "float-ids",
        "str-probs",
        "n_base>n_states",
    ],
)
def test_from_topk_rejects(indices, probs, kwargs, exc, match, row):
    with pytest.raises(exc, match=match) as info:
        mm.TransitionMatrix.from_topk(indices, probs, **kwargs)
    if exc is mm.InvariantError:
        assert info.value.row == row


@pytest.mark.parametrize(
    ("seqs", "kwargs", "exc", "match"),
    [
        ([], {}, ValueError, "sequences is empty"),
        (np.zeros((0, 4), dtype=int), {}, ValueError, "sequences is empty"),
        ([[0, 5]], {}, IndexError, r"sequences\[0\]\[1\] = 5 is out of range \[0, n_states = 3\)"),
        ([[0, 1], [2, -1]], {}, IndexError, r"sequences\[1\]\[1\] = -1 is out of range"),
        ([[0, 1.0]], {}, TypeError, r"sequences\[0\] must hold integer token ids; got dtype float64"),
        ([np.array([True, False])], {}, TypeError, "dtype bool"),
        ("012", {}, TypeError, "not a string"),
        ([[[0, 1]]], {}, ValueError, r"sequences\[0\] must be 1-D; got shape \(1, 2\)"),
        ([[0, 1]], {"n_states": 0}, ValueError, "n_states is 0; expected an integer >= 1"),
        ([[0, 1]], {"n_states": 2**31}, ValueError, "n_states is 2147483648"),
        ([[0, 1]], {"top_k": 0}, ValueError, "top_k is 0; expected an integer >= 1"),
        ([[0, 1]], {"smoothing": -1.0}, ValueError, "smoothing must be a finite number >= 0"),
        ([[0, 1]], {"smoothing": float("nan")}, ValueError, "smoothing must be a finite number >= 0"),
        ([[0, 1]], {"smoothing": float("inf")}, ValueError, "smoothing must be a finite number >= 0"),
        ([[0, 1]], {"n_threads": -1}, ValueError, "n_threads is -1"),
    ],
    ids=[
        "empty-list",
        "empty-2d",
        "id-too-big",
        "id-negative",
        "float",
        "bool",
        "string",
        "2-D-item",
        "n_states-0",
        "n_states-beyond-int32",
        "top_k-0",
        "smoothing-negative",
        "smoothing-nan",
        "smoothing-inf",
        "n_threads",
    ],
)
def test_from_sequences_rejects(seqs, kwargs, exc, match):
    kwargs = {"n_states": 3, **kwargs}
    n_states = kwargs.pop("n_states")
    with pytest.raises(exc, match=match):
        mm.TransitionMatrix.from_sequences(seqs, n_states, **kwargs)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda P: P.prob(0, 4), IndexError, r"x = 4 is out of range \[0, n_states = 4\)"),
        (lambda P: P.prob(-1, 0), IndexError, "v = -1 is out of range"),
        (lambda P: P.prob(0, 2**40), IndexError, "x = 1099511627776 is out of range"),
        (lambda P: P.prob([0, 5], [0, 0]), IndexError, r"v\[1\] = 5 is out of range"),
        (lambda P: P.log_prob(np.array([0, 1]), np.array([1, 9])), IndexError, r"x\[1\] = 9"),
        (lambda P: P.prob(0.0, 1), TypeError, "v must be an integer state id; got float"),
        (lambda P: P.prob([0.5], [1]), TypeError, "v must hold integer state ids; got dtype float64"),
        (lambda P: P.prob([0, 1], [0, 1, 2]), ValueError, "broadcast"),
        (lambda P: P.row(4), IndexError, "v = 4 is out of range"),
        (lambda P: P.row("0"), TypeError, "v must be an integer state id; got str"),
        (lambda P: P.step(np.ones(3)), ValueError, r"distribution has shape \(3,\); expected \(4,\)"),
        (lambda P: P.step(np.array([np.nan, 0, 0, 0])), ValueError, "distribution has non-finite entries"),
        (lambda P: P.step(np.array([np.inf, 0, 0, 0])), ValueError, "non-finite"),
        (lambda P: P.sample(0, 0), ValueError, "length is 0; expected an integer >= 1"),
        (lambda P: P.sample(9, 3), IndexError, "start = 9 is out of range"),
        (lambda P: P.perplexity([[0], [1]]), ValueError, "sequences hold no transition"),
        (lambda P: P.perplexity([]), ValueError, "sequences is empty"),
        (lambda P: P.log_likelihood([[0, 9]]), IndexError, r"sequences\[0\]\[1\] = 9 is out of range"),
        (lambda P: P.log_likelihood([[0, 1.5]]), TypeError, "integer token ids"),
    ],
    ids=[
        "x-too-big",
        "v-negative",
        "x-huge",
        "array-v",
        "log_prob-array-x",
        "float-v",
        "float-array",
        "no-broadcast",
        "row",
        "row-str",
        "step-shape",
        "step-nan",
        "step-inf",
        "sample-length",
        "sample-start",
        "perplexity-no-transition",
        "perplexity-empty",
        "ll-id",
        "ll-float",
    ],
)
def test_queries_reject(chain4, call, exc, match):
    with pytest.raises(exc, match=match):
        call(chain4)
