"""expand() and verify_expansion(): old rows kept bit for bit, compositions,
the certificate's figures on good and hand-made bad expansions, and rejected
new rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import dense_of, random_csr

import markovmem as mm

FIELDS = [
    "n_old",
    "n_new",
    "n_base",
    "same_n_base",
    "old_block_identical",
    "max_abs_diff_old",
    "leaked_mass_to_new",
    "new_to_new_mass",
    "max_row_sum_error",
    "fingerprint_before",
    "fingerprint_after_old",
    "fingerprint_after",
    "after_valid",
    "after_violation",
    "ok",
    "open",
    "max_leak",
    "mean_leak",
    "worst_leak_row",
    "forgetting_max_nats",
    "forgetting_mean_nats",
    "leak_bound",
]


def u8(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def assert_old_rows_bitwise(P: mm.TransitionMatrix, Q: mm.TransitionMatrix) -> None:
    n, nnz = P.n_states, P.nnz
    assert np.array_equal(u8(Q.indptr[: n + 1]), u8(P.indptr))
    assert np.array_equal(u8(Q.indices[:nnz]), u8(P.indices))
    assert np.array_equal(u8(Q.data[:nnz]), u8(P.data))
    assert np.array_equal(u8(Q.tail[:n]), u8(P.tail))


@pytest.fixture
def P(rng) -> mm.TransitionMatrix:
    return mm.TransitionMatrix.from_scipy(random_csr(rng, 8, density=0.4, full_rows=True))


def test_expand_keeps_old_rows_bitwise(rng, P):
    rows = random_csr(rng, 3, density=0.5)[:, :].toarray()
    new = np.zeros((3, 8))
    new[:, :3] = rows
    Q, cert = P.expand(sp.csr_array(new))
    assert (Q.n_states, Q.n_base, Q.nnz) == (11, 8, P.nnz + np.count_nonzero(new))
    assert_old_rows_bitwise(P, Q)
    assert cert.ok and cert.failures() == []
    np.testing.assert_array_equal(Q.to_dense()[:8, :8], P.to_dense())
    assert np.all(Q.to_dense()[:, 8:] == 0.0)  # nothing moves to a new state
    np.testing.assert_allclose(Q.to_dense()[8:, :8], dense_of(Q)[8:, :8], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(Q.to_dense().sum(axis=1), 1.0, atol=1e-6)
    Q.validate()


def test_expand_certificate_fields(P):
    Q, cert = P.expand(np.eye(2, 8) * 0.5)
    assert isinstance(cert, mm.ExpansionCertificate)
    assert list(cert.to_dict()) == FIELDS
    assert (cert.n_old, cert.n_new, cert.n_base) == (8, 2, 8)
    assert cert.same_n_base and cert.old_block_identical and cert.after_valid
    assert cert.max_abs_diff_old == cert.leaked_mass_to_new == cert.new_to_new_mass == 0.0
    assert cert.max_row_sum_error <= 1e-6
    assert cert.fingerprint_before == P.fingerprint() == cert.fingerprint_after_old
    assert cert.fingerprint_after == Q.fingerprint() != P.fingerprint()
    assert cert.after_violation == ""
    assert json.loads(json.dumps(cert.to_dict())) == cert.to_dict()
    assert mm.ExpansionCertificate.from_dict(cert.to_dict()) == cert
    text = str(cert)
    assert "certificate" in text and text.rstrip().endswith("OK")
    assert "8 -> 10 (+2), n_base 8" in text
    assert mm.verify_expansion(P, Q) == cert  # recomputed independently, same figures
    with pytest.raises(ValueError, match="missing"):
        mm.ExpansionCertificate.from_dict({"ok": True})


@pytest.mark.parametrize(
    "convert",
    [np.asarray, sp.csr_array, sp.coo_array, sp.csc_matrix, lambda a: a.tolist()],
    ids=["dense", "csr", "coo", "csc", "list"],
)
def test_expand_accepts_any_2d_input(P, convert):
    rows = np.array([[0.0, 0.5, 0.0, 0.0, 0.25, 0.0, 0.0, 0.0]])
    Q, cert = P.expand(convert(rows))
    assert cert.ok
    ref, _ = P.expand(sp.csr_array(rows))
    assert Q.fingerprint() == ref.fingerprint()


def test_expand_accepts_predict_object(P):
    class Fit:
        def predict(self):
            return np.full((2, 8), 1 / 8)

    Q, cert = P.expand(Fit())
    assert cert.ok and Q.n_states == 10
    np.testing.assert_allclose(Q.prob(9, np.arange(8)), 1 / 8, rtol=1e-6)


def test_expand_empty_new_row_is_uniform_over_base(P):
    Q, cert = P.expand(sp.csr_array((1, 8)))
    assert cert.ok
    np.testing.assert_allclose(Q.to_dense()[8], [1 / 8] * 8 + [0.0])


@pytest.mark.parametrize(
    "before",
    [np.array([[1.0]]), np.eye(2), np.zeros((2, 2)), np.array([[0.5, 0.5], [0.0, 0.25]])],
    ids=["1x1", "identity", "all-tail", "mixed"],
)
@pytest.mark.parametrize("m", [1, 3])
def test_expand_by_rows_adding_no_entries(before, m):
    """New rows that store nothing (nnz unchanged) still certify: the old block is the whole data."""
    P = mm.TransitionMatrix.from_scipy(before)
    Q, cert = P.expand(sp.csr_array((m, P.n_base)))
    assert cert.ok, cert.failures()
    assert cert.fingerprint_after_old == P.fingerprint()
    assert Q.nnz == P.nnz
    assert_old_rows_bitwise(P, Q)
    np.testing.assert_allclose(Q.to_dense()[P.n_states :, : P.n_base], 1.0 / P.n_base)


def test_expansions_compose(rng, P):
    Q1, c1 = P.expand(np.eye(2, 8) * 0.75)
    Q2, c2 = Q1.expand(sp.csr_array(random_csr(rng, 3, density=0.6).toarray() @ np.eye(3, 8)))
    assert c1.ok and c2.ok
    assert (Q2.n_states, Q2.n_base) == (13, 8)
    assert (c2.n_old, c2.n_new, c2.n_base) == (10, 3, 8)
    assert_old_rows_bitwise(P, Q2)
    assert_old_rows_bitwise(Q1, Q2)
    for before in (P, Q1):
        cert = mm.verify_expansion(before, Q2)
        assert cert.ok, cert.failures()
    assert mm.verify_expansion(P, Q2).n_new == 5
    dense = Q2.to_dense()
    assert np.all(dense[:, 8:] == 0.0)
    np.testing.assert_array_equal(dense[:10, :10], Q1.to_dense())
    # the second expansion's rows only live over the base states
    with pytest.raises(ValueError, match=r"shape \(1, 10\); expected 8 columns"):
        Q1.expand(np.full((1, 10), 0.1))


def test_verify_expansion_of_identity_is_ok(P):
    cert = mm.verify_expansion(P, P)
    assert cert.ok and cert.n_new == 0


# ---------------------------------------------------------------- each failure mode


@pytest.fixture
def P3() -> mm.TransitionMatrix:
    return mm.TransitionMatrix.from_scipy(np.array([[0.5, 0.25, 0.0], [0.0, 0.0, 1.0], [0.1, 0.0, 0.0]]))


def expanded_dense(P3) -> np.ndarray:
    Q, cert = P3.expand(np.array([[1.0, 0.0, 0.0]]))
    assert cert.ok
    return Q.to_scipy().toarray().astype(np.float64)


def test_failure_changed_old_value(P3):
    dense = expanded_dense(P3)
    dense[0, 1] = 0.2
    cert = mm.verify_expansion(P3, mm.TransitionMatrix.from_scipy(dense, n_base=3))
    assert not cert.ok
    assert cert.same_n_base and not cert.old_block_identical
    assert cert.max_abs_diff_old == pytest.approx(0.05, rel=1e-6)  # 0.25 -> 0.2 (and the tail 0.25 -> 0.3)
    assert cert.leaked_mass_to_new == 0.0 and cert.new_to_new_mass == 0.0
    assert cert.fingerprint_after_old != cert.fingerprint_before
    assert cert.after_valid
    assert cert.failures() == [
        "old rows are not byte-identical",
        "old transition probabilities changed by up to 0.05",
        "fingerprint of the old block changed",
    ]
    assert "FAILED: old rows are not byte-identical" in str(cert)


def test_failure_one_ulp_change_is_caught(P3):
    dense = expanded_dense(P3).astype(np.float32)
    dense[2, 0] = np.nextafter(dense[2, 0], np.float32(0))
    cert = mm.verify_expansion(P3, mm.TransitionMatrix.from_scipy(dense, n_base=3))
    assert not cert.ok and not cert.old_block_identical
    assert 0.0 < cert.max_abs_diff_old < 1e-8


def test_failure_old_row_with_mass_on_new_state(P3):
    dense = expanded_dense(P3)
    dense[1, 2], dense[1, 3] = 0.75, 0.25  # row 1 moves a quarter of its mass to the new state 3
    after = mm.TransitionMatrix.from_scipy(dense, n_base=4)
    cert = mm.verify_expansion(P3, after)
    assert not cert.ok
    assert cert.leaked_mass_to_new == pytest.approx(0.3)  # row 2's tail 0.9 now also reaches state 3
    assert cert.max_abs_diff_old == pytest.approx(0.25)
    assert not cert.same_n_base
    assert any("on new states" in f for f in cert.failures())


def test_failure_old_row_stores_mass_on_new_state_only(P3):
    # Same n_base change, but the only leak of row 1 is a stored entry.
    dense = np.zeros((4, 4))
    dense[:3, :3] = expanded_dense(P3)[:3, :3]
    dense[0, 2] = 0.25  # row 0 stores its whole mass: no tail left to leak
    dense[2, 1:3] = 0.45  # row 2 stores everything too
    dense[1, 2], dense[1, 3] = 0.5, 0.5
    dense[3, 0] = 1.0
    cert = mm.verify_expansion(P3, mm.TransitionMatrix.from_scipy(dense, n_base=4))
    assert cert.leaked_mass_to_new == pytest.approx(0.5)
    assert not cert.ok


def test_failure_n_base_changed_tail_leaks(P3):
    dense = expanded_dense(P3)
    after = mm.TransitionMatrix.from_scipy(dense, n_base=4)  # same stored values, larger n_base
    cert = mm.verify_expansion(P3, after)
    assert not cert.ok
    assert not cert.same_n_base and not cert.old_block_identical
    # row 0's tail 0.25 was on state 2 only; now it splits over states 2 and 3
    assert cert.leaked_mass_to_new == pytest.approx(0.3)  # row 2: 0.9 over 3 free states
    assert cert.max_abs_diff_old == pytest.approx(0.15)
    assert cert.new_to_new_mass == 0.0  # the new row stores 1.0 on a base state
    assert cert.failures()[0] == "n_base changed: old tails would spread onto new states"


def test_failure_new_row_with_mass_on_new_state(P3):
    dense = expanded_dense(P3)
    dense[3, 0], dense[3, 3] = 0.5, 0.5
    cert = mm.verify_expansion(P3, mm.TransitionMatrix.from_scipy(dense, n_base=4))
    assert not cert.ok
    assert cert.new_to_new_mass == pytest.approx(0.5)
    assert "a new row puts mass 0.5 on states >= n_base" in cert.failures()


def test_failure_new_row_tail_reaches_new_states(P3):
    dense = expanded_dense(P3)
    dense[3, 0] = 0.4  # tail 0.6 over 3 free states once n_base = 4
    cert = mm.verify_expansion(P3, mm.TransitionMatrix.from_scipy(dense, n_base=4))
    assert cert.new_to_new_mass == pytest.approx(0.2)


def test_failure_after_has_fewer_states(P3):
    with pytest.raises(ValueError, match="the expanded matrix has 2 states, fewer than the original's 3"):
        mm.verify_expansion(P3, mm.TransitionMatrix.from_scipy(np.eye(2)))


@pytest.mark.parametrize("bad", [None, np.eye(3), "P"], ids=["none", "array", "str"])
def test_verify_expansion_type_errors(P3, bad):
    with pytest.raises(TypeError, match="must be a markovmem.TransitionMatrix"):
        mm.verify_expansion(P3, bad)
    with pytest.raises(TypeError, match="before must be"):
        mm.verify_expansion(bad, P3)


def test_verify_expansion_against_dense_reference(rng):
    """Figures of arbitrary 'after' matrices against numpy on the dense forms."""
    for _ in range(20):
        n_old = int(rng.integers(2, 6))
        n_new = int(rng.integers(0, 3))
        before = mm.TransitionMatrix.from_scipy(random_csr(rng, n_old, density=0.5))
        n_base_after = int(rng.choice([n_old, n_old + n_new]))
        after = mm.TransitionMatrix.from_scipy(
            random_csr(rng, n_old + n_new, n_base_after, density=0.5), n_base=n_base_after
        )
        cert = mm.verify_expansion(before, after, n_threads=1)
        A, B = dense_of(before), dense_of(after)
        assert cert.max_abs_diff_old == pytest.approx(np.abs(B[:n_old, :n_old] - A).max(), rel=1e-9, abs=1e-15)
        assert cert.leaked_mass_to_new == pytest.approx(B[:n_old, n_old:].sum(axis=1).max(initial=0.0), abs=1e-12)
        assert cert.new_to_new_mass == pytest.approx(B[n_old:, before.n_base :].sum(axis=1).max(initial=0.0), abs=1e-12)
        assert cert.same_n_base == (after.n_base == before.n_base)
        assert not cert.ok


# ---------------------------------------------------------------- bad new rows


BAD_NEW_ROWS = [
    (np.zeros((1, 7)), ValueError, r"new_rows has shape \(1, 7\); expected 8 columns", None),
    (np.zeros((1, 9)), ValueError, r"new_rows has shape \(1, 9\); expected 8 columns", None),
    (np.zeros((0, 8)), ValueError, "new_rows has no rows; expected at least one new state", None),
    (sp.csr_array((0, 8)), ValueError, "new_rows has no rows", None),
    (np.zeros(8), ValueError, r"new_rows must be 2-D; got shape \(8,\)", None),
    (
        np.array([[0.5] + [0] * 7, [np.nan] + [0] * 7]),
        mm.InvariantError,
        "new_rows row 1: probability is not finite",
        1,
    ),
    (
        sp.csr_array(np.array([[0.5] + [0] * 7, [0.1] + [np.inf] + [0] * 6])),
        mm.InvariantError,
        "new row 1: probability at column 1 is not finite",
        1,
    ),
    (np.array([[0.0] * 7 + [-0.1]]), mm.InvariantError, "new row 0: negative probability", 0),
    (np.array([[0.5] * 8, [0.1] * 8]), mm.InvariantError, "new row 0: probabilities sum to 4", 0),
    (np.array([[0.125] * 8, [0.6, 0.6] + [0.0] * 6]), mm.InvariantError, "new row 1: probabilities sum to 1.2", 1),
    (
        sp.csr_array((np.float32([0.2, 0.3]), np.int32([3, 1]), np.array([0, 2])), shape=(1, 8)),
        mm.InvariantError,
        r"new row 0: column indices are not sorted \(3 before 1\)",
        0,
    ),
    (
        sp.csr_array((np.float32([0.2, 0.3]), np.int32([1, 1]), np.array([0, 0, 2])), shape=(2, 8)),
        mm.InvariantError,
        "new row 1: duplicate column index 1",
        1,
    ),
    (np.full((1, 8), 0.1j), TypeError, "must hold real numbers", None),
]


@pytest.mark.parametrize(
    ("rows", "exc", "match", "row"),
    BAD_NEW_ROWS,
    ids=[
        "too-few-columns",
        "too-many-columns",
        "no-rows",
        "no-rows-sparse",
        "1-D",
        "nan",
        "inf",
        "negative",
        "sum>1",
        "sum>1-row1",
        "unsorted",
        "duplicate",
        "complex",
    ],
)
def test_expand_rejects_bad_new_rows(P, rows, exc, match, row):
    with pytest.raises(exc, match=match) as info:
        P.expand(rows)
    if exc is mm.InvariantError:
        assert isinstance(info.value, ValueError)
        assert info.value.row == row


def test_expand_tol(P):
    row = np.array([[0.5, 0.500004] + [0.0] * 6])
    _, cert = P.expand(row)
    assert cert.ok
    with pytest.raises(mm.InvariantError, match="above 1"):
        P.expand(row, tol=1e-7)


# ---------------------------------------------------------------- in-place expansion


@pytest.fixture
def roomy() -> mm.TransitionMatrix:
    """A matrix built with spare capacity (from_topk / from_scipy reserve some)."""
    rng = np.random.default_rng(11)
    T, k = 300, 4
    idx = (np.arange(k)[None, :] * 7 + rng.integers(0, T, size=(T, 1))) % T
    return mm.TransitionMatrix.from_topk(idx, np.full((T, k), 0.2, dtype=np.float32))


def test_in_place_expansion_shares_old_memory_and_certifies(roomy) -> None:
    before = {n: np.array(getattr(roomy, n)) for n in ("indptr", "indices", "data", "tail")}
    Q, cert = roomy.expand(sp.csr_array(np.eye(2, 300) * 0.5))
    assert np.shares_memory(roomy.data, Q.data)  # nothing old was copied
    assert cert.ok and cert.fingerprint_after_old == roomy.fingerprint()
    for n, arr in before.items():
        assert arr.tobytes() == getattr(roomy, n).tobytes()
    assert mm.verify_expansion(roomy, Q).ok


def test_sibling_expansions_never_overwrite_each_other(roomy) -> None:
    Q1, c1 = roomy.expand(sp.csr_array(np.eye(2, 300) * 0.5))
    Q2, c2 = roomy.expand(sp.csr_array(np.eye(2, 300, k=5) * 0.25))
    assert c1.ok and c2.ok
    # The second expansion may not reuse the spare capacity the first one holds.
    assert Q1.row(300).indices.tolist() == [0] and Q1.row(300).probs.tolist() == [0.5]
    assert Q2.row(300).indices.tolist() == [5] and Q2.row(300).probs.tolist() == [0.25]
    assert not np.shares_memory(Q1.data, Q2.data)
    assert mm.verify_expansion(roomy, Q1).ok and mm.verify_expansion(roomy, Q2).ok


def test_spare_capacity_is_reused_once_the_expansion_is_gone(roomy) -> None:
    Q1, _ = roomy.expand(sp.csr_array(np.eye(1, 300) * 0.5))
    fp1 = Q1.fingerprint()
    del Q1
    Q2, c2 = roomy.expand(sp.csr_array(np.eye(1, 300, k=3) * 0.5))
    assert c2.ok and np.shares_memory(roomy.data, Q2.data)
    assert Q2.fingerprint() != fp1
    Q3, c3 = Q2.expand(sp.csr_array(np.eye(1, 300, k=9)))  # chains in place too
    assert c3.ok and mm.verify_expansion(roomy, Q3).ok
    assert Q3.row(300).indices.tolist() == [3] and Q3.row(301).indices.tolist() == [9]


def test_expansion_beyond_capacity_copies(roomy) -> None:
    dense = sp.csr_array(np.full((50, 300), 1 / 300))  # 15,000 entries: more than the spare room
    Q, cert = roomy.expand(dense)
    assert cert.ok and not np.shares_memory(roomy.data, Q.data)


# ---------------------------------------------------------------- open expansion


def open_pair(P):
    """P expanded by two new states, with old rows 1 and 3 leaking to them."""
    B = np.zeros((8, 2))
    B[1] = [0.1, 0.05]
    B[3, 1] = 0.25
    return P.expand(np.full((2, 8), 0.125), incoming=B)


def test_open_expansion_figures_and_views(P):
    Q, cert = open_pair(P)
    assert cert.ok and cert.open and Q.is_open and not P.is_open
    assert cert.max_leak == np.float64(np.float32(0.25)) and cert.worst_leak_row == 3
    assert cert.leaked_mass_to_new == cert.max_leak
    eps = np.array([0, 0.15, 0, 0.25, 0, 0, 0, 0], dtype=np.float64)
    np.testing.assert_allclose(Q.leak[:8], eps, rtol=1e-7)
    assert cert.forgetting_max_nats == pytest.approx(-np.log(0.75), rel=1e-6)
    # row() and to_scipy() show the stored bytes; prob() and incoming the true p~
    idx, probs, tail = Q.row(3)
    assert probs.tobytes() == P.row(3).probs.tobytes() and tail == P.row(3).tail
    assert (Q.to_scipy()[:8, :8] != P.to_scipy()).nnz == 0 and Q.to_scipy()[:8, 8:].nnz == 0
    x = int(idx[0])
    assert Q.prob(3, x) == (1.0 - Q.leak[3]) * P.prob(3, x)
    assert Q.prob(3, 9) == Q.incoming[3, 9] == np.float32(0.25) and Q.prob(3, 8) == 0.0
    assert Q.incoming.shape == (10, 10) and Q.incoming.nnz == 3
    np.testing.assert_allclose(Q.incoming.sum(axis=1), Q.leak)
    np.testing.assert_allclose(Q.step(np.full(10, 0.1)).sum(), 1.0, atol=1e-6)
    text = str(cert)
    assert "max leak" in text and "(row 3)" in text and "forgetting max (nats)" in text
    assert json.loads(json.dumps(cert.to_dict()))["leak_bound"] is None
    assert mm.ExpansionCertificate.from_dict(cert.to_dict()) == cert


def test_open_expansion_max_leak_bound(P):
    Q, _ = open_pair(P)
    for bound, ok in ((0.05, False), (0.11, True)):  # every row leaks 2 x float32(0.05), about 0.1
        _, bounded = P.expand(np.full((2, 8), 0.125), incoming=np.full((8, 2), 0.05), max_leak=bound)
        assert bounded.ok is ok and bounded.leak_bound == bound and bounded.worst_leak_row == 0
    tight = mm.verify_expansion(P, Q, max_leak=0.2)
    assert not tight.ok and tight.leak_bound == 0.2
    assert any("old row 3 leaks" in f and "above max_leak = 0.2" in f for f in tight.failures())
    assert mm.verify_expansion(P, Q, max_leak=0.25).ok
    with pytest.raises(ValueError, match="max_leak is -1"):
        mm.verify_expansion(P, Q, max_leak=-1)


def test_assert_expansion_preserves_open(P):
    from markovmem.testing import assert_expansion_preserves

    Q, _ = open_pair(P)
    with pytest.raises(AssertionError, match=r"leaks more than max_leak = 0: old row 3 moves 0\.25"):
        assert_expansion_preserves(P, Q)
    cert = assert_expansion_preserves(P, Q, max_leak=0.25)
    assert cert.open and cert.worst_leak_row == 3
    Z, _ = P.expand(np.full((1, 8), 0.125), incoming=np.zeros((8, 1)))
    assert assert_expansion_preserves(P, Z).open  # an open expansion that leaks nothing


def test_open_expansion_then_closed_keeps_the_block(P):
    Q, _ = open_pair(P)
    R, cert = Q.expand(np.full((1, 8), 0.125))
    assert cert.ok and not cert.open and cert.old_block_identical
    assert R.prob(3, 9) == Q.prob(3, 9) and (R.incoming[:10, :10] != Q.incoming).nnz == 0
    assert mm.verify_expansion(P, R).open


@pytest.mark.parametrize(
    ("incoming", "error", "match"),
    [
        (np.zeros((7, 2)), ValueError, r"incoming has shape \(7, 2\); expected \(n_states, m\) = \(8, 2\)"),
        (np.zeros((8, 3)), ValueError, r"incoming has shape \(8, 3\)"),
        (np.zeros(8), ValueError, r"incoming has shape \(8,\)"),
        (np.where(np.eye(8, 2) > 0, -0.1, 0.0), mm.InvariantError, r"incoming row 0, column 0: probability is -0\.1"),
        (np.where(np.eye(8, 2, k=-4) > 0, np.nan, 0.0), mm.InvariantError, r"incoming row 4, column 0: .*nan"),
        (np.where(np.arange(16).reshape(8, 2) >= 14, 0.5, 0.0), mm.InvariantError, r"incoming row 7 sums to 1"),
    ],
    ids=["rows", "columns", "1-d", "negative", "nan", "sum>=1"],
)
def test_open_expansion_rejects_bad_incoming(P, incoming, error, match):
    with pytest.raises(error, match=match) as info:
        P.expand(np.full((2, 8), 0.125), incoming=incoming)
    if error is mm.InvariantError:
        assert info.value.row is not None


def test_open_expansion_rejects_sparse_bad_incoming(P):
    nan = sp.csr_array((np.array([np.nan]), np.array([1]), np.array([0, 0, 0, 1, 1, 1, 1, 1, 1])), shape=(8, 2))
    with pytest.raises(mm.InvariantError, match=r"incoming row 2, column 1: probability is nan"):
        P.expand(np.full((2, 8), 0.125), incoming=nan)
    wide = sp.csr_array((np.array([0.1]), np.array([5]), np.array([0, 1, 1, 1, 1, 1, 1, 1, 1])), shape=(8, 6))
    bad = sp.csr_array((8, 2))
    bad.indptr, bad.indices, bad.data = wide.indptr, wide.indices, wide.data  # column 5 of a (8, 2) block
    with pytest.raises(IndexError, match=r"incoming row 0: column 5 is out of range \[0, m = 2\)"):
        P.expand(np.full((2, 8), 0.125), incoming=bad)
    with pytest.raises(ValueError, match="max_leak is -0.5"):
        P.expand(np.full((2, 8), 0.125), incoming=np.zeros((8, 2)), max_leak=-0.5)


def test_docs_open_expansion_example_runs(capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "concepts" / "expansion.md").read_text()
    m = re.search(
        r"<!-- open-expansion-example -->\n```python\n(.*?)```\n<!-- /open-expansion-example -->", text, re.DOTALL
    )
    assert m, "docs/concepts/expansion.md lost its open expansion example"
    namespace: dict = {}
    exec(compile(m.group(1), "docs/concepts/expansion.md", "exec"), namespace)  # noqa: S102 - runs the doc's own code
    assert namespace["cert"].ok and "open expansion: max leak" in capsys.readouterr().out
