"""markovmem._core: dtype rejection (noconvert), shape checks, zero-copy views,
owning outputs, exception mapping, and the same results from several threads."""

from __future__ import annotations

import errno
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import random_csr

import markovmem as mm
from markovmem import _core

I64, I32, F32, F64 = np.int64, np.int32, np.float32, np.float64


def i64(*values):
    return np.array(values, dtype=I64)


def i32(*values):
    return np.array(values, dtype=I32)


def f32(*values):
    return np.array(values, dtype=F32)


def topk(n_states, indices, probs):
    return _core.TransitionMatrix.from_topk(n_states, n_states, indices, probs, 1e-5, 1)


def parts():
    """CSR parts of a 3-state matrix with the dtypes the core expects."""
    return (i64(0, 2, 3, 3), i32(0, 2, 1), f32(0.5, 0.25, 1.0))


def copy_csr(n=3, n_base=3, indptr=None, indices=None, data=None):
    ip, ix, d = parts()
    return _core.TransitionMatrix.copy_csr(
        n,
        n_base,
        ip if indptr is None else indptr,
        ix if indices is None else indices,
        d if data is None else data,
        1e-5,
        1,
    )


@pytest.fixture
def core() -> _core.TransitionMatrix:
    return copy_csr()


def test_copy_csr_builds_the_matrix(core):
    assert (core.n_states, core.n_base, core.nnz) == (3, 3, 3)
    assert core.storage_bytes == 4 * 8 + 3 * 8 + 3 * 8
    assert core.prob(0, 1) == 0.25 and core.prob(2, 0) == pytest.approx(1 / 3)
    np.testing.assert_allclose(core.tail, [0.25, 0.0, 1.0])
    assert isinstance(_core.has_openmp, bool)


# ---------------------------------------------------------------- dtype rejection


@pytest.mark.parametrize(
    "kwargs",
    [
        {"indptr": i32(0, 2, 3, 3)},
        {"indptr": np.array([0, 2, 3, 3], dtype=np.uint64)},
        {"indptr": [0, 2, 3, 3]},
        {"indices": i64(0, 2, 1)},
        {"indices": np.array([0, 2, 1], dtype=np.uint32)},
        {"data": np.array([0.5, 0.25, 1.0], dtype=F64)},
        {"data": np.array([0.5, 0.25, 1.0], dtype=np.float16)},
        {"data": f32(0.5, 0.0, 0.25, 0.0, 1.0, 0.0)[::2]},  # not contiguous
        {"indices": np.array([[0, 9], [2, 9], [1, 9]], dtype=I32)[:, 0]},  # a column: strided
    ],
    ids=[
        "indptr-int32",
        "indptr-uint64",
        "indptr-list",
        "indices-int64",
        "indices-uint32",
        "data-float64",
        "data-float16",
        "data-strided",
        "indices-column",
    ],
)
def test_copy_csr_rejects_wrong_dtype_without_copying(kwargs):
    with pytest.raises(TypeError, match="incompatible function arguments"):
        copy_csr(**kwargs)


def test_contiguous_view_of_right_dtype_is_accepted():
    _, _, d = parts()
    wide = np.zeros((2, 3), dtype=F32)
    wide[0] = d
    assert copy_csr(data=wide[0]).prob(0, 0) == 0.5


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda P: P.prob_many(i32(0), i64(0), False, 1), "incompatible"),
        (lambda P: P.prob_many(i64(0), np.array([0.0]), False, 1), "incompatible"),
        (lambda P: P.step(np.ones(3, dtype=F32), 1), "incompatible"),
        (lambda P: P.step([1.0, 0.0, 0.0], 1), "incompatible"),
        (lambda P: P.log_likelihood(i64(0, 1), i64(0, 2), 1), "incompatible"),
        (lambda P: P.log_likelihood(i32(0, 1), i32(0, 2), 1), "incompatible"),
        (lambda P: _core.expand(P, i32(0, 1), i32(0), f32(1.0), 1e-5, 1), "incompatible"),
        (lambda P: _core.expand(P, i64(0, 1), i32(0), np.array([1.0], dtype=F64), 1e-5, 1), "incompatible"),
        (lambda P: topk(3, np.zeros((3, 1), dtype=I64), np.zeros((3, 1), dtype=F64)), "incompatible"),
        (lambda P: topk(3, np.zeros((3, 1), dtype=np.int16), np.zeros((3, 1), dtype=F32)), "incompatible"),
        (lambda P: _core.TransitionMatrix.count_transitions(i64(0, 1), i64(0, 2), 3, 0, 0.0, 1), "incompatible"),
        (lambda P: _core.verify_expansion(P, "Q", 1e-5, 1), "incompatible"),
    ],
    ids=[
        "prob_many-v-int32",
        "prob_many-x-float",
        "step-float32",
        "step-list",
        "ll-tokens-int64",
        "ll-offsets-int32",
        "expand-indptr-int32",
        "expand-data-float64",
        "topk-probs-float64",
        "topk-indices-int16",
        "count-tokens-int64",
        "verify-not-matrix",
    ],
)
def test_core_rejects_wrong_dtype(core, call, match):
    with pytest.raises(TypeError, match=match):
        call(core)


