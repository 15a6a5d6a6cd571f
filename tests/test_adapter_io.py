"""markovmem.llm save_expansion / load_expansion / remove_expansion round trips and export_merged."""

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
PROBE = torch.tensor([[1, 5, V, 7, V + 1, 9], [1, 3, 4, 5, 6, 7]])


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def expanded(arch="llama", tied=True, dtype=torch.float32, block_output=True):
    model = tiny_model(arch, V, tied=tied, dtype=dtype)
    base = copy.deepcopy(model)
    tok = tiny_tokenizer(V)
    gen = torch.Generator().manual_seed(0)
    ids = llm.add_tokens(
        model, tok, ["glorp", "blip"], embeddings=torch.randn(2, 32, generator=gen), block_output=block_output
    )
    return base, model, tok, ids


@pytest.mark.parametrize(
    "arch, tied, dtype, block",
    [
        ("llama", True, torch.float32, True),
        ("qwen2", False, torch.bfloat16, True),
        ("gpt2", False, torch.float32, False),
    ],
)
def test_save_load_round_trip_is_bitwise(tmp_path, arch, tied, dtype, block):
    base, model, tok, ids = expanded(arch, tied, dtype, block)
    alpha = sp.csr_array(([0.25, 0.75, 1.0], ([0, 0, 1], [3, 9, 11])), shape=(2, V))
    path = tmp_path / "glorp.safetensors"
    llm.save_expansion(model, tok, path, alpha=alpha)
    fresh = copy.deepcopy(base)
    fresh_tok = tiny_tokenizer(V)
    assert llm.load_expansion(fresh, fresh_tok, path) == ids
    assert fresh_tok("w5 glorp blip")["input_ids"] == [1, 5, V, V + 1]
    with torch.no_grad():
        assert torch.equal(bits(fresh(PROBE).logits), bits(model(PROBE).logits))
    state = llm.get_expansion(fresh)
    assert torch.equal(bits(state.input_layer.new_weight), bits(llm.get_expansion(model).input_layer.new_weight))
    assert state.config.block_output == block
    np.testing.assert_array_equal(state.alpha.toarray(), alpha.toarray())
    assert_no_forgetting(base, fresh, PROBE[1:].tolist())
    # The tokenizer saved with the expansion already holds the tokens: accepted as is.
    again = copy.deepcopy(base)
    assert llm.load_expansion(again, fresh_tok, path) == ids
    llm.remove_expansion(fresh)
    for (name, a), (_, b) in zip(base.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(bits(a), bits(b)), name
    assert llm.base_fingerprint(fresh) == llm.base_fingerprint(base)


def test_load_refuses_another_base(tmp_path):
    _, model, tok, _ = expanded()
    path = tmp_path / "e.safetensors"
    llm.save_expansion(model, tok, path)
    other = tiny_model("llama", V, seed=1)
    with pytest.raises(ValueError, match="made for another base model"):
        llm.load_expansion(other, tiny_tokenizer(V), path)
    assert llm.get_expansion(other) is None
    assert llm.load_expansion(other, tiny_tokenizer(V), path, check_base=False) == [V, V + 1]
    with pytest.raises(ValueError, match="already carries an expansion"):
        llm.load_expansion(other, tiny_tokenizer(V), path, check_base=False)
    with pytest.raises(ValueError, match="needs n_base = 48"):
        llm.load_expansion(tiny_model("llama", V + 2), tiny_tokenizer(V + 2), path, check_base=False)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model("llama", V)
    with pytest.raises(FileNotFoundError, match="no expansion file"):
        llm.load_expansion(model, tiny_tokenizer(V), tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        llm.load_expansion(model, tiny_tokenizer(V), tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a markovmem expansion file"):
        llm.load_expansion(model, tiny_tokenizer(V), tmp_path / "other.safetensors")


def test_save_checks_the_tokenizer(tmp_path):
    _, model, _, _ = expanded()
    with pytest.raises(ValueError, match="tokenizer maps 'glorp' to None"):
        llm.save_expansion(model, tiny_tokenizer(V), tmp_path / "e.safetensors")


@pytest.mark.parametrize("arch, tied", [("llama", True), ("gpt2", False)])
def test_export_merged_loads_with_plain_transformers(tmp_path, arch, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, model, tok, ids = expanded(arch, tied)
    before = llm.base_fingerprint(model)
    out = llm.export_merged(model, tok, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    merged_tok = AutoTokenizer.from_pretrained(out)
    assert merged.config.vocab_size == V + 2
    assert merged_tok("w5 glorp")["input_ids"] == [1, 5, V]
    assert torch.equal(merged.get_input_embeddings().weight[V:], llm.get_expansion(model).input_layer.new_weight)
    assert set(ids) <= set(merged.generation_config.suppress_tokens)
    with torch.no_grad():
        got, ref = merged(PROBE).logits, model(PROBE).logits
    # Same old logits up to rounding (not bitwise: the output GEMM is wider); new tokens not blocked.
    np.testing.assert_allclose(got[..., :V].numpy(), ref[..., :V].numpy(), atol=1e-5)
    assert torch.isfinite(got[..., V:]).all()
    if tied:
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    # The expanded model itself is untouched by the export.
    assert type(model.get_input_embeddings()).__name__ == "NewTokenEmbeddingLayer"
    assert model.config.vocab_size == V + 2 and model.generation_config.suppress_tokens is None
    assert llm.base_fingerprint(model) == before
