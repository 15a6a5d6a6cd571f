"""The pseudo-word benchmark (markovmem.llm.pseudowords) in miniature: corpus construction,
and the paper's invariant that embedding tuning forgets exactly nothing while full
fine-tuning, LoRA and prompt tuning change old logits.  Tiny in-code models, plus the
real model at MARKOVMEM_TEST_MODEL when it is set."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from helpers import tinystories_path

from markovmem.llm import PseudoWord, PseudoWordBench, PseudoWordBenchConfig, build_corpus
from markovmem.llm.pseudowords import _apportion
from markovmem.llm.testing import tiny_model, tiny_tokenizer

PSEUDO = [PseudoWord("glorp", ("w5",)), PseudoWord("zorp", ("w6", "w7"), (0.5, 0.5))]
TINY_LRS = {
    "et_alpha": (0.1,),
    "et_mean": (0.1,),
    "et_random": (0.1,),
    "fft": (1e-2,),
    "lora": (1e-2,),
    "prompt": (1e-2,),
}


def tiny_text(seed: int = 0, n_paragraphs: int = 60) -> str:
    """Paragraphs of word-level sentences ending in ' .', each holding one of w5, w6, w7."""
    rng = np.random.default_rng(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = []
        for _ in range(4):
            words = [f"w{int(x)}" for x in rng.integers(8, 40, size=int(rng.integers(4, 8)))]
            words.insert(int(rng.integers(0, len(words))), f"w{int(rng.choice([5, 6, 7]))}")
            sentences.append(" ".join(words) + " .")
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


@pytest.fixture(scope="module")
def tiny_corpus():
    return build_corpus(tiny_text(), tiny_tokenizer(64), PSEUDO, n_val=2, n_test=4)


@pytest.mark.parametrize("n, weights", [(3, (0.4, 0.3, 0.3)), (3, (0.5, 0.5)), (10, (0.7, 0.3)), (1, (1.0,))])
def test_apportion_keeps_the_total(n, weights):
    parts = _apportion(n, weights)
    assert sum(parts) == n and all(p >= 0 for p in parts)
    assert all(abs(p - n * w) < 1 for p, w in zip(parts, weights))


def test_corpus_injects_pseudo_words_and_splits_by_story(tiny_corpus):
    c = tiny_corpus
    assert c.tokens == ["glorp", "zorp"] and c.word_ids == [[5], [6, 7]]
    n_par = len(c.stories["train"]) + len(c.stories["val"]) + len(c.stories["test"])
    assert n_par == 60 and len(c.stories["train"]) == 42
    for split in ("val", "test"):
        assert not set(c.stories[split]) & set(c.stories["train"])
    train = c.sentences("train", 4)
    assert [i for i, _ in train] == [0] * 4 + [1] * 4
    originals = c.sentences("train", 4, original=True)
    for (i, s), (_, o) in zip(train, originals):
        token = c.tokens[i]
        assert token in s.split() and token not in o
        assert s.split().count(token) == sum(o.split().count(w) for w in PSEUDO[i].words)
    # The blend takes half its sentences from each word, and larger N extend smaller draws.
    zorp = [o for (i, _), (_, o) in zip(train, originals) if i == 1]
    assert sum("w6" in o.split() for o in zorp) == 2 and sum("w7" in o.split() for o in zorp) == 2
    assert c.sentences("train", 2) == [train[0], train[1], train[4], train[6]]
    assert c.sentences("train", 4, repeat=1) != train
    assert len(c.sentences("test")) == 8 and len(c.sentences("val")) == 4
    assert 4 <= c.max_train() <= len(c.pools["train"][0][0])


def test_corpus_rejects_bad_pseudo_words():
    text, tok = tiny_text(n_paragraphs=20), tiny_tokenizer(64)
    with pytest.raises(ValueError, match="is a base token"):
        build_corpus(text, tok, [PseudoWord("w9", ("w5",))])
    with pytest.raises(ValueError, match="occurs in the text"):
        build_corpus(text + " glorp", tok, [PseudoWord("glorp", ("w5",))])
    with pytest.raises(ValueError, match="serves both"):
        build_corpus(text, tok, [PseudoWord("glorp", ("w5",)), PseudoWord("zorp", ("w5", "w6"))])
    with pytest.raises(ValueError, match="expected one"):
        build_corpus(text, tok, [PseudoWord("glorp", ("unknownword",))])
    with pytest.raises(ValueError, match="weights"):
        PseudoWord("glorp", ("w5", "w6"), (0.9, 0.3))
    with pytest.raises(ValueError, match="the test split has .* 40 needed"):
        build_corpus(text, tok, [PseudoWord("glorp", ("w5",))], n_val=1, n_test=40)


def check_miniature(bench: PseudoWordBench, n: int) -> dict[str, dict]:
    """Run every method once on n sentences per pseudo-word; assert the forgetting invariants."""
    rows = {m: bench.run(m, n) for m in ("alpha", "et_alpha", "et_mean", "et_random", "fft", "lora", "prompt")}
    for m in ("alpha", "et_alpha", "et_mean", "et_random"):
        assert rows[m]["delta_old_loss"] == 0.0, m
        assert rows[m]["max_abs_logit_diff"] == 0.0, m
        assert rows[m]["verified"] is True, m
    for m in ("fft", "lora", "prompt"):
        assert rows[m]["max_abs_logit_diff"] > 0.0, m
        assert rows[m]["delta_old_loss"] != 0.0, m
    assert rows["alpha"]["trainable"] == 0
    assert rows["et_alpha"]["trainable"] == rows["et_mean"]["trainable"] == 2 * bench.template.config.hidden_size
    assert rows["fft"]["trainable"] > rows["lora"]["trainable"] > rows["prompt"]["trainable"] > 0
    for r in rows.values():
        assert np.isfinite(r["test_after"]) and np.isfinite(r["test_sentence"])
    return rows


def test_miniature_et_forgets_nothing_and_baselines_do(tiny_corpus):
    tok = tiny_tokenizer(64)
    config = PseudoWordBenchConfig(
        steps=3,
        batch_size=4,
        lrs=TINY_LRS,
        n_old_contexts=8,
        old_context_len=16,
        alpha_grid=(("mixture", 1), ("logit", 2)),
    )
    bench = PseudoWordBench(tiny_model("llama", 64), tok, tiny_corpus, config, progress=False)
    rows = check_miniature(bench, 4)
    # A random model's rows carry no signal to recover the words by; only the figures' ranges are checked.
    for key in ("support_precision", "support_recall", "alpha_mass_on_words"):
        assert 0.0 <= rows["alpha"][key] <= 1.0
    assert (rows["alpha"]["alpha_link"], rows["alpha"]["alpha_s"]) in config.alpha_grid
    assert set(rows["alpha"]["alpha_val_by_setting"]) == {"mixture, s=1", "logit, s=2"}
    ref = bench.reference()
    assert ref["delta_old_loss"] == 0.0 and np.isfinite(ref["test_after"])


def test_bench_rejects_bad_settings(tiny_corpus):
    with pytest.raises(ValueError, match="steps"):
        PseudoWordBenchConfig(steps=0)
    with pytest.raises(ValueError, match="unknown methods"):
        PseudoWordBenchConfig(lrs={"sgd": (0.1,)})
    with pytest.raises(ValueError, match="alpha_grid"):
        PseudoWordBenchConfig(alpha_grid=(("softmax", 2),))
    bench = PseudoWordBench(
        tiny_model("llama", 64),
        tiny_tokenizer(64),
        tiny_corpus,
        PseudoWordBenchConfig(steps=1, n_old_contexts=2, old_context_len=8),
        progress=False,
    )
    with pytest.raises(ValueError, match="method is"):
        bench.train("adapter", 2, 0.1)
    with pytest.raises(ValueError, match="needs a learning rate"):
        bench.train("fft", 2)


MODEL_DIR = os.environ.get("MARKOVMEM_TEST_MODEL")
DATA = tinystories_path()


@pytest.mark.skipif(not MODEL_DIR, reason="MARKOVMEM_TEST_MODEL is not set (a stories260k directory)")
@pytest.mark.skipif(not DATA.is_file(), reason="no TinyStories text (set MARKOVMEM_TEST_DATA)")
def test_miniature_on_the_real_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = "\n\n".join(DATA.read_text(encoding="utf-8").split("\n\n")[:300])
    pws = [PseudoWord("glorp", ("Lily",)), PseudoWord("zorp", ("he", "she"), (0.5, 0.5))]
    with pytest.raises(ValueError, match="is a base token"):
        build_corpus(text, tok, [PseudoWord("the", ("Lily",))])
    corpus = build_corpus(text, tok, pws, n_val=4, n_test=8)
    config = PseudoWordBenchConfig(
        steps=2, batch_size=8, lrs=TINY_LRS, n_old_contexts=8, old_context_len=32, alpha_grid=(("mixture", 1),)
    )
    bench = PseudoWordBench(model, tok, corpus, config, progress=False)
    assert bench.ids == [512, 513]
    rows = check_miniature(bench, 8)
    assert rows["et_alpha"]["trainable"] == 2 * 64
