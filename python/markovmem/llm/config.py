"""Configuration dataclasses of the adapter: one expansion (MarkovMemConfig) and the
one-call pipeline (LearnTokensConfig).  Fields carry defaults and help text;
``__post_init__`` validates with ValueError.  No torch here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LearnTokensConfig", "MarkovMemConfig"]

#: How new input rows start when add_tokens gets no ``embeddings``.
ROW_INITS = ("mean", "random", "zeros")
#: How embedding_tune may (re)initialise the rows it trains; None keeps them.
TUNE_INITS = ("alpha", "mean", "random")


@dataclass
class MarkovMemConfig:
    """One expansion of a transformers model by new tokens.

    Stored on the expanded model (``get_expansion(model).config``) and in
    expansion files, so an expansion can be re-applied exactly.
    """

    tokens: list[str] = field(
        default_factory=list,
        metadata={"help": "The new token strings, in the order of their new ids."},
    )
    block_output: bool = field(
        default=True,
        metadata={
            "help": (
                "Give the new tokens logit -inf at every position (the paper's p(u|v) = 0): "
                "the model can read them but never predicts them, and old contexts keep "
                "exactly the base model's next-token distribution."
            )
        },
    )
    tie_output: bool = field(
        default=False,
        metadata={
            "help": (
                "With block_output False: True makes the new tokens' output rows their input rows (one "
                "parameter, the paper's ET); False (the default) gives them their own output rows and bias, "
                "also when the base model ties its embeddings."
            )
        },
    )
    init: str = field(
        default="mean",
        metadata={
            "help": (
                "Initial input rows when no embeddings are given: 'mean' (mean of the base "
                "input rows), 'random' (normal with the base rows' std, seeded) or 'zeros'."
            )
        },
    )
    pad_tokenizer: bool = field(
        default=True,
        metadata={
            "help": (
                "When the tokenizer has fewer tokens than the model has rows (padded vocabularies, "
                "e.g. Qwen2), first add reserved special tokens '<|markovmem_reserved_N|>' for the "
                "unnamed rows, so the new tokens get ids >= n_base.  False raises instead."
            )
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the 'random' init."})

    def __post_init__(self) -> None:
        if isinstance(self.tokens, (str, bytes)):
            # A string is a sequence of characters: refuse it rather than add one token per character.
            raise TypeError(f"tokens must be a list of strings, not the string {self.tokens!r}")
        self.tokens = list(self.tokens)
        for i, t in enumerate(self.tokens):
            if not isinstance(t, str):
                raise TypeError(f"tokens[{i}] is {t!r} ({type(t).__name__}); expected a non-empty string")
            if not t:
                raise ValueError(f"tokens[{i}] is {t!r}; expected a non-empty string")
        seen: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            if t in seen:
                raise ValueError(f"tokens[{i}] = {t!r} repeats tokens[{seen[t]}]")
            seen[t] = i
        if self.init not in ROW_INITS:
            raise ValueError(f"init is {self.init!r}; expected one of {ROW_INITS}")
        if not isinstance(self.block_output, bool):
            raise ValueError(f"block_output is {self.block_output!r}; expected True or False")
        if not isinstance(self.tie_output, bool):
            raise ValueError(f"tie_output is {self.tie_output!r}; expected True or False")
        if self.tie_output and self.block_output:
            raise ValueError("tie_output=True needs block_output=False (blocked tokens have no output rows)")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)


@dataclass
class LearnTokensConfig:
    """Settings of :func:`markovmem.llm.learn_tokens` (distill -> add -> count -> fit -> write -> tune -> verify)."""

    top_k: int = field(default=256, metadata={"help": "Entries kept per distilled row."})
    distill_mode: str = field(
        default="corpus",
        metadata={
            "help": (
                "'corpus': row v averages p(.|context) over the occurrences of v in the texts (and the "
                "optional general corpus), the new tokens' own positions left out.  'token': row v is "
                "p(.|prefix, v), one short context per token (cheap, corpus-free, out of distribution)."
            )
        },
    )
    fallback: str = field(
        default="token",
        metadata={"help": "Corpus mode: what rows seen rarely shrink toward: 'token', 'unigram' or 'none'."},
    )
    shrinkage: float = field(
        default=1.0,
        metadata={"help": "Corpus mode: pseudo-count of the fallback row (a row seen this often is half fallback)."},
    )
    distill_batch_size: int | None = field(
        default=None, metadata={"help": "Contexts per forward pass in distill (None: sized from the vocabulary)."}
    )
    prefix: str | None = field(
        default="bos",
        metadata={
            "help": (
                "Prefix of the one-token contexts in distill: 'bos' uses the tokenizer's BOS when "
                "it adds one to every text, None uses no prefix."
            )
        },
    )
    s: int = field(
        default=1,
        metadata={
            "help": (
                "Sparsity: at most s dictionary tokens per new token.  1 scored best on the real-model "
                "recovery benchmark (bench/recovery): E^T alpha is a blend of input rows, and each extra "
                "atom fitted from few contexts dilutes it.  Raise it for words that blend several old ones, "
                "with more contexts (>= 10 s), or let link='auto' choose."
            )
        },
    )
    link: str = field(
        default="logit",
        metadata={
            "help": (
                "fit_alpha link: 'mixture', 'logit', or 'auto' (per token, the (link, s) of auto_grid with the "
                "lowest held-out loss after the token, by two-fold cross-fitting on the texts)."
            )
        },
    )
    bound: float = field(
        default=1.0,
        metadata={
            "help": (
                "||alpha||_2 bound of the logit link.  1 keeps E^T alpha at the scale of the input rows; "
                "fit_alpha's own default (10) lets few contexts pull in large weights on unrelated tokens, "
                "and E^T alpha then lands far from every real embedding (bench/recovery)."
            )
        },
    )
    evidence: str = field(
        default="two-sided",
        metadata={
            "help": (
                "What picks alpha's support.  'two-sided': the s old tokens with the highest log-likelihood of "
                "both sides of the new token's occurrences, the tokens after it (dictionary rows) and the "
                "contexts before it (the base model's prediction there, against its prediction anywhere in the "
                "texts); the link then fits the weights on that support.  'row': fit_alpha's own selection, "
                "from the tokens after it only.  'two-sided' found the replaced word far more often on the "
                "real-model recovery benchmark (bench/recovery); it costs one forward pass over the texts."
            )
        },
    )
    auto_grid: tuple[tuple[str, int], ...] = field(
        default=(("logit", 1), ("logit", 2), ("mixture", 2), ("logit", 4)),
        metadata={"help": "(link, s) candidates of link='auto', simplest first (ties go to the earlier)."},
    )
    diagnostics: bool = field(
        default=True,
        metadata={
            "help": "Score E^T alpha against the mean init on held-out occurrences (two-fold cross-fit: two more "
            "fits and three forward passes over the texts; False skips it)."
        },
    )
    tune_steps: int = field(default=50, metadata={"help": "Embedding-tuning steps after E^T alpha (0 skips it)."})
    tune_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of embedding tuning."})
    tune_batch_size: int = field(default=8, metadata={"help": "Sequences per embedding-tuning step."})
    block_output: bool = field(default=True, metadata={"help": "See MarkovMemConfig.block_output."})
    generate: bool = field(
        default=False,
        metadata={
            "help": (
                "Let the model generate the new tokens (an open expansion; block_output is then False): each "
                "new token gets its own output row W^T beta, the old token whose column (the contexts leading "
                "to it) best explains the new token's contexts, and the maximum-likelihood bias given that row "
                "(llm.columns.output_init); embedding tuning then trains input and output rows.  Old logits "
                "stay bitwise; old text loses exactly -log(1 - leak) per position, which the report measures."
            )
        },
    )
    max_leak: float | None = field(
        default=None,
        metadata={
            "help": (
                "With generate: hold the leak (the new tokens' probability on old text) at or under this bound "
                "on the verification contexts, by one offset on the new logits (llm.calibrate_leak); the "
                "report's ok requires it.  None: no gate."
            )
        },
    )
    leak_statistic: str = field(
        default="max", metadata={"help": "Statistic of the per-position leak max_leak bounds: 'max', 'p99' or 'mean'."}
    )
    n_verify_contexts: int = field(
        default=64, metadata={"help": "Old-token-only contexts (cut from the texts) used by the forgetting check."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of batch order in embedding tuning."})

    def __post_init__(self) -> None:
        if int(self.top_k) < 1:
            raise ValueError(f"top_k is {self.top_k}; expected >= 1")
        if self.distill_mode not in ("token", "corpus"):
            raise ValueError(f"distill_mode is {self.distill_mode!r}; expected 'token' or 'corpus'")
        if self.max_leak is not None and not self.generate:
            raise ValueError("max_leak bounds the leak of generated tokens; it needs generate=True")
        if self.max_leak is not None and not 0.0 < float(self.max_leak) < 1.0:
            raise ValueError(f"max_leak is {self.max_leak}; expected a number strictly between 0 and 1")
        if self.leak_statistic not in ("max", "p99", "mean"):
            raise ValueError(f"leak_statistic is {self.leak_statistic!r}; expected 'max', 'p99' or 'mean'")
        if self.evidence not in ("two-sided", "row"):
            raise ValueError(f"evidence is {self.evidence!r}; expected 'two-sided' or 'row'")
        if self.fallback not in ("token", "unigram", "none"):
            raise ValueError(f"fallback is {self.fallback!r}; expected 'token', 'unigram' or 'none'")
        if not float(self.shrinkage) >= 0:
            raise ValueError(f"shrinkage is {self.shrinkage}; expected >= 0")
        if self.distill_batch_size is not None and int(self.distill_batch_size) < 1:
            raise ValueError(f"distill_batch_size is {self.distill_batch_size}; expected None or >= 1")
        if self.prefix not in ("bos", None):
            raise ValueError(f"prefix is {self.prefix!r}; expected 'bos' or None")
        if int(self.s) < 1:
            raise ValueError(f"s is {self.s}; expected >= 1")
        if self.link not in ("logit", "mixture", "auto"):
            raise ValueError(f"link is {self.link!r}; expected 'mixture', 'logit' or 'auto'")
        if not float(self.bound) > 0:
            raise ValueError(f"bound is {self.bound}; expected > 0")
        self.auto_grid = tuple((str(link), int(s)) for link, s in self.auto_grid)
        if not self.auto_grid or any(link not in ("logit", "mixture") or s < 1 for link, s in self.auto_grid):
            raise ValueError(
                f"auto_grid is {self.auto_grid}; expected (link, s) pairs, link 'mixture' or 'logit', s >= 1"
            )
        if int(self.tune_steps) < 0:
            raise ValueError(f"tune_steps is {self.tune_steps}; expected >= 0")
        if not float(self.tune_lr) > 0:
            raise ValueError(f"tune_lr is {self.tune_lr}; expected > 0")
        if int(self.tune_batch_size) < 1:
            raise ValueError(f"tune_batch_size is {self.tune_batch_size}; expected >= 1")
        if int(self.n_verify_contexts) < 1:
            raise ValueError(f"n_verify_contexts is {self.n_verify_contexts}; expected >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)
