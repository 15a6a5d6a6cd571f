"""The vocabulary-extension benchmark (bench/vocab_extension/run.py) in miniature, on the real
stories260k model and TinyStories text: its BPB of the base model equals a direct computation, the
merged tokens cover the same bytes, and one tiny end-to-end cell gives finite figures and a
forgetting report."""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import tinystories_path

if not (os.environ.get("MARKOVMEM_TEST_MODEL") and os.environ.get("MARKOVMEM_TEST_DATA")):
    pytest.skip("MARKOVMEM_TEST_MODEL / MARKOVMEM_TEST_DATA not set", allow_module_level=True)

# The benchmark script, loaded under its own name (bench/ is not a package).
_spec = importlib.util.spec_from_file_location(
    "vocab_extension_run", Path(__file__).resolve().parents[1] / "bench" / "vocab_extension" / "run.py"
)
assert _spec is not None and _spec.loader is not None
vx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vx)


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.environ["MARKOVMEM_TEST_MODEL"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    paras = vx.paragraphs(tinystories_path())[:240]
    train, held = vx.split(paras, 0.25, seed=0)
    return tok, model, train, held


def test_base_bpb_equals_a_direct_computation(setup):
    tok, model, _, held = setup
    held = held[:12]
    seqs = vx.encode(tok, held)
    got = vx.bits_per_byte(model, seqs, held)
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for text in held:
            ids = torch.tensor([tok(text)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            nats += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n_bytes += len(text.encode("utf-8"))
    assert got["bytes"] == n_bytes
    # Padded batches vs one sequence at a time: float32 logits agree to rounding.
    assert got["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)
    assert got["tokens"] == sum(len(s) - 1 for s in seqs)


def test_merged_tokens_cover_the_same_bytes(setup):
    tok, _, train, held = setup
    words, skipped = vx.merged_words(tok, train, 5)
    assert len(words) == 5 and all(len(tok(w, add_special_tokens=False)["input_ids"]) >= 2 for w in words)
    assert all(w not in words for w, _, _ in skipped)
    ext = vx.extended_tokenizer(tok, words)
    n_base = len(tok)
    base_seqs, ext_seqs = vx.encode(tok, held), vx.encode(ext, held)
    assert vx.covers_text(tok, base_seqs, held) and vx.covers_text(ext, ext_seqs, held)
    merged = sum(int((s >= n_base).sum()) for s in ext_seqs)
    assert merged > 0
    assert sum(len(s) for s in ext_seqs) < sum(len(s) for s in base_seqs)
    cov = vx.coverage(ext, words, held, n_base)
    assert cov["whole_total"] + cov["prefix_total"] == merged
    # A merged word matches at a word start only: "girl" inside "girls" is the new token + "s".
    ext2 = vx.extended_tokenizer(tok, ["girl"])
    pieces = ext2.convert_ids_to_tokens(ext2('The girls and a "girl"')["input_ids"])
    assert pieces[2:4] == ["▁girl", "s"] and pieces.count("▁girl") == 1


def test_tiny_end_to_end_cell(setup):
    from markovmem import llm

    tok, base, train, held = setup
    words, _ = vx.merged_words(tok, train, 2)
    model, mtok = vx.copy.deepcopy(base), vx.copy.deepcopy(tok)
    info = vx.markovmem_init(model, mtok, words, train, seed=0)
    ids = info["ids"]
    n_base = len(tok)
    ext = vx.extended_tokenizer(tok, words)
    train_ext = vx.encode(ext, train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm.embedding_tune(model, ids, train_ext, steps=3, batch_size=4, progress=False)
    args = type("Args", (), {"n_old": 20, "samples": 4, "sample_length": 32, "seed": 0})()
    row = vx.Scorer(base, ext, n_base, held[:30], args)(model, certified=True)
    for key in ("bpb", "nll_per_token", "kl_old", "delta_nll"):
        assert np.isfinite(row[key]), key
    cert = row["certificate"]
    assert cert["ok"] and cert["logits_bitwise_equal"]
    # On old text the KL over old tokens is exactly the certified forgetting -log(1 - leak).
    assert row["kl_old"] == pytest.approx(cert["forgetting_nats"], rel=1e-6, abs=1e-12)
    assert 0 <= row["sampling"]["emitted_new"] and row["sampling"]["bytes"] > 0
