"""Property tests (hypothesis) of the core invariants on small random matrices:
expansion keeps old rows bitwise, save/load round-trips, every corruption
kind is caught with its row, and prob() matches a dense numpy reference."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import dense_reference, random_csr, write_matrix_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import markovmem as mm
from markovmem import _core

# No example database: tests write nothing outside their tmp directories.
SETTINGS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def csr_specs(draw, min_states: int = 1, max_states: int = 8):
    """(csr, n_base) of a random valid matrix; n_base < n_states about a third of the time."""
    n = draw(st.integers(min_states, max_states))
    n_base = draw(st.one_of(st.just(n), st.integers(1, n)))
    density = draw(st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    full_rows = draw(st.booleans())
    return random_csr(np.random.default_rng(seed), n, n_base, density=density, full_rows=full_rows), n_base


def build(spec) -> mm.TransitionMatrix:
    csr, n_base = spec
    return mm.TransitionMatrix.from_scipy(csr, n_base=n_base, n_threads=1)


def u8(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


@pytest.fixture(scope="module")
def io_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties-io")


_counter = itertools.count()


# ---------------------------------------------------------------- prob vs dense reference


@SETTINGS
@given(spec=csr_specs())
def test_prob_matches_dense_reference(spec):
    P = build(spec)
    n = P.n_states
    csr, n_base = spec
    ref = dense_reference(n, n_base, csr.indptr, csr.indices, csr.data)
    vv, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    got = P.prob(vv, xx, n_threads=1)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(P.to_dense(), ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(P.log_prob(vv, xx, n_threads=1), np.log(np.maximum(ref, 1e-12)), rtol=1e-12)
    # every row is a distribution over the base states, in [0, 1]
    assert np.all((got >= 0) & (got <= 1 + 1e-6))
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    stored_cols = np.zeros((n, n), dtype=bool)
    stored_cols[np.repeat(np.arange(n), np.diff(P.indptr)), P.indices] = True
    assert np.all(got[:, n_base:][~stored_cols[:, n_base:]] == 0.0)  # no tail on states >= n_base
    for v in range(n):
        assert P.prob(v, n - 1) == got[v, n - 1]
    P.validate(n_threads=1)


@SETTINGS
@given(spec=csr_specs(), seed=st.integers(0, 2**32 - 1))
def test_step_is_the_dense_product_and_keeps_mass(spec, seed):
    P = build(spec)
    d = np.random.default_rng(seed).random(P.n_states)
    d /= d.sum()
    ref = d @ dense_reference(P.n_states, P.n_base, P.indptr, P.indices, P.data)
    out = P.step(d, n_threads=1)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-14)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.all(out[P.n_base :] >= 0)


# ---------------------------------------------------------------- expansion


@st.composite
def new_rows(draw, n_base: int):
    m = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rows = random_csr(
        np.random.default_rng(seed), max(m, n_base), n_base, density=draw(st.sampled_from([0.0, 0.3, 1.0]))
    )
    return sp.csr_array(rows[:m, :n_base])


@SETTINGS
@given(data=st.data(), spec=csr_specs())
def test_expansion_keeps_old_rows_bitwise(data, spec):
    P = build(spec)
    rows = data.draw(new_rows(P.n_base))
    Q, cert = P.expand(rows, n_threads=1)
    n, nnz, m = P.n_states, P.nnz, rows.shape[0]
    assert (Q.n_states, Q.n_base, Q.nnz) == (n + m, P.n_base, nnz + rows.nnz)
    assert u8(Q.indptr[: n + 1]) == u8(P.indptr)
    assert u8(Q.indices[:nnz]) == u8(P.indices)
    assert u8(Q.data[:nnz]) == u8(P.data)
    assert u8(Q.tail[:n]) == u8(P.tail)
    assert cert.ok, cert.failures()
    assert cert.to_dict() == mm.verify_expansion(P, Q, n_threads=1).to_dict()
    assert cert.fingerprint_after_old == P.fingerprint()
    dense = Q.to_dense()
    np.testing.assert_array_equal(dense[:n, :n], P.to_dense())
    assert np.all(dense[:n, n:] == 0.0)  # p(u | v) = 0 for old v
    assert np.all(dense[n:, P.n_base :] == 0.0)  # new rows live over base states only
    np.testing.assert_allclose(dense[n:].sum(axis=1), 1.0, atol=1e-5)
    # a second expansion composes
    R, cert2 = Q.expand(rows, n_threads=1)
    assert cert2.ok and mm.verify_expansion(P, R, n_threads=1).ok
    assert u8(R.data[:nnz]) == u8(P.data)


@SETTINGS
@given(spec=csr_specs(min_states=2), which=st.integers(0, 10**6), scale=st.sampled_from([0.5, 0.999, 1.001, 2.0]))
def test_verify_expansion_detects_any_changed_old_value(spec, which, scale):
    csr, n_base = spec
    if csr.nnz == 0:
        return
    P = build(spec)
    bad = csr.copy()
    j = which % bad.nnz
    bad.data[j] = np.float32(min(bad.data[j] * scale, 1.0)) if scale > 1 else np.float32(bad.data[j] * scale)
    if bad.data[j] == csr.data[j]:
        return
    try:
        after = mm.TransitionMatrix.from_scipy(bad, n_base=n_base, n_threads=1)
    except mm.InvariantError:
        return  # the change pushed a row above 1: not a matrix to compare
    cert = mm.verify_expansion(P, after, n_threads=1)
    assert not cert.ok and not cert.old_block_identical
    assert cert.max_abs_diff_old > 0.0
    assert cert.fingerprint_after_old != cert.fingerprint_before


# ---------------------------------------------------------------- save / load


@SETTINGS
@given(
    spec=csr_specs(),
    mmap=st.booleans(),
    expand=st.booleans(),
    meta=st.dictionaries(
        st.text(max_size=8).filter(
            lambda k: k not in {"format", "format_version", "n_states", "n_base", "nnz", "fingerprint"}
        ),
        st.text(max_size=12),
        max_size=3,
    ),
)
def test_save_load_round_trip(io_dir, spec, mmap, expand, meta):
    P = build(spec)
    if expand:
        P, _ = P.expand(np.full((2, P.n_base), 1.0 / P.n_base), n_threads=1)
    path = io_dir / f"m{next(_counter)}.safetensors"
    try:
        P.save(path, metadata=meta)
        L = mm.TransitionMatrix.load(path, mmap=mmap, verify=True, n_threads=1)
        assert L.fingerprint() == P.fingerprint()
        assert (L.n_states, L.n_base) == (P.n_states, P.n_base)
        for name in ("indptr", "indices", "data", "tail"):
            assert u8(getattr(L, name)) == u8(getattr(P, name))
        assert {k: L.metadata[k] for k in meta} == meta
        del L
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- each corruption kind is caught

KINDS = ["negative", "nan", "inf", "sum>1", "unsorted", "duplicate", "out-of-range", "new-state"]
MESSAGES = {
    "negative": "negative probability",
    "nan": "not finite",
    "inf": "not finite",
    "sum>1": "probabilities sum to",
    "unsorted": "column indices are not sorted",
    "duplicate": "duplicate column index",
    "out-of-range": "column index .* is out of range",
    "new-state": "a new state",
}


def corrupt(csr: sp.csr_array, n_base: int, row: int, kind: str):
    """CSR parts (indptr, indices, data) with one corruption of ``kind`` in ``row``.

    The row is first given two stored entries (columns 0 and 1, mass 0.25 each),
    so every kind applies; other rows stay valid.
    """
    n = csr.shape[0]
    dense_rows = [
        (csr.indices[csr.indptr[v] : csr.indptr[v + 1]].tolist(), csr.data[csr.indptr[v] : csr.indptr[v + 1]].tolist())
        for v in range(n)
    ]
    dense_rows[row] = ([0, 1], [0.25, 0.25])
    cols, vals = dense_rows[row]
    if kind == "negative":
        vals[1] = -0.25
    elif kind == "nan":
        vals[0] = np.nan
    elif kind == "inf":
        vals[1] = np.inf
    elif kind == "sum>1":
        vals[0] = 0.875
    elif kind == "unsorted":
        cols[:] = [1, 0]
    elif kind == "duplicate":
        cols[:] = [1, 1]
    elif kind == "out-of-range":
        cols[1] = n + 3
    elif kind == "new-state":
        cols[1] = n_base if n_base > 1 else n - 1
    indptr = np.zeros(n + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(c) for c, _ in dense_rows])
    indices = np.array([c for cs, _ in dense_rows for c in cs], dtype=np.int32)
    data = np.array([x for _, xs in dense_rows for x in xs], dtype=np.float32)
    return indptr, indices, data


@st.composite
def corruptions(draw):
    n = draw(st.integers(2, 7))
    kind = draw(st.sampled_from(KINDS))
    n_base = draw(st.integers(2, n - 1)) if kind == "new-state" and n > 2 else n
    if kind == "new-state" and n == 2:
        n = 3
        n_base = 2
    seed = draw(st.integers(0, 2**32 - 1))
    csr = random_csr(np.random.default_rng(seed), n, n_base, density=draw(st.sampled_from([0.0, 0.3, 0.8])))
    row = draw(st.integers(0, n - 1))
    return csr, n_base, row, kind


@SETTINGS
@given(case=corruptions())
def test_constructors_report_each_corruption_with_its_row(case):
    csr, n_base, row, kind = case
    n = csr.shape[0]
    indptr, indices, data = corrupt(csr, n_base, row, kind)
    with pytest.raises(mm.InvariantError, match=MESSAGES[kind]) as info:
        _core.TransitionMatrix.copy_csr(n, n_base, indptr, indices, data, 1e-5, 1)
    assert info.value.row == row
    if kind != "out-of-range":  # scipy itself refuses column ids beyond the shape
        bad = sp.csr_array((data, indices, indptr), shape=(n, n))
        with pytest.raises(mm.InvariantError, match=MESSAGES[kind]) as info:
            mm.TransitionMatrix.from_scipy(bad, n_base=n_base, n_threads=1)
        assert info.value.row == row
    # the same rows as new rows of an expansion are refused, naming the new row
    if kind not in {"out-of-range", "new-state"}:
        base = mm.TransitionMatrix.from_scipy(sp.csr_array((n_base, n_base)), n_threads=1)
        block = sp.csr_array((data, indices, indptr), shape=(n, n_base))  # kept as given, not canonicalised
        with pytest.raises(mm.InvariantError) as info:
            base.expand(block, n_threads=1)
        assert info.value.row == row


VALUE_KINDS = ["negative", "nan", "inf", "sum>1", "tail-mismatch", "tail-nan", "tail-negative"]


@SETTINGS
@given(spec=csr_specs(min_states=2), kind=st.sampled_from(VALUE_KINDS), pick=st.integers(0, 10**6))
def test_validate_reports_value_corruption_of_loaded_files(io_dir, spec, kind, pick):
    """Values are only checked on request (verify=True or validate()): both name the row."""
    _, n_base = spec
    P = build(spec)
    n = P.n_states
    data = np.array(P.data)
    tail = np.array(P.tail)
    if kind.startswith("tail"):
        row = pick % n
        tail[row] = {
            "tail-mismatch": tail[row] + 0.5 if tail[row] < 0.5 else tail[row] - 0.5,
            "tail-nan": np.nan,
            "tail-negative": -0.125,
        }[kind]
    else:
        if P.nnz == 0:
            return
        j = pick % P.nnz
        row = int(np.searchsorted(P.indptr, j, side="right") - 1)
        data[j] = {"negative": -0.125, "nan": np.nan, "inf": np.inf, "sum>1": 1.5}[kind]
    path = write_matrix_file(
        io_dir / f"v{next(_counter)}.safetensors",
        n_states=n,
        n_base=n_base,
        indptr=P.indptr,
        indices=P.indices,
        data=data,
        tail=tail,
    )
    try:
        L = mm.TransitionMatrix.load(path, n_threads=1)
        with pytest.raises(mm.InvariantError, match=f"row {row}: ") as info:
            L.validate(n_threads=1)
        assert info.value.row == row
        del L
        with pytest.raises(mm.InvariantError) as info:
            mm.TransitionMatrix.load(path, verify=True, n_threads=1)
        assert info.value.row == row
    finally:
        path.unlink()


# ---------------------------------------------------------------- counting


@SETTINGS
@given(
    n=st.integers(1, 6),
    seqs=st.lists(st.lists(st.integers(0, 5), max_size=12), min_size=1, max_size=4),
    smoothing=st.sampled_from([0.0, 0.5]),
    top_k=st.sampled_from([None, 1, 2]),
)
def test_from_sequences_rows_are_distributions(n, seqs, smoothing, top_k):
    seqs = [[t % n for t in s] for s in seqs]
    P = mm.TransitionMatrix.from_sequences(seqs, n, top_k=top_k, smoothing=smoothing, n_threads=1)
    P.validate(n_threads=1)
    dense = P.to_dense()
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, atol=1e-6)
    C = np.zeros((n, n))
    for s in seqs:
        if len(s) > 1:
            np.add.at(C, (np.array(s[:-1]), np.array(s[1:])), 1)
    if top_k is None:
        totals = C.sum(axis=1, keepdims=True)
        expected = np.where(totals > 0, (C + smoothing) / np.maximum(totals + smoothing * n, 1e-300), 1.0 / n)
        np.testing.assert_allclose(dense, expected, rtol=2e-7, atol=1e-7)
    else:
        assert np.diff(P.indptr).max(initial=0) <= top_k


# ---------------------------------------------------------------- open expansion


@st.composite
def incoming_blocks(draw, n_old: int, m: int):
    """(n_old, m) float32 block of an open expansion: random sparsity, row sums in [0, max_leak)."""
    seed = draw(st.integers(0, 2**32 - 1))
    max_leak = draw(st.sampled_from([0.0, 1e-6, 0.3, 0.999]))
    rng = np.random.default_rng(seed)
    block = rng.random((n_old, m)) * (rng.random((n_old, m)) < draw(st.sampled_from([0.0, 0.5, 1.0])))
    sums = block.sum(axis=1, keepdims=True)
    leak = rng.random((n_old, 1)) * max_leak
    block = np.divide(block * leak, sums, out=np.zeros_like(block), where=sums > 0)
    return block.astype(np.float32)


@SETTINGS
@given(data=st.data(), spec=csr_specs())
def test_open_expansion_scales_old_rows_and_certifies_the_leak(data, spec):
    P = build(spec)
    rows = data.draw(new_rows(P.n_base))
    n, nnz, m = P.n_states, P.nnz, rows.shape[0]
    block = data.draw(incoming_blocks(n, m))
    Q, cert = P.expand(rows, incoming=block, n_threads=1)
    # old stored bytes identical
    assert u8(Q.indptr[: n + 1]) == u8(P.indptr)
    assert u8(Q.indices[:nnz]) == u8(P.indices)
    assert u8(Q.data[:nnz]) == u8(P.data)
    assert u8(Q.tail[:n]) == u8(P.tail)
    eps = block.astype(np.float64).sum(axis=1)  # float32 entries summed in double, in order
    np.testing.assert_array_equal(Q.leak[:n], eps)
    assert np.all(Q.leak[n:] == 0.0)
    # p~(x | v) = (1 - eps_v) p(x | v) for every old x, p~(n + j | v) = block[v, j]
    v, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    np.testing.assert_array_equal(Q.prob(v, x), (1.0 - eps)[:, None] * P.prob(v, x))
    np.testing.assert_array_equal(Q.to_dense()[:n, n:], block.astype(np.float64))
    np.testing.assert_allclose(Q.to_dense().sum(axis=1), 1.0, atol=1e-5)
    # the certificate, recomputed from P and Q, against an independent computation
    assert cert.ok and cert.open and cert.old_block_identical, cert.failures()
    assert cert.to_dict() == mm.verify_expansion(P, Q, n_threads=1).to_dict()
    assert cert.max_leak == eps.max() and cert.mean_leak == pytest.approx(eps.mean(), rel=1e-12, abs=0)
    np.testing.assert_allclose(cert.forgetting_max_nats, (-np.log1p(-eps)).max(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(cert.forgetting_mean_nats, (-np.log1p(-eps)).mean(), rtol=1e-12, atol=1e-300)
    if eps.max() > 0:
        assert eps[cert.worst_leak_row] == eps.max()
        assert not mm.verify_expansion(P, Q, max_leak=float(np.nextafter(eps.max(), 0))).ok
    assert mm.verify_expansion(P, Q, max_leak=float(eps.max())).ok
    # a second expansion, open again, nests: Q's bytes (blocks included) are kept
    R, cert2 = Q.expand(rows, incoming=data.draw(incoming_blocks(n + m, m)), n_threads=1)
    assert cert2.ok and cert2.old_block_identical and cert2.fingerprint_after_old == Q.fingerprint()
    np.testing.assert_allclose(R.to_dense().sum(axis=1), 1.0, atol=1e-5)
    total = mm.verify_expansion(P, R, n_threads=1)
    assert total.ok
    np.testing.assert_allclose(total.forgetting_max_nats, (-np.log1p(-R.leak[:n])).max(), rtol=1e-9, atol=1e-15)


@SETTINGS
@given(data=st.data(), spec=csr_specs(), which=st.integers(0, 10**6), up=st.booleans())
def test_verify_open_expansion_catches_one_ulp_in_an_old_row(data, spec, which, up):
    csr, n_base = spec
    if csr.nnz == 0:
        return
    P = build(spec)
    rows = data.draw(new_rows(P.n_base))
    block = data.draw(incoming_blocks(P.n_states, rows.shape[0]))
    # The tampered matrix from parts: P with one stored float32 moved by one ulp, then expanded openly.
    bad = csr.copy()
    j = which % bad.nnz
    bad.data[j] = np.nextafter(bad.data[j], np.float32(1.0 if up else 0.0))
    if bad.data[j] == csr.data[j]:
        return  # already at the end of [0, 1] in that direction
    try:
        P_bad = mm.TransitionMatrix.from_scipy(bad, n_base=n_base, n_threads=1)
    except mm.InvariantError:
        return  # the ulp pushed a row above 1 + tol
    Q_bad, own = P_bad.expand(rows, incoming=block, n_threads=1)
    assert own.ok  # a valid open expansion of P_bad ...
    cert = mm.verify_expansion(P, Q_bad, n_threads=1)
    assert not cert.ok and not cert.old_block_identical  # ... but not of P
    assert cert.max_abs_diff_old > 0.0 and cert.fingerprint_after_old != cert.fingerprint_before


@SETTINGS
@given(data=st.data(), spec=csr_specs(), mmap=st.booleans())
def test_open_expansion_save_load_and_pickle_round_trip(io_dir, data, spec, mmap):
    import pickle

    P = build(spec)
    rows = data.draw(new_rows(P.n_base))
    Q, _ = P.expand(rows, incoming=data.draw(incoming_blocks(P.n_states, rows.shape[0])), n_threads=1)
    path = io_dir / f"open{next(_counter)}.safetensors"
    try:
        Q.save(path)
        for L in (mm.TransitionMatrix.load(path, mmap=mmap, verify=True, n_threads=1), pickle.loads(pickle.dumps(Q))):
            assert L.fingerprint() == Q.fingerprint() and L.is_open
            for name in ("indptr", "indices", "data", "tail", "leak"):
                assert u8(getattr(L, name)) == u8(getattr(Q, name))
            assert (L.incoming != Q.incoming).nnz == 0
            assert mm.verify_expansion(P, L, n_threads=1).ok
        del L
    finally:
        path.unlink(missing_ok=True)
