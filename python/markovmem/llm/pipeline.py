"""learn_tokens: the whole path in one call (distill -> add tokens -> count ->
fit alpha -> write E^T alpha -> embedding tuning -> verify no forgetting)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from torch import nn

from .._errors import SampleSizeWarning
from .._matrix import TransitionMatrix
from .columns import ColumnEvidence, OutputInit, RowLogs, column_evidence, output_init, two_sided_support
from .config import LearnTokensConfig
from .distillation import distill, next_token_counts
from .leak import LeakCalibration, calibrate_leak
from .model import (
    _model_n_base,
    _require_expansion,
    add_tokens,
    alpha_to_embeddings,
    get_expansion,
    remove_expansion,
    set_embeddings,
)
from .selection import cross_fit
from .tuning import TuneHistory, embedding_tune
from .verify import ForgettingReport, verify_no_forgetting

__all__ = ["LearnResult", "TokenReport", "learn_tokens"]


@dataclass
class TokenReport:
    """Diagnostics of one new token learned by :func:`learn_tokens`.

    Attributes
    ----------
    token : str
    id : int
    n_contexts : int
        Occurrences followed by an old token in the texts (the fit's N).
    link : str
        Link of its fit (chosen per token when ``link='auto'``).
    s : int
        Sparsity of its fit.
    heldout_loss : float
        Mean loss (nats) right after the token on held-out occurrences, with E^T alpha
        fitted on the other occurrences (two-fold cross-fit); NaN with fewer than two.
    mean_loss : float
        The same positions with the mean base embedding as the token's row.
    decomposition : list of (str, float)
        Largest dictionary weights: (old token, weight).
    """

    token: str
    id: int
    n_contexts: int
    link: str
    s: int
    heldout_loss: float
    mean_loss: float
    decomposition: list[tuple[str, float]]

    @property
    def heldout_gain(self) -> float:
        """Held-out loss of the mean init minus that of E^T alpha (nats per occurrence; > 0: alpha helps)."""
        return self.mean_loss - self.heldout_loss

    @property
    def few_contexts(self) -> bool:
        """Fewer than 10 s contexts: the fit may pick the wrong old words."""
        return self.n_contexts < 10 * self.s

    def __str__(self) -> str:
        parts = " ".join(f"{w:+.3f} x {t!r}" for t, w in self.decomposition)
        gain = "n/a (< 2 contexts)" if np.isnan(self.heldout_loss) else f"{self.heldout_gain:+.3f} nats"
        flag = f" (few: < 10 s = {10 * self.s})" if self.few_contexts else ""
        return (
            f"{self.token} = {parts}\n    {self.link}, s = {self.s}, {self.n_contexts} contexts{flag}, "
            f"held-out gain over the mean init: {gain}"
        )


@dataclass
class LearnResult:
    """What :func:`learn_tokens` produced.

    Attributes
    ----------
    tokens : list of str
    ids : list of int
        The new ids.
    matrix : TransitionMatrix
        The distilled base matrix the fit used (:func:`dictionary_info` tells how it was made).
    counts : scipy.sparse.csr_array
        (m, n_base) next-token counts of the new tokens in the texts.
    alpha : scipy.sparse.csr_array
        (m, n_states) dictionary weights; the new input rows start at ``E^T alpha``.
    fits : dict of (str, int) -> (list of int, AlphaFit)
        One ``markovmem.fit_alpha`` result per (link, s) used, with the token indices it holds
        (a single entry unless ``link='auto'`` chose differently for different tokens).
    tokens_report : list of TokenReport
        Per token: contexts, link and s, held-out gain over the mean init, decomposition.
    history : TuneHistory or None
        Embedding tuning (None when ``tune_steps == 0``).
    report : ForgettingReport
        Zero-forgetting check on old-only contexts cut from the texts (with ``generate``: the
        leak and the exact forgetting in nats on them).
    config : LearnTokensConfig
    output : OutputInit or None
        With ``generate``: the output init (beta's support, ``W^T beta``, the bias).
    leak : LeakCalibration or None
        With ``max_leak``: what the leak gate set and what it cost the new tokens.
    """

    tokens: list[str]
    ids: list[int]
    matrix: TransitionMatrix
    counts: Any
    alpha: Any
    fits: dict[tuple[str, int], tuple[list[int], Any]]
    tokens_report: list[TokenReport]
    history: TuneHistory | None
    report: ForgettingReport
    config: LearnTokensConfig
    output: OutputInit | None = None
    leak: LeakCalibration | None = None

    @property
    def fit(self) -> Any:
        """The AlphaFit of every token, when one (link, s) served them all.

        Raises
        ------
        ValueError
            ``link='auto'`` chose several (link, s); see :attr:`fits`.
        """
        if len(self.fits) != 1:
            raise ValueError(f"tokens were fitted with {sorted(self.fits)}; see LearnResult.fits")
        return next(iter(self.fits.values()))[1]

    @property
    def choices(self) -> list[tuple[str, int]]:
        """(link, s) of each token's fit."""
        return [(r.link, r.s) for r in self.tokens_report]

    def decomposition(self, tokenizer: Any = None, top: int = 8) -> dict[str, list[tuple[Any, float]]]:
        """Largest dictionary weights of each new token: {token: [(base token or id, weight), ...]}."""
        return {tok: pairs for tok, pairs in zip(self.tokens, _decompose(self.alpha, tokenizer, top), strict=False)}


def _decompose(alpha: Any, tokenizer: Any, top: int) -> list[list[tuple[Any, float]]]:
    import scipy.sparse as sp

    alpha = sp.csr_array(alpha)
    out = []
    for i in range(alpha.shape[0]):
        a, b = alpha.indptr[i], alpha.indptr[i + 1]
        cols, vals = alpha.indices[a:b], alpha.data[a:b]
        order = np.argsort(-np.abs(vals), kind="stable")[:top]
        names = [int(c) for c in cols[order]]
        if tokenizer is not None:
            names = tokenizer.convert_ids_to_tokens(names)
        out.append([(n, float(v)) for n, v in zip(names, vals[order], strict=True)])
    return out


def _special_ids(tokenizer: Any, n_base: int) -> list[int]:
    """The tokenizer's special tokens among the old ids: never a word a new token stands for."""
    return sorted({int(t) for t in getattr(tokenizer, "all_special_ids", []) if 0 <= int(t) < n_base})


def _fit_alpha() -> Any:
    import markovmem

    fit = getattr(markovmem, "fit_alpha", None)
    if fit is None:
        raise ImportError("markovmem.fit_alpha is not available in this build of markovmem; learn_tokens needs it")
    return fit


def _bos_prefix(tokenizer: Any) -> list[int] | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else None


def _dictionary_corpus(
    tokenizer: Any, texts: Sequence[str], tokens: Sequence[str]
) -> tuple[list[list[int]], list[np.ndarray]]:
    """The texts tokenized by the base tokenizer, with a mask that drops the positions of new-token strings.

    The base model reads the texts as it would without the new tokens (their strings split into
    old pieces); those pieces are context for what follows but are not occurrences of their own
    old tokens, so the dictionary rows describe the old words, not the new ones.
    """
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    try:
        enc = tokenizer(list(texts), return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as exc:
        raise ValueError(
            "distill_mode='corpus' needs a tokenizer that reports character offsets (a fast tokenizer: "
            "AutoTokenizer.from_pretrained(..., use_fast=True)) to leave the new words out of the dictionary; "
            f"this one does not ({exc})"
        ) from exc
    seqs, masks = [], []
    for i, text in enumerate(texts):
        ids = list(enc["input_ids"][i])
        offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
        keep_arr = np.ones(len(ids), dtype=bool)
        for m in pattern.finditer(text):
            keep_arr &= ~((offsets[:, 0] < m.end()) & (offsets[:, 1] > m.start()))
        seqs.append(ids)
        masks.append(keep_arr)
    return seqs, masks


def _old_contexts(seqs: list[list[int]], n_base: int, limit: int, max_len: int = 64) -> list[list[int]]:
    """Old-token-only pieces of the tokenized texts (split at new tokens), at most ``limit``."""
    out: list[list[int]] = []
    for s in seqs:
        piece: list[int] = []
        for t in list(s) + [n_base]:
            if t < n_base:
                piece.append(int(t))
                continue
            if len(piece) >= 2:
                out.append(piece[:max_len])
                if len(out) >= limit:
                    return out
            piece = []
    return out


def learn_tokens(
    model: nn.Module,
    tokenizer: Any,
    tokens: Sequence[str],
    texts: Sequence[str],
    s: int | None = None,
    tune_steps: int | None = None,
    *,
    config: LearnTokensConfig | None = None,
    matrix: TransitionMatrix | None = None,
    contexts: Any = None,
    base_model: nn.Module | None = None,
    corpus: Sequence[str] | None = None,
    device: Any = None,
    progress: bool = True,
    **options: Any,
) -> LearnResult:
    """Teach a model new tokens from example texts, with zero forgetting, in one call.

    Runs the path of DESIGN §3:

    1. ``P = distill(model, ...)`` (skipped when ``matrix`` is given): by default
       in corpus mode, each old token's row averaged over its occurrences in
       ``texts`` and ``corpus`` (the new tokens' own positions left out), rows
       seen rarely shrunk toward their one-token row;
    2. ``ids = add_tokens(model, tokenizer, tokens)``;
    3. tokenize ``texts`` with the expanded tokenizer, ``C = next_token_counts``;
    4. ``fit = markovmem.fit_alpha(P, C, s=s, link=...)``;
    5. ``set_embeddings(model, ids, alpha_to_embeddings(model, fit.alpha))``;
    6. ``embedding_tune`` from those rows for ``tune_steps`` steps;
    7. ``verify_no_forgetting`` on old-only contexts cut from the texts.

    With ``generate=True`` (an option, see LearnTokensConfig) the new tokens can also be
    generated: step 2 opens their output, step 5 also writes their output rows ``W^T beta`` and
    biases (:func:`~markovmem.llm.columns.output_init`), step 6 trains input and output rows,
    ``max_leak`` gates the leak on the verification contexts
    (:func:`~markovmem.llm.leak.calibrate_leak`) and step 7 reports the leak and the exact
    forgetting in nats.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Expanded in place.  If any step after 2 fails, the expansion is removed
        again (the tokenizer keeps the tokens: reload it).
    tokenizer : transformers tokenizer
    tokens : sequence of str
        New tokens.
    texts : sequence of str
        Example texts using them.  Every token must be followed by a base token
        at least once.
    s : int, optional
        Sparsity of alpha (default ``config.s``, 1; see LearnTokensConfig for the link and radius).
    tune_steps : int, optional
        Embedding-tuning steps (default ``config.tune_steps``; 0 skips tuning).
    config : LearnTokensConfig, optional
        All settings; ``s``, ``tune_steps`` and ``**options`` (field names of
        LearnTokensConfig) override it.
    matrix : TransitionMatrix, optional
        A matrix already distilled from this model (n_base rows).
    contexts : iterable of token-id sequences, optional
        Old-only contexts for the forgetting check (default: cut from texts).
    base_model : transformers.PreTrainedModel, optional
        Separate base model for the check (default: the model with its expansion off).
    corpus : sequence of str, optional
        General text in the model's domain added to ``texts`` for the corpus-mode
        dictionary (more occurrences per old token, better rows).  Texts longer
        than the model's context are cut into overlapping windows.
    device : str or torch.device, optional
    progress : bool
        tqdm bars for distillation, the fit (shown after 2 s; Ctrl-C stops it
        cleanly) and embedding tuning.

    Returns
    -------
    LearnResult

    Raises
    ------
    ImportError
        ``markovmem.fit_alpha`` is missing.
    ValueError
        Bad settings, empty texts, an empty ``corpus``, a token that never appears in the texts or is
        never followed by a base token, or (corpus mode) a tokenizer that reports no character offsets.
    """
    fit_alpha = _fit_alpha()
    base = config if config is not None else LearnTokensConfig()
    unknown = sorted(set(options) - {f.name for f in fields(LearnTokensConfig)})
    if unknown:
        raise TypeError(f"learn_tokens got unknown options {unknown}; see LearnTokensConfig")
    values = {f.name: getattr(base, f.name) for f in fields(LearnTokensConfig)}
    values.update(options)
    if s is not None:
        values["s"] = s
    if tune_steps is not None:
        values["tune_steps"] = tune_steps
    cfg = LearnTokensConfig(**values)
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty sequence of strings")
    if isinstance(corpus, str):
        raise TypeError("corpus must be a sequence of strings, not one string")
    if corpus is not None:
        corpus = list(corpus)
        if not all(isinstance(t, str) for t in corpus):
            raise TypeError("corpus must be a sequence of strings")
        corpus = [t for t in corpus if t.strip()]
        if not corpus:
            raise ValueError("corpus is empty; pass None or texts in the model's domain")
    absent = [t for t in tokens if not any(t in text for text in texts)]
    if absent:
        raise ValueError(f"tokens {absent} never appear in texts; add examples using them")
    if get_expansion(model) is not None:
        raise ValueError("model already carries an expansion; learn_tokens starts from a base model")
    n_base = _model_n_base(model)
    if matrix is None:
        prefix = _bos_prefix(tokenizer) if cfg.prefix == "bos" else None
        if cfg.distill_mode == "corpus":
            seqs, masks = _dictionary_corpus(tokenizer, texts + list(corpus or []), tokens)
            matrix = distill(
                model,
                top_k=cfg.top_k,
                batch_size=cfg.distill_batch_size,
                prefix=prefix if cfg.fallback == "token" else None,
                device=device,
                progress=progress,
                mode="corpus",
                sequences=seqs,
                mask=masks,
                fallback=cfg.fallback,
                shrinkage=cfg.shrinkage,
            )
        else:
            if corpus is not None:
                raise ValueError("corpus is only used with distill_mode='corpus'")
            matrix = distill(
                model,
                top_k=cfg.top_k,
                batch_size=cfg.distill_batch_size,
                prefix=prefix,
                device=device,
                progress=progress,
            )
    elif matrix.n_base != n_base:
        raise ValueError(f"matrix has n_base = {matrix.n_base}; the model has {n_base} base tokens")
    ids = add_tokens(model, tokenizer, tokens, block_output=cfg.block_output and not cfg.generate)
    try:
        seqs = [tokenizer(t)["input_ids"] for t in texts]
        counts = next_token_counts(seqs, ids, n_base)
        empty = [tok for tok, n in zip(tokens, np.diff(counts.indptr), strict=True) if n == 0]
        if empty:
            raise ValueError(f"tokens {empty} are never followed by a base token in texts; add examples using them")
        alpha, fits, tokens_report, columns = _fit_tokens(
            model, ids, list(tokens), seqs, counts, matrix, cfg, fit_alpha, tokenizer, device, progress
        )
        set_embeddings(model, ids, alpha_to_embeddings(model, alpha))
        _require_expansion(model).alpha = alpha
        output = None
        if cfg.generate:
            arrays = [np.asarray(x, dtype=np.int64) for x in seqs]
            if columns is None:
                columns = column_evidence(model, ids, arrays, device=device)
            output = output_init(model, ids, arrays, columns, exclude=_special_ids(tokenizer, n_base), device=device)
            set_embeddings(model, ids, output_embeddings=output.rows, output_bias=output.bias)
        history = None
        if cfg.tune_steps > 0:
            history = embedding_tune(
                model,
                ids,
                seqs,
                steps=cfg.tune_steps,
                lr=cfg.tune_lr,
                batch_size=cfg.tune_batch_size,
                seed=cfg.seed,
                device=device,
                progress=progress,
            )
        if contexts is None:
            contexts = _old_contexts(seqs, n_base, cfg.n_verify_contexts)
            if not contexts:
                contexts = [[int(v)] for v in range(min(n_base, cfg.n_verify_contexts))]
        leak = None
        if cfg.max_leak is not None:
            leak = calibrate_leak(
                model,
                contexts,
                cfg.max_leak,
                statistic=cfg.leak_statistic,
                texts=seqs,
                device=device,
                progress=progress,
            )
        report = verify_no_forgetting(
            base_model, model, contexts, max_leak=cfg.max_leak, leak_statistic=cfg.leak_statistic
        )
    except BaseException:
        remove_expansion(model)
        raise
    return LearnResult(
        tokens=list(tokens),
        ids=ids,
        matrix=matrix,
        counts=counts,
        alpha=alpha,
        fits=fits,
        tokens_report=tokens_report,
        history=history,
        report=report,
        config=cfg,
        output=output,
        leak=leak,
    )


def _fit_tokens(
    model: nn.Module,
    ids: list[int],
    tokens: list[str],
    seqs: list[Any],
    counts: Any,
    matrix: TransitionMatrix,
    cfg: LearnTokensConfig,
    fit_alpha: Any,
    tokenizer: Any,
    device: Any,
    progress: bool,
) -> tuple[Any, dict[tuple[str, int], tuple[list[int], Any]], list[TokenReport], ColumnEvidence | None]:
    """Fit alpha for every token (per-token (link, s) when ``cfg.link == 'auto'``) and its diagnostics;
    also returns the column evidence read for the two-sided support (None with ``evidence='row'``)."""
    import scipy.sparse as sp

    grid = list(cfg.auto_grid) if cfg.link == "auto" else [(cfg.link, int(cfg.s))]
    arrays = [np.asarray(x, dtype=np.int64) for x in seqs]
    held_out = cfg.diagnostics or len(grid) > 1
    columns = None
    if cfg.evidence == "two-sided":
        columns = column_evidence(model, ids, arrays, folds=2 if held_out else 1, device=device)
    n_base = matrix.n_base
    special = _special_ids(tokenizer, n_base)
    row_logs = RowLogs(matrix) if columns is not None else None  # one build for every fold and candidate

    def fit(c: Any, link: str, s: int, rows: Any = None, fold: int | None = None, bar: bool = False) -> Any:
        extra: dict[str, Any] = {"bound": cfg.bound} if link == "logit" else {}
        if columns is not None and row_logs is not None:
            score = row_logs.loglik(c) + columns.loglik(rows, exclude_fold=fold)
            extra["support"] = two_sided_support(score, s, exclude=special)
        return fit_alpha(matrix, c, s=s, link=link, progress=bar, **extra)

    cv = cross_fit(model, ids, arrays, fit, grid, device=device) if held_out else None
    chosen = cv.best(default=0) if cv is not None else [0] * len(ids)
    fits: dict[tuple[str, int], tuple[list[int], Any]] = {}
    parts: list[Any] = [None] * len(ids)
    for c in sorted(set(chosen)):
        rows = [i for i, x in enumerate(chosen) if x == c]
        res = fit(sp.csr_array(counts[rows]), *grid[c], rows=rows, bar=progress)
        fits[grid[c]] = (rows, res)
        for r, i in enumerate(rows):
            parts[i] = res.alpha[[r]]
    alpha = sp.csr_array(sp.vstack(parts, format="csr"))
    n = np.asarray(counts.sum(axis=1)).reshape(-1).astype(np.int64)
    decomp = _decompose(alpha, tokenizer, 6)
    nan = float("nan")
    report = [
        TokenReport(
            token=t,
            id=int(i),
            n_contexts=int(n[k]),
            link=grid[chosen[k]][0],
            s=grid[chosen[k]][1],
            heldout_loss=float(cv.loss[chosen[k], k]) if cv is not None else nan,
            mean_loss=float(cv.mean_loss[k]) if cv is not None else nan,
            decomposition=[(str(a), w) for a, w in decomp[k]],
        )
        for k, (t, i) in enumerate(zip(tokens, ids, strict=False))
    ]
    few = [r for r in report if r.few_contexts]
    if few:
        warnings.warn(
            "few contexts for a sparse fit (fewer than 10 s): "
            + ", ".join(f"{r.token!r} has {r.n_contexts} for s = {r.s}" for r in few[:8])
            + ("" if len(few) <= 8 else f" and {len(few) - 8} more")
            + "; the decomposition may name the wrong old words; add texts using them or lower s",
            SampleSizeWarning,
            stacklevel=3,
        )
    return alpha, fits, report, columns
