"""The paper's synthetic-vocabulary benchmark on a real pretrained model: pseudo-words
(new tokens standing for an existing word or a blend of 2-3 words) injected into real
sentences, learned by alpha only, embedding tuning (ET) or the usual baselines (full
fine-tuning, LoRA, prompt tuning), and scored for target loss, forgetting and cost.

``build_corpus`` makes the data from plain text, ``PseudoWordBench`` runs the methods
on one model; ``bench/paper/run.py`` is the driver that writes the committed results.
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .distillation import distill, next_token_counts
from .model import _require_expansion, add_tokens, alpha_to_embeddings, set_embeddings
from .tuning import Forward, TuneHistory, _model_forward, _train_steps, embedding_tune
from .verify import verify_no_forgetting

__all__ = [
    "DEFAULT_PSEUDO_WORDS",
    "METHODS",
    "PseudoWord",
    "PseudoWordBench",
    "PseudoWordBenchConfig",
    "PseudoWordCorpus",
    "build_corpus",
]

#: Method keys, in table order: alpha only, ET from three starts, and the three baselines.
METHODS = ("alpha", "et_alpha", "et_mean", "et_random", "fft", "lora", "prompt")
METHOD_NAMES = {
    "alpha": "alpha only (E^T alpha, no training)",
    "et_alpha": "ET from E^T alpha",
    "et_mean": "ET from mean embedding",
    "et_random": "ET from random",
    "fft": "full fine-tuning",
    "lora": "LoRA",
    "prompt": "prompt tuning",
}
#: Learning rates tried per method; the best on the validation split is kept.
DEFAULT_LRS = {
    "et_alpha": (1e-2, 3e-2, 1e-1),
    "et_mean": (1e-2, 3e-2, 1e-1),
    "et_random": (1e-2, 3e-2, 1e-1),
    "fft": (1e-3, 3e-3, 1e-2),
    "lora": (1e-3, 3e-3, 1e-2),
    "prompt": (1e-2, 3e-2, 1e-1),
}
_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A sentence ends at . ! or ? (optionally followed by a closing quote) and whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'])\s+")


@dataclass(frozen=True)
class PseudoWord:
    """A new token that stands for one existing word or a blend of 2-3 words.

    Attributes
    ----------
    token : str
        The new token: a made-up word, no whitespace, not a token of the base vocabulary.
    words : tuple of str
        The words it replaces (case-sensitive, each one base token with its leading space).
    weights : tuple of float
        Share of its sentences taken from each word (the blend's replacement frequencies); sums to 1.
    """

    token: str
    words: tuple[str, ...]
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        words = tuple(self.words)
        weights = tuple(float(w) for w in self.weights) or tuple(1.0 / len(words) for _ in words)
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "weights", weights)
        if not self.token or any(c.isspace() for c in self.token):
            raise ValueError(f"token is {self.token!r}; expected a non-empty string without whitespace")
        if not 1 <= len(words) <= 3 or len(set(words)) != len(words):
            raise ValueError(f"words of {self.token!r} are {words}; expected 1 to 3 distinct words")
        if len(weights) != len(words) or min(weights) <= 0 or abs(sum(weights) - 1.0) > 1e-9:
            raise ValueError(
                f"weights of {self.token!r} are {weights}; expected {len(words)} positive weights summing to 1"
            )


def _pw(token: str, *pairs: tuple[str, float]) -> PseudoWord:
    return PseudoWord(token, tuple(w for w, _ in pairs), tuple(x for _, x in pairs))


#: 24 pseudo-words for TinyStories-like text (stories260k's vocabulary): 12 stand for one
#: word, 8 for a blend of two and 4 for a blend of three, every source word used once.
DEFAULT_PSEUDO_WORDS: tuple[PseudoWord, ...] = (
    _pw("glorp", ("Lily", 1.0)),
    _pw("zorp", ("said", 1.0)),
    _pw("blick", ("saw", 1.0)),
    _pw("wug", ("play", 1.0)),
    _pw("daxo", ("named", 1.0)),
    _pw("fepi", ("very", 1.0)),
    _pw("tomav", ("mom", 1.0)),
    _pw("kivo", ("day", 1.0)),
    _pw("bouba", ("but", 1.0)),
    _pw("florp", ("there", 1.0)),
    _pw("snib", ("big", 1.0)),
    _pw("quax", ("you", 1.0)),
    _pw("vren", ("he", 0.5), ("she", 0.5)),
    _pw("plim", ("He", 0.6), ("She", 0.4)),
    _pw("drazzle", ("his", 0.5), ("her", 0.5)),
    _pw("greeble", ("the", 0.7), ("a", 0.3)),
    _pw("yurk", ("was", 0.6), ("had", 0.4)),
    _pw("mibble", ("it", 0.5), ("that", 0.5)),
    _pw("splonk", ("to", 0.6), ("for", 0.4)),
    _pw("trazz", ("They", 0.5), ("they", 0.5)),
    _pw("jeck", ("in", 0.4), ("on", 0.3), ("with", 0.3)),
    _pw("nuvix", ("little", 0.4), ("happy", 0.3), ("friend", 0.3)),
    _pw("frobble", ("of", 0.4), ("up", 0.3), ("time", 0.3)),
    _pw("zibber", ("so", 0.4), ("Timmy", 0.3), ("be", 0.3)),
)


def _apportion(n: int, weights: Sequence[float]) -> list[int]:
    """Split ``n`` into integer parts proportional to ``weights`` (largest remainder, exact total)."""
    raw = [n * w for w in weights]
    parts = [int(np.floor(r)) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (parts[i] - raw[i], i))[: n - sum(parts)]:
        parts[i] += 1
    return parts


@dataclass
class PseudoWordCorpus:
    """Sentences with pseudo-words injected, split by story into train / validation / test.

    Attributes
    ----------
    pseudo_words : list of PseudoWord
    word_ids : list of list of int
        Base token id of each source word (``"▁" + word``), per pseudo-word.
    pools : dict of str -> list of list of list of (str, str)
        ``pools[split][i][j]``: (injected sentence, original sentence) pairs of
        pseudo-word ``i`` drawn from its word ``j``, in a seeded order; splits
        'train', 'val', 'test'.  Train pools hold every usable sentence; val and
        test pools hold the blend's share of ``n_val`` / ``n_test``.
    stories : dict of str -> list of str
        The original paragraphs of each split (no pseudo-word).
    settings : dict
    """

    pseudo_words: list[PseudoWord]
    word_ids: list[list[int]]
    pools: dict[str, list[list[list[tuple[str, str]]]]]
    stories: dict[str, list[str]]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> list[str]:
        return [p.token for p in self.pseudo_words]

    def max_train(self) -> int:
        """Largest N for which :meth:`sentences` ('train', N) has every blend's share available."""
        best = []
        for p, per_word in zip(self.pseudo_words, self.pools["train"], strict=True):
            best.append(min(int(len(pool) / w) for pool, w in zip(per_word, p.weights, strict=True)))
        n = min(best)
        while n > 0 and any(
            a > len(pool)
            for p, per_word in zip(self.pseudo_words, self.pools["train"], strict=True)
            for a, pool in zip(_apportion(n, p.weights), per_word, strict=True)
        ):
            n -= 1
        return n

    def sentences(
        self, split: str, n: int | None = None, *, repeat: int = 0, original: bool = False
    ) -> list[tuple[int, str]]:
        """(pseudo-word index, sentence) pairs of one split.

        Parameters
        ----------
        split : {'train', 'val', 'test'}
        n : int, optional
            Train only: sentences per pseudo-word, shared among its words by the
            blend weights.  Draws for a larger ``n`` extend those for a smaller one.
        repeat : int
            Train only: which seeded draw (0 is the stored order; others permute the pools).
        original : bool
            Return the original sentences (the real words) instead of the injected ones.
        """
        if split not in self.pools:
            raise ValueError(f"split is {split!r}; expected one of {sorted(self.pools)}")
        if split != "train" and (n is not None or repeat):
            raise ValueError("n and repeat apply to the 'train' split only")
        if split == "train" and (n is None or int(n) < 1):
            raise ValueError(f"n is {n!r}; the train split needs n >= 1 sentences per pseudo-word")
        out = []
        rng = np.random.default_rng([int(self.settings.get("seed", 0)), int(repeat)])
        for i, (p, per_word) in enumerate(zip(self.pseudo_words, self.pools[split], strict=True)):
            counts = [len(pool) for pool in per_word] if n is None else _apportion(int(n), p.weights)
            for pool, k in zip(per_word, counts, strict=True):
                if k > len(pool):
                    raise ValueError(
                        f"pseudo-word {p.token!r} has {len(pool)} train sentences for a word that "
                        f"needs {k} at n = {n}; at most n = {self.max_train()} is available"
                    )
                order = np.arange(len(pool)) if repeat == 0 else rng.permutation(len(pool))
                out += [(i, pool[int(j)][1 if original else 0]) for j in order[:k]]
        return out


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


class _WordPattern:
    """Where a word occurs in a sentence: anywhere (as a word), and after whitespace or at the start."""

    def __init__(self, word: str) -> None:
        self.word = word
        self.anywhere = re.compile(rf"\b{re.escape(word)}\b")
        self.spaced = re.compile(rf"(?:(?<=\s)|^){re.escape(word)}\b")

    def injectable(self, sentence: str, others: Sequence[_WordPattern]) -> bool:
        """Every occurrence follows whitespace or starts the sentence (so it is the base token
        ``"▁" + word`` and the pseudo-word token can take its place), and no other word of the
        same blend occurs."""
        if self.word not in sentence:
            return False
        n = len(self.anywhere.findall(sentence))
        if n == 0 or n != len(self.spaced.findall(sentence)):
            return False
        return not any(o.word in sentence and o.anywhere.search(sentence) for o in others)


def build_corpus(
    text: str,
    tokenizer: Any,
    pseudo_words: Sequence[PseudoWord] | None = None,
    *,
    n_val: int = 20,
    n_test: int = 40,
    split: tuple[float, float, float] = (0.7, 0.1, 0.2),
    max_chars: int = 300,
    seed: int = 0,
) -> PseudoWordCorpus:
    """Inject pseudo-words into real sentences and split them by story.

    The text is cut into paragraphs at blank lines; the first ``split[0]`` of
    them form the train stories, the next ``split[1]`` the validation stories,
    the rest the test stories (contiguous blocks, so a story is never on two
    sides except at the two cut points).  Each paragraph is cut into sentences.
    A sentence serves pseudo-word ``p`` through its word ``w`` when every
    occurrence of ``w`` follows a space or starts the sentence and no other word
    of ``p``'s blend occurs; each occurrence of ``w`` is then replaced by
    ``p.token``.  A sentence may serve several pseudo-words (one copy each).  It
    is kept only when its tokenization with the pseudo-words added equals the
    original's with the pseudo-word's id in place of ``w``'s, position for position.

    Parameters
    ----------
    text : str
        Plain text, paragraphs separated by blank lines (e.g. TinyStories).
    tokenizer : transformers tokenizer
        The base model's tokenizer (not modified: a copy gets the pseudo-words).
    pseudo_words : sequence of PseudoWord, optional
        Default :data:`DEFAULT_PSEUDO_WORDS`.
    n_val, n_test : int
        Validation and test sentences per pseudo-word (shared among a blend's words by weight).
    split : (float, float, float)
        Fractions of the paragraphs for train, validation, test.
    max_chars : int
        Longer sentences are skipped.
    seed : int
        Seeds the order of each pool.

    Returns
    -------
    PseudoWordCorpus

    Raises
    ------
    ValueError
        A pseudo-word is a base token, is not split into several base tokens, or
        occurs in the text; a source word is not one base token or serves two
        pseudo-words; too few validation or test sentences.
    """
    pws = list(DEFAULT_PSEUDO_WORDS if pseudo_words is None else pseudo_words)
    if not pws:
        raise ValueError("pseudo_words is empty")
    if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1.0) > 1e-9:
        raise ValueError(f"split is {split}; expected three positive fractions summing to 1")
    tokens = [p.token for p in pws]
    if len(set(tokens)) != len(tokens):
        raise ValueError("pseudo_words repeat a token")
    vocab = tokenizer.get_vocab()
    lower = text.lower()
    for t in tokens:
        pieces = tokenizer.tokenize(t)
        # New means: no vocabulary entry, and the base tokenizer needs several pieces (or its
        # unknown token, for word-level vocabularies) to write it.
        if t in vocab or "▁" + t in vocab or (len(pieces) == 1 and pieces[0] != tokenizer.unk_token):
            raise ValueError(f"pseudo-word {t!r} is a base token ({pieces}); pick a made-up word")
        if t.lower() in lower:
            raise ValueError(f"pseudo-word {t!r} occurs in the text; pick a word the text does not contain")
    word_ids: list[list[int]] = []
    owner: dict[str, str] = {}
    for p in pws:
        ids = []
        for w in p.words:
            if w in owner:
                raise ValueError(f"word {w!r} serves both {owner[w]!r} and {p.token!r}")
            owner[w] = p.token
            pieces = tokenizer.tokenize(w)
            if len(pieces) != 1 or pieces[0] not in vocab or pieces[0] == tokenizer.unk_token:
                raise ValueError(f"word {w!r} of {p.token!r} is {len(pieces)} base tokens {pieces}; expected one")
            ids.append(int(vocab[pieces[0]]))
        word_ids.append(ids)
    expanded = copy.deepcopy(tokenizer)
    expanded.add_tokens(tokens)
    new_id = {t: int(expanded.convert_tokens_to_ids(t)) for t in tokens}

    paras = _paragraphs(text)
    a = round(split[0] * len(paras))
    b = a + round(split[1] * len(paras))
    stories = {"train": paras[:a], "val": paras[a:b], "test": paras[b:]}
    pools: dict[str, list[list[list[tuple[str, str]]]]] = {}
    for si, (name, part) in enumerate(stories.items()):
        sentences = [s for p in part for s in _SENTENCE_END.split(p) if s and len(s) <= max_chars]
        pools[name] = []
        for i, p in enumerate(pws):
            per_word = []
            patterns = [_WordPattern(w) for w in p.words]
            for j, pat in enumerate(patterns):
                others = [o for o in patterns if o is not pat]
                cand = [s for s in sentences if pat.injectable(s, others)]
                injected = [pat.spaced.sub(lambda _, token=p.token: token, s) for s in cand]
                pairs = _aligned(tokenizer, expanded, cand, injected, word_ids[i][j], new_id[p.token])
                order = np.random.default_rng([seed, si, i, j]).permutation(len(pairs))
                per_word.append([pairs[k] for k in order])
            pools[name].append(per_word)
    for name, n in (("val", n_val), ("test", n_test)):
        for i, p in enumerate(pws):
            need = _apportion(int(n), p.weights)
            for j, (w, k) in enumerate(zip(p.words, need, strict=True)):
                have = len(pools[name][i][j])
                if have < k:
                    raise ValueError(
                        f"the {name} split has {have} sentences with {w!r} for {p.token!r}; "
                        f"{k} needed (lower n_{name} or use more text)"
                    )
                pools[name][i][j] = pools[name][i][j][:k]
    settings = {
        "n_paragraphs": len(paras),
        "split": list(split),
        "n_val": n_val,
        "n_test": n_test,
        "max_chars": max_chars,
        "seed": seed,
    }
    return PseudoWordCorpus(pws, word_ids, pools, stories, settings)


