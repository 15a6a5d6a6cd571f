"""File format: save/load round trips, metadata, safetensors compatibility,
atomic saves, load errors, and corrupted or hand-crafted files (loaded in a
subprocess so that a crash shows up as a signal instead of killing pytest)."""

from __future__ import annotations

import errno
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import random_csr, write_matrix_file

import markovmem as mm

ARRAYS = ("indptr", "indices", "data", "tail")


def same_arrays(P: mm.TransitionMatrix, Q: mm.TransitionMatrix) -> bool:
    return all(getattr(P, n).tobytes() == getattr(Q, n).tobytes() for n in ARRAYS)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def P(rng) -> mm.TransitionMatrix:
    base = mm.TransitionMatrix.from_scipy(random_csr(rng, 10, density=0.3, full_rows=True))
    Q, _ = base.expand(np.eye(2, 10) * 0.5)  # n_base < n_states round-trips too
    return Q


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
def test_round_trip(tmp_path, P, mmap):
    path = tmp_path / "p.safetensors"
    P.save(path)
    L = mm.TransitionMatrix.load(path, mmap=mmap)
    assert (L.n_states, L.n_base, L.nnz) == (P.n_states, P.n_base, P.nnz)
    assert same_arrays(L, P)
    assert L.fingerprint() == P.fingerprint()
    for name in ARRAYS:
        assert not getattr(L, name).flags.writeable
    L.validate()
    vv, xx = np.meshgrid(np.arange(P.n_states), np.arange(P.n_states), indexing="ij")
    np.testing.assert_array_equal(L.prob(vv, xx), P.prob(vv, xx))
    assert mm.verify_expansion(P, L).ok
    V = mm.TransitionMatrix.load(str(path), mmap=mmap, verify=True)
    assert V.fingerprint() == P.fingerprint()
    assert listing(tmp_path) == ["p.safetensors"]


def test_mmap_load_survives_file_removal(tmp_path, P):
    path = tmp_path / "p.safetensors"
    P.save(path)
    L = mm.TransitionMatrix.load(path, mmap=True)
    data = L.data
    path.unlink()
    assert data.tobytes() == P.data.tobytes()
    assert L.fingerprint() == P.fingerprint()


def test_save_overwrites_and_saves_loaded_matrix(tmp_path, P, chain4):
    path = tmp_path / "m.safetensors"
    chain4.save(path)
    P.save(path)
    L = mm.TransitionMatrix.load(path)
    assert L.fingerprint() == P.fingerprint()
    L.save(tmp_path / "again.safetensors")  # saving a mapped matrix
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()
    assert listing(tmp_path) == ["again.safetensors", "m.safetensors"]


def test_save_is_deterministic(tmp_path, P):
    P.save(tmp_path / "a")
    P.save(tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_metadata_round_trip(tmp_path, chain4):
    user = {
        "model": "gpt-tiny",
        "": "empty key",
        'quote"back\\slash': "line\nbreak\ttab\x01\x00nul",
        "unicode": "é – 😀 \u2028",
    }
    path = tmp_path / "m.safetensors"
    chain4.save(path, metadata=user)
    for mmap in (True, False):
        meta = mm.TransitionMatrix.load(path, mmap=mmap).metadata
        assert {k: meta[k] for k in user} == user
        assert meta["format"] == "markovmem.TransitionMatrix"
        assert meta["format_version"] == "1"
        assert (meta["n_states"], meta["n_base"], meta["nnz"]) == ("4", "4", "4")
        assert meta["fingerprint"] == chain4.fingerprint()
    L = mm.TransitionMatrix.load(path)
    m = L.metadata
    m["model"] = "changed"
    assert L.metadata["model"] == "gpt-tiny"  # a copy


@pytest.mark.parametrize("key", ["format", "format_version", "n_states", "n_base", "nnz", "fingerprint"])
def test_metadata_reserved_keys(tmp_path, chain4, key):
    with pytest.raises(ValueError, match=f"metadata key '{key}' is reserved"):
        chain4.save(tmp_path / "m", metadata={key: "x"})
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    "metadata", [{"a": 1}, {1: "a"}, {"a": None}, {"a": b"bytes"}], ids=["int-value", "int-key", "none", "bytes"]
)
def test_metadata_must_be_str_to_str(tmp_path, chain4, metadata):
    with pytest.raises(TypeError, match="metadata must map str to str"):
        chain4.save(tmp_path / "m", metadata=metadata)
    assert listing(tmp_path) == []


