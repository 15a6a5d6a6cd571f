"""The default path of learn_tokens on the real pretrained model: a miniature of bench/recovery.

Pseudo-words replace frequent single-token words in TinyStories sentences; learn_tokens runs with
its defaults on 30 sentences per word.  Needs MARKOVMEM_TEST_MODEL (stories260k) and the TinyStories
sample (MARKOVMEM_TEST_DATA); skips without them."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import tinystories_path

import markovmem as mm
from markovmem import llm
from markovmem.llm.selection import new_token_positions, position_losses

MODEL_DIR = os.environ.get("MARKOVMEM_TEST_MODEL")
DATA = tinystories_path()
pytestmark = [
    pytest.mark.skipif(not MODEL_DIR, reason="MARKOVMEM_TEST_MODEL is not set (a stories260k directory)"),
    pytest.mark.skipif(not DATA.is_file(), reason="no TinyStories text (set MARKOVMEM_TEST_DATA)"),
]

#: Lily, mom, so and be are words the tokens after them alone mistake for others ('it', 'my', 'very').
WORDS = [
    ("glorp", "Lily"),
    ("tomav", "mom"),
    ("zibber", "so"),
    ("kren", "be"),
    ("daxo", "named"),
    ("kivo", "day"),
    ("florp", "there"),
    ("nuvix", "little"),
]


def test_default_path_finds_the_replaced_words_and_beats_the_mean_init():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = "\n\n".join(DATA.read_text(encoding="utf-8").split("\n\n")[:2000])
    pws = [llm.PseudoWord(t, (w,)) for t, w in WORDS]
    corpus = llm.build_corpus(text, tok, pws, n_val=1, n_test=10)
    train = [s for _, s in corpus.sentences("train", 30)]
    row_only = llm.learn_tokens(
        copy.deepcopy(model), copy.deepcopy(tok), corpus.tokens, train, tune_steps=0, evidence="row", progress=False
    )
    result = llm.learn_tokens(model, tok, corpus.tokens, train, tune_steps=0, progress=False)
    assert llm.dictionary_info(result.matrix)["mode"] == "corpus"

    def recall(alpha):
        top = [
            int(
                alpha.indices[alpha.indptr[i] : alpha.indptr[i + 1]][
                    np.argmax(alpha.data[alpha.indptr[i] : alpha.indptr[i + 1]])
                ]
            )
            for i in range(len(pws))
        ]
        return np.mean([t in ids for t, ids in zip(top, corpus.word_ids, strict=True)])

    assert recall(result.alpha) >= 0.85, result.decomposition(tok, top=3)
    # the default (two-sided evidence) finds words the tokens after them alone do not
    assert recall(row_only.alpha) <= recall(result.alpha) - 0.25, row_only.decomposition(tok, top=3)
    for rep in result.tokens_report:
        assert rep.n_contexts >= 30 and np.isfinite(rep.heldout_loss)
    test = [np.asarray(x) for x in tok([s for _, s in corpus.sentences("test")])["input_ids"]]
    where = [(j, t) for j, t, _ in new_token_positions(test, result.ids, 512)]
    alpha_loss = position_losses(model, test, where).mean()
    weight = llm.get_expansion(model).input_layer.base_layer.weight
    llm.set_embeddings(model, result.ids, weight.detach().mean(0, keepdim=True).repeat(len(pws), 1))
    mean_loss = position_losses(model, test, where).mean()
    assert alpha_loss < mean_loss - 0.5, (alpha_loss, mean_loss)


def test_empty_corpus_and_absent_tokens_are_named():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    texts = ["Lily saw a glorp in the park. The glorp was big."] * 3
    with pytest.raises(ValueError, match=r"tokens \['zorp'\] never appear in texts"):
        llm.learn_tokens(model, tok, ["glorp", "zorp"], texts, progress=False)
    with pytest.raises(ValueError, match="corpus is empty"):
        llm.learn_tokens(model, tok, ["glorp"], texts, corpus=["", "  "], progress=False)
    assert llm.get_expansion(model) is None
    with pytest.warns(mm.SampleSizeWarning, match="'glorp' has 6 for s = 1"):
        result = llm.learn_tokens(model, tok, ["glorp"], texts, tune_steps=0, progress=False)
    assert result.tokens_report[0].few_contexts


def test_generate_output_rows_name_the_replaced_words_and_beat_the_mean_output_init():
    """The dual of alpha on the real model: each pseudo-word's output row is its replaced word's, and
    the model predicts the pseudo-word on held-out sentences far better than with the mean row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = "\n\n".join(DATA.read_text(encoding="utf-8").split("\n\n")[:2000])
    pws = [llm.PseudoWord(t, (w,)) for t, w in WORDS[:6]]
    corpus = llm.build_corpus(text, tok, pws, n_val=1, n_test=10)
    train = [s for _, s in corpus.sentences("train", 30)]
    res = llm.learn_tokens(model, tok, corpus.tokens, train, tune_steps=0, generate=True, progress=False)
    hits = [int(v) in ids for v, ids in zip(res.output.support[:, 0], corpus.word_ids, strict=True)]
    assert np.mean(hits) >= 5 / 6, res.output.support
    test = [np.asarray(x) for x in tok([s for _, s in corpus.sentences("test")])["input_ids"]]
    new = set(res.ids)
    where = [(j, t) for j, s in enumerate(test) for t in range(len(s) - 1) if int(s[t + 1]) in new]
    beta_loss = position_losses(model, test, where).mean()
    head = llm.get_expansion(model).output_layer.base_layer.weight.detach()
    llm.set_embeddings(
        model,
        res.ids,
        output_embeddings=head.mean(0, keepdim=True).repeat(len(pws), 1),
        output_bias=torch.zeros(len(pws)),
    )
    mean_loss = position_losses(model, test, where).mean()
    assert len(where) >= 50 and beta_loss < mean_loss - 2.0, (beta_loss, mean_loss)
