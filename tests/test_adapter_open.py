"""markovmem.llm open expansion (new tokens that can be generated): own output rows and bias,
the exact forgetting certificate (leak, -log(1 - leak)), the leak gate calibrate_leak,
expansion files, export to plain transformers with generate(), and embedding tuning of the
new output side, on tiny Llama, Qwen2 and GPT-2 models, tied and untied, float32 and bfloat16."""

from __future__ import annotations

import copy
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import numpy as np
from helpers import forge

from markovmem import llm
from markovmem.llm.testing import assert_no_forgetting, tiny_model, tiny_tokenizer

V = 64
D = 32
CASES = [
    pytest.param(arch, tied, dtype, id=f"{arch}-{'tied' if tied else 'untied'}-{str(dtype)[6:]}")
    for arch in ("llama", "qwen2", "gpt2")
    for tied in (True, False)
    for dtype in (torch.float32, torch.bfloat16)
]


def old_contexts(n=12, length=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, V, (length - 1,), generator=gen).tolist()] for _ in range(n)]


def new_texts(ids):
    return [[1, 5, ids[0], 7, 8, ids[1], 9, ids[0]], [1, 11, 12, ids[1], 13, 14, ids[0], 15]] * 2


def open_model(arch="llama", tied=True, dtype=torch.float32, bias=(4.0, 1.0)):
    """(base, expanded, tokenizer, ids): two new tokens with random own output rows and a bias
    large enough that they take most of the mass after many old contexts."""
    model = tiny_model(arch, V, tied=tied, dtype=dtype)
    base = copy.deepcopy(model)
    tok = tiny_tokenizer(V)
    gen = torch.Generator().manual_seed(1)
    ids = llm.add_tokens(
        model,
        tok,
        ["glorp", "blip"],
        embeddings=torch.randn(2, D, generator=gen),
        block_output=False,
        output_embeddings=torch.randn(2, D, generator=gen) * 0.2,
        output_bias=list(bias),
    )
    return base, model, tok, ids


def logits_of(model, contexts):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([c])).logits[0] for c in contexts]


def independent_leak(model, contexts):
    """Per-position leak and -log(1 - leak) from the expanded logits alone, in float64:
    leak = sum of the softmax over the new columns."""
    leaks = []
    for logits in logits_of(model, contexts):
        p = torch.softmax(logits.double(), -1)
        leaks.append(p[:, V:].sum(-1))
    leak = torch.cat(leaks)
    return leak.numpy(), float((-torch.log(1 - leak)).mean())


@pytest.mark.parametrize("arch, tied, dtype", CASES)
def test_certificate_is_exact_and_the_gate_holds(arch, tied, dtype):
    base, model, _, ids = open_model(arch, tied, dtype)
    ctx = old_contexts()
    report = llm.verify_no_forgetting(base, model, ctx)
    assert report.logits_bitwise_equal and report.max_abs_logit_diff == 0.0
    assert report.old_conditional_bitwise_equal and report.base_params_unchanged and report.ok
    leak, forgetting = independent_leak(model, ctx)
    assert report.forgetting_nats == pytest.approx(forgetting, abs=1e-6)
    assert report.forgetting_nats > 0.01  # an open expansion does take mass from old text
    assert report.leak_max == pytest.approx(leak.max(), abs=1e-6)
    assert report.leak_mean == pytest.approx(leak.mean(), abs=1e-6)
    # p99: the smallest measured leak that at least 99% of the positions do not exceed.
    assert report.leak_p99 == pytest.approx(np.sort(leak)[int(np.ceil(0.99 * leak.size)) - 1], abs=1e-6)
    assert report.n_positions == leak.size == 12 * 24
    assert "leak mean / p99 / max" in str(report) and "forgetting (nats/token)" in str(report)
    bounded = llm.verify_no_forgetting(base, model, ctx, max_leak=0.01)
    assert not bounded.ok and any("exceeds max_leak" in f for f in bounded.failures())

    cal = llm.calibrate_leak(model, ctx, 0.01, texts=new_texts(ids), progress=False)
    assert cal.binding and cal.offset < 0 and cal.offset == float(llm.get_expansion(model).output_layer.leak_offset)
    after = llm.verify_no_forgetting(base, model, ctx, max_leak=0.01)
    assert after.ok, str(after)
    assert after.logits_bitwise_equal and after.old_conditional_bitwise_equal
    # Tight: the bound is nearly reached, not undershot by a needlessly negative offset.
    assert 0.005 < after.leak_max <= 0.01
    assert after.leak_max == pytest.approx(cal.leak_after, abs=1e-9)
    leak2, forgetting2 = independent_leak(model, ctx)
    assert leak2.max() <= 0.01 + 1e-9
    assert after.forgetting_nats == pytest.approx(forgetting2, abs=1e-6)
    assert cal.forgetting_after == pytest.approx(forgetting2, abs=1e-6)
    assert cal.forgetting_after < cal.forgetting_before
    # The cost on the new tokens' own loss: a lower offset makes them less likely where they occur.
    assert cal.n_new_token_targets == 10 and cal.new_token_loss_after > cal.new_token_loss_before


