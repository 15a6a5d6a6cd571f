"""Expansion files under corruption and concurrency: every stored field validated with a
ValueError naming file and field, the content fingerprint, all-or-nothing loads, atomic
saves (mode, concurrent writers, temporaries), and the adapter's own input checks
(add_tokens traps, next_token_counts ids, integer ids, overflowing alpha rows)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import numpy as np
import scipy.sparse as sp
from helpers import forge

from markovmem import llm
from markovmem.llm import _stfile, expansion_io
from markovmem.llm.testing import tiny_model, tiny_tokenizer

V = 48
ALPHA = sp.csr_array(([0.25, 0.75, 1.0], ([0, 0, 1], [3, 9, 11])), shape=(2, V))


def expanded(block_output=True, tied=True, arch="llama"):
    model = tiny_model(arch, V, tied=tied)
    base = copy.deepcopy(model)
    tok = tiny_tokenizer(V)
    gen = torch.Generator().manual_seed(0)
    llm.add_tokens(
        model, tok, ["glorp", "blip"], embeddings=torch.randn(2, 32, generator=gen), block_output=block_output
    )
    return base, model, tok


@pytest.fixture
def saved(tmp_path):
    base, model, tok = expanded(block_output=False, tied=False, arch="qwen2")
    path = tmp_path / "e.safetensors"
    llm.save_expansion(model, tok, path, alpha=ALPHA)
    return base, path


def snapshot(model, tok):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        tok.get_vocab(),
        len(tok),
        model.config.vocab_size,
        llm.get_expansion(model),
    )


def assert_unchanged(before, model, tok):
    sd, vocab, n, vs, exp = before
    after = model.state_dict()
    assert sorted(after) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(after[k], v), k
    assert tok.get_vocab() == vocab and len(tok) == n
    assert model.config.vocab_size == vs and llm.get_expansion(model) is exp


I64 = torch.int64
CORRUPT = {
    "index 10**12": ({"alpha_indices": torch.tensor([3, 9, 10**12], dtype=I64)}, {}, "alpha_indices\\[2\\]"),
    "negative index": ({"alpha_indices": torch.tensor([3, -1, 11], dtype=I64)}, {}, "alpha_indices\\[1\\] = -1"),
    "index >= n_base": ({"alpha_indices": torch.tensor([3, 9, V], dtype=I64)}, {}, "outside \\[0, n_base"),
    "unsorted row": ({"alpha_indices": torch.tensor([9, 3, 11], dtype=I64)}, {}, "does not increase"),
    "repeated column": ({"alpha_indices": torch.tensor([9, 9, 11], dtype=I64)}, {}, "does not increase"),
    "indptr decreasing": ({"alpha_indptr": torch.tensor([0, 3, 2], dtype=I64)}, {}, "alpha_indptr"),
    "indptr end": ({"alpha_indptr": torch.tensor([0, 2, 2], dtype=I64)}, {}, "alpha_indptr runs from 0 to 2"),
    "indptr length": ({"alpha_indptr": torch.tensor([0, 3], dtype=I64)}, {}, "'alpha_indptr' has shape"),
    "indptr dtype": ({"alpha_indptr": torch.tensor([0, 2, 3], dtype=torch.int32)}, {}, "'alpha_indptr' has dtype"),
    "data nan": ({"alpha_data": torch.tensor([0.25, float("nan"), 1.0], dtype=torch.float64)}, {}, "non-finite"),
    "data length": ({"alpha_data": torch.tensor([0.25], dtype=torch.float64)}, {}, "'alpha_data' has shape"),
    "data float32": ({"alpha_data": torch.tensor([0.25, 0.75, 1.0])}, {}, "'alpha_data' has dtype"),
    "alpha_shape rows": ({}, {"alpha_shape": "[3, 48]"}, "alpha_shape is \\(3, 48\\)"),
    "alpha_shape narrow": ({}, {"alpha_shape": "[2, 10]"}, "n_states >= n_base"),
    "alpha_shape junk": ({}, {"alpha_shape": "[2, 4"}, "'alpha_shape' is not valid JSON"),
    "alpha parts missing": ({"alpha_data": None}, {}, "lacks the tensor 'alpha_data'"),
    "ids": ({"ids": torch.tensor([48, 50], dtype=I64)}, {}, "tensor 'ids'"),
    "ids float": ({"ids": torch.tensor([48.0, 49.0])}, {}, "'ids' has dtype"),
    "rows inf": ({"input_rows": torch.full((2, 32), float("inf"))}, {}, "'input_rows' has a non-finite"),
    "rows 1-D": ({"input_rows": torch.zeros(64)}, {}, "'input_rows' has shape"),
    "rows int": ({"input_rows": torch.zeros((2, 32), dtype=I64)}, {}, "'input_rows' has dtype"),
    "rows missing": ({"input_rows": None}, {}, "lacks the tensor 'input_rows'"),
    "output rows width": ({"output_rows": torch.zeros(2, 7)}, {}, "'output_rows' has width 7"),
    "unknown tensor": ({"extra": torch.zeros(1)}, {}, "unknown tensors \\['extra'\\]"),
    "tokens count": ({}, {"tokens": '["glorp"]'}, "'tokens' must be a list of 2"),
    "tokens json": ({}, {"tokens": '["glorp", '}, "'tokens' is not valid JSON"),
    "tokens repeated": ({}, {"tokens": '["glorp", "glorp"]'}, "tokens\\[1\\] = 'glorp' appears twice"),
    "token empty": ({}, {"tokens": '["glorp", ""]'}, "tokens\\[1\\] is ''"),
    "token not str": ({}, {"tokens": '["glorp", 7]'}, "tokens\\[1\\] is 7"),
    "tokens missing": ({}, {"tokens": None}, "lacks the metadata field 'tokens'"),
    "n_base float": ({}, {"n_base": "47.5"}, "'n_base' is '47.5'"),
    "block_output": ({}, {"block_output": "1"}, "'block_output' is '1'"),
    "version": ({}, {"version": "9"}, "format version '9'"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT), ids=str)
def test_corrupt_field_raises_value_error_naming_file_and_field(saved, tmp_path, case):
    base, path = saved
    tensors, meta, match = CORRUPT[case]
    bad = forge(path, tmp_path / "bad.safetensors", tensors=tensors, meta=meta)
    model, tok = copy.deepcopy(base), tiny_tokenizer(V)
    before = snapshot(model, tok)
    with pytest.raises(ValueError, match=match) as info:
        llm.load_expansion(model, tok, bad)
    assert "bad.safetensors" in str(info.value)
    assert_unchanged(before, model, tok)


@pytest.mark.parametrize("shape", [[0, 2**63], [-1, 2], [2.0, 32], [1] * 9], ids=str)
def test_header_shapes_torch_cannot_hold_are_refused(tmp_path, shape):
    header = json.dumps({"input_rows": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "shape.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match="tensor 'input_rows' has shape"):
        expansion_io.read_expansion(path)


def test_output_rows_of_a_blocked_expansion_are_refused(tmp_path):
    base, model, tok = expanded(block_output=True, tied=False, arch="qwen2")
    path = tmp_path / "e.safetensors"
    llm.save_expansion(model, tok, path)
    bad = forge(path, tmp_path / "bad.safetensors", tensors={"output_rows": torch.zeros(2, 32)})
    with pytest.raises(ValueError, match="'output_rows' but block_output is true"):
        llm.load_expansion(copy.deepcopy(base), tiny_tokenizer(V), bad)


@pytest.mark.parametrize("what", ["input_rows", "alpha_data", "tokens", "n_base"])
def test_changed_bytes_fail_the_content_fingerprint(saved, tmp_path, what):
    base, path = saved
    data = bytearray(path.read_bytes())
    st = _stfile.parse(bytes(data), "x")
    n = int.from_bytes(data[:8], "little")
    if what in st.records:
        header = json.loads(data[8 : 8 + n])
        at = 8 + n + header[what]["data_offsets"][0]
        data[at] ^= 0x10
    else:
        old = {"tokens": b"glorp", "n_base": b'"48"'}[what]
        at = data.index(old, 8, 8 + n)
        data[at + 1] ^= 0x01  # "glorp" -> "gmorp", "48" -> "58"
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its fingerprint"):
        llm.load_expansion(copy.deepcopy(base), tiny_tokenizer(V), bad)


def test_version_1_files_without_a_fingerprint_still_load(saved, tmp_path):
    base, path = saved
    old = forge(path, tmp_path / "v1.safetensors", meta={"version": "1", "content_fingerprint": None}, resign=False)
    model = copy.deepcopy(base)
    assert llm.load_expansion(model, tiny_tokenizer(V), old) == [V, V + 1]
    np.testing.assert_array_equal(llm.get_expansion(model).alpha.toarray(), ALPHA.toarray())
    # A version 2 file must carry one.
    bare = forge(path, tmp_path / "v2.safetensors", meta={"content_fingerprint": None}, resign=False)
    with pytest.raises(ValueError, match="lacks the metadata field 'content_fingerprint'"):
        llm.load_expansion(copy.deepcopy(base), tiny_tokenizer(V), bare)


def test_corrupt_alpha_never_reaches_the_model_or_a_save(saved, tmp_path):
    base, path = saved
    model, tok = copy.deepcopy(base), tiny_tokenizer(V)
    llm.load_expansion(model, tok, path)
    state = llm.get_expansion(model)
    bad = sp.csr_array((np.array([1.0]), np.array([10**12]), np.array([0, 1, 1])), shape=(2, V))
    with pytest.raises(ValueError, match=r"alpha: alpha_indices\[0\] = 1000000000000"):
        llm.save_expansion(model, tok, tmp_path / "out.safetensors", alpha=bad)
    assert not (tmp_path / "out.safetensors").exists()
    np.testing.assert_array_equal(state.alpha.toarray(), ALPHA.toarray())


def test_failed_load_changes_nothing_and_a_retry_succeeds(saved, tmp_path, monkeypatch):
    base, path = saved
    model, tok = copy.deepcopy(base), tiny_tokenizer(V)
    before = snapshot(model, tok)
    # A failure after the tokens were added to the tokenizer and the model (past every check).
    real = expansion_io._require_expansion

    def broken(m):
        raise RuntimeError("injected failure after add_tokens")

    monkeypatch.setattr(expansion_io, "_require_expansion", broken)
    with pytest.raises(RuntimeError, match="injected"):
        llm.load_expansion(model, tok, path)
    assert_unchanged(before, model, tok)
    monkeypatch.setattr(expansion_io, "_require_expansion", real)
    # A failure inside add_tokens, after the tokenizer got the tokens.
    from markovmem.llm import model as model_module

    def refuse(self, *args, **kwargs):
        raise RuntimeError("injected failure while wrapping the layers")

    with monkeypatch.context() as mp:
        mp.setattr(model_module.MarkovMemModel, "__init__", refuse)
        with pytest.raises(RuntimeError, match="wrapping"):
            llm.load_expansion(model, tok, path)
    assert_unchanged(before, model, tok)
    assert llm.load_expansion(model, tok, path) == [V, V + 1]
    assert tok("w5 glorp blip")["input_ids"] == [1, 5, V, V + 1]


def test_save_gives_the_mode_open_would(tmp_path):
    _, model, tok = expanded()
    old = os.umask(0o027)
    try:
        llm.save_expansion(model, tok, tmp_path / "e.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "e.safetensors").stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["e.safetensors"]


WRITER = textwrap.dedent("""
    import sys, time, torch
    from markovmem import llm
    from markovmem.llm.testing import tiny_model, tiny_tokenizer
    torch.set_num_threads(1)
    path, which, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    model, tok = tiny_model("llama", 48), tiny_tokenizer(48)
    tokens = ["aaa"] if which == 0 else ["bbb", "ccc", "ddd"]
    llm.add_tokens(model, tok, tokens, embeddings=torch.full((len(tokens), 32), float(which + 1)))
    print("ready", flush=True)
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        llm.save_expansion(model, tok, path)
        n += 1
    print(n, flush=True)
