"""markovmem.llm.run_demo plumbing at toy settings (a few training steps, a
hand-made fit standing in for markovmem.fit_alpha); the real figures come from
`markovmem demo`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import numpy as np
import scipy.sparse as sp

import markovmem as mm
from markovmem import llm
from markovmem.llm import demo


class FirstRowsFit:
    """alpha = 1/s on the s rows of P closest to q_hat in total variation (shape (m, n_states) CSR)."""

    def __init__(self, P, counts, s=2, link="logit"):
        q = counts.toarray() / counts.sum(axis=1)[:, None]
        tv = np.abs(q[:, None, :] - P.to_dense()[None]).sum(-1)
        cols = np.argsort(tv, axis=1)[:, :s]
        rows = np.repeat(np.arange(q.shape[0]), s)
        self.alpha = sp.csr_array((np.full(rows.size, 1.0 / s), (rows, cols.ravel())), shape=(q.shape[0], P.n_states))


def test_demo_runs_and_caches_the_base_model(tmp_path, capsys):
    kwargs = dict(
        n_examples=8, s=2, tune_steps=2, base_steps=3, cache_dir=tmp_path, threads=1, progress=False, fit=FirstRowsFit
    )
    result = llm.run_demo(**kwargs)
    assert [r["method"] for r in result.rows] == [
        "E^T alpha, logit link (no training)",
        "E^T alpha, mixture link (no training)",
        "ET from E^T alpha (logit)",
        "ET from mean embedding",
        "full fine-tuning",
    ]
    for row in result.rows[:4]:
        assert row["max_abs_logit_diff"] == 0.0
    assert result.rows[0]["trainable_params"] == 0 and result.rows[2]["trainable_params"] == 64
    assert result.rows[4]["max_abs_logit_diff"] > 0.0
    assert all(0.0 <= r[key] <= 1.0 for r in result.rows for key in ("new_op_acc", "mul_acc", "add_acc"))
    assert set(result.decomposition) == {"logit", "mixture"} and len(result.decomposition["logit"]) == 2
    assert result.settings["n_held_out"] == 144 - 8
    out = capsys.readouterr().out
    assert "acc '#' (held out)" in out and "E^T alpha, mixture link: '#' =" in out
    cached = list(tmp_path.glob("demo-arith-llama-*"))
    assert len(cached) == 1 and (cached[0] / "config.json").exists()
    again = llm.run_demo(**{**kwargs, "verbose": False})
    assert again.settings["base_training_seconds_this_run"] == 0.0
    assert again.base_accuracy == result.base_accuracy


def test_demo_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="n_examples is 144"):
        llm.run_demo(n_examples=144, cache_dir=tmp_path, fit=FirstRowsFit)
    monkeypatch.delattr(mm, "fit_alpha", raising=False)
    with pytest.raises(ImportError, match="fit_alpha"):
        llm.run_demo(cache_dir=tmp_path)


def test_demo_language():
    tok = demo._tokenizer()
    assert tok.convert_ids_to_tokens(tok("12*7=84")["input_ids"]) == ["<s>", "1", "2", "*", "7", "=", "8", "4"]
    corpus = demo._base_corpus()
    assert len(corpus) == 2 * 144 + 400 and "12x12=144" in corpus and "19+19=38" in corpus
