"""Regression tests for bugs found while writing the core test suite (each
failed against the first version of the core and passes since its fix)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import markovmem as mm
from helpers import write_matrix_file


# 1. A row that stores every base state but sums below 1 has a tail with nowhere
#    to go.  The constructors accept it (their core check runs with opts.tail =
#    false, so the "stores every base state yet has tail mass" rule is skipped),
#    yet validate() rejects the very matrix they built, and the row's
#    probabilities (prob / to_dense / step) sum to less than 1.
@pytest.mark.parametrize(
    "build",
    [
        lambda: mm.TransitionMatrix.from_scipy(np.array([[0.5, 0.2], [0.3, 0.7]])),
        lambda: mm.TransitionMatrix.from_topk(np.array([[0, 1], [1, 0]]), np.array([[0.5, 0.2], [0.5, 0.5]])),
        lambda: mm.TransitionMatrix.from_scipy(np.array([[0.25, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 1.0, 0.0]]), n_base=1),
    ],
    ids=["from_scipy", "from_topk", "from_scipy-n_base"],
)
def test_constructors_only_build_matrices_that_validate(build):
    try:
        P = build()
    except mm.InvariantError as e:  # rejecting the row is a fine fix
        assert e.row == 0
        return
    P.validate()  # currently: InvariantError "row 0: stores every base state yet has tail mass 0.3"
    np.testing.assert_allclose(P.to_dense().sum(axis=1), 1.0, atol=1e-5)


def test_expand_rejects_full_new_row_summing_below_one():
    # expand() documents InvariantError for a new row that is not a distribution over
    # base states; instead it returns Q with a failed certificate (ok=False,
    # after_violation "row 2: stores every base state yet has tail mass 0.8").
    P = mm.TransitionMatrix.from_scipy(np.eye(2))
    with pytest.raises(mm.InvariantError) as info:
        P.expand(np.array([[0.1, 0.1]]))
    assert info.value.row == 0


# 2. A NaN tolerance disables every row-sum check ("sum > 1 + tol" is false for NaN):
#    rows summing to 2 are accepted, and validate(tol=nan) passes anything.
@pytest.mark.parametrize(
    "call",
    [
        lambda: mm.TransitionMatrix.from_scipy(np.eye(2) * 2.0, tol=float("nan")),
        lambda: mm.TransitionMatrix.from_topk(np.array([[0], [1]]), np.array([[2.0], [2.0]]), tol=float("nan")),
        lambda: mm.TransitionMatrix.from_scipy(np.eye(2)).expand(np.array([[2.0, 0.0]]), tol=float("nan")),
        lambda: mm.TransitionMatrix.from_scipy(np.eye(2)).validate(tol=float("nan")),
        lambda: mm.verify_expansion(mm.TransitionMatrix.from_scipy(np.eye(2)),
                                    mm.TransitionMatrix.from_scipy(np.eye(2)), tol=float("nan")),
    ],
    ids=["from_scipy", "from_topk", "expand", "validate", "verify_expansion"],
)
def test_nan_tolerance_is_rejected(call):
    with pytest.raises(ValueError, match="tol"):
        call()


# 3. A header whose strings are not UTF-8 (a bit flip in the metadata, or a
#    hand-crafted file) escapes as a bare UnicodeDecodeError from the binding's
#    str conversion, without the file name or the usual "not a valid markovmem
#    matrix" message (safetensors itself requires UTF-8 JSON).
def test_non_utf8_header_is_reported_as_a_corrupt_file(tmp_path: Path):
    path = write_matrix_file(tmp_path / "m.safetensors", n_states=2, n_base=2, indptr=[0, 1, 2], indices=[0, 1],
                             data=[1.0, 1.0], meta={"note": "x"})
    path.write_bytes(path.read_bytes().replace(b'"note":"x"', b'"note":"\xff"'))
    with pytest.raises(ValueError, match="is not a valid markovmem matrix") as info:
        mm.TransitionMatrix.load(path)
    assert not isinstance(info.value, UnicodeDecodeError)


# 4. scipy (>= 1.14) has 1-D sparse arrays; giving one where a 2-D matrix is
#    expected fails with a bare "IndexError: tuple index out of range" from
#    _csr_parts instead of the ValueError dense 1-D input gets.
@pytest.mark.parametrize(
    "call",
    [
        lambda: mm.TransitionMatrix.from_scipy(sp.coo_array(np.full(3, 1 / 3))),
        lambda: mm.TransitionMatrix.from_scipy(np.eye(3)).expand(sp.coo_array(np.full(3, 1 / 3))),
    ],
    ids=["from_scipy", "expand"],
)
def test_one_dimensional_sparse_input_gives_value_error(call):
    with pytest.raises(ValueError, match="2-D"):
        call()


# 5. Dense input of a non-numeric dtype gets numpy's internal "ufunc 'isfinite'
#    not supported ..." TypeError instead of the "must hold real numbers" message
#    sparse input of the same dtype gets.
@pytest.mark.parametrize("dense", [np.array([["a", "b"], ["c", "d"]]), np.array([[None, 1], [1, None]])],
                         ids=["str", "object"])
def test_non_numeric_dense_input_message(dense):
    with pytest.raises(TypeError, match="must hold real numbers"):
        mm.TransitionMatrix.from_scipy(dense)


# 6. State ids above int64 are wrapped by the int64 conversion before the range
#    check, so the message names a value the caller never passed.
def test_out_of_range_uint64_id_is_reported_as_given():
    P = mm.TransitionMatrix.from_scipy(np.eye(3))
    with pytest.raises(IndexError, match="18446744073709551615"):
        P.prob(np.array([2**64 - 1], dtype=np.uint64), np.array([0]))


# 7. cpp/include/markovmem/io.hpp documents that extra metadata keys "must not
#    start with "markovmem."", but save() only refuses the six reserved names.
def test_metadata_keys_in_the_markovmem_namespace_are_refused(tmp_path: Path):
    P = mm.TransitionMatrix.from_scipy(np.eye(2))
    with pytest.raises(ValueError, match="markovmem."):
        P.save(tmp_path / "m.safetensors", metadata={"markovmem.version": "9"})
    assert list(tmp_path.iterdir()) == []


def test_logit_support_search_beats_the_best_single_state_on_the_demo_counts():
    """The demo's 32 examples of a new operator '#' (a#b = a*b) against its distilled matrix: the logit
    link's support search once stopped at {'=', '3'} (objective 0.225) although '*' alone reaches 0.152.
    The file holds that matrix (``llm.distill(mode="corpus")`` of the demo's base model, seed 0, 17 tokens)
    and the counts of what followed '#'.  The cause (found when the vectorised exp moved a last bit): '*'
    stores nearly all of the mass, so the exact line gain computed Z(t) as Z - (its old mass) + (its new
    mass), which cancelled to a rounding error; phi looked unbounded below at t = -bound and a spurious
    gain of ~440 picked whichever shortlisted row came first.  Even s = 1 chose '=' (0.309)."""
    d = np.load(Path(__file__).parent / "data" / "demo_operator_fit.npz")
    n = int(d["n_base"])
    vocab = d["vocab"].tolist()
    P = mm.TransitionMatrix.from_scipy(sp.csr_array((d["p_data"], d["p_indices"], d["p_indptr"]), shape=(n, n)))
    C = sp.csr_array((d["c_data"], d["c_indices"], d["c_indptr"]), shape=(1, n))
    fit = mm.fit_alpha(P, C, s=2, link="logit")
    singles = {v: mm.fit_alpha(P, C, s=1, link="logit", support=[np.array([i])]).kl[0] for i, v in enumerate(vocab)}
    assert singles["*"] == min(singles.values())
    assert fit.kl[0] <= singles["*"] + 1e-9
    assert vocab.index("*") in fit.support[0]
    one = mm.fit_alpha(P, C, s=1, link="logit")
    assert one.support[0].tolist() == [vocab.index("*")]
    assert one.kl[0] == pytest.approx(singles["*"], rel=1e-9)