""")


def concurrent_saves(path, seconds=4.0, timeout=180.0):
    """Two processes save different expansions to ``path`` for ``seconds``; this process reads
    it meanwhile.  Returns (saves per writer, reads, torn reads, read errors)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(i), str(seconds)], stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        reads, torn, errors = 0, 0, []
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if not path.exists():
                continue
            try:
                tensors, meta = expansion_io.read_expansion(path)
            except ValueError as exc:
                errors.append(str(exc))
                continue
            reads += 1
            tokens, rows = json.loads(meta["tokens"]), tensors["input_rows"]
            whole = (tokens == ["aaa"] and bool((rows == 1).all())) or (
                tokens == ["bbb", "ccc", "ddd"] and bool((rows == 2).all())
            )
            torn += not whole
        saves = [int(p.communicate(timeout=timeout)[0].strip()) for p in procs]
        assert [p.returncode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return saves, reads, torn, errors


def test_two_processes_saving_to_one_path_leave_whole_files(tmp_path):
    path = tmp_path / "shared.safetensors"
    saves, reads, torn, errors = concurrent_saves(path)
    assert min(saves) > 10 and reads > 10
    assert torn == 0 and errors == []
    assert os.listdir(tmp_path) == ["shared.safetensors"]


def test_export_merged_publishes_a_whole_directory(tmp_path):
    _, model, tok = expanded()
    out = tmp_path / "merged"
    llm.export_merged(model, tok, out)
    first = sorted(os.listdir(out))
    llm.export_merged(model, tok, out)  # a previous export is replaced
    assert sorted(os.listdir(out)) == first
    (out / "my_notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="my_notes.txt"):
        llm.export_merged(model, tok, out)
    assert (out / "my_notes.txt").read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["merged"]


# ---------------------------------------------------------------------- add_tokens traps
def test_a_plain_string_is_not_split_into_tokens():
    model, tok = tiny_model("llama", V), tiny_tokenizer(V)
    with pytest.raises(TypeError, match="single string '☃☄'"):
        llm.add_tokens(model, tok, "☃☄")
    with pytest.raises(TypeError, match=r"tokens\[0\] is 5"):
        llm.add_tokens(model, tok, [5])
    assert len(tok) == V and llm.get_expansion(model) is None
    assert llm.add_tokens(model, tok, ["☃☄"]) == [V]


def test_a_token_shadowing_an_old_one_is_refused_on_a_tiny_tokenizer():
    model, tok = tiny_model("llama", V), tiny_tokenizer(V)
    before = tok("w3 w7")["input_ids"]
    with pytest.raises(ValueError, match="token 'w' occurs in the text of the existing token 'w3'"):
        llm.add_tokens(model, tok, ["glorp", "w"])
    assert len(tok) == V and llm.get_expansion(model) is None
    with pytest.warns(UserWarning, match="token 'w' occurs"):
        ids = llm.add_tokens(model, tok, ["w"], allow_shadowing=True)
    assert tok("w3 w7")["input_ids"] != before and ids[0] in tok("w3 w7")["input_ids"]


MODEL_DIR = os.environ.get("MARKOVMEM_TEST_MODEL")
DATA_DIR = os.environ.get("MARKOVMEM_TEST_DATA")


@pytest.mark.skipif(not MODEL_DIR, reason="MARKOVMEM_TEST_MODEL is not set (a stories260k directory)")
def test_shadowing_on_the_real_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = "Once upon a time, the little dog went to the park. There the sun was warm."
    if DATA_DIR:
        with open(os.path.join(DATA_DIR, "tinystories-sample.txt"), encoding="utf-8") as f:
            text = f.read(20_000)
    old = tok(text)["input_ids"]
    assert "▁the" in tok.get_vocab() and "the" not in tok.get_vocab()
    with pytest.raises(ValueError, match="token 'the' occurs in the text of the existing token '▁the'"):
        llm.add_tokens(model, tok, ["the"])
    assert tok(text)["input_ids"] == old and llm.get_expansion(model) is None
    # A new word leaves every old text's ids as they were.
    llm.add_tokens(model, tok, ["glorp"])
    assert tok(text)["input_ids"] == old
    llm.remove_expansion(model)
    # With the override the trap is visible: old text now encodes differently.
    tok2 = AutoTokenizer.from_pretrained(MODEL_DIR)
    with pytest.warns(UserWarning, match="'the'"):
        llm.add_tokens(model, tok2, ["the"], allow_shadowing=True)
    assert tok2(text)["input_ids"] != old


# ---------------------------------------------------------------------- ids and alpha
def test_next_token_counts_checks_ids_before_allocating():
    seqs = [[48, 5, 48, 7], [1, 2, 10**9, 3]]
    llm.next_token_counts(seqs[:1], [48], 48)  # imports done before measuring
    tracemalloc.start()
    try:
        with pytest.raises(IndexError, match=r"sequences\[1\]\[2\] = 1000000000 is out of range \[0, 49\)"):
            llm.next_token_counts(seqs, [48], 48)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**24  # a table indexed by the stray id would be 7.5 GiB
    counts = llm.next_token_counts([[48, 5, 48, 7], [49, 3, 48, 49]], [49, 48], 48)
    np.testing.assert_array_equal(counts.toarray()[:, [3, 5, 7]], [[1, 0, 0], [0, 1, 1]])
    # A huge new id costs no table of its size.
    counts = llm.next_token_counts([[10**12, 4]], [10**12], 48)
    assert counts.toarray()[0, 4] == 1


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"new_token_ids": [512.7]}, r"new_token_ids\[0\] must be an integer; got float 512.7"),
        ({"new_token_ids": [True]}, r"new_token_ids\[0\] must be an integer; got a bool \(True\)"),
        ({"new_token_ids": np.array([48.0])}, "new_token_ids must hold integer ids; got dtype float64"),
        ({"new_token_ids": np.array([True])}, "new_token_ids must hold integer ids; got dtype bool"),
        ({"n_base": 47.5}, "n_base must be an integer; got float 47.5"),
        ({"n_base": True}, r"n_base must be an integer; got a bool \(True\)"),
    ],
)
def test_ids_must_be_integers(bad, match):
    kwargs = {"new_token_ids": [48], "n_base": 48, **bad}
    with pytest.raises(TypeError, match=match):
        llm.next_token_counts([[48, 5]], **kwargs)


