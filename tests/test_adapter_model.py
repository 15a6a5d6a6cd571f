"""markovmem.llm add_tokens / set_embeddings / alpha_to_embeddings / remove_expansion:
exact zero forgetting on tiny Llama, Qwen2 and GPT-2 models, tied and untied."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import numpy as np
import scipy.sparse as sp

from markovmem import llm
from markovmem.llm.testing import assert_no_forgetting, tiny_model, tiny_tokenizer

V = 64
CONTEXTS = [[1, 5, 6, 7, 8], [1, 9, 10, 11, 12], [1, 3], [4, 4, 4, 4, 4], [1, 60, 61, 62, 63]]
CASES = [
    pytest.param(arch, tied, dtype, id=f"{arch}-{'tied' if tied else 'untied'}-{str(dtype)[6:]}")
    for arch in ("llama", "qwen2", "gpt2")
    for tied in (True, False)
    for dtype in (torch.float32, torch.bfloat16)
]


@pytest.fixture
def pair():
    model = tiny_model("llama", V, tied=True)
    return copy.deepcopy(model), model, tiny_tokenizer(V)


@pytest.mark.parametrize("arch, tied, dtype", CASES)
def test_zero_forgetting_is_exact(arch, tied, dtype):
    model = tiny_model(arch, V, tied=tied, dtype=dtype)
    base = copy.deepcopy(model)
    tok = tiny_tokenizer(V)
    ids = llm.add_tokens(model, tok, ["glorp", "blip"])
    assert ids == [V, V + 1]
    assert tok("w5 glorp w7 blip")["input_ids"] == [1, 5, V, 7, V + 1]
    # Rows unlike any base row, so a leak into old logits could not hide.
    llm.set_embeddings(model, ids, torch.randn(2, 32) * 3)
    report = llm.verify_no_forgetting(base, model, CONTEXTS)
    assert report.max_abs_logit_diff == 0.0
    assert report.logits_bitwise_equal
    assert report.max_new_token_prob == 0.0
    assert report.base_params_unchanged
    assert report.ok, str(report)
    assert llm.verify_no_forgetting(None, model, CONTEXTS).ok
    assert llm.verify_no_forgetting(model, model, CONTEXTS).ok
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_new_tokens_are_read_but_never_predicted(arch):
    model = tiny_model(arch, V)
    tok = tiny_tokenizer(V)
    ids = llm.add_tokens(model, tok, ["glorp"])
    rows = torch.randn(1, 32)
    llm.set_embeddings(model, ids, rows)
    emb = model.get_input_embeddings()(torch.tensor([[5, V, 7]]))
    assert torch.equal(emb[0, 1], rows[0])
    assert torch.equal(emb[0, 0], model.get_input_embeddings().weight[5])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, V, 7]])).logits
    assert logits.shape == (1, 4, V + 1)
    assert torch.isneginf(logits[..., V]).all()
    assert torch.softmax(logits, -1)[..., V].max().item() == 0.0
    # A different row changes what follows the new token, and only from there on.
    llm.set_embeddings(model, ids, rows + 1)
    with torch.no_grad():
        again = model(torch.tensor([[1, 5, V, 7]])).logits
    assert torch.equal(again[:, :2], logits[:, :2])
    assert not torch.equal(again[:, 2:], logits[:, 2:])


def test_tie_output_uses_the_input_row():
    model = tiny_model("llama", V, tied=True)
    tok = tiny_tokenizer(V)
    ids = llm.add_tokens(model, tok, ["glorp"], block_output=False, tie_output=True)
    state = llm.get_expansion(model)
    assert state.output_layer.new_weight is state.input_layer.new_weight
    assert len(state.new_parameters()) == 2  # the shared rows once, and the bias
    row = torch.randn(1, 32)
    llm.set_embeddings(model, ids, row)
    seen = {}
    model.model.norm.register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 6]])).logits
    expected = seen["h"] @ row[0]
    assert torch.allclose(logits[..., V], expected, atol=1e-6)
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="ties them to the input rows"):
        llm.set_embeddings(model, ids, output_embeddings=row)


def test_open_output_rows_are_untied_by_default_on_a_tied_base():
    model = tiny_model("llama", V, tied=True)
    tok = tiny_tokenizer(V)
    row = torch.randn(1, 32)
    ids = llm.add_tokens(model, tok, ["glorp"], embeddings=row, block_output=False)
    state = llm.get_expansion(model)
    out = state.output_layer
    assert out.new_weight is not state.input_layer.new_weight
    assert torch.equal(out.new_weight.detach(), row)  # starts as a copy of the input rows, like the base
    assert torch.equal(out.new_bias.detach(), torch.zeros(1))  # a bias though the base head has none
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # base still tied
    llm.set_embeddings(model, ids, torch.zeros(1, 32))
    assert torch.equal(out.new_weight.detach(), row)  # input rows alone leave the output rows
    llm.set_embeddings(model, ids, output_embeddings=torch.ones(1, 32), output_bias=[2.0])
    assert torch.equal(out.new_weight.detach(), torch.ones(1, 32)) and out.new_bias.tolist() == [2.0]
    assert torch.equal(state.input_layer.new_weight.detach(), torch.zeros(1, 32))


def test_untied_unblocked_output_rows_are_settable():
    model = tiny_model("qwen2", V, tied=False)
    tok = tiny_tokenizer(V)
    out_rows = torch.zeros(1, 32)
    ids = llm.add_tokens(model, tok, ["glorp"], block_output=False, output_embeddings=out_rows)
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([[1, 5]])).logits[..., V], torch.zeros(1, 2))
    llm.set_embeddings(model, ids, torch.randn(1, 32), output_embeddings=torch.ones(1, 32))
    with torch.no_grad():
        assert model(torch.tensor([[1, 5]])).logits[..., V].abs().max() > 0


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("tie_output", [True, False])
def test_growing_an_unblocked_expansion(tied, tie_output):
    model = tiny_model("gpt2", V, tied=tied)
    base = copy.deepcopy(model)
    tok = tiny_tokenizer(V)
    llm.add_tokens(model, tok, ["glorp"], block_output=False, tie_output=tie_output, output_bias=[1.5])
    llm.add_tokens(model, tok, ["blip"], block_output=False, tie_output=tie_output)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, V, V + 1]])).logits
    assert logits.shape == (1, 4, V + 2) and torch.isfinite(logits).all()
    out = llm.get_expansion(model).output_layer
    assert out.new_weight.shape == (2, 32)
    assert (out.new_weight is llm.get_expansion(model).input_layer.new_weight) == tie_output
    assert out.new_bias.tolist() == [1.5, 0.0]
    with pytest.raises(ValueError, match="tie_output"):
        llm.add_tokens(model, tok, ["zap"], block_output=False, tie_output=not tie_output)
    report = llm.verify_no_forgetting(base, model, CONTEXTS)
    assert report.max_abs_logit_diff == 0.0 and report.base_params_unchanged
    assert report.max_new_token_prob > 0.0 and report.ok  # not blocked: new tokens may be predicted


def test_init_modes(pair):
    _, model, tok = pair
    base_w = model.get_input_embeddings().weight.detach().clone()
    llm.add_tokens(model, tok, ["a1"], init="mean")
    llm.add_tokens(model, tok, ["a2"], init="zeros")
    ids = llm.add_tokens(model, tok, ["a3", "a4"], init="random", seed=3)
    assert ids == [V + 2, V + 3]
    rows = llm.get_expansion(model).input_layer.new_weight.detach()
    assert torch.allclose(rows[0], base_w.mean(0))
    assert torch.equal(rows[1], torch.zeros(32))
    assert not torch.equal(rows[2], rows[3])


def test_growing_keeps_earlier_rows(pair):
    base, model, tok = pair
    first = llm.add_tokens(model, tok, ["glorp"], embeddings=torch.full((1, 32), 0.5))
    second = llm.add_tokens(model, tok, ["blip", "zap"])
    assert first == [V] and second == [V + 1, V + 2]
    assert model.config.vocab_size == V + 3
    rows = llm.get_expansion(model).input_layer.new_weight
    assert torch.equal(rows[0], torch.full((32,), 0.5))
    assert_no_forgetting(base, model, CONTEXTS)
    with pytest.raises(ValueError, match="already added"):
        llm.add_tokens(model, tok, ["glorp"])
    with pytest.raises(ValueError, match="block_output"):
        llm.add_tokens(model, tok, ["new"], block_output=False)


def test_remove_expansion_restores_the_base_bitwise(pair):
    base, model, tok = pair
    keys = list(model.state_dict())
    fp = llm.base_fingerprint(model)
    llm.add_tokens(model, tok, ["glorp"], embeddings=torch.randn(1, 32))
    assert llm.base_fingerprint(model) == fp
    out = llm.remove_expansion(model)
    assert out is model and llm.get_expansion(model) is None
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert model.config.vocab_size == V
    assert list(model.state_dict()) == keys
    for (k, a), (_, b) in zip(base.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), k
    assert llm.base_fingerprint(model) == fp
    with pytest.raises(ValueError, match="no markovmem expansion"):
        llm.remove_expansion(model)


def test_verify_detects_a_changed_base_weight(pair):
    base, model, tok = pair
    llm.add_tokens(model, tok, ["glorp"])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    report = llm.verify_no_forgetting(base, model, CONTEXTS)
    assert not report.ok
    assert report.max_abs_logit_diff > 0.0
    assert "model.layers.0.mlp.down_proj.weight" in report.changed_tensors
    with pytest.raises(AssertionError, match="zero forgetting violated"):
        assert_no_forgetting(base, model, CONTEXTS)
    # Against itself the logits agree, but the recorded fingerprint still catches the change.
    self_report = llm.verify_no_forgetting(None, model, CONTEXTS)
    assert self_report.max_abs_logit_diff == 0.0
    assert not self_report.base_params_unchanged and not self_report.ok


def test_verify_accepts_strings_and_rejects_new_tokens(pair):
    base, model, tok = pair
    llm.add_tokens(model, tok, ["glorp"])
    report = llm.verify_no_forgetting(base, model, ["w5 w6 w7", "w8"], tokenizer=tok)
    assert report.ok and report.n_contexts == 2 and report.n_positions == 6
    with pytest.raises(ValueError, match="holds a new token"):
        llm.verify_no_forgetting(base, model, [[1, V]])
    with pytest.raises(ValueError, match="pass tokenizer"):
        llm.verify_no_forgetting(base, model, ["w5"])


def test_training_loss_and_generate_work_on_the_expanded_model(pair):
    base, model, tok = pair
    ids = llm.add_tokens(model, tok, ["glorp"])
    x = torch.tensor([[1, 5, ids[0], 7, 8]])
    with torch.no_grad():
        loss = model(x, labels=torch.tensor([[1, 5, -100, 7, 8]])).loss
    assert torch.isfinite(loss)
    out = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11) and (out[0, 5:] < V).all()
    plain = base.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(
        model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=6, do_sample=False, pad_token_id=0), plain
    )


def test_padded_vocabulary_gets_reserved_tokens():
    model = tiny_model("qwen2", V)
    tok = tiny_tokenizer(V - 4)
    ids = llm.add_tokens(model, tok, ["glorp"])
    assert ids == [V]
    assert len(tok) == V + 1
    assert tok.convert_ids_to_tokens(V - 4) == "<|markovmem_reserved_60|>"
    strict = tiny_tokenizer(V - 4)
    with pytest.raises(ValueError, match="pad_tokenizer"):
        llm.add_tokens(tiny_model("qwen2", V), strict, ["glorp"], pad_tokenizer=False)


def test_add_tokens_errors(pair):
    _, model, tok = pair
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        llm.add_tokens(model, tok, ["w5"])
    with pytest.raises(ValueError, match="repeats"):
        llm.add_tokens(model, tok, ["x", "x"])
    with pytest.raises(ValueError, match="non-empty string"):
        llm.add_tokens(model, tok, [""])
    with pytest.raises(ValueError, match="tokens is empty"):
        llm.add_tokens(model, tok, [])
    with pytest.raises(ValueError, match=r"embeddings has shape \(1, 7\); expected \(1, 32\)"):
        llm.add_tokens(model, tok, ["glorp"], embeddings=torch.zeros(1, 7))
    with pytest.raises(ValueError, match="tokenizer has 65 tokens"):
        llm.add_tokens(model, tiny_tokenizer(V + 1), ["glorp"])
    assert llm.get_expansion(model) is None and len(tok) == V
    with pytest.raises(TypeError, match="transformers"):
        llm.add_tokens(torch.nn.Linear(2, 2), tok, ["glorp"])


def test_set_embeddings_errors(pair):
    _, model, tok = pair
    with pytest.raises(ValueError, match="no markovmem expansion"):
        llm.set_embeddings(model, [V], torch.zeros(1, 32))
    ids = llm.add_tokens(model, tok, ["glorp"])
    with pytest.raises(IndexError, match=r"ids\[0\] = 5 is not a new token id"):
        llm.set_embeddings(model, [5], torch.zeros(1, 32))
    with pytest.raises(ValueError, match="non-finite"):
        llm.set_embeddings(model, ids, torch.full((1, 32), float("nan")))


def test_alpha_to_embeddings_matches_dense_reference(pair, rng):
    _, model, tok = pair
    E = model.get_input_embeddings().weight.detach().numpy().astype(np.float64)
    alpha = sp.random_array((3, V), density=0.1, random_state=rng, format="csr")
    got = llm.alpha_to_embeddings(model, alpha)
    assert got.shape == (3, 32) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), alpha.toarray() @ E, rtol=1e-5, atol=1e-6)
    llm.add_tokens(model, tok, ["glorp"])
    wide = sp.hstack([alpha, sp.csr_array((3, 2))]).tocsr()  # n_states > n_base, new columns empty
    assert torch.equal(llm.alpha_to_embeddings(model, wide), got)

    class Fit:
        pass

    fit = Fit()
    fit.alpha = alpha
    assert torch.equal(llm.alpha_to_embeddings(model, fit), got)
    bad = sp.csr_array(([1.0], ([0], [V])), shape=(1, V + 1))
    with pytest.raises(ValueError, match="weights a state >= n_base"):
        llm.alpha_to_embeddings(model, bad)
    with pytest.raises(ValueError, match="at least n_base"):
        llm.alpha_to_embeddings(model, sp.csr_array((1, 5)))


def test_alpha_to_embeddings_bfloat16():
    model = tiny_model("gpt2", V, dtype=torch.bfloat16)
    alpha = sp.csr_array(([0.5, 0.5], ([0, 0], [3, 4])), shape=(1, V))
    got = llm.alpha_to_embeddings(model, alpha)
    E = model.get_input_embeddings().weight.float()
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[0], (0.5 * E[3] + 0.5 * E[4]).to(torch.bfloat16))


def test_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import markovmem, markovmem.llm, markovmem.llm.testing\n"
        "try:\n    markovmem.llm.distill\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ERR" in out and "pip install markovmem[llm]" in out