# ---------------------------------------------------------------- shape and size checks


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"indptr": i64(0, 2, 3)}, ValueError, "indptr has length 3; expected 4"),
        ({"indptr": np.array([[0, 2, 3, 3]], dtype=I64)}, ValueError, "indptr must be 1-D; got 2 dimensions"),
        ({"data": f32(0.5, 0.25)}, ValueError, "data has length 2; expected 3"),
        ({"indices": i32(0, 2), "data": f32(0.5, 0.25)}, ValueError, r"indptr\[-1\] = 3 but indices has 2 entries"),
        ({"indptr": i64(0, 2, 3, 99)}, ValueError, r"indptr\[-1\] = 99"),
        ({"indptr": i64(0, 2, 3, -1)}, ValueError, r"indptr\[-1\] = -1"),
        ({"indptr": i64(0, 5, 3, 3)}, mm.InvariantError, "exceeds the number of stored entries 3"),
        ({"indptr": i64(0, -5, 3, 3)}, mm.InvariantError, "row pointers must not decrease"),
        ({"indptr": i64(1, 2, 3, 3)}, mm.InvariantError, r"indptr\[0\] is 1; expected 0"),
        ({"indices": i32(0, 2, 3)}, mm.InvariantError, "row 1: column index 3 is out of range"),
        ({"n": 0}, ValueError, "n_states is 0"),
        ({"n": 2**31}, ValueError, "n_states is 2147483648"),
        ({"n_base": 4}, ValueError, "n_base is 4"),
        ({"n_base": -1}, ValueError, "n_base is -1"),
    ],
    ids=[
        "indptr-short",
        "indptr-2d",
        "data-short",
        "nnz-mismatch",
        "indptr-end-large",
        "indptr-end-negative",
        "indptr-middle-large",
        "indptr-middle-negative",
        "indptr-start",
        "index-range",
        "n_states-0",
        "n_states-beyond-int32",
        "n_base-large",
        "n_base-negative",
    ],
)
def test_copy_csr_checks_shapes_and_structure(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        copy_csr(**kwargs)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda P: P.prob_many(i64(0, 1), i64(0), False, 1), ValueError, "x has length 1; expected 2"),
        (
            lambda P: P.prob_many(np.zeros((2, 1), dtype=I64), np.zeros((2, 1), dtype=I64), False, 1),
            ValueError,
            "v must be 1-D",
        ),
        (lambda P: P.step(np.ones(4), 1), ValueError, "distribution has length 4; expected 3"),
        (lambda P: P.log_likelihood(i32(0, 1), i64(), 1), ValueError, "offsets must have at least one entry"),
        (lambda P: P.log_likelihood(i32(0, 1), i64(0, 3), 1), ValueError, r"offsets\[1\] = 3 is not within"),
        (lambda P: P.log_likelihood(i32(0, 1), i64(1, 0), 1), ValueError, r"offsets\[1\] = 0 is not within"),
        (lambda P: P.log_likelihood(i32(0, 1), i64(-1, 2), 1), ValueError, r"offsets\[0\] is -1"),
        (lambda P: P.stationary(-1.0, 10, 1), ValueError, "tol is -1"),
        (lambda P: P.sample(0, 0, 1), ValueError, "length is 0"),
        (lambda P: _core.expand(P, i64(0), i32(), f32(), 1e-5, 1), ValueError, "at least 2 entries"),
        (
            lambda P: _core.expand(P, i64(0, 2), i32(0), f32(1.0), 1e-5, 1),
            ValueError,
            r"new_rows indptr\[-1\] = 2 but indices has 1 entries",
        ),
        (
            lambda P: _core.expand(P, i64(0, 1), i32(3), f32(1.0), 1e-5, 1),
            mm.InvariantError,
            "new row 0: column index 3 is out of range|new row 0: puts mass on state 3",
        ),
        (
            lambda P: topk(4, np.zeros((3, 1), dtype=I64), np.zeros((3, 1), dtype=F32)),
            ValueError,
            "indices has 3 rows; expected n_states = 4",
        ),
        (
            lambda P: topk(3, np.zeros((3, 1), dtype=I64), np.zeros((3, 2), dtype=F32)),
            ValueError,
            r"must both have shape \(n_states, k\)",
        ),
        (
            lambda P: _core.TransitionMatrix.count_transitions(i32(0, 1), i64(), 3, 0, 0.0, 1),
            ValueError,
            "offsets must have at least one entry",
        ),
        (
            lambda P: _core.TransitionMatrix.count_transitions(i32(0, 1), i64(0, 5), 3, 0, 0.0, 1),
            ValueError,
            r"offsets\[1\] = 5 is not within",
        ),
        (
            lambda P: _core.TransitionMatrix.count_transitions(i32(0, 1), i64(0, 2), 3, -1, 0.0, 1),
            ValueError,
            "top_k must be >= 0",
        ),
        (
            lambda P: _core.verify_expansion(
                P, _core.TransitionMatrix.copy_csr(1, 1, i64(0, 0), i32(), f32(), 1e-5, 1), 1e-5, 1
            ),
            ValueError,
            "fewer than the original's 3",
        ),
    ],
    ids=[
        "prob_many-lengths",
        "prob_many-2d",
        "step-length",
        "ll-offsets-empty",
        "ll-offsets-beyond",
        "ll-offsets-decreasing",
        "ll-offsets-negative",
        "stationary-tol",
        "sample-length",
        "expand-indptr-short",
        "expand-nnz-mismatch",
        "expand-column",
        "topk-rows",
        "topk-shapes",
        "count-offsets-empty",
        "count-offsets-beyond",
        "count-top_k",
        "verify-fewer-states",
    ],
)
def test_core_checks_shapes(core, call, exc, match):
    with pytest.raises(exc, match=match):
        call(core)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda P: P.prob(3, 0), r"state v = 3 is out of range \[0, n_states = 3\)"),
        (lambda P: P.prob(0, -1), "state x = -1 is out of range"),
        (lambda P: P.log_prob(0, 2**40), "state x = 1099511627776"),
        (lambda P: P.prob_many(i64(0, 7), i64(0, 0), False, 1), r"v\[1\] = 7"),
        (lambda P: P.prob_many(i64(0), i64(-3), True, 1), r"x\[0\] = -3"),
        (lambda P: P.sample(3, 5, 1), "start = 3 is out of range"),
        (lambda P: P.fingerprint(4), "n_rows = 4 .*n_states = 3"),
        (lambda P: P.log_likelihood(i32(0, 5), i64(0, 2), 1), "sequence 0 position 1: token 5 is out of range"),
        (
            lambda P: _core.TransitionMatrix.count_transitions(i32(0, 1, 9), i64(0, 3), 3, 0, 0.0, 1),
            "sequence 0 position 2: token 9 is out of range",
        ),
        (
            lambda P: _core.TransitionMatrix.count_transitions(i32(0, 1, 9), i64(0, 2), 3, 0, 0.0, 1),
            "outside every sequence",
        ),
    ],
    ids=[
        "prob-v",
        "prob-x",
        "log_prob-huge",
        "prob_many-v",
        "prob_many-x",
        "sample-start",
        "fingerprint-rows",
        "ll-token",
        "count-token",
        "count-token-outside",
    ],
)
def test_core_index_errors(core, call, match):
    with pytest.raises(IndexError, match=match):
        call(core)


