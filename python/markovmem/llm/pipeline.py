"""learn_tokens: the whole path in one call (distill -> add tokens -> count ->
fit alpha -> write E^T alpha -> embedding tuning -> verify no forgetting)."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
from torch import nn

from .._matrix import TransitionMatrix
from .config import LearnTokensConfig
from .distillation import distill, next_token_counts
from .model import _model_n_base, add_tokens, alpha_to_embeddings, get_expansion, remove_expansion, set_embeddings
from .tuning import TuneHistory, embedding_tune
from .verify import ForgettingReport, verify_no_forgetting

__all__ = ["LearnResult", "learn_tokens"]


@dataclass
class LearnResult:
    """What :func:`learn_tokens` produced.

    Attributes
    ----------
    tokens : list of str
    ids : list of int
        The new ids.
    matrix : TransitionMatrix
        The distilled base matrix the fit used.
    counts : scipy.sparse.csr_array
        (m, n_base) next-token counts of the new tokens in the texts.
    fit : AlphaFit
        ``markovmem.fit_alpha`` result; ``fit.alpha`` is (m, n_states) sparse.
    history : TuneHistory or None
        Embedding tuning (None when ``tune_steps == 0``).
    report : ForgettingReport
        Zero-forgetting check on old-only contexts cut from the texts.
    config : LearnTokensConfig
    """

    tokens: list[str]
    ids: list[int]
    matrix: TransitionMatrix
    counts: Any
    fit: Any
    history: TuneHistory | None
    report: ForgettingReport
    config: LearnTokensConfig

    def decomposition(self, tokenizer: Any = None, top: int = 8) -> dict[str, list[tuple[Any, float]]]:
        """Largest dictionary weights of each new token: {token: [(base token or id, weight), ...]}."""
        import scipy.sparse as sp

        alpha = sp.csr_array(self.fit.alpha)
        out = {}
        for i, tok in enumerate(self.tokens):
            a, b = alpha.indptr[i], alpha.indptr[i + 1]
            cols, vals = alpha.indices[a:b], alpha.data[a:b]
            order = np.argsort(-np.abs(vals))[:top]
            names = [int(c) for c in cols[order]]
            if tokenizer is not None:
                names = tokenizer.convert_ids_to_tokens(names)
            out[tok] = [(n, float(v)) for n, v in zip(names, vals[order])]
        return out


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


def _dictionary_corpus(tokenizer: Any, texts: Sequence[str], tokens: Sequence[str]) -> tuple[list[list[int]], list[np.ndarray]]:
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
        Sparsity of alpha (default ``config.s``, 16).
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
        Bad settings, empty texts, or a token never followed by a base token.
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
            matrix = distill(model, top_k=cfg.top_k, batch_size=cfg.distill_batch_size,
                             prefix=prefix if cfg.fallback == "token" else None, device=device, progress=progress,
                             mode="corpus", sequences=seqs, mask=masks, fallback=cfg.fallback,
                             shrinkage=cfg.shrinkage)
        else:
            if corpus is not None:
                raise ValueError("corpus is only used with distill_mode='corpus'")
            matrix = distill(model, top_k=cfg.top_k, batch_size=cfg.distill_batch_size, prefix=prefix,
                             device=device, progress=progress)
    elif matrix.n_base != n_base:
        raise ValueError(f"matrix has n_base = {matrix.n_base}; the model has {n_base} base tokens")
    ids = add_tokens(model, tokenizer, tokens, block_output=cfg.block_output)
    try:
        seqs = [tokenizer(t)["input_ids"] for t in texts]
        counts = next_token_counts(seqs, ids, n_base)
        empty = [tok for tok, n in zip(tokens, np.diff(counts.indptr)) if n == 0]
        if empty:
            raise ValueError(f"tokens {empty} are never followed by a base token in texts; add examples using them")
        fit = fit_alpha(matrix, counts, s=cfg.s, link=cfg.link, progress=progress)
        set_embeddings(model, ids, alpha_to_embeddings(model, fit.alpha))
        get_expansion(model).alpha = fit.alpha
        history = None
        if cfg.tune_steps > 0:
            history = embedding_tune(model, ids, seqs, steps=cfg.tune_steps, lr=cfg.tune_lr,
                                     batch_size=cfg.tune_batch_size, seed=cfg.seed, device=device, progress=progress)
        if contexts is None:
            contexts = _old_contexts(seqs, n_base, cfg.n_verify_contexts)
            if not contexts:
                contexts = [[int(v)] for v in range(min(n_base, cfg.n_verify_contexts))]
        report = verify_no_forgetting(base_model, model, contexts)
    except BaseException:
        remove_expansion(model)
        raise
    return LearnResult(tokens=list(tokens), ids=ids, matrix=matrix, counts=counts, fit=fit, history=history,
                       report=report, config=cfg)
