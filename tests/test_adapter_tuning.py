"""markovmem.llm.embedding_tune: only the new rows move, every base tensor stays bitwise."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import numpy as np
import scipy.sparse as sp

from markovmem import llm
from markovmem.llm.testing import assert_no_forgetting, tiny_model, tiny_tokenizer

V = 48
CONTEXTS = [[1, 5, 6, 7], [1, 20, 21, 22, 23]]


def training_sequences(new_id, n=24, seed=0):
    """'... glorp w7 w8 ...': the new token is always followed by w7 w8."""
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, V, 3).tolist(), new_id, 7, 8, *rng.integers(3, V, 2).tolist()] for _ in range(n)]


@pytest.mark.parametrize(
    "arch, tied, dtype",
    [
        ("llama", True, torch.float32),
        ("qwen2", False, torch.float32),
        ("gpt2", True, torch.bfloat16),
    ],
)
def test_only_new_rows_change(arch, tied, dtype):
    model = tiny_model(arch, V, tied=tied, dtype=dtype)
    base = copy.deepcopy(model)
    tok = tiny_tokenizer(V)
    ids = llm.add_tokens(model, tok, ["glorp", "blip"])
    state = llm.get_expansion(model)
    before_rows = state.input_layer.new_weight.detach().clone()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fp = llm.base_fingerprint(model)
    history = llm.embedding_tune(
        model, [ids[0]], training_sequences(ids[0]), steps=30, lr=0.05, batch_size=8, progress=False
    )
    rows = state.input_layer.new_weight.detach()
    assert not torch.equal(rows[0], before_rows[0])
    assert torch.equal(
        rows[1].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        before_rows[1].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
    assert rows.dtype == dtype
    assert llm.base_fingerprint(model) == fp
    assert all(p.grad is None for n, p in model.named_parameters() if "new_weight" not in n)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert len(history.loss) == 30 and history.n_trainable == 32
    assert np.mean(history.loss[-5:]) < np.mean(history.loss[:5])
    assert_no_forgetting(base, model, CONTEXTS)


def test_tuning_learns_the_continuation():
    model = tiny_model("llama", V, hidden_size=32, num_layers=2, seed=2)
    with torch.no_grad():  # a random model at init is nearly uniform; give it some range
        model.get_output_embeddings().weight.mul_(10)
    tok = tiny_tokenizer(V)
    ids = llm.add_tokens(model, tok, ["glorp"])
    seqs = training_sequences(ids[0], n=32)
    probe = torch.tensor([[1, 30, 31, ids[0]]])
    with torch.no_grad():
        p_before = torch.softmax(model(probe).logits[0, -1].float(), -1)[7].item()
    history = llm.embedding_tune(model, ids, seqs, steps=60, lr=0.1, batch_size=8, init="random", progress=False)
    with torch.no_grad():
        p_after = torch.softmax(model(probe).logits[0, -1].float(), -1)[7].item()
    assert p_after > max(5 * p_before, 0.5)
    assert history.final_loss < history.loss[0]
    assert history.init == "random" and history.n_sequences == 32


def test_init_alpha_writes_e_t_alpha():
    model = tiny_model("llama", V)
    tok = tiny_tokenizer(V)
    ids = llm.add_tokens(model, tok, ["glorp"])
    alpha = sp.csr_array(([0.7, 0.3], ([0, 0], [7, 8])), shape=(1, V))
    history = llm.embedding_tune(
        model, ids, training_sequences(ids[0]), steps=0, init="alpha", alpha=alpha, progress=False
    )
    assert history.loss == []
    row = llm.get_expansion(model).input_layer.new_weight[0].detach()
    assert torch.equal(row, llm.alpha_to_embeddings(model, alpha)[0])


def test_unblocked_tokens_are_targets_too():
    model = tiny_model("llama", V, tied=True)
    tok = tiny_tokenizer(V)
    ids = llm.add_tokens(model, tok, ["glorp"], block_output=False)
    seqs = [[1, 5, 6, ids[0], 7, ids[0], 8]] * 4
    history = llm.embedding_tune(model, ids, seqs, steps=3, lr=0.01, batch_size=2, progress=False)
    # open output: every position is scored (each holds the new logits), the first glorp included
    assert history.n_targets[0] == 2 * 6
    blocked = tiny_model("llama", V, tied=True)
    ids_b = llm.add_tokens(blocked, tiny_tokenizer(V), ["glorp"])
    hb = llm.embedding_tune(blocked, ids_b, seqs, steps=1, lr=0.01, batch_size=2, progress=False)
    assert hb.n_targets[0] == 2 * 2  # glorp is never a target when blocked


def test_tuning_errors():
    model = tiny_model("llama", V)
    tok = tiny_tokenizer(V)
    with pytest.raises(ValueError, match="no markovmem expansion"):
        llm.embedding_tune(model, [V], [[1, V, 3]], progress=False)
    ids = llm.add_tokens(model, tok, ["glorp"])
    with pytest.raises(ValueError, match="needs alpha"):
        llm.embedding_tune(model, ids, [[1, V, 3]], init="alpha", progress=False)
    with pytest.raises(ValueError, match="init is 'best'"):
        llm.embedding_tune(model, ids, [[1, V, 3]], init="best", progress=False)
    with pytest.raises(ValueError, match="no sequence contains a trained token"):
        llm.embedding_tune(model, ids, [[1, 5, 6], [1, 7, V]], progress=False)
    with pytest.raises(IndexError, match="not a new token id"):
        llm.embedding_tune(model, [3], [[1, V, 3]], progress=False)
