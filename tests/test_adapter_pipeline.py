"""markovmem.llm.learn_tokens end to end on a tiny model (a hand-made fit stands in
for markovmem.fit_alpha where noted), and the path of DESIGN §3 step by step."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import numpy as np
import scipy.sparse as sp

import markovmem as mm
from markovmem import llm
from markovmem.llm.testing import tiny_model, tiny_tokenizer

V = 48


class NearestRowsFit:
    """Hand-made stand-in for AlphaFit: alpha spreads 1/s over the s rows of P
    closest to q_hat in KL, or over a given (m, s) support.  Same shapes as the real thing:
    alpha (m, n_states) CSR."""

    def __init__(self, P, counts, s=2, link="logit", bound=10.0, progress=True, support=None):
        dense = P.to_dense()
        q = counts.toarray()
        q = q / q.sum(1, keepdims=True)
        kl = np.array(
            [[np.sum(qi[qi > 0] * np.log(qi[qi > 0] / np.maximum(row[qi > 0], 1e-12))) for row in dense] for qi in q]
        )
        cols = np.argsort(kl, axis=1)[:, :s] if support is None else np.asarray(support)
        rows = np.repeat(np.arange(q.shape[0]), s)
        self.alpha = sp.csr_array((np.full(rows.size, 1.0 / s), (rows, cols.ravel())), shape=(q.shape[0], P.n_states))
        self.kl = kl[np.arange(q.shape[0]), cols[:, 0]]


def texts(n=24):
    rng = np.random.default_rng(0)
    return [f"w{rng.integers(3, V)} w{rng.integers(3, V)} glorp w7 w8 w{rng.integers(3, V)}" for _ in range(n)]


def test_design_path_step_by_step():
    model = tiny_model("llama", V)
    base = copy.deepcopy(model)
    tok = tiny_tokenizer(V)
    P = llm.distill(model, top_k=16, prefix=[tok.bos_token_id], progress=False)
    ids = llm.add_tokens(model, tok, ["glorp"])
    seqs = [tok(t)["input_ids"] for t in texts()]
    C = llm.next_token_counts(seqs, ids, P.n_base)
    assert C[0, 7] == 24
    fit = NearestRowsFit(P, C)
    llm.set_embeddings(model, ids, llm.alpha_to_embeddings(model, fit.alpha))
    history = llm.embedding_tune(model, ids, seqs, steps=5, lr=0.01, batch_size=4, progress=False)
    report = llm.verify_no_forgetting(base, model, [[1, 5, 6], [1, 9, 10, 11]])
    assert report.ok and len(history.loss) == 5
    Q, cert = P.expand(C.toarray() / C.sum(axis=1)[:, None])
    assert cert.ok and Q.n_states == V + 1


def test_learn_tokens_with_a_stand_in_fit(monkeypatch):
    monkeypatch.setattr(mm, "fit_alpha", NearestRowsFit, raising=False)
    model = tiny_model("qwen2", V, tied=False)
    base = copy.deepcopy(model)
    tok = tiny_tokenizer(V)
    result = llm.learn_tokens(
        model, tok, ["glorp"], texts(), s=2, tune_steps=4, tune_batch_size=4, top_k=8, base_model=base, progress=False
    )
    assert result.ids == [V] and result.tokens == ["glorp"]
    assert result.matrix.n_states == V and result.counts.shape == (1, V)
    assert result.history is not None and len(result.history.loss) == 4
    assert result.report.ok and result.report.n_contexts > 0
    assert result.config.s == 2 and result.config.top_k == 8
    assert llm.get_expansion(model).alpha is result.alpha
    assert result.fit.alpha is not None and result.choices == [("logit", 2)]
    (rep,) = result.tokens_report
    assert rep.n_contexts == 24 and rep.token == "glorp" and np.isfinite(rep.heldout_loss)
    ((name, weight),) = result.decomposition(tok, top=1)["glorp"][:1]
    assert name.startswith("w") or name in ("<s>", "</s>", "<unk>")
    assert weight == pytest.approx(0.5)
    again = llm.learn_tokens(
        tiny_model("qwen2", V, tied=False),
        tiny_tokenizer(V),
        ["glorp"],
        texts(),
        s=1,
        tune_steps=0,
        matrix=result.matrix,
        distill_mode="corpus",
        progress=False,
    )
    assert again.history is None and again.report.ok


def test_learn_tokens_failure_removes_the_expansion(monkeypatch):
    monkeypatch.setattr(mm, "fit_alpha", NearestRowsFit, raising=False)
    model = tiny_model("llama", V)
    tok = tiny_tokenizer(V)
    with pytest.raises(ValueError, match=r"tokens \['blip'\] are never followed by a base token"):
        llm.learn_tokens(model, tok, ["glorp", "blip"], texts() + ["w5 blip"], tune_steps=0, top_k=4, progress=False)
    assert llm.get_expansion(model) is None and model.config.vocab_size == V
    with pytest.raises(TypeError, match="unknown options"):
        llm.learn_tokens(model, tiny_tokenizer(V), ["glorp"], texts(), tune_step=3, progress=False)
    with pytest.raises(ValueError, match="distill_mode"):
        llm.learn_tokens(model, tiny_tokenizer(V), ["glorp"], texts(), distill_mode="bigram", progress=False)


def test_learn_tokens_needs_fit_alpha(monkeypatch):
    monkeypatch.delattr(mm, "fit_alpha", raising=False)
    with pytest.raises(ImportError, match="fit_alpha"):
        llm.learn_tokens(tiny_model("llama", V), tiny_tokenizer(V), ["glorp"], texts(), progress=False)


def test_config_validation():
    with pytest.raises(ValueError, match="init is 'best'"):
        llm.MarkovMemConfig(tokens=["a"], init="best")
    with pytest.raises(TypeError, match="not the string"):
        llm.MarkovMemConfig(tokens="glorp")
    with pytest.raises(ValueError, match="link is 'linear'"):
        llm.LearnTokensConfig(link="linear")
    with pytest.raises(ValueError, match="tune_steps is -1"):
        llm.LearnTokensConfig(tune_steps=-1)
    assert llm.LearnTokensConfig().to_dict()["s"] == 1


def test_learn_tokens_generate_writes_beta_output_rows_and_holds_max_leak():
    model = tiny_model("qwen2", V, tied=False)
    base = copy.deepcopy(model)
    tok = tiny_tokenizer(V)
    res = llm.learn_tokens(
        model, tok, ["glorp"], texts(), tune_steps=0, top_k=8, generate=True, max_leak=0.02, progress=False
    )
    state = llm.get_expansion(model)
    (v,) = res.output.support[:, 0]
    head = base.get_output_embeddings().weight
    # W^T beta: the support token's output row; the bias is the one learn_tokens wrote
    assert torch.equal(state.output_layer.new_weight[0].detach(), head[int(v)].detach())
    assert float(state.output_layer.new_bias[0].detach()) == pytest.approx(res.output.bias[0], rel=1e-6)
    assert res.output.observed.tolist() == [24]
    assert res.leak is not None and res.leak.leak_after <= 0.02 and res.leak.offset <= 0.0
    assert res.report.ok and res.report.leak_max <= 0.02 and res.report.forgetting_nats > 0.0
    with pytest.raises(ValueError, match="max_leak bounds the leak of generated tokens; it needs generate=True"):
        llm.LearnTokensConfig(max_leak=0.1)
    with pytest.raises(ValueError, match="max_leak is 1.5; expected a number strictly between 0 and 1"):
        llm.LearnTokensConfig(generate=True, max_leak=1.5)