@pytest.mark.parametrize("statistic", ["p99", "mean"])
def test_gate_statistics(statistic):
    base, model, _, _ = open_model("qwen2", False)
    ctx = old_contexts(n=20)
    cal = llm.calibrate_leak(model, ctx, 0.02, statistic=statistic, progress=False)
    report = llm.verify_no_forgetting(base, model, ctx, max_leak=0.02, leak_statistic=statistic)
    assert report.ok and report.leak == cal.leak_after
    assert 0.01 < report.leak <= 0.02
    assert report.leak_max >= report.leak_p99 >= report.leak_mean


def test_gate_never_raises_the_leak():
    _, model, _, _ = open_model("llama", True, bias=(-20.0, -20.0))
    ctx = old_contexts()
    cal = llm.calibrate_leak(model, ctx, 0.5, progress=False)
    assert not cal.binding and cal.offset == 0.0 and cal.leak_after == cal.leak_before < 0.5
    # A looser bound after a tight one lifts the offset back toward 0.
    llm.get_expansion(model).output_layer.leak_offset.fill_(-30.0)
    assert llm.calibrate_leak(model, ctx, 0.5, progress=False).offset == 0.0


def test_assert_no_forgetting_takes_max_leak():
    base, model, _, _ = open_model("gpt2", False)
    ctx = old_contexts()
    assert_no_forgetting(base, model, ctx)
    with pytest.raises(AssertionError, match="exceeds max_leak"):
        assert_no_forgetting(base, model, ctx, max_leak=0.05)
    llm.calibrate_leak(model, ctx, 0.05, progress=False)
    assert assert_no_forgetting(base, model, ctx, max_leak=0.05).leak_max <= 0.05


def test_blocked_expansions_report_no_leak():
    model = tiny_model("llama", V)
    base = copy.deepcopy(model)
    llm.add_tokens(model, tiny_tokenizer(V), ["glorp"])
    report = llm.verify_no_forgetting(base, model, old_contexts(), max_leak=1e-9)
    assert report.ok and report.leak_max == 0.0 and report.forgetting_nats == 0.0
    assert "leak" not in str(report)  # the closed-mode report reads as before
    with pytest.raises(ValueError, match="blocks its new tokens"):
        llm.calibrate_leak(model, old_contexts(), 0.1, progress=False)


@pytest.mark.parametrize("arch, tied, dtype", CASES)
def test_files_remove_and_export(tmp_path, arch, tied, dtype):
    from transformers import AutoModelForCausalLM

    base, model, tok, ids = open_model(arch, tied, dtype)
    ctx = old_contexts(n=4)
    llm.calibrate_leak(model, ctx, 0.2, progress=False)
    probe = [[1, 5, ids[0], 7, 8], [1, 9, 10, ids[1], 11]]
    want = logits_of(model, probe + ctx)

    path = tmp_path / "e.safetensors"
    llm.save_expansion(model, tok, path)
    again = copy.deepcopy(base)
    assert llm.load_expansion(again, tiny_tokenizer(V), path) == ids
    for a, b in zip(logits_of(again, probe + ctx), want, strict=True):
        assert torch.equal(a, b)
    state = llm.get_expansion(again)
    assert state.config.tie_output is False and float(state.output_layer.leak_offset) < 0

    out = llm.export_merged(model, tok, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    assert plain.get_output_embeddings().weight.shape == (V + 2, D)
    x = torch.tensor([[1, 5, 6, 7]])
    mine = model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)
    theirs = plain.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert (mine[0, 4:] >= V).any()  # the markovmem model does emit a new token
    assert torch.equal(mine, theirs)

    llm.remove_expansion(model)
    assert llm.base_fingerprint(model) == llm.base_fingerprint(base)
    for a, b in zip(logits_of(model, ctx), logits_of(base, ctx), strict=True):
        assert torch.equal(a, b)