def test_set_embeddings_refuses_float_and_bool_ids():
    _, model, _ = expanded()
    with pytest.raises(TypeError, match=r"ids\[0\] must be an integer; got float 48.5"):
        llm.set_embeddings(model, [48.5], torch.zeros(1, 32))
    with pytest.raises(TypeError, match=r"ids\[0\] must be an integer; got a bool \(True\)"):
        llm.set_embeddings(model, [True], torch.zeros(1, 32))


def test_alpha_to_embeddings_refuses_rows_that_overflow():
    model = tiny_model("llama", V)
    alpha = sp.csr_array(([1.0, 1e300, 2.0], ([0, 1, 2], [3, 4, 5])), shape=(3, V))
    with pytest.raises(ValueError, match=r"alpha rows \[1\] give non-finite embeddings"):
        llm.alpha_to_embeddings(model, alpha)
    half = tiny_model("llama", V, dtype=torch.float16)
    alpha = sp.csr_array(([1.0, 1e9], ([0, 1], [3, 4])), shape=(2, V))
    with pytest.raises(ValueError, match=r"alpha rows \[1\] give non-finite embeddings in torch.float16"):
        llm.alpha_to_embeddings(half, alpha)
    ok = llm.alpha_to_embeddings(model, sp.csr_array(([0.5], ([0], [3])), shape=(1, V)))
    assert torch.equal(ok[0], 0.5 * model.get_input_embeddings().weight[3].detach())
