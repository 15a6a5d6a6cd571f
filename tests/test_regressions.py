"""Regression tests for bugs found while writing the core test suite (each
failed against the first version of the core and passes since its fix)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import write_matrix_file

import markovmem as mm


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
        lambda: mm.TransitionMatrix.from_scipy(
            np.array([[0.25, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 1.0, 0.0]]), n_base=1
        ),
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
        lambda: mm.verify_expansion(
            mm.TransitionMatrix.from_scipy(np.eye(2)), mm.TransitionMatrix.from_scipy(np.eye(2)), tol=float("nan")
        ),
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
    path = write_matrix_file(
        tmp_path / "m.safetensors",
        n_states=2,
        n_base=2,
        indptr=[0, 1, 2],
        indices=[0, 1],
        data=[1.0, 1.0],
        meta={"note": "x"},
    )
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
@pytest.mark.parametrize(
    "dense", [np.array([["a", "b"], ["c", "d"]]), np.array([[None, 1], [1, None]])], ids=["str", "object"]
)
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


# ---------------------------------------------------------------- issue 18: every entry point as safe as the file
# Cases that only need "raises this, no signal" are in tests/test_bad_input.py.


# item 8: a support row flat over the observed tokens (a uniform row) made the closed form
# divide rounding by rounding: alpha = -1.8e285 for a two-token target.
def test_closed_form_gives_a_flat_support_row_zero():
    D = np.full((6, 6), 1 / 6)
    D[1] = [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]
    P = mm.TransitionMatrix.from_scipy(D)
    C = sp.csr_array(np.array([[3.0, 1.0, 0, 0, 0, 0], [1.0, 1, 1, 1, 1, 1]]))
    uniform = mm.closed_form_alpha(P, C, [[0], [0, 3]])
    assert uniform.alpha.toarray().tolist() == [[0.0] * 6, [0.0] * 6]  # the minimum-norm answer
    assert np.all(np.isfinite(uniform.kl))
    # A flat atom next to an informative one: the informative one is solved alone.
    both = mm.closed_form_alpha(P, C[[0]], [[0, 1]])
    alone = mm.closed_form_alpha(P, C[[0]], [[1]])
    assert both.alpha[0, 0] == 0.0
    assert both.alpha[0, 1] == pytest.approx(alone.alpha[0, 1], rel=1e-12)
    # The KL fit started from it stays finite as well.
    fit = mm.fit_alpha(P, C, support=[[0], [0, 3]], progress=False)
    assert np.all(np.isfinite(fit.alpha.data)) and np.all(np.isfinite(fit.kl))


# item 12: pickling recomputed the tail from the float32 data, so a matrix whose stored tail
# differs in the last bits (a file's) came back with another fingerprint.
def test_pickle_keeps_the_stored_tail_and_fingerprint(tmp_path: Path):
    import pickle

    from helpers import write_matrix_file

    indptr, indices, data = [0, 2, 3, 3], [0, 2, 1], [0.3, 0.3, 0.7]
    recomputed = np.array([1 - (np.float32(0.3) + np.float64(np.float32(0.3))), 1 - np.float64(np.float32(0.7)), 1.0])
    stored = recomputed + np.array([1e-9, -2e-9, 0.0])  # within tol of 1 - sum, not equal to it
    path = write_matrix_file(
        tmp_path / "m.safetensors", n_states=3, n_base=3, indptr=indptr, indices=indices, data=data, tail=stored
    )
    P = mm.TransitionMatrix.load(path)
    P.validate()
    Q = pickle.loads(pickle.dumps(P))
    assert Q.fingerprint() == P.fingerprint()
    assert Q.tail.tobytes() == P.tail.tobytes()
    # Pickles written before the tail travelled (six arguments) still load, with the tail recomputed.
    rebuild, args = P.__reduce__()
    old = rebuild(*args[:6])
    np.testing.assert_array_equal(old.indices, P.indices)
    assert old.tail.tolist() != P.tail.tolist()


# item 4: verify=True did not cover the header's user metadata.
def test_verify_covers_the_metadata(tmp_path: Path):
    P = mm.TransitionMatrix.from_scipy(np.eye(3) * 0.5)
    path = tmp_path / "m.safetensors"
    P.save(path, metadata={"source": "corpus-a", "note": "x"})
    assert mm.TransitionMatrix.load(path, verify=True).metadata["source"] == "corpus-a"
    blob = path.read_bytes()
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(blob.replace(b"corpus-a", b"corpus-b", 1))
    assert mm.TransitionMatrix.load(edited).metadata["source"] == "corpus-b"  # structure is intact
    with pytest.raises(ValueError, match="metadata fingerprint .* does not match"):
        mm.TransitionMatrix.load(edited, verify=True)
    # The fingerprint does not depend on the order of the keys in the header (ASCII here, so
    # json.dumps writes the same bytes as the library, in the reversed order).
    import json

    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"] = dict(reversed(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n and text != blob[8 : 8 + n]
    reordered = tmp_path / "reordered.safetensors"
    reordered.write_bytes(blob[:8] + text + blob[8 + n :])
    assert mm.TransitionMatrix.load(reordered, verify=True).metadata == mm.TransitionMatrix.load(path).metadata


# item 7: a mapped file rewritten in place gave a wrong row() and then SIGSEGV in prob():
# indptr and indices, which every address comes from, now live in owned memory.
def test_mapped_file_rewritten_in_place_changes_values_not_structure(tmp_path: Path):
    rng = np.random.default_rng(7)
    from helpers import random_csr

    P = mm.TransitionMatrix.from_scipy(random_csr(rng, 50, density=0.2))
    path = tmp_path / "m.safetensors"
    P.save(path)
    Q = mm.TransitionMatrix.load(path, mmap=True)
    n_header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    size = path.stat().st_size
    with open(path, "r+b") as f:  # indptr, tail, indices, data all overwritten with 0xff
        f.seek(8 + n_header)
        f.write(b"\xff" * (size - 8 - n_header))
    np.testing.assert_array_equal(Q.indptr, P.indptr)
    np.testing.assert_array_equal(Q.indices, P.indices)
    assert np.isnan(Q.data).all()  # the values are the mapping's, as documented
    assert np.isnan(Q.prob(np.arange(50), np.arange(50))).any()
    with pytest.raises(mm.InvariantError):
        Q.validate()


# item 9: temporary files of killed saves piled up (38 files, 1.2 GB after 60 kills).
SAVE_LOOP = r"""
import sys
import numpy as np
import markovmem as mm
P = mm.TransitionMatrix.from_topk(np.tile(np.arange(64, dtype=np.int32), (40_000, 1)),
                                  np.full((40_000, 64), 1 / 128, np.float32))
print("ready", flush=True)
while True:
    P.save(sys.argv[1])
"""


def test_next_save_removes_the_temporary_files_of_killed_saves(tmp_path: Path):
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "m.safetensors"
    killed_with_temp = 0
    for _ in range(20):  # each attempt: kill -9 a process that saves in a loop, mid-save if it can be caught
        proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 30
            while not list(tmp_path.glob(f"m.safetensors.tmp-{proc.pid}-*")) and time.monotonic() < deadline:
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
            proc.stdout.close()
        killed_with_temp += bool(list(tmp_path.glob(f"m.safetensors.tmp-{proc.pid}-*")))
        if killed_with_temp >= 2:
            break
    assert killed_with_temp >= 2, "no save was caught mid-write"
    # A live writer's temp (this process's, or one held by another process) is never touched.
    own = tmp_path / f"m.safetensors.tmp-{os.getpid()}-999999"
    own.write_bytes(b"in progress")
    other = tmp_path / "other.safetensors.tmp-1-0"
    other.write_bytes(b"another path's")
    P = mm.TransitionMatrix.from_scipy(np.eye(3))
    P.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.safetensors", own.name, other.name])
    assert mm.TransitionMatrix.load(path, verify=True).fingerprint() == P.fingerprint()