def test_file_is_readable_by_safetensors(tmp_path, P):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    path = tmp_path / "p.safetensors"
    P.save(path, metadata={"note": "hello"})
    arrays = safetensors_numpy.load_file(str(path))
    assert sorted(arrays) == sorted(ARRAYS)
    expected_dtypes = {"indptr": np.int64, "indices": np.int32, "data": np.float32, "tail": np.float64}
    for name in ARRAYS:
        assert arrays[name].dtype == expected_dtypes[name]
        assert arrays[name].tobytes() == getattr(P, name).tobytes()
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert meta["note"] == "hello" and meta["fingerprint"] == P.fingerprint()
    assert meta["n_states"] == str(P.n_states) and meta["n_base"] == str(P.n_base)


def test_file_written_by_safetensors_loads(tmp_path, chain4):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "ext.safetensors"
    tensors = {name: np.array(getattr(chain4, name)) for name in ARRAYS}
    meta = {
        "format": "markovmem.TransitionMatrix",
        "format_version": "1",
        "n_states": "4",
        "n_base": "4",
        "nnz": "4",
        "fingerprint": chain4.fingerprint(),
    }
    safetensors_numpy.save_file(tensors, str(path), metadata=meta)
    # Without markovmem's metadata fingerprint, verify checks the arrays and says so.
    with pytest.warns(UserWarning, match="no metadata fingerprint"):
        L = mm.TransitionMatrix.load(path, verify=True)
    assert same_arrays(L, chain4)


# ---------------------------------------------------------------- atomic save


def test_failed_save_reserved_key_leaves_file(tmp_path, chain4, P):
    path = tmp_path / "m.safetensors"
    chain4.save(path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="reserved"):
        P.save(path, metadata={"nnz": "1"})
    assert path.read_bytes() == before
    assert listing(tmp_path) == ["m.safetensors"]


def test_failed_save_onto_directory_leaves_no_temp_file(tmp_path, P):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_bytes(b"keep")
    # The temporary file is written completely; the final rename fails.
    with pytest.raises(OSError, match="cannot replace"):
        P.save(target)
    assert listing(tmp_path) == ["taken"]
    assert listing(target) == ["inside"] and (target / "inside").read_bytes() == b"keep"


def test_failed_save_parent_is_a_file(tmp_path, P):
    (tmp_path / "plain").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        P.save(tmp_path / "plain" / "m.safetensors")
    with pytest.raises(FileNotFoundError):
        P.save(tmp_path / "missing-dir" / "m.safetensors")
    assert listing(tmp_path) == ["plain"] and (tmp_path / "plain").read_bytes() == b"x"