def _aligned(
    base_tok: Any, expanded_tok: Any, originals: list[str], injected: list[str], word_id: int, new: int
) -> list[tuple[str, str]]:
    """The (injected, original) pairs whose token sequences differ exactly where word_id became new."""
    if not originals:
        return []
    a = base_tok(originals)["input_ids"]
    b = expanded_tok(injected)["input_ids"]
    out = []
    for s_inj, s_orig, x, y in zip(injected, originals, a, b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.size != y.size or not (y == new).any():
            continue
        diff = x != y
        if np.array_equal(diff, y == new) and (x[diff] == word_id).all():
            out.append((s_inj, s_orig))
    return out


# ---------------------------------------------------------------------- the bench
@dataclass
class PseudoWordBenchConfig:
    """Settings of :class:`PseudoWordBench`, shared by every method so the comparison is like for like."""

    steps: int = field(default=300, metadata={"help": "Optimizer steps of every trained method."})
    batch_size: int = field(default=16, metadata={"help": "Sentences per step (all pseudo-words mixed)."})
    alpha_grid: tuple[tuple[str, int], ...] = field(
        default=(
            ("logit", 1),
            ("logit", 2),
            ("logit", 4),
            ("logit", 8),
            ("mixture", 1),
            ("mixture", 2),
            ("mixture", 4),
            ("mixture", 8),
        ),
        metadata={
            "help": "(link, s) fits tried for alpha; the best validation target loss of E^T alpha wins "
            "and also starts 'ET from E^T alpha'."
        },
    )
    lrs: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: dict(DEFAULT_LRS),
        metadata={"help": "Learning rates tried per trained method; the best validation target loss wins."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (all attention and MLP projections)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    n_virtual: int = field(default=8, metadata={"help": "Virtual tokens of prompt tuning."})
    top_k: int = field(default=64, metadata={"help": "Entries per distilled row (the rest is the row's tail)."})
    n_old_contexts: int = field(default=64, metadata={"help": "Held-out original stories for the forgetting figures."})
    old_context_len: int = field(default=128, metadata={"help": "Tokens kept of each such story."})
    eval_batch_size: int = field(default=64, metadata={"help": "Sequences per evaluation forward pass."})
    seed: int = field(default=0, metadata={"help": "Seeds batch order, random rows and adapter initialisation."})

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "top_k",
            "lora_r",
            "lora_alpha",
            "n_virtual",
            "n_old_contexts",
            "eval_batch_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; expected >= 1")
        if int(self.old_context_len) < 2:
            raise ValueError(f"old_context_len is {self.old_context_len}; expected >= 2")
        self.alpha_grid = tuple((str(link), int(s)) for link, s in self.alpha_grid)
        if not self.alpha_grid:
            raise ValueError("alpha_grid is empty; expected (link, s) pairs")
        for link, s in self.alpha_grid:
            if link not in ("logit", "mixture") or s < 1:
                raise ValueError(f"alpha_grid holds ({link!r}, {s}); expected link 'logit' or 'mixture' and s >= 1")
        unknown = sorted(set(self.lrs) - set(METHODS[1:]))
        if unknown:
            raise ValueError(f"lrs has unknown methods {unknown}; expected some of {METHODS[1:]}")
        for m, values in self.lrs.items():
            if not values or min(values) <= 0:
                raise ValueError(f"lrs[{m!r}] is {values}; expected positive learning rates")
        self.lrs = {**DEFAULT_LRS, **{m: tuple(float(x) for x in v) for m, v in self.lrs.items()}}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lrs"] = {m: list(v) for m, v in self.lrs.items()}
        d["alpha_grid"] = [list(x) for x in self.alpha_grid]
        return d


@dataclass
class _Trained:
    """One trained candidate: how to run it and what it cost."""

    model: nn.Module
    forward: Forward
    trainable: int
    seconds: float
    fit: Any = None
    history: TuneHistory | None = None


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning
    under transformers 5): not ours to fix, and tests turn warnings into errors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