def test_export_without_the_bias_in_forward(tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    _, model, tok, ids = open_model("llama", True)
    out = llm.export_merged(model, tok, tmp_path / "merged")
    gen = GenerationConfig.from_pretrained(out)
    assert gen.sequence_bias == [[[ids[0]], 4.0], [[ids[1]], 1.0]]
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    # Base ties its embeddings, the new output rows differ from the input rows: exported untied.
    assert plain.config.tie_word_embeddings is False
    assert plain.get_output_embeddings().weight is not plain.get_input_embeddings().weight
    x = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        theirs, mine = plain(x).logits, model(x).logits
    # forward() of the export lacks the per-token bias: the new logits differ by exactly it.
    torch.testing.assert_close(theirs[..., V:] + torch.tensor([4.0, 1.0]), mine[..., V:], atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs[..., :V], mine[..., :V], atol=1e-5, rtol=0)
    # The model object keeps its own config.
    assert model.config.tie_word_embeddings is True and model.generation_config.sequence_bias is None


@pytest.mark.parametrize("tie_output", [False, True])
@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False)])
def test_embedding_tune_trains_only_new_rows(arch, tied, tie_output):
    model = tiny_model(arch, V, tied=tied)
    base = copy.deepcopy(model)
    tok = tiny_tokenizer(V)
    ids = llm.add_tokens(model, tok, ["glorp", "blip"], block_output=False, tie_output=tie_output)
    state = llm.get_expansion(model)
    inp, out = state.input_layer, state.output_layer
    before = {k: v.detach().clone() for k, v in (("in", inp.new_weight), ("out", out.new_weight), ("b", out.new_bias))}
    history = llm.embedding_tune(model, ids[:1], new_texts(ids), steps=5, lr=0.05, batch_size=2, progress=False)
    assert history.n_trainable == (D + (0 if tie_output else D) + 1)
    for p in model.parameters():
        assert p.grad is None
    assert llm.base_fingerprint(model) == llm.base_fingerprint(base)
    assert_no_forgetting(base, model, old_contexts(n=3))
    now = {"in": inp.new_weight, "out": out.new_weight, "b": out.new_bias}
    for key, old in before.items():
        assert not torch.equal(now[key][0], old[0]), key  # the trained token's rows moved
        assert torch.equal(now[key][1], old[1]), key  # the other new token's stayed bitwise
    assert (out.new_weight is inp.new_weight) == tie_output


def test_bad_input_names_the_argument():
    base, model, _, ids = open_model()
    ctx = old_contexts(n=2)
    for bad in (0, 1, 1.5, -0.1, float("nan"), "x", None):
        with pytest.raises(ValueError, match="max_leak is"):
            llm.calibrate_leak(model, ctx, bad, progress=False)
    with pytest.raises(ValueError, match="max_leak is"):
        llm.verify_no_forgetting(base, model, ctx, max_leak=float("nan"))
    with pytest.raises(ValueError, match="statistic is 'median'"):
        llm.calibrate_leak(model, ctx, 0.1, statistic="median", progress=False)
    with pytest.raises(ValueError, match="leak_statistic is 'p50'"):
        llm.verify_no_forgetting(base, model, ctx, leak_statistic="p50")
    with pytest.raises(ValueError, match=r"reference_contexts\[0\] holds a new token"):
        llm.calibrate_leak(model, [[1, ids[0]]], 0.1, progress=False)
    with pytest.raises(ValueError, match="texts hold no position"):
        llm.calibrate_leak(model, ctx, 0.1, texts=[[1, 5, 6]], progress=False)
    with pytest.raises(ValueError, match="output_embeddings has shape"):
        llm.set_embeddings(model, ids, output_embeddings=torch.zeros(2, D + 1))
    with pytest.raises(ValueError, match="output_bias has shape"):
        llm.set_embeddings(model, ids, output_bias=torch.zeros(3))
    with pytest.raises(ValueError, match="output_bias has non-finite"):
        llm.set_embeddings(model, ids, output_bias=[float("nan"), 0.0])
    fresh, tok2 = tiny_model("llama", V), tiny_tokenizer(V)
    with pytest.raises(ValueError, match="output_bias has shape"):
        llm.add_tokens(fresh, tok2, ["a1"], block_output=False, output_bias=[1.0, 2.0])
    with pytest.raises(ValueError, match="output_embeddings has shape"):
        llm.add_tokens(fresh, tok2, ["a1"], block_output=False, output_embeddings=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="output_bias needs block_output=False"):
        llm.add_tokens(fresh, tok2, ["a1"], output_bias=[1.0])
    with pytest.raises(ValueError, match="tie_output=True needs block_output=False"):
        llm.add_tokens(fresh, tok2, ["a1"], tie_output=True)
    with pytest.raises(ValueError, match="output_embeddings needs block_output=False and tie_output=False"):
        llm.add_tokens(fresh, tok2, ["a1"], block_output=False, tie_output=True, output_embeddings=torch.zeros(1, D))
    assert llm.get_expansion(fresh) is None and len(tok2) == V