FSIZE_SCRIPT = r"""
import resource, signal, sys
import numpy as np
import markovmem as mm
P = mm.TransitionMatrix.from_topk(np.tile(np.arange(8), (64, 1)), np.full((64, 8), 0.1, dtype=np.float32))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))
try:
    P.save(sys.argv[1])
except OSError as e:
    print("OSError", e.errno)
else:
    print("saved")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE behaviour checked on Linux")
def test_failed_save_mid_write_leaves_existing_file(tmp_path, chain4):
    """A real write error part-way through (file size limit, works as root too)."""
    path = tmp_path / "m.safetensors"
    chain4.save(path)
    before = path.read_bytes()
    out = subprocess.run(
        [sys.executable, "-c", FSIZE_SCRIPT, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["OSError", str(errno.EFBIG)]
    assert path.read_bytes() == before
    assert listing(tmp_path) == ["m.safetensors"]
    assert mm.TransitionMatrix.load(path, verify=True).fingerprint() == chain4.fingerprint()


# ---------------------------------------------------------------- load errors


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot open") as info:
        mm.TransitionMatrix.load(tmp_path / "nope.safetensors")
    assert info.value.filename == str(tmp_path / "nope.safetensors")


def test_load_directory(tmp_path):
    with pytest.raises(OSError, match="not a regular file"):
        mm.TransitionMatrix.load(tmp_path)


def test_verify_detects_flipped_data_byte(tmp_path, chain4):
    path = tmp_path / "m.safetensors"
    chain4.save(path)
    blob = bytearray(path.read_bytes())
    # lowest mantissa byte of data[0] (0.5f): the value stays a valid probability
    n_header = struct.unpack("<Q", bytes(blob[:8]))[0]
    header = json.loads(bytes(blob[8 : 8 + n_header]))
    pos = 8 + n_header + header["data"]["data_offsets"][0]
    blob[pos] ^= 0x01
    path.write_bytes(bytes(blob))
    L = mm.TransitionMatrix.load(path)  # structure is fine, values are not re-checked
    assert L.data[0] != np.float32(0.5)
    L.validate()
    assert L.fingerprint() != chain4.fingerprint()
    with pytest.raises(ValueError, match=r"fingerprint [0-9a-f]{16} does not match the stored " + chain4.fingerprint()):
        mm.TransitionMatrix.load(path, verify=True)
    with pytest.raises(ValueError, match="does not match"):
        mm.TransitionMatrix.load(path, mmap=False, verify=True)


# ---------------------------------------------------------------- hand-crafted files

BASE = dict(n_states=3, n_base=3, indptr=[0, 2, 3, 3], indices=[0, 2, 1], data=[0.5, 0.25, 1.0])


def _edit(fn):
    return {"edit": fn}


def _set(*keys_value):
    *keys, value = keys_value

    def fn(h):
        d = h
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return fn


def _drop(name):
    return lambda h: h.pop(name)


def raw_file(path: Path, header: bytes, body: bytes = b"", length: int | None = None) -> Path:
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + body)
    return path


# (id, kwargs for write_matrix_file or a raw-bytes maker, match)
STRUCTURAL = [
    ("wrong-dtype-indices", {**BASE, **_edit(_set("indices", "dtype", "I64"))}, "tensor 'indices' must have dtype I32"),
    ("wrong-dtype-data", {**BASE, **_edit(_set("data", "dtype", "F64"))}, "tensor 'data' must have dtype F32"),
    ("wrong-dtype-tail", {**BASE, **_edit(_set("tail", "dtype", "F32"))}, "tensor 'tail' must have dtype F64"),
    ("dtype-not-string", {**BASE, **_edit(_set("indptr", "dtype", 8))}, "tensor 'indptr' must have dtype I64"),
    ("wrong-shape", {**BASE, **_edit(_set("indptr", "shape", [3]))}, r"tensor 'indptr' must have shape \[4\]"),
    ("2-d-shape", {**BASE, **_edit(_set("tail", "shape", [3, 1]))}, r"tensor 'tail' must have shape \[3\]"),
    ("offsets-beyond-file", {**BASE, **_edit(_set("data", "data_offsets", [80, 10**6]))}, "do not fit its shape"),
    ("offsets-huge", {**BASE, **_edit(_set("data", "data_offsets", [2**64 - 12, 2**64 - 1]))}, "do not fit"),
    ("offsets-reversed", {**BASE, **_edit(_set("data", "data_offsets", [80, 68]))}, "do not fit"),
    ("offsets-wrong-size", {**BASE, **_edit(_set("indptr", "data_offsets", [0, 8]))}, "do not fit"),
    ("offsets-missing", {**BASE, **_edit(_set("indices", "data_offsets", [0]))}, "no valid data_offsets"),
    ("misaligned", {**BASE, "misalign": 4}, "not aligned"),
    ("tensor-missing", {**BASE, **_edit(_drop("tail"))}, "tensor 'tail' is missing"),
    ("tensor-not-object", {**BASE, **_edit(_set("indices", [1, 2]))}, "tensor 'indices' is missing"),
    ("format-missing", {**BASE, **_edit(lambda h: h["__metadata__"].pop("format"))}, "'format' is '<missing>'"),
    ("format-wrong", {**BASE, "meta": {"format": "numpy"}}, "'format' is 'numpy'"),
    ("version-99", {**BASE, "meta": {"format_version": "99"}}, "format version '99' is not supported"),
    ("n_states-missing", {**BASE, **_edit(lambda h: h["__metadata__"].pop("n_states"))}, "has no 'n_states'"),
    ("n_states-text", {**BASE, "meta": {"n_states": "three"}}, "'n_states' is 'three', not a size"),
    ("n_states-negative", {**BASE, "meta": {"n_states": "-3"}}, "not a size"),
    ("n_states-huge", {**BASE, "meta": {"n_states": "9" * 19}}, "not a size"),
    ("n_states-zero", {**BASE, "meta": {"n_states": "0"}}, "n_states is 0"),
    ("n_states-beyond-int32", {**BASE, "meta": {"n_states": str(2**31)}}, "n_states is 2147483648"),
    ("n_base-too-big", {**BASE, "meta": {"n_base": "4"}}, "n_base is 4"),
    ("nnz-mismatch", {**BASE, "meta": {"nnz": "4"}}, r"tensor 'indices' must have shape \[4\]"),
    ("metadata-not-object", {**BASE, **_edit(_set("__metadata__", ["a"]))}, "__metadata__ is not an object"),
    ("metadata-int-value", {**BASE, **_edit(_set("__metadata__", "x", 1))}, "__metadata__ value 'x' is not a string"),
    ("indptr-decreasing", {**BASE, "indptr": [0, 2, 1, 3]}, r"row 1: indptr\[1\] = 2 > indptr\[2\] = 1"),
    ("indptr-first-not-0", {**BASE, "indptr": [1, 2, 3, 3]}, r"indptr\[0\] is 1; expected 0"),
    ("indptr-beyond-nnz", {**BASE, "indptr": [0, 2, 9, 3]}, "exceeds the number of stored entries 3"),
    ("indptr-negative", {**BASE, "indptr": [0, -2, 3, 3]}, "row pointers must not decrease"),
    ("indptr-last-short", {**BASE, "indptr": [0, 1, 2, 2]}, r"indptr\[3\] = 2 but 3 entries are stored"),
    ("index-out-of-range", {**BASE, "indices": [0, 7, 1]}, r"row 0: column index 7 is out of range \[0, 3\)"),
    ("index-negative", {**BASE, "indices": [0, 2, -1]}, "row 1: column index -1 is out of range"),
    ("index-huge", {**BASE, "indices": [0, 2, 2**31 - 1]}, "row 1: column index 2147483647"),
    (
        "index-on-new-state",
        {**BASE, "n_base": 2, "indices": [0, 1, 2], "data": [0.5, 0.25, 1.0]},
        "row 1: puts mass on state 2, a new state",
    ),
    (
        "indices-unsorted",
        {**BASE, "indices": [2, 0, 1], "data": [0.25, 0.5, 1.0]},
        r"row 0: column indices are not sorted \(2 before 0\)",
    ),
    ("indices-duplicate", {**BASE, "indices": [2, 2, 1]}, "row 0: duplicate column index 2"),
]

RAW = [
    ("empty-file", lambda p: (p.write_bytes(b""), p)[1], "0 bytes, too few"),
    ("seven-bytes", lambda p: (p.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00"), p)[1], "7 bytes, too few"),
    ("header-length-huge", lambda p: raw_file(p, b"{}", length=2**63), "header length 9223372036854775808 exceeds"),
    ("header-length-max", lambda p: raw_file(p, b"{}", length=2**64 - 1), "exceeds the file size"),
    (
        "header-length-beyond-file",
        lambda p: raw_file(p, b"{}      ", length=100),
        "header length 100 exceeds the file size 16",
    ),
    ("header-over-100MB-limit", lambda p: raw_file(p, b"{}", length=200 << 20), "exceeds"),
    ("json-truncated", lambda p: raw_file(p, b'{"__metadata__":'), "JSON header ends early"),
    ("json-array", lambda p: raw_file(p, b"[]"), "the JSON header is not an object"),
    ("json-true", lambda p: raw_file(p, b'{"a":true}'), "unsupported value"),
    ("json-null", lambda p: raw_file(p, b"null"), "unsupported value"),
    ("json-float", lambda p: raw_file(p, b'{"a":1.5}'), "non-integer number"),
    ("json-negative", lambda p: raw_file(p, b'{"a":-1}'), "unsupported value"),
    ("json-overflow", lambda p: raw_file(p, b'{"a":99999999999999999999999}'), "integer overflows"),
    ("json-deep", lambda p: raw_file(p, b'{"a":' * 20 + b"1" + b"}" * 20), "nests deeper than 8 levels"),
    ("json-duplicate-key", lambda p: raw_file(p, b'{"a":1,"a":2}'), "duplicate key 'a'"),
    ("json-trailing", lambda p: raw_file(p, b"{}x"), "trailing characters"),
    ("json-control-char", lambda p: raw_file(p, b'{"a\x01":1}'), "control character"),
    ("json-bad-escape", lambda p: raw_file(p, b'{"a\\q":1}'), "bad escape"),
    ("json-short-unicode", lambda p: raw_file(p, b'{"\\u12'), "short \\\\u escape"),
    ("json-unterminated", lambda p: raw_file(p, b'{"abc'), "unterminated string"),
    ("json-missing-colon", lambda p: raw_file(p, b'{"a" 1}'), "expected ':'"),
    ("json-binary", lambda p: raw_file(p, bytes(range(256))), "not a valid markovmem matrix"),
    ("not-markovmem", lambda p: raw_file(p, b'{"__metadata__":{"format":"pt"}}'), "'format' is 'pt'"),
]


def make_structural(path: Path, kwargs: dict) -> Path:
    return write_matrix_file(path, **kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [c[1:] for c in STRUCTURAL], ids=[c[0] for c in STRUCTURAL])
@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
def test_crafted_structural_corruption_raises(tmp_path, kwargs, match, mmap):
    path = make_structural(tmp_path / "bad.safetensors", kwargs)
    with pytest.raises(ValueError, match=match) as info:
        mm.TransitionMatrix.load(path, mmap=mmap)
    assert "is not a valid markovmem matrix" in str(info.value) or str(path) in str(info.value)


@pytest.mark.parametrize(("make", "match"), [c[1:] for c in RAW], ids=[c[0] for c in RAW])
def test_crafted_raw_header_raises(tmp_path, make, match):
    path = make(tmp_path / "bad.safetensors")
    for mmap in (True, False):
        with pytest.raises(ValueError, match=match):
            mm.TransitionMatrix.load(path, mmap=mmap)


def test_crafted_row_errors_carry_the_row(tmp_path):
    path = write_matrix_file(tmp_path / "bad", **{**BASE, "indices": [0, 2, 9]})
    with pytest.raises(mm.InvariantError, match=f"file '{path}': row 1: column index 9") as info:
        mm.TransitionMatrix.load(path)
    assert info.value.row == 1


def test_crafted_valid_file_loads(tmp_path):
    """The hand-crafted writer itself produces loadable files (the cases above differ by one thing)."""
    path = write_matrix_file(tmp_path / "good", **BASE)
    L = mm.TransitionMatrix.load(path)
    np.testing.assert_allclose(L.to_dense(), [[0.5, 0.25, 0.25], [0, 1, 0], [1 / 3] * 3])
    L.validate()
    with pytest.raises(ValueError, match="fingerprint"):  # the writer stores a dummy fingerprint
        mm.TransitionMatrix.load(path, verify=True)
    meta = {"fingerprint": L.fingerprint()}
    with pytest.warns(UserWarning, match="no metadata fingerprint"):  # nor does it write one
        assert mm.TransitionMatrix.load(write_matrix_file(tmp_path / "good2", **BASE, meta=meta), verify=True).nnz == 3


# Value corruptions: structure is intact, so a plain load succeeds and validate() reports the row;
# verify=True rejects the file on load.
VALUES = [
    ("nan", {**BASE, "data": [0.5, 0.25, np.nan]}, 1, r"row 1: probability at column 1 is not finite \(nan\)"),
    ("inf", {**BASE, "data": [np.inf, 0.25, 1.0]}, 0, "row 0: probability at column 0 is not finite"),
    ("negative", {**BASE, "data": [0.5, -0.25, 1.0]}, 0, "row 0: negative probability -0.25 at column 2"),
    ("sum>1", {**BASE, "data": [0.5, 0.75, 1.0], "tail": [0.0, 0.0, 1.0]}, 0, "row 0: probabilities sum to 1.25"),
    ("tail-mismatch", {**BASE, "tail": [0.25, 0.0, 0.5]}, 2, "row 2: tail mass 0.5 does not equal 1 - row sum = 1"),
    ("tail-nan", {**BASE, "tail": [0.25, np.nan, 1.0]}, 1, r"row 1: tail mass nan is not in \[0, 1\]"),
    ("tail-negative", {**BASE, "tail": [-0.25, 0.0, 1.0]}, 0, r"row 0: tail mass -0.25 is not in \[0, 1\]"),
    ("tail-above-1", {**BASE, "tail": [0.25, 0.0, 2.0]}, 2, "tail mass 2 is not in"),
    (
        "full-row-with-tail",
        dict(n_states=2, n_base=2, indptr=[0, 2, 3], indices=[0, 1, 0], data=[0.5, 0.2, 1.0]),
        0,
        "row 0: stores every base state but sums to 0.7",
    ),
]


@pytest.mark.parametrize(("kwargs", "row", "match"), [c[1:] for c in VALUES], ids=[c[0] for c in VALUES])
def test_validate_catches_value_corruption_in_files(tmp_path, kwargs, row, match):
    path = write_matrix_file(tmp_path / "bad.safetensors", **kwargs)
    L = mm.TransitionMatrix.load(path)
    with pytest.raises(mm.InvariantError, match=match) as info:
        L.validate()
    assert info.value.row == row
    for mmap in (True, False):
        with pytest.raises(mm.InvariantError, match=match) as info:
            mm.TransitionMatrix.load(path, mmap=mmap, verify=True)
        assert info.value.row == row


# ---------------------------------------------------------------- corruption loop in a subprocess

CORRUPTION_SCRIPT = r"""
import json, os, sys, warnings
import numpy as np
import markovmem as mm