class PseudoWordBench:
    """Run the paper's methods on one model and one :class:`PseudoWordCorpus`, like for like.

    Every method starts from the same expanded model: the pseudo-words added by
    :func:`markovmem.llm.add_tokens` with ``block_output=True`` (p(u|v) = 0) and
    rows at the mean base embedding.  So new tokens are never targets for any
    method, and the same positions are trained and scored everywhere: training
    scores each sentence from its first pseudo-word on (earlier positions do not
    depend on a new row), at positions whose target is a base token.

    - ``alpha``: ``fit_alpha`` on the train sentences' next-token counts against
      the base model distilled over the train stories (corpus mode), rows
      ``E^T alpha``; link and s from ``config.alpha_grid``, best on validation.
    - ``et_alpha`` / ``et_mean`` / ``et_random``: :func:`embedding_tune` of the new
      rows, started at that ``E^T alpha``, the mean base row, or a random row.
    - ``fft``: every weight of the model plus the new rows.
    - ``lora``: peft LoRA on every attention and MLP projection, plus the new rows.
    - ``prompt``: peft prompt tuning (virtual tokens started at random base rows),
      plus the new rows; the virtual tokens precede every input, old ones included.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The base model (put in eval mode; its weights are never written).
    tokenizer : transformers tokenizer
        Its tokenizer; receives the pseudo-words.
    corpus : PseudoWordCorpus
    config : PseudoWordBenchConfig, optional
    progress : bool
        tqdm bars for distillation and training.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        corpus: PseudoWordCorpus,
        config: PseudoWordBenchConfig | None = None,
        *,
        progress: bool = True,
    ) -> None:
        import markovmem

        self.config = config or PseudoWordBenchConfig()
        self.corpus = corpus
        self.progress = progress
        self.base = model.eval()
        self.tokenizer = tokenizer
        self.template = copy.deepcopy(model)
        self.ids = add_tokens(self.template, tokenizer, corpus.tokens)
        self.n_base = _require_expansion(self.template).n_base
        self._ids_arr = np.asarray(self.ids, dtype=np.int64)
        self._fit_alpha = markovmem.fit_alpha
        self._encoded: dict[Any, list[np.ndarray]] = {}
        self._selected: dict[Any, dict[str, Any]] = {}
        stories = [self._encode([s])[0] for s in corpus.stories["test"][: self.config.n_old_contexts]]
        self.old_contexts = [s[: self.config.old_context_len] for s in stories if s.size >= 2]
        self._base_old = self._old_text_logits(_model_forward(self.base))
        self.base_old_nll = self._old_nll(self._base_old)
        train_stories = [s[:512] for s in self._encode(corpus.stories["train"])]
        t0 = time.perf_counter()
        self.matrix = distill(
            self.base, top_k=self.config.top_k, mode="corpus", sequences=train_stories, progress=progress
        )
        self.distill_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ data
    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(x, dtype=np.int64) for x in self.tokenizer(list(texts))["input_ids"]]

    def train_sequences(self, n: int, repeat: int = 0) -> list[np.ndarray]:
        """Tokenized train sentences, ``n`` per pseudo-word (draw ``repeat``)."""
        key = ("train", int(n), int(repeat))
        if key not in self._encoded:
            self._encoded[key] = self._encode([s for _, s in self.corpus.sentences("train", n, repeat=repeat)])
        return self._encoded[key]

    def sequences(self, split: str, original: bool = False) -> list[np.ndarray]:
        """Tokenized validation or test sentences (``original``: with the real words)."""
        key = (split, original)
        if key not in self._encoded:
            self._encoded[key] = self._encode([s for _, s in self.corpus.sentences(split, original=original)])
        return self._encoded[key]

    # ------------------------------------------------------------------ methods
    def fit(self, n: int, repeat: int = 0, *, link: str = "mixture", s: int = 4) -> Any:
        """``fit_alpha`` of every pseudo-word from ``n`` train sentences each, against the distilled matrix."""
        counts = next_token_counts(self.train_sequences(n, repeat), self.ids, self.n_base)
        return self._fit_alpha(self.matrix, counts, s=s, link=link, progress=self.progress)

    def select_alpha(self, n: int, repeat: int = 0) -> dict[str, Any]:
        """Fit every (link, s) of ``config.alpha_grid``, keep the best validation target loss of
        E^T alpha (no training): {'link', 's', 'fit', 'seconds', 'val_by_setting'}.  Cached."""
        key = ("alpha", int(n), int(repeat))
        if key in self._selected:
            return self._selected[key]
        model = copy.deepcopy(self.template)
        forward = _model_forward(model)
        val = self.sequences("val")
        best: dict[str, Any] = {"val_by_setting": {}}
        t0 = time.perf_counter()
        for link, s in self.config.alpha_grid:
            fitted = self.fit(n, repeat, link=link, s=s)
            set_embeddings(model, self.ids, alpha_to_embeddings(model, fitted.alpha))
            loss = self.target_loss(forward, val)["after"]
            best["val_by_setting"][f"{link}, s={s}"] = loss
            if "fit" not in best or loss < best["val_after"]:
                best.update(link=link, s=s, fit=fitted, val_after=loss)
        best["seconds"] = time.perf_counter() - t0
        self._selected[key] = best
        return best

    def train(self, method: str, n: int, lr: float | None = None, *, repeat: int = 0) -> _Trained:
        """One candidate of ``method`` trained on ``n`` sentences per pseudo-word at learning rate ``lr``."""
        if method not in METHODS:
            raise ValueError(f"method is {method!r}; expected one of {METHODS}")
        if method != "alpha" and lr is None:
            raise ValueError(f"method {method!r} needs a learning rate")
        cfg = self.config
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(self.template)
        seqs = self.train_sequences(n, repeat)
        fitted, fit_seconds = None, 0.0
        if method in ("alpha", "et_alpha"):
            # Alpha's cost is the whole (link, s) selection, as a method's is one training run.
            chosen = self.select_alpha(n, repeat)
            fitted, fit_seconds = chosen["fit"], chosen["seconds"]
            set_embeddings(model, self.ids, alpha_to_embeddings(model, fitted.alpha))
            _require_expansion(model).alpha = fitted.alpha
        if method == "alpha":
            return _Trained(model, _model_forward(model), 0, fit_seconds, fitted)
        assert lr is not None  # checked on entry: every method but "alpha" has a learning rate
        t0 = time.perf_counter()
        if method.startswith("et_"):
            init = {"et_alpha": None, "et_mean": "mean", "et_random": "random"}[method]
            history = embedding_tune(
                model,
                self.ids,
                seqs,
                steps=cfg.steps,
                lr=float(lr),
                batch_size=cfg.batch_size,
                init=init,
                seed=cfg.seed,
                progress=self.progress,
            )
            seconds = time.perf_counter() - t0 + fit_seconds
            return _Trained(model, _model_forward(model), history.n_trainable, seconds, fitted, history)
        new_rows = _require_expansion(model).input_layer.new_weight
        if method == "fft":
            runner: nn.Module = model
            forward = _model_forward(model)
            for p in model.parameters():
                p.requires_grad_(True)
        elif method == "lora":
            runner, forward = self._lora(model)
        else:
            runner, forward = self._prompt(model)
        new_rows.requires_grad_(True)
        params = [p for p in runner.parameters() if p.requires_grad]
        runner.eval()
        # The new rows start where add_tokens put them: the mean base row.
        history = TuneHistory(
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=float(lr),
            init="mean",
            n_trainable=sum(p.numel() for p in params),
            n_sequences=len(seqs),
        )
        _train_steps(
            forward,
            params,
            seqs,
            self._ids_arr,
            self.n_base,
            True,
            history=history,
            steps=cfg.steps,
            lr=float(lr),
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            progress=self.progress,
            desc=method,
        )
        for p in runner.parameters():
            p.requires_grad_(False)
        history.seconds = time.perf_counter() - t0
        return _Trained(runner, forward, history.n_trainable, history.seconds, None, history)

    def _lora(self, model: nn.Module) -> tuple[nn.Module, Forward]:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=self.config.lora_r, lora_alpha=self.config.lora_alpha, lora_dropout=0.0, target_modules=_LORA_TARGETS
        )
        with _quiet_peft():
            peft_model = get_peft_model(model, cfg)
        return peft_model, _model_forward(peft_model)

    def _prompt(self, model: nn.Module) -> tuple[nn.Module, Forward]:
        from peft import PromptTuningConfig, get_peft_model

        n_virtual = self.config.n_virtual
        with _quiet_peft():
            # peft looks for the word embeddings by config.vocab_size, which the expansion
            # grew; the inputs are embedded by the expanded model's own layer below instead.
            peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual))
        embed = _require_expansion(model).input_layer  # the expanded embedding: it reads new ids too
        gen = torch.Generator().manual_seed(self.config.seed)
        start = torch.randint(0, self.n_base, (n_virtual,), generator=gen)
        prompt_embedding = peft_model.prompt_encoder["default"].embedding
        assert isinstance(prompt_embedding, nn.Embedding)  # peft's PromptEmbedding holds its virtual tokens in one
        prompt = prompt_embedding.weight
        with torch.no_grad():
            prompt.copy_(embed.weight[start].to(prompt.dtype))

        def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            out = peft_model(inputs_embeds=embed(ids), attention_mask=mask, use_cache=False).logits
            return out[:, n_virtual:]

        return peft_model, forward

    # ------------------------------------------------------------------ metrics
    def _batches(self, seqs: list[np.ndarray]) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """Right-padded batches of similar lengths: (indices, ids, mask)."""
        order = np.argsort([s.size for s in seqs], kind="stable")
        out = []
        for a in range(0, len(order), self.config.eval_batch_size):
            pick = order[a : a + self.config.eval_batch_size]
            length = max(seqs[i].size for i in pick)
            ids = torch.zeros(len(pick), length, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(pick):
                ids[r, : seqs[i].size] = torch.as_tensor(seqs[i])
                mask[r, : seqs[i].size] = 1
            out.append((pick, ids, mask))
        return out

    def target_loss(
        self, forward: Forward, seqs: list[np.ndarray], after: np.ndarray | None = None
    ) -> dict[str, float]:
        """Mean next-token NLL (nats) right after a pseudo-word and over the whole sentence.

        Positions whose target is a pseudo-word are left out (its logit is -inf for
        every method).  ``after`` marks the positions to score as "after" by
        their input token (default: the pseudo-word ids); the base-model
        reference passes the source words' ids on the original sentences.
        """
        after_ids = self._ids_arr if after is None else after
        tot = {"after": 0.0, "sentence": 0.0}
        cnt = {"after": 0, "sentence": 0}
        with torch.no_grad():
            for _, ids, mask in self._batches(seqs):
                logp = torch.log_softmax(forward(ids, mask).float(), -1)[:, :-1]
                tgt = ids[:, 1:]
                ok = (mask[:, 1:] == 1) & (tgt < self.n_base)
                nll = -logp.gather(-1, tgt.clamp(max=logp.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
                is_after = ok & torch.as_tensor(np.isin(ids[:, :-1].numpy(), after_ids))
                tot["after"] += float(nll[is_after].sum())
                cnt["after"] += int(is_after.sum())
                tot["sentence"] += float(nll[ok].sum())
                cnt["sentence"] += int(ok.sum())
        return {k: tot[k] / max(cnt[k], 1) for k in tot}

    def _old_text_logits(self, forward: Forward) -> list[torch.Tensor]:
        with torch.no_grad():
            return [forward(ids, mask)[..., : self.n_base].float() for _, ids, mask in self._batches(self.old_contexts)]

    def _old_nll(self, logits: list[torch.Tensor]) -> float:
        total, count = 0.0, 0
        for (_, ids, mask), lg in zip(self._batches(self.old_contexts), logits, strict=True):
            ok = mask[:, 1:] == 1
            nll = F.cross_entropy(lg[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            total += float(nll[ok.flatten()].sum())
            count += int(ok.sum())
        return total / count

    def forgetting(self, forward: Forward) -> dict[str, float]:
        """Change of mean NLL on held-out original stories, and max |delta logit| (old vocabulary) there."""
        logits = self._old_text_logits(forward)
        diff = 0.0
        for (_, _, mask), a, b in zip(self._batches(self.old_contexts), logits, self._base_old, strict=True):
            real = mask.bool()
            diff = max(diff, float((a - b).abs()[real].max()))
        return {"delta_old_loss": self._old_nll(logits) - self.base_old_nll, "max_abs_logit_diff": diff}

    def support(self, alpha: Any) -> dict[str, float]:
        """Precision and recall of alpha's support against the source words, and the share of
        |alpha| on them, averaged over pseudo-words."""
        import scipy.sparse as sp

        a = sp.csr_array(alpha)
        prec, rec, mass = [], [], []
        for i, words in enumerate(self.corpus.word_ids):
            cols = a.indices[a.indptr[i] : a.indptr[i + 1]]
            vals = np.abs(a.data[a.indptr[i] : a.indptr[i + 1]])
            hit = np.isin(cols, words)
            prec.append(hit.mean() if cols.size else 0.0)
            rec.append(len(set(cols[hit].tolist())) / len(words))
            mass.append(vals[hit].sum() / vals.sum() if vals.sum() > 0 else 0.0)
        return {
            "support_precision": float(np.mean(prec)),
            "support_recall": float(np.mean(rec)),
            "alpha_mass_on_words": float(np.mean(mass)),
        }

    def reference(self) -> dict[str, Any]:
        """The base model on the original sentences (the real words in place): the loss a
        perfect pseudo-word embedding would approach, with the same positions scored."""
        words = np.asarray(sorted({w for ids in self.corpus.word_ids for w in ids}), dtype=np.int64)
        forward = _model_forward(self.base)
        val = self.target_loss(forward, self.sequences("val", original=True), after=words)
        test = self.target_loss(forward, self.sequences("test", original=True), after=words)
        return {
            "method": "reference: base model, real words in place",
            "key": "reference",
            "lr": None,
            "val_after": val["after"],
            "test_after": test["after"],
            "test_sentence": test["sentence"],
            "delta_old_loss": 0.0,
            "max_abs_logit_diff": 0.0,
            "trainable": 0,
            "seconds": 0.0,
        }

    def start(self) -> dict[str, Any]:
        """The expanded model before any fit or training (new rows at the mean base embedding):
        where ET from mean and the three baselines start."""
        forward = _model_forward(self.template)
        val = self.target_loss(forward, self.sequences("val"))
        test = self.target_loss(forward, self.sequences("test"))
        return {
            "method": "start: new rows at the mean embedding, no training",
            "key": "start",
            "lr": None,
            "val_after": val["after"],
            "test_after": test["after"],
            "test_sentence": test["sentence"],
            **self.forgetting(forward),
            "trainable": 0,
            "seconds": 0.0,
        }

    def run(
        self, method: str, n: int, *, repeat: int = 0, lrs: Sequence[float] | None = None, full: bool = True
    ) -> dict[str, Any]:
        """Train ``method`` at each learning rate, keep the best on validation, score it.

        Parameters
        ----------
        method : str
            One of :data:`METHODS`.
        n : int
            Train sentences per pseudo-word.
        repeat : int
            Which draw of the train sentences.
        lrs : sequence of float, optional
            Default ``config.lrs[method]`` (ignored for 'alpha').
        full : bool
            Also measure forgetting (skipped in sample-efficiency sweeps).

        Returns
        -------
        dict
            method, key, n, repeat, lr, val_after (per lr in val_by_lr), test_after,
            test_sentence, trainable, seconds (fit + training of the kept candidate;
            the shared distillation is in ``distill_seconds``), and with ``full``
            delta_old_loss, max_abs_logit_diff, verified (ET and alpha rows:
            :func:`verify_no_forgetting` passed); support figures for alpha fits.
        """
        grid = [None] if method == "alpha" else list(lrs or self.config.lrs[method])
        val = self.sequences("val")
        best, best_loss, by_lr = None, float("inf"), {}
        for lr in grid:
            cand = self.train(method, n, lr, repeat=repeat)
            loss = self.target_loss(cand.forward, val)["after"]
            by_lr[str(lr)] = loss
            if best is None or loss < best_loss:
                best, best_loss, best_lr = cand, loss, lr
        assert best is not None
        test = self.target_loss(best.forward, self.sequences("test"))
        row: dict[str, Any] = {
            "method": METHOD_NAMES[method],
            "key": method,
            "n": int(n),
            "repeat": int(repeat),
            "lr": best_lr,
            "val_after": best_loss,
            "val_by_lr": by_lr,
            "test_after": test["after"],
            "test_sentence": test["sentence"],
            "trainable": int(best.trainable),
            "seconds": best.seconds,
        }
        if best.fit is not None:
            chosen = self.select_alpha(n, repeat)
            row.update(
                self.support(best.fit.alpha),
                alpha_link=chosen["link"],
                alpha_s=chosen["s"],
                alpha_val_by_setting=chosen["val_by_setting"],
            )
        if full:
            row.update(self.forgetting(best.forward))
            if method == "alpha" or method.startswith("et_"):
                row["verified"] = verify_no_forgetting(self.base, best.model, self.old_contexts[:16]).ok
        return row