@pytest.mark.parametrize(
    "tensors, meta, match",
    [
        ({}, {"leak_offset": "NaN"}, "'leak_offset' is 'NaN'"),
        ({}, {"leak_offset": '"-1"'}, "'leak_offset'"),
        ({}, {"tie_output": None}, "lacks the metadata field 'tie_output'"),
        ({}, {"tie_output": "true"}, "'output_rows' but tie_output is true"),
        ({"output_rows": None}, {}, "lacks the tensor 'output_rows'"),
        ({}, {"block_output": "true"}, "'output_rows' but block_output is true"),
        ({"output_bias": torch.zeros(3)}, {}, "'output_bias' has shape"),
    ],
    ids=["offset-nan", "offset-str", "no-tie_output", "tied-with-rows", "no-rows", "blocked-with-rows", "bias-shape"],
)
def test_inconsistent_open_files_are_refused(tmp_path, tensors, meta, match):
    base, model, tok, _ = open_model()
    path = tmp_path / "e.safetensors"
    llm.save_expansion(model, tok, path)
    bad = forge(path, tmp_path / "bad.safetensors", tensors=tensors, meta=meta)
    with pytest.raises(ValueError, match=match):
        llm.load_expansion(copy.deepcopy(base), tiny_tokenizer(V), bad)


def test_version_2_open_files_load_as_before(tmp_path):
    """A version 2 file of an open expansion on a tied base held no output rows: its new
    tokens' output rows were their input rows.  It still loads that way."""
    model = tiny_model("gpt2", V, tied=True)
    base = copy.deepcopy(model)
    tok = tiny_tokenizer(V)
    ids = llm.add_tokens(model, tok, ["glorp"], embeddings=torch.randn(1, D), block_output=False, tie_output=True)
    path = tmp_path / "e.safetensors"
    llm.save_expansion(model, tok, path)
    old = forge(path, tmp_path / "v2.safetensors", meta={"version": "2", "tie_output": None, "leak_offset": None})
    again = copy.deepcopy(base)
    llm.load_expansion(again, tiny_tokenizer(V), old)
    state = llm.get_expansion(again)
    assert state.config.tie_output and state.output_layer.new_weight is state.input_layer.new_weight
    probe = [[1, 5, ids[0], 7]]
    assert torch.equal(logits_of(again, probe)[0], logits_of(model, probe)[0])


@pytest.mark.skipif(not os.environ.get("MARKOVMEM_TEST_MODEL"), reason="MARKOVMEM_TEST_MODEL is not set")
def test_gate_on_stories260k():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.environ["MARKOVMEM_TEST_MODEL"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    base = copy.deepcopy(model)
    tok = AutoTokenizer.from_pretrained(path)
    lines = [
        "Once upon a time there was a little girl named Lily.",
        "She liked to play in the park with her friend Tom.",
        "One day they found a big red ball under a tree.",
        "The sun was warm and the birds sang happy songs.",
    ]
    ctx = [tok(t)["input_ids"] for t in lines]
    # The mean of the base rows as the output row, with a bias that makes "glorp" likely everywhere.
    ids = llm.add_tokens(model, tok, ["glorp"], block_output=False, init="mean", output_bias=[16.0])
    texts = [tok(f"Lily saw a glorp in the park. The glorp was {c}.")["input_ids"] for c in ("red", "big", "shy")]
    report = llm.verify_no_forgetting(base, model, ctx)
    assert report.ok and report.old_conditional_bitwise_equal and report.leak_max > 0.05
    cal = llm.calibrate_leak(model, ctx, 0.05, texts=texts, progress=False)
    assert cal.n_new_token_targets == 6 and cal.new_token_loss_after >= cal.new_token_loss_before
    after = llm.verify_no_forgetting(base, model, ctx, max_leak=0.05)
    assert after.ok and 0.025 < after.leak_max <= 0.05, str(after)
    assert after.forgetting_nats <= -np.log1p(-0.05)
    assert ids == [512]


def test_export_puts_bias_and_offset_into_a_head_bias(tmp_path):
    from safetensors.torch import load_file
    from transformers import GenerationConfig

    model = tiny_model("llama", V, tied=False)
    head = torch.nn.Linear(D, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.uniform_(-1, 1)
    model.lm_head = head
    tok = tiny_tokenizer(V)
    ids = llm.add_tokens(model, tok, ["glorp"], block_output=False, output_bias=[2.5])
    llm.get_expansion(model).output_layer.leak_offset.fill_(-1.0)
    out = llm.export_merged(model, tok, tmp_path / "merged")
    tensors = load_file(out / "model.safetensors")
    assert torch.equal(tensors["lm_head.bias"][:V], head.bias.detach())
    assert tensors["lm_head.bias"][ids[0]].item() == 1.5
    assert GenerationConfig.from_pretrained(out).sequence_bias is None