warnings.simplefilter("ignore")
src, work, crafted = sys.argv[1], sys.argv[2], sys.argv[3]
blob = open(src, "rb").read()
ref = mm.TransitionMatrix.load(src, mmap=False, n_threads=1)
ref_fp = ref.fingerprint()
rng = np.random.default_rng(20260514)

cases = [("truncate", n, blob[:n]) for n in range(len(blob))]
for pos in range(len(blob)):
    b = bytearray(blob)
    b[pos] ^= 1 << int(rng.integers(8))
    cases.append(("flip", pos, bytes(b)))
for i in range(150):
    b = bytearray(blob)
    for pos in rng.choice(len(b), size=int(rng.integers(2, 9)), replace=False):
        b[pos] = int(rng.integers(256))
    cases.append(("garbage", i, bytes(b)))
for name in sorted(os.listdir(crafted)):
    cases.append(("crafted", name, open(os.path.join(crafted, name), "rb").read()))

ALLOWED = (ValueError, OSError)
report = {"cases": 0, "loads": 0, "loaded": 0, "raised": {}, "bad": [], "truncated_loaded": [], "verify_mismatch": []}

def exercise(m):
    n = m.n_states
    m.fingerprint()
    vv, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    m.prob(vv, xx, n_threads=1)
    m.log_prob(vv, xx, n_threads=1)
    m.to_dense()
    m.to_scipy().toarray()
    m.step(np.full(n, 1.0 / n), n_threads=1)
    m.stationary(max_iter=3, n_threads=1)
    m.sample(0, 30, seed=1)
    m.log_likelihood([np.arange(n)], n_threads=1)
    for v in range(n):
        m.row(v)
    m.expand(np.full((1, m.n_base), 1.0 / m.n_base), n_threads=1)
    mm.verify_expansion(m, m, n_threads=1)
    try:
        m.validate(n_threads=1)
    except ValueError:
        pass

