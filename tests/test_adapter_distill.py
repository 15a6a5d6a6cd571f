"""markovmem.llm.distill and next_token_counts against direct per-token softmax and
hand counts, sharded resume, corpus mode."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import numpy as np

import markovmem as mm
from markovmem import llm
from markovmem.llm.testing import tiny_model, tiny_tokenizer

V = 48


def reference_rows(model, prefix, dtype=torch.float32):
    """p(. | prefix + [v]) for every v, one forward pass per token."""
    rows = []
    with torch.no_grad():
        for v in range(V):
            logits = model(torch.tensor([list(prefix) + [v]])).logits[0, -1, :V]
            rows.append(torch.softmax(logits.float(), -1).numpy())
    return np.stack(rows)


def assert_rows_match(P, ref, k, atol=2e-6):
    assert P.n_states == V and P.nnz == V * k
    for v in range(V):
        row = P.row(v)
        expected = np.sort(np.argsort(-ref[v], kind="stable")[:k])
        # Near-ties at the cut could swap; every stored entry must be a top entry.
        assert len(set(row.indices.tolist()) ^ set(expected.tolist())) <= 2, v
        np.testing.assert_allclose(row.probs, ref[v, row.indices], rtol=1e-5, atol=atol)
        assert row.tail == pytest.approx(1.0 - ref[v, row.indices].sum(), abs=1e-5)


@pytest.mark.parametrize("arch, prefix", [("llama", [1]), ("gpt2", []), ("qwen2", [1, 2])])
def test_rows_equal_direct_softmax(arch, prefix):
    model = tiny_model(arch, V, hidden_size=16, seed=1)
    with torch.no_grad():  # sharper distributions than the default init gives
        model.get_output_embeddings().weight.mul_(20)
    P = llm.distill(model, top_k=8, batch_size=7, prefix=prefix or None, progress=False)
    assert_rows_match(P, reference_rows(model, prefix), 8)
    P.validate()


def test_full_k_rows_sum_to_one():
    model = tiny_model("llama", V, hidden_size=16)
    P = llm.distill(model, top_k=10_000, progress=False)
    assert P.nnz == V * V
    np.testing.assert_allclose(P.to_dense().sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(P.to_dense(), reference_rows(model, []), atol=1e-6)


def test_bfloat16_model_float32_softmax():
    model = tiny_model("qwen2", V, hidden_size=16, dtype=torch.bfloat16)
    P = llm.distill(model, top_k=V, prefix=[1], progress=False)
    ref = reference_rows(model, [1])
    np.testing.assert_allclose(P.to_dense(), ref, atol=1e-6)
    assert P.data.dtype == np.float32


def test_autocast_dtype_and_device_arguments():
    model = tiny_model("llama", V, hidden_size=16)
    exact = llm.distill(model, top_k=V, prefix=[1], progress=False)
    low = llm.distill(model, top_k=V, prefix=[1], progress=False, dtype=torch.bfloat16, device="cpu")
    low.validate()
    np.testing.assert_allclose(low.to_dense(), exact.to_dense(), atol=2e-2)
    assert not np.array_equal(low.to_dense(), exact.to_dense())
    with pytest.raises(ValueError, match="dtype is torch.float64"):
        llm.distill(model, dtype=torch.float64, progress=False)


def test_expanded_model_distils_its_base_rows():
    model = tiny_model("llama", V, hidden_size=16)
    P = llm.distill(model, top_k=5, prefix=[1], progress=False)
    llm.add_tokens(model, tiny_tokenizer(V), ["glorp"])
    Q = llm.distill(model, top_k=5, prefix=[1], progress=False)
    assert Q.n_states == V
    assert Q.fingerprint() == P.fingerprint()


def test_token_subset_leaves_other_rows_empty():
    model = tiny_model("llama", V, hidden_size=16)
    P = llm.distill(model, top_k=4, token_ids=[9, 3, 20], prefix=[1], progress=False)
    full = llm.distill(model, top_k=4, prefix=[1], progress=False)
    assert P.n_states == V and P.nnz == 12
    for v in (3, 9, 20):
        np.testing.assert_array_equal(P.row(v).indices, np.sort(full.row(v).indices))
    assert P.row(0).tail == 1.0 and P.row(0).indices.size == 0


def test_out_dir_writes_shards_and_resumes(tmp_path, monkeypatch):
    from markovmem.llm import distillation

    model = tiny_model("llama", V, hidden_size=16)
    out = tmp_path / "run"
    P = llm.distill(model, top_k=6, batch_size=4, prefix=[1], progress=False, out=out, shard_rows=8)
    shards = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert len(shards) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["top_k"] == 6 and manifest["mode"] == "token"
    assert mm.TransitionMatrix.load(out / "matrix.safetensors").fingerprint() == P.fingerprint()
    (out / shards[2]).unlink()
    (out / shards[5]).unlink()
    calls = []
    select = distillation._select_topk
    monkeypatch.setattr(distillation, "_select_topk", lambda logits, k: calls.append(len(logits)) or select(logits, k))
    again = llm.distill(model, top_k=6, batch_size=4, prefix=[1], progress=False, out=out, shard_rows=8)
    assert calls == [4, 4, 4, 4]  # two missing shards of 8 rows, 4 rows per batch
    assert again.fingerprint() == P.fingerprint()
    with pytest.raises(ValueError, match="holds a distillation with other settings"):
        llm.distill(model, top_k=7, batch_size=4, prefix=[1], progress=False, out=out, shard_rows=8)


def _direct_corpus_sums(model, seqs, masks=None):
    """Per token: the list of full softmax rows at its counted positions (a direct computation)."""
    sums = {}
    with torch.no_grad():
        for i, s in enumerate(seqs):
            probs = torch.softmax(model(torch.tensor([s])).logits[0].float(), -1).numpy()
            for t, v in enumerate(s):
                if masks is None or masks[i][t]:
                    sums.setdefault(v, []).append(probs[t])
    return sums


def test_corpus_mode_averages_over_occurrences(tmp_path):
    model = tiny_model("gpt2", V, hidden_size=16)
    seqs = [[1, 5, 6, 5, 7], [1, 6, 5], [3, 4]]
    P = llm.distill(model, top_k=V, mode="corpus", sequences=seqs, batch_size=2, progress=False, fallback="none")
    for v, dists in _direct_corpus_sums(model, seqs).items():
        np.testing.assert_allclose(P.to_dense()[v], np.mean(dists, 0), atol=1e-6)
    assert P.row(10).tail == 1.0
    info = llm.dictionary_info(P)
    assert info["mode"] == "corpus" and info["fallback"] == "none" and info["shrinkage"] == 0.0
    assert info["row_counts"][5] == 3 and info["row_counts"][6] == 2 and info["row_counts"][10] == 0
    sharded = llm.distill(
        model,
        top_k=V,
        mode="corpus",
        sequences=seqs,
        batch_size=1,
        progress=False,
        out=tmp_path / "c",
        shard_rows=1,
        fallback="none",
    )
    np.testing.assert_allclose(sharded.to_dense(), P.to_dense(), atol=1e-7)
    saved = mm.TransitionMatrix.load(tmp_path / "c" / "matrix.safetensors")
    assert llm.dictionary_info(saved)["corpus"] == info["corpus"]
    top2 = llm.distill(model, top_k=2, mode="corpus", sequences=seqs, progress=False)
    assert np.diff(top2.indptr).max() == 2


@pytest.mark.parametrize("fallback", ["token", "unigram"])
def test_corpus_rows_shrink_toward_the_fallback_by_occurrence_count(fallback):
    model = tiny_model("llama", V, hidden_size=16)
    seqs = [[1, 5, 6, 5, 7, 5], [1, 6, 5], [3, 4]]
    masks = [np.array([True, True, False, True, True, True]), np.ones(3, bool), np.ones(2, bool)]
    lam = 2.5
    P = llm.distill(
        model,
        top_k=V,
        mode="corpus",
        sequences=seqs,
        mask=masks,
        fallback=fallback,
        shrinkage=lam,
        prefix=[1] if fallback == "token" else None,
        progress=False,
    )
    sums = _direct_corpus_sums(model, seqs, masks)
    if fallback == "token":
        with torch.no_grad():
            base = torch.softmax(model(torch.tensor([[1, v] for v in range(V)])).logits[:, -1].float(), -1).numpy()
    else:
        everything = np.concatenate([np.stack(d) for d in sums.values()])
        base = np.tile(everything.mean(0), (V, 1))
    dense = P.to_dense()
    for v in range(V):
        rows = sums.get(v, [])
        expected = (np.sum(rows, 0) + lam * base[v]) / (len(rows) + lam) if rows else base[v]
        np.testing.assert_allclose(dense[v], expected, atol=2e-6, err_msg=f"row {v}")
    info = llm.dictionary_info(P)
    assert info["row_counts"][6] == 1  # the masked occurrence of 6 does not count
    assert info["fallback"] == fallback and info["shrinkage"] == lam


def test_corpus_longer_than_the_context_is_windowed_not_truncated():
    model = tiny_model("llama", V, hidden_size=16)
    rng = np.random.default_rng(0)
    seq = rng.integers(3, V, size=23).tolist()
    P = llm.distill(model, top_k=V, mode="corpus", sequences=[seq], window=8, fallback="none", progress=False)
    counts = llm.dictionary_info(P)["row_counts"]
    assert counts.sum() == len(seq)  # every position counted once
    # Each position is scored with the window that first gives it >= 4 tokens of context.
    starts = [0, 4, 8, 12, 16]
    expected = {}
    with torch.no_grad():
        for j, a in enumerate(starts):
            piece = seq[a : a + 8]
            probs = torch.softmax(model(torch.tensor([piece])).logits[0].float(), -1).numpy()
            lo = 0 if j == 0 else 4
            for t in range(lo, len(piece)):
                if a + t < (starts[j + 1] + 4 if j + 1 < len(starts) else len(seq)) and a + t not in expected:
                    expected[a + t] = probs[t]
    assert sorted(expected) == list(range(len(seq)))
    by_token = {}
    for t, v in enumerate(seq):
        by_token.setdefault(v, []).append(expected[t])
    for v, dists in by_token.items():
        np.testing.assert_allclose(P.to_dense()[v], np.mean(dists, 0), atol=2e-6)


def test_distill_errors():
    model = tiny_model("llama", V, hidden_size=16)
    with pytest.raises(ValueError, match="mode is 'bigram'"):
        llm.distill(model, mode="bigram")
    with pytest.raises(ValueError, match="top_k is 0"):
        llm.distill(model, top_k=0)
    with pytest.raises(ValueError, match="sequences is required"):
        llm.distill(model, mode="corpus", progress=False)
    with pytest.raises(TypeError, match="not a string"):
        llm.distill(model, mode="corpus", sequences="some text", progress=False)
    with pytest.raises(IndexError, match=r"token_ids\[1\] = 99 is out of range"):
        llm.distill(model, token_ids=[1, 99], progress=False)
    with pytest.raises(ValueError, match="only used with mode='corpus'"):
        llm.distill(model, sequences=[[1, 2]], progress=False)
    with pytest.raises(ValueError, match="fallback is 'mean'"):
        llm.distill(model, mode="corpus", sequences=[[1, 2]], fallback="mean", progress=False)
    with pytest.raises(ValueError, match="shrinkage is -1"):
        llm.distill(model, mode="corpus", sequences=[[1, 2]], shrinkage=-1, progress=False)
    with pytest.raises(ValueError, match=r"mask\[0\] has 3 entries; sequences\[0\] has 2"):
        llm.distill(model, mode="corpus", sequences=[[1, 2]], mask=[[True, True, False]], progress=False)
    with pytest.raises(ValueError, match="no counted position"):
        llm.distill(model, mode="corpus", sequences=[[1, 2]], mask=[[False, False]], progress=False)


def test_next_token_counts_against_hand_counts():
    n_base = 10
    seqs = [[1, 10, 3, 10, 3, 11], [10, 11, 10], [11, 4], np.array([10, 9])]
    C = llm.next_token_counts(seqs, [10, 11], n_base)
    assert C.shape == (2, n_base) and C.dtype == np.float64
    expected = np.zeros((2, n_base))
    expected[0, 3] = 2  # 10 -> 3 twice; 10 -> 11 is into a new token: not counted
    expected[0, 9] = 1
    expected[1, 4] = 1  # 11 -> 10 is not counted; 11 ends the first sequence
    np.testing.assert_array_equal(C.toarray(), expected)
    empty = llm.next_token_counts([[1, 2, 3]], [12], n_base)
    assert empty.nnz == 0 and empty.shape == (1, n_base)
    with pytest.raises(ValueError, match="repeated"):
        llm.next_token_counts(seqs, [10, 10], n_base)
    with pytest.raises(TypeError, match="tokenize the text first"):
        llm.next_token_counts(["a text"], [10], n_base)


def test_next_token_counts_accepts_tokenizer_output():
    tok = tiny_tokenizer(V)
    model = tiny_model("llama", V, hidden_size=16)
    ids = llm.add_tokens(model, tok, ["glorp"])
    enc = [tok("w5 glorp w7 w8 glorp w7"), tok("glorp w9")]
    C = llm.next_token_counts(enc, ids, V)
    assert C[0, 7] == 2 and C[0, 9] == 1 and C.sum() == 3


@pytest.mark.parametrize("v, k", [(4099, 8), (8192, 16), (5000, 1), (70_000, 300)])
def test_cpu_topk_is_exact(v, k):
    from markovmem.llm.distillation import _select_topk

    gen = torch.Generator().manual_seed(v)
    logits = torch.randn(13, v, generator=gen) * 4
    logits[3] = 0.0  # all ties
    logits[4, -3:] = 50.0  # the winners sit in the remainder after the last full chunk
    values, ids = _select_topk(logits, k)
    probs = torch.softmax(logits.double(), -1)
    ref = torch.topk(probs, k, -1)
    assert ids.dtype == torch.int32 and values.dtype == torch.float32
    torch.testing.assert_close(values.double(), ref.values, rtol=2e-6, atol=0)
    torch.testing.assert_close(probs.gather(1, ids.long()), values.double(), rtol=2e-6, atol=0)
    assert all(len(set(r.tolist())) == k for r in ids)
    assert ids[3].tolist() == list(range(k))  # ties: smaller ids first
    assert set(ids[4].tolist()) <= {v - 3, v - 2, v - 1} if k < 3 else set(ids[4].tolist()) >= {v - 3, v - 2, v - 1}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_last_logits_head_shortcut_matches_the_model(kind, monkeypatch):
    from markovmem.llm import distillation
    from markovmem.llm.distillation import _HeadLogits

    monkeypatch.setattr(distillation, "_HEAD_MIN_LOGITS", 0)  # a tiny vocabulary takes the shortcut too

    model = tiny_model(kind, V, hidden_size=16).eval()
    inp = torch.tensor([[1, 5], [1, 9], [1, 30]])
    last = _HeadLogits(model, V, torch.device("cpu"), None, 4)
    with torch.no_grad():
        got = last(inp).clone()
        assert last.head is not None  # the shortcut passed its check and is used
        again = last(inp[:1])  # the reused buffer, a smaller batch
        ref = model(input_ids=inp).logits[:, -1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, ref[:1], rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(distillation, "_HEAD_MIN_LOGITS", 10**9)
    assert _HeadLogits(model, V, torch.device("cpu"), None, 4).head is None  # small batches: the model's forward


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_corpus_head_shortcut_matches_the_model_at_the_kept_positions(kind, monkeypatch):
    """Corpus mode applies the head at the counted positions only, in chunks of a reused buffer."""
    from markovmem.llm import distillation
    from markovmem.llm.distillation import _HeadLogits

    monkeypatch.setattr(distillation, "_HEAD_MIN_LOGITS", 0)
    monkeypatch.setattr(distillation, "_HEAD_CHUNK_LOGITS", 3 * V)  # chunks of 3 positions
    model = tiny_model(kind, V, hidden_size=16).eval()
    ids = torch.tensor([[1, 5, 9, 30, 7], [1, 12, 3, 0, 0]])
    attend = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    keep = torch.tensor([[True, False, True, True, True], [False, True, True, False, False]])
    head = _HeadLogits(model, V, torch.device("cpu"), None, 10)
    with torch.no_grad():
        values, top = head.topk_at(ids, attend, keep, 6)
        assert head.head is not None  # the shortcut passed its check and is used
        ref = torch.softmax(model(input_ids=ids, attention_mask=attend).logits[keep].double(), -1)
    assert values.shape == top.shape == (6, 6)
    torch.testing.assert_close(values.double(), torch.topk(ref, 6).values, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ref.gather(1, top.long()), values.double(), rtol=1e-5, atol=1e-7)
    seqs = [[1, 5, 9, 30, 7], [1, 12, 3]]
    fast = llm.distill(model, top_k=6, mode="corpus", sequences=seqs, fallback="none", progress=False)
    monkeypatch.setattr(distillation, "_HEAD_MIN_LOGITS", 10**9)
    slow = llm.distill(model, top_k=6, mode="corpus", sequences=seqs, fallback="none", progress=False)
    np.testing.assert_allclose(fast.to_dense(), slow.to_dense(), rtol=1e-5, atol=1e-7)


def test_last_logits_falls_back_when_the_head_is_not_plain(monkeypatch):
    """A model that post-processes its logits (soft-capping, scaling) is distilled through its own forward."""
    from markovmem.llm import distillation
    from markovmem.llm.distillation import _HeadLogits

    monkeypatch.setattr(distillation, "_HEAD_MIN_LOGITS", 0)

    model = tiny_model("llama", V, hidden_size=16).eval()
    plain = model.forward

    def capped(*args, **kwargs):
        out = plain(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    model.forward = capped
    inp = torch.tensor([[1, 5], [1, 9]])
    last = _HeadLogits(model, V, torch.device("cpu"), None, 4)
    with torch.no_grad():
        got = last(inp)
        assert last.head is None
        ref = model(input_ids=inp).logits[:, -1]
        assert torch.equal(got, ref)
        P = llm.distill(model, top_k=8, token_ids=[5, 9], prefix=[1], progress=False)
    row = P.row(9)
    top = torch.topk(torch.softmax(ref[1], -1), 8)
    np.testing.assert_array_equal(row.indices, np.sort(top.indices.numpy()))
    np.testing.assert_allclose(row.probs, torch.softmax(ref[1], -1).numpy()[row.indices], rtol=1e-5)


def test_large_vocab_distill_matches_direct_softmax():
    model = tiny_model("qwen2", 4099, hidden_size=16)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    P = llm.distill(model, top_k=8, token_ids=[5, 4000], prefix=[1], progress=False)
    with torch.no_grad():
        for v in (5, 4000):
            ref = torch.softmax(model(torch.tensor([[1, v]])).logits[0, -1], -1)
            top = torch.topk(ref, 8)
            row = P.row(v)
            np.testing.assert_array_equal(row.indices, np.sort(top.indices.numpy()))
            np.testing.assert_allclose(row.probs, ref.numpy()[row.indices], rtol=1e-5, atol=1e-7)