def test_core_os_errors_carry_errno(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        _core.load(str(tmp_path / "missing"), True, False, 1)
    assert info.value.errno == errno.ENOENT and info.value.filename == str(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):
        _core.load(str(tmp_path), True, False, 1)
    with pytest.raises(FileNotFoundError):
        _core.read_metadata(str(tmp_path / "missing"))


def test_invariant_error_type(core):
    assert issubclass(mm.InvariantError, ValueError)
    assert mm.InvariantError is _core.InvariantError
    assert mm.InvariantError.__module__ == "markovmem"
    with pytest.raises(mm.InvariantError) as info:
        copy_csr(data=f32(0.5, -0.25, 1.0))
    assert info.value.row == 0
    assert str(info.value) == "row 0: negative probability -0.25 at column 2"


# ---------------------------------------------------------------- zero-copy views, owning outputs


@pytest.mark.parametrize("name", ["indptr", "indices", "data", "tail"])
def test_views_share_core_memory(core, name):
    a, b = getattr(core, name), getattr(core, name)
    assert np.shares_memory(a, b)
    assert not a.flags.writeable and not a.flags.owndata
    assert a.base is core  # the view keeps the core object alive


def test_public_views_share_core_memory(rng):
    P = mm.TransitionMatrix.from_scipy(random_csr(rng, 6))
    for name in ("indptr", "indices", "data", "tail"):
        assert np.shares_memory(getattr(P, name), getattr(P._m, name))
    assert np.shares_memory(P.to_scipy().data, P._m.data)
    assert np.shares_memory(P.row(1).probs, P._m.data) or P.row(1).probs.size == 0


def test_inputs_are_copied_not_aliased():
    ip, ix, d = parts()
    M = copy_csr(indptr=ip, indices=ix, data=d)
    assert not np.shares_memory(M.data, d)
    d[0] = 0.75
    assert M.prob(0, 0) == 0.5


def test_outputs_own_their_memory(core):
    v = i64(0, 1, 2)
    out = core.prob_many(v, v, False, 1)
    assert out.dtype == F64 and out.flags.writeable
    assert not np.shares_memory(out, v)
    out[0] = 7.0  # owned: writing does not touch the matrix
    assert core.prob(0, 0) == 0.5
    step = core.step(np.array([1.0, 0.0, 0.0]), 1)
    assert step.flags.writeable and step.dtype == F64
    path = core.sample(0, 4, 1)
    assert path.dtype == I32 and path.flags.writeable


# ---------------------------------------------------------------- threads


@pytest.fixture(scope="module")
def big() -> mm.TransitionMatrix:
    rng = np.random.default_rng(7)
    n, k = 3000, 12
    idx = np.stack([rng.choice(n, size=k, replace=False) for _ in range(n)])
    pr = rng.dirichlet(np.ones(k + 1), size=n)[:, :k].astype(F32)
    return mm.TransitionMatrix.from_topk(idx, pr, n_threads=1)


def test_concurrent_prob_calls_agree(big):
    rng = np.random.default_rng(11)
    queries = [(rng.integers(0, big.n_states, 50_000), rng.integers(0, big.n_states, 50_000)) for _ in range(8)]
    expected = [big.prob(v, x, n_threads=1) for v, x in queries]
    scalar = [(int(v[0]), int(x[0])) for v, x in queries]

    def work(i):
        v, x = queries[i]
        return big.prob(v, x), big.log_prob(v, x, n_threads=1), big.prob(*scalar[i])

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(8)))
    for (p, lp, s), e in zip(results, expected):
        np.testing.assert_array_equal(p, e)
        np.testing.assert_array_equal(lp, np.log(np.maximum(e, 1e-12)))
        assert s == e[0]


def test_concurrent_fingerprint_and_queries_agree(rng):
    fresh = [mm.TransitionMatrix.from_scipy(random_csr(rng, 40, density=0.2)) for _ in range(2)]
    expected = [mm.TransitionMatrix.from_scipy(M.to_scipy()).fingerprint() for M in fresh]

    def work(i):
        M = fresh[i % 2]
        return i % 2, M.fingerprint(), M.validate(n_threads=1), M.step(np.full(40, 1 / 40), n_threads=1).tobytes()

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(16)))  # the first fingerprint of each matrix races
    steps = {}
    for which, fp, _, step in results:
        assert fp == expected[which]
        assert steps.setdefault(which, step) == step


def test_concurrent_constructors_agree(rng):
    seqs = [rng.integers(0, 30, size=200) for _ in range(6)]
    ref = mm.TransitionMatrix.from_sequences(seqs, 30, top_k=5, n_threads=1).fingerprint()

    def work(_):
        P = mm.TransitionMatrix.from_sequences(seqs, 30, top_k=5, n_threads=1)
        _, cert = P.expand(np.eye(1, 30), n_threads=1)
        return P.fingerprint(), cert.ok

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(work, range(8))) == [(ref, True)] * 8