for i, (kind, where, data) in enumerate(cases):
    path = os.path.join(work, "case-%d.safetensors" % i)
    with open(path, "wb") as f:
        f.write(data)
    report["cases"] += 1
    exercised = False
    for mmap in (True, False):
        for verify in (False, True):
            report["loads"] += 1
            try:
                m = mm.TransitionMatrix.load(path, mmap=mmap, verify=verify, n_threads=1)
            except ALLOWED as e:
                key = type(e).__name__
                report["raised"][key] = report["raised"].get(key, 0) + 1
                continue
            except BaseException as e:
                report["bad"].append([kind, where, "load", type(e).__name__, str(e)[:200]])
                continue
            report["loaded"] += 1
            if kind == "truncate":
                report["truncated_loaded"].append(where)
            if verify and kind != "crafted" and m.fingerprint() != ref_fp:
                report["verify_mismatch"].append([kind, where])
            if not exercised:
                exercised = True
                try:
                    exercise(m)
                except ValueError:
                    pass
                except BaseException as e:
                    report["bad"].append([kind, where, "use", type(e).__name__, str(e)[:200]])
            del m
    os.unlink(path)
print(json.dumps(report))
"""


def test_corrupted_files_never_crash(tmp_path, rng):
    P = mm.TransitionMatrix.from_scipy(random_csr(rng, 5, density=0.4))
    Q, _ = P.expand(np.eye(1, 5) * 0.5)
    src = tmp_path / "src.safetensors"
    Q.save(src, metadata={"note": "x"})
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    for name, kwargs, *_ in STRUCTURAL + VALUES:
        make_structural(crafted / name, kwargs)
    for name, make, _ in RAW:
        make(crafted / name)
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", CORRUPTION_SCRIPT, str(src), str(work), str(crafted)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, f"subprocess died with {out.returncode}: {out.stderr[-2000:]}"
    report = json.loads(out.stdout)
    size = src.stat().st_size
    n_crafted = len(STRUCTURAL) + len(VALUES) + len(RAW)
    assert report["cases"] == 2 * size + 150 + n_crafted
    assert report["bad"] == []  # every failure was a ValueError or an OSError
    assert report["truncated_loaded"] == []  # a truncated file never loads
    assert report["verify_mismatch"] == []  # verify=True never accepts changed content
    assert report["loaded"] > 0 and sum(report["raised"].values()) > 2 * size
    # UnicodeDecodeError (a ValueError) comes from flips inside header strings; see test_found_bugs.py
    assert set(report["raised"]) <= {"ValueError", "InvariantError", "UnicodeDecodeError"}
    assert listing(work) == []


# ---------------------------------------------------------------- open expansion blocks in files


def _open_file(tmp_path: Path, chain4) -> tuple[Path, mm.TransitionMatrix]:
    B = np.zeros((4, 2))
    B[1] = [0.1, 0.2]
    B[2, 0] = 0.3
    Q, _ = chain4.expand(np.full((2, 4), 0.25), incoming=B)
    path = tmp_path / "open.safetensors"
    Q.save(path)
    return path, Q


def _rewrite(path: Path, edit_header=None, patch=None) -> None:
    """Rewrite a saved file: edit its JSON header (re-padded to 8 bytes) and/or patch a tensor's bytes.

    ``patch`` is (tensor name, element index, numpy scalar) written over that element.
    """
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    body = bytearray(blob[8 + n :])
    if patch is not None:
        name, i, value = patch
        start = header[name]["data_offsets"][0] + i * value.itemsize
        body[start : start + value.itemsize] = value.tobytes()
    if edit_header is not None:
        edit_header(header)
    text = json.dumps(header).encode()
    text += b" " * (-(len(text) + 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(body))


def test_open_matrix_file_is_version_2_and_round_trips(tmp_path, chain4):
    path, Q = _open_file(tmp_path, chain4)
    meta = mm.TransitionMatrix.load(path).metadata
    assert meta["format_version"] == "2" and meta["open_blocks"] == "4,2,3"
    for mmap in (True, False):
        L = mm.TransitionMatrix.load(path, mmap=mmap, verify=True)
        assert L.fingerprint() == Q.fingerprint() and (L.incoming != Q.incoming).nnz == 0
        np.testing.assert_array_equal(L.to_dense(), Q.to_dense())
    chain4.save(tmp_path / "closed.safetensors")
    assert mm.TransitionMatrix.load(tmp_path / "closed.safetensors").metadata["format_version"] == "1"
    with pytest.raises(ValueError, match="metadata key 'open_blocks' is reserved"):
        chain4.save(tmp_path / "x.safetensors", metadata={"open_blocks": "1,1,0"})


@pytest.mark.parametrize(
    ("patch", "edit", "match"),
    [
        (("open.0.data", 0, np.float32(np.nan)), None, r"open block 0 row 1, column 4: probability is nan"),
        (("open.0.data", 2, np.float32(-0.3)), None, r"open block 0 row 2, column 4: probability is -0\.3"),
        (("open.0.data", 1, np.float32(0.95)), None, r"open block 0 row 1: the row sums to 1\.04999"),
        (("open.0.leak", 2, np.float64(0.5)), None, r"open block 0 row 2: stored leak 0\.5 is not the row sum 0\.3"),
        (("open.0.indices", 0, np.int32(2)), None, r"open block 0 row 1: column 2 is not one of the added states"),
        (("open.0.indices", 1, np.int32(99)), None, r"open block 0 row 1: column 99 is not one of the added states"),
        (("open.0.indptr", 2, np.int64(7)), None, r"open block 0 row 1: indptr\[2\] = 7"),
        (None, lambda h: h["__metadata__"].update(open_blocks="4,2,5"), r"tensor 'open\.0\.indices' must have shape"),
        (None, lambda h: h["__metadata__"].update(open_blocks="4,2"), r"'open_blocks' entry '4,2' is not n_rows,m,nnz"),
        (None, lambda h: h["__metadata__"].update(open_blocks="9,2,3"), r"does not fit a matrix of 6 states"),
        (None, lambda h: h["__metadata__"].pop("open_blocks"), r"format version 2 needs 'open_blocks'"),
        (None, lambda h: h.pop("open.0.leak"), r"tensor 'open\.0\.leak' is missing"),
    ],
    ids=[
        "nan",
        "negative",
        "sum>=1",
        "leak-mismatch",
        "column-old-state",
        "column-out-of-range",
        "indptr",
        "nnz-shape",
        "sizes-text",
        "rows-too-many",
        "sizes-missing",
        "tensor-missing",
    ],
)
@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
def test_corrupt_open_block_in_a_file_raises(tmp_path, chain4, patch, edit, match, mmap):
    path, _ = _open_file(tmp_path, chain4)
    _rewrite(path, edit, patch)
    with pytest.raises(ValueError, match=match) as info:
        mm.TransitionMatrix.load(path, mmap=mmap)
    assert "open.safetensors" in str(info.value)
