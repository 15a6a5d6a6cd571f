"""Expanding a transformers model with new tokens in place, reversibly.

MarkovMemModel is the controller attached to an expanded model: it finds the
input embedding and output head by walking named modules, swaps each for its
wrapper from layer.py through one dispatch on layer type, and can put the
originals back.  The functions below (add_tokens, set_embeddings,
alpha_to_embeddings, remove_expansion, base_fingerprint) are the public path.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from ._ids import as_ids
from .config import MarkovMemConfig
from .layer import NewTokenEmbeddingLayer, NewTokenOutputLayer

__all__ = [
    "MarkovMemModel",
    "add_tokens",
    "alpha_to_embeddings",
    "base_checksums",
    "base_fingerprint",
    "get_expansion",
    "remove_expansion",
    "set_embeddings",
]

#: Attribute of the transformers model that holds its MarkovMemModel.
_STATE_ATTR = "_markovmem_expansion"
#: Name pattern of the placeholder tokens that name unnamed padding rows.
RESERVED_TOKEN = "<|markovmem_reserved_{}|>"

#: The layer types markovmem wraps, by role: nn.Embedding -> NewTokenEmbeddingLayer,
#: nn.Linear -> NewTokenOutputLayer (see _io_modules, MarkovMemModel.__init__).
_WRAPPED = {"input": nn.Embedding, "output": nn.Linear}


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model must be a transformers PreTrainedModel (with .config); got {type(model).__name__}")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _io_modules(model: nn.Module) -> tuple[nn.Embedding, nn.Linear]:
    """The unexpanded model's input embedding and output head, checked to be types markovmem wraps."""
    # Looked up by name: nn.Module declares neither method, transformers models have both.
    getters: dict[str, Any] = {
        name: getattr(model, name, None) for name in ("get_input_embeddings", "get_output_embeddings")
    }
    for name, getter in getters.items():
        if not callable(getter):
            raise TypeError(f"model must be a transformers causal LM with {name}(); got {type(model).__name__}")
    inp, out = getters["get_input_embeddings"](), getters["get_output_embeddings"]()
    if inp is None or out is None:
        raise TypeError(f"{type(model).__name__} has no input embedding or no output head; expected a causal LM")
    if not isinstance(inp, nn.Embedding):
        _unsupported("input", inp)
    if not isinstance(out, nn.Linear):
        _unsupported("output", out)
    return inp, out


def _locate(model: nn.Module, target: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (parent, attribute) under which ``target`` is registered."""
    sites = []
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent.named_children():
            if child is target:
                sites.append((parent, child_name))
    # named_modules(remove_duplicate=False) still visits each parent once per path;
    # keep each (parent, attribute) once.
    unique, seen = [], set()
    for parent, child_name in sites:
        key = (id(parent), child_name)
        if key not in seen:
            seen.add(key)
            unique.append((parent, child_name))
    if not unique:
        raise TypeError(f"{type(target).__name__} returned by the model's accessor is not one of its submodules")
    return unique


def _unsupported(role: str, module: object) -> NoReturn:
    base_type = _WRAPPED[role]
    what = "input embedding" if role == "input" else "output head"
    raise TypeError(
        f"the model's {what} is a {type(module).__name__}; markovmem supports {base_type.__module__}."
        f"{base_type.__name__} there (Llama, Qwen2, GPT-2 and most decoder-only transformers)"
    )


def _model_n_base(model: nn.Module) -> int:
    """Number of base tokens: the rows of the (unexpanded) input and output matrices."""
    inp, out = _io_modules(model)
    n_in, n_out = int(inp.num_embeddings), int(out.out_features)
    if n_in != n_out:
        raise ValueError(
            f"the input embedding has {n_in} rows but the output head has {n_out}; "
            "markovmem needs one vocabulary for both"
        )
    return n_in


def _init_rows(weight: torch.Tensor, m: int, init: str, seed: int) -> torch.Tensor:
    """(m, d) initial rows in weight's dtype and device: 'mean', 'random' or 'zeros' of the base rows."""
    w = weight.detach().float()
    d = w.shape[1]
    if init == "zeros":
        rows = torch.zeros(m, d)
    elif init == "mean":
        rows = w.mean(0).cpu().expand(m, d).clone()
    elif init == "random":
        gen = torch.Generator().manual_seed(int(seed))
        rows = w.mean(0).cpu() + torch.randn(m, d, generator=gen) * w.std().cpu()
    else:
        raise ValueError(f"init is {init!r}; expected 'mean', 'random' or 'zeros'")
    return rows.to(device=weight.device, dtype=weight.dtype)


def _as_rows(values: Any, shape: tuple[int, ...], like: torch.Tensor, name: str) -> torch.Tensor:
    """``values`` (tensor or array) checked to ``shape`` and cast to ``like``'s dtype and device."""
    t = values if torch.is_tensor(values) else torch.as_tensor(np.asarray(values))
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must hold floating-point values; got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has non-finite entries")
    return t.detach().to(device=like.device, dtype=like.dtype)


class MarkovMemModel:
    """Controller of one expansion of a transformers model by new tokens.

    Attached to the model it expands (see :func:`get_expansion`); created by
    :func:`add_tokens`.  The model keeps its class and is used as before; its
    input embedding and output head are replaced by
    :class:`~markovmem.llm.NewTokenEmbeddingLayer` and
    :class:`~markovmem.llm.NewTokenOutputLayer`, which hold the new rows as
    separate parameters and never touch a base tensor.

    Attributes
    ----------
    config : MarkovMemConfig
        Tokens (in id order), block_output, tie_output, init.
    n_base : int
        Base vocabulary size; new token ``i`` has id ``n_base + i``.
    base_fingerprint : str
        :func:`base_fingerprint` of the model when the expansion was attached.
    alpha : scipy.sparse.csr_array or None
        (n_new, n_states) dictionary weights, when a fit produced the rows
        (kept for save_expansion).
    """

    def __init__(
        self,
        model: nn.Module,
        config: MarkovMemConfig,
        new_rows: torch.Tensor,
        new_output_rows: torch.Tensor | None = None,
        new_output_bias: torch.Tensor | None = None,
    ) -> None:
        if get_expansion(model) is not None:
            raise ValueError("model already carries a markovmem expansion; add tokens to it with add_tokens")
        self.n_base = _model_n_base(model)
        self.config = config
        self.alpha: Any = None
        tc = _text_config(model)
        self._vocab_size_before = getattr(tc, "vocab_size", None)
        self.base_fingerprint = base_fingerprint(model)
        inp, out = _io_modules(model)
        self.tied = inp.weight is out.weight
        self._model_ref = model
        self._sites: dict[str, list[tuple[nn.Module, str]]] = {
            "input": _locate(model, inp),
            "output": _locate(model, out),
        }
        self._originals = {"input": inp, "output": out}
        in_wrapper = NewTokenEmbeddingLayer(inp, new_rows)
        out_weight = self._output_rows(in_wrapper, out, new_output_rows)
        out_bias = None
        if new_output_bias is not None and not config.block_output:
            out_bias = nn.Parameter(_as_rows(new_output_bias, (in_wrapper.n_new,), out.weight, "output_bias"))
        out_wrapper = NewTokenOutputLayer(out, in_wrapper.n_new, config.block_output, out_weight, out_bias)
        self._input_layer, self._output_layer = in_wrapper, out_wrapper
        self._wrappers: dict[str, nn.Module] = {"input": in_wrapper, "output": out_wrapper}
        self._install("wrappers")
        object.__setattr__(model, _STATE_ATTR, self)

    # ------------------------------------------------------------------ wiring
    def _output_rows(
        self, in_wrapper: NewTokenEmbeddingLayer, out: nn.Linear, new_output_rows: torch.Tensor | None
    ) -> nn.Parameter | None:
        if self.config.block_output:
            return None
        if self.config.tie_output:
            # The paper's ET: the new tokens' output rows are their input rows (one parameter).
            return in_wrapper.new_weight
        return nn.Parameter(self._default_output_rows(in_wrapper.new_weight.detach(), out, new_output_rows))

    def _default_output_rows(self, input_rows: torch.Tensor, out: nn.Linear, rows: torch.Tensor | None) -> torch.Tensor:
        """Own output rows of new tokens: ``rows`` when given, else a copy of their input rows when the
        base ties its embeddings (the base model's own convention), else ``init`` over the base output rows."""
        m = int(input_rows.shape[0])
        if rows is None:
            if self.tied:
                rows = input_rows.clone()
            else:
                rows = _init_rows(out.weight, m, self.config.init, self.config.seed)
        return _as_rows(rows, (m, out.in_features), out.weight, "output_embeddings")

    def _install(self, which: str) -> None:
        for role in ("input", "output"):
            module = self._wrappers[role] if which == "wrappers" else self._originals[role]
            for parent, name in self._sites[role]:
                setattr(parent, name, module)
        tc = _text_config(self._model_ref)
        if self._vocab_size_before is not None:
            # transformers' loss and generation read config.vocab_size as the logits width.
            tc.vocab_size = self.n_base + self.n_new if which == "wrappers" else self._vocab_size_before

    # ------------------------------------------------------------------ views
    @property
    def model(self) -> nn.Module:
        """The expanded transformers model."""
        return self._model_ref

    @property
    def input_layer(self) -> NewTokenEmbeddingLayer:
        return self._input_layer

    @property
    def output_layer(self) -> NewTokenOutputLayer:
        return self._output_layer

    @property
    def n_new(self) -> int:
        return self.input_layer.n_new

    @property
    def tokens(self) -> list[str]:
        return list(self.config.tokens)

    @property
    def new_ids(self) -> list[int]:
        """Ids of the new tokens, ``n_base .. n_base + n_new - 1``."""
        return list(range(self.n_base, self.n_base + self.n_new))

    def new_parameters(self) -> list[nn.Parameter]:
        """The expansion's own parameters: new input rows, and when not blocked new output rows
        (unless tied to the input rows) and the new bias."""
        params: list[nn.Parameter] = [self.input_layer.new_weight]
        out = self.output_layer
        for p in (out.new_weight, out.new_bias):
            if p is not None and all(p is not q for q in params):
                params.append(p)
        return params

    def __repr__(self) -> str:
        return (
            f"MarkovMemModel(n_base={self.n_base}, tokens={self.tokens!r}, "
            f"block_output={self.config.block_output}, tie_output={self.config.tie_output}, tied={self.tied})"
        )

    # ------------------------------------------------------------------ changes
    def grow(
        self,
        tokens: Sequence[str],
        rows: torch.Tensor,
        output_rows: torch.Tensor | None = None,
        output_bias: torch.Tensor | None = None,
    ) -> None:
        """Append new tokens (input rows (m, d), optional own output rows (m, d) and bias (m,));
        earlier new rows keep their values, and the leak offset is kept."""
        inp = self.input_layer
        m = len(tokens)
        new_in = torch.cat([inp.new_weight.detach(), rows.to(inp.new_weight)], 0)
        inp.new_weight = nn.Parameter(new_in)
        self.config.tokens = list(self.config.tokens) + list(tokens)
        out = self.output_layer
        out.n_new = inp.n_new
        if not self.config.block_output:
            assert out.new_weight is not None and out.new_bias is not None  # __init__ set them when not blocked
            if self.config.tie_output:
                out.new_weight = inp.new_weight
            else:
                extra = self._default_output_rows(rows, out.base_layer, output_rows)
                out.new_weight = nn.Parameter(torch.cat([out.new_weight.detach(), extra.to(out.new_weight)], 0))
            bias = out.new_bias.new_zeros(m) if output_bias is None else output_bias.to(out.new_bias)
            out.new_bias = nn.Parameter(torch.cat([out.new_bias.detach(), bias]))
        self._install("wrappers")

    def detach(self) -> nn.Module:
        """Put the original modules and config.vocab_size back; the model is the base model again."""
        self._install("originals")
        model = self._model_ref
        if getattr(model, _STATE_ATTR, None) is self:
            object.__delattr__(model, _STATE_ATTR)
        return model

    @contextlib.contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """Context in which the model runs as the base model (originals swapped back in)."""
        self._install("originals")
        try:
            yield self._model_ref
        finally:
            self._install("wrappers")


def get_expansion(model: nn.Module) -> MarkovMemModel | None:
    """The :class:`MarkovMemModel` attached to ``model``, or None if it has no new tokens."""
    state = model.__dict__.get(_STATE_ATTR)
    return state if isinstance(state, MarkovMemModel) else None


def _require_expansion(model: nn.Module) -> MarkovMemModel:
    state = get_expansion(model)
    if state is None:
        raise ValueError("model has no markovmem expansion; add tokens with markovmem.llm.add_tokens first")
    return state


# ---------------------------------------------------------------------- fingerprints
def _base_named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every base parameter and buffer, named as in the unexpanded model."""
    state = get_expansion(model)
    skip: set[int] = set()
    renames: list[tuple[str, str]] = []
    if state is not None:
        # The expansion's own tensors: its parameters and the leak offset buffer.
        skip = {id(p) for p in state.new_parameters()} | {id(state.output_layer.leak_offset)}
        for name, module in model.named_modules():
            if module is state.input_layer or module is state.output_layer:
                renames.append((f"{name}.base_layer.", f"{name}."))
    out = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in skip:
            continue
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out.append((name, t))
    return out


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().reshape(-1)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if data.numel():
        # The tensor -> bytes copy: raw bits, so -0.0, NaN payloads and bf16 all count.
        h.update(data.view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def base_checksums(model: nn.Module) -> dict[str, str]:
    """blake2b digest (hex) of every base parameter and buffer, by its base-model name.

    New-token parameters are left out and wrapper names are mapped back
    (``lm_head.base_layer.weight`` -> ``lm_head.weight``), so an expanded model
    and its base give the same dict when no base tensor changed.  Tied weights
    appear once.
    """
    return {name: _tensor_digest(t) for name, t in _base_named_tensors(model)}


def base_fingerprint(model: nn.Module) -> str:
    """Content hash (32 hex digits) of every base tensor: dtype, shape and raw bytes.

    Equal for an expanded model and its base exactly when no base tensor
    changed, bit for bit.  Costs one pass over the weights (a device -> host copy).
    """
    return _fingerprint_of(base_checksums(model))


def _fingerprint_of(checksums: dict[str, str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, digest in sorted(checksums.items()):
        h.update(f"{name}={digest};".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------- tokenizer
def _tokenizer_ids(tokenizer: Any, tokens: Sequence[str]) -> list[int | None]:
    vocab = tokenizer.get_vocab()
    return [vocab.get(t) for t in tokens]


def _require_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None or not callable(getattr(tokenizer, "add_tokens", None)):
        raise TypeError(f"tokenizer must be a transformers tokenizer; got {type(tokenizer).__name__}")


def _prepare_tokenizer(
    tokenizer: Any, tokens: Sequence[str], first_id: int, n_base: int, pad: bool, expanded: bool
) -> bool:
    """Check ``tokenizer`` can give ``tokens`` ids ``first_id ..``; True if it already does."""
    _require_tokenizer(tokenizer)
    expected = list(range(first_id, first_id + len(tokens)))
    present = _tokenizer_ids(tokenizer, tokens)
    if present == expected and len(tokenizer) == first_id + len(tokens):
        return True
    for t, i in zip(tokens, present, strict=True):
        if i is not None:
            raise ValueError(f"token {t!r} is already in the tokenizer's vocabulary (id {i}); new tokens must be new")
    n_tok = len(tokenizer)
    if n_tok > first_id:
        raise ValueError(
            f"tokenizer has {n_tok} tokens but the model has rows for {first_id}; the tokenizer "
            "holds tokens the model cannot embed (pass the tokenizer that belongs to this model)"
        )
    if n_tok < first_id:
        if expanded or not pad:
            raise ValueError(
                f"tokenizer has {n_tok} tokens but the model has {first_id} rows, so new tokens would get "
                f"ids below n_base = {n_base}; use pad_tokenizer=True to name the unused rows first"
            )
        reserved = [RESERVED_TOKEN.format(i) for i in range(n_tok, first_id)]
        tokenizer.add_tokens(reserved, special_tokens=True)
        if len(tokenizer) != first_id:
            raise ValueError(
                f"could not pad the tokenizer to {first_id} tokens (it has {len(tokenizer)}); "
                "some reserved names clash with its vocabulary"
            )
    return False


@contextlib.contextmanager
def _tokenizer_transaction(tokenizer: Any) -> Iterator[None]:
    """Context that puts ``tokenizer`` back as it was if the block raises.

    Tokens added to a transformers tokenizer cannot be removed, so the state
    is copied on entry (``copy.deepcopy`` of the object's attributes, the
    backend tokenizer included) and swapped back on an exception.
    """
    _require_tokenizer(tokenizer)
    snapshot = copy.deepcopy(tokenizer.__dict__)
    try:
        yield
    except BaseException:
        tokenizer.__dict__.clear()
        tokenizer.__dict__.update(snapshot)
        raise


def _shadowed(tokenizer: Any, tokens: Sequence[str], n_base: int) -> list[tuple[str, int, str]]:
    """(new token, base id, base text) for each new token whose text occurs in a base token's text.

    Added tokens are matched in raw text before the tokenizer's model runs, so
    such a token would split every old text holding that piece differently
    (``"the"`` where the vocabulary holds ``"▁the"`` or ``"Ġthe"``, ``"ing"``
    inside ``"▁going"``): old ids stay valid, but old text no longer encodes
    to them.  Special and added tokens are left out (they never were text).
    """
    skip = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    skip |= {int(i) for i in tokenizer.get_added_vocab().values()}
    ids = [i for i in range(min(n_base, len(tokenizer))) if i not in skip]
    texts = tokenizer.batch_decode([[i] for i in ids]) if ids else []
    # One joined string: each token is one substring search in C, not one per base token.
    joined = "\x00".join(texts)
    starts = np.cumsum([0] + [len(t) + 1 for t in texts])
    found = []
    for t in tokens:
        at = joined.find(t)
        if at >= 0:
            k = int(np.searchsorted(starts, at, side="right") - 1)
            found.append((t, ids[k], texts[k]))
    return found


def _check_shadowing(tokenizer: Any, tokens: Sequence[str], n_base: int, allow: bool) -> None:
    hits = _shadowed(tokenizer, tokens, n_base)
    if not hits:
        return
    t, i, text = hits[0]
    message = (
        f"token {t!r} occurs in the text of the existing token {tokenizer.convert_ids_to_tokens(i)!r} "
        f"(id {i}, text {text!r}): once added, old text containing {t!r} encodes with the new id, so "
        "zero forgetting would hold on token ids but not on text"
        + (f" ({len(hits)} tokens shadow old ones: {[h[0] for h in hits[:5]]})" if len(hits) > 1 else "")
    )
    if not allow:
        raise ValueError(message + "; choose a new word, or pass allow_shadowing=True to add it anyway")
    warnings.warn(message, UserWarning, stacklevel=3)


# ---------------------------------------------------------------------- public API
def add_tokens(
    model: nn.Module,
    tokenizer: Any,
    tokens: Sequence[str],
    embeddings: Any = None,
    block_output: bool = True,
    *,
    init: str = "mean",
    output_embeddings: Any = None,
    output_bias: Any = None,
    tie_output: bool = False,
    pad_tokenizer: bool = True,
    seed: int = 0,
    allow_shadowing: bool = False,
) -> list[int]:
    """Add new tokens to a tokenizer and a transformers causal LM, in place, with zero forgetting.

    The base weights are never written: the input embedding and the output
    head are wrapped (see :class:`NewTokenEmbeddingLayer`,
    :class:`NewTokenOutputLayer`), the new input rows live in their own
    parameter, and the output head computes the base logits exactly as before
    and appends the new tokens' logits.  For any input of old tokens only, the
    logits over the old vocabulary are bitwise identical to the base model's,
    tied embeddings included.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM whose input embedding is an ``nn.Embedding`` and whose
        output head is an ``nn.Linear`` (Llama, Qwen2, GPT-2, ...).  It may
        already be expanded; the tokens are then appended.
    tokenizer : transformers tokenizer
        Receives the tokens (``tokenizer.add_tokens``); must have one entry per
        model row.  A padded vocabulary (more rows than tokens) is filled first
        with reserved special tokens when ``pad_tokenizer`` (see Notes).
    tokens : sequence of str
        New, distinct token strings not in the vocabulary (a list, not one
        string).  A token whose text occurs in an old token's text (``"the"``
        where the vocabulary holds ``"▁the"``) is refused: it would change
        how old text is tokenized.
    embeddings : (m, d) tensor or array, optional
        Their input rows (e.g. ``alpha_to_embeddings(model, alpha)``); cast to
        the embedding's dtype and device.  Default: ``init``.
    block_output : bool
        New tokens get logit ``-inf`` at every position (probability exactly 0),
        the paper's p(u|v) = 0.  False (generate mode) computes their logits
        ``h . w_u + b_u + leak_offset`` from output rows ``w_u`` and a bias
        ``b_u`` held in their own parameters, so the model can emit them; the old
        logits stay bitwise the base model's, and old text loses exactly
        ``-log(1 - leak)`` per position (see :func:`verify_no_forgetting`).
        Must match the existing expansion when appending.
    init : {'mean', 'random', 'zeros'}
        Initial rows when ``embeddings`` is None.
    output_embeddings : (m, d) tensor or array, optional
        Output rows when ``block_output`` is False and ``tie_output`` is False
        (e.g. a fitted output init).  Default: a copy of the new input rows when
        the base ties its embeddings, else ``init`` over the base output rows.
    output_bias : (m,) tensor or array, optional
        Bias of the new logits when ``block_output`` is False; default zeros.
        New tokens get a bias even when the base head has none.
    tie_output : bool
        With ``block_output=False``: the new output rows *are* the new input
        rows (one parameter; the paper's ET).  The default False gives the new
        tokens their own output rows even when the base model ties its
        embeddings (then the base rows stay tied and only the new ones are
        untied).  Must match the existing expansion when appending.
    pad_tokenizer : bool
        Allow filling a padded vocabulary with reserved tokens.
    seed : int
        Seed of ``init='random'``.
    allow_shadowing : bool
        Add tokens that shadow old ones anyway, with a UserWarning.

    Returns
    -------
    list of int
        The new ids, ``n_base + n_already_added + i``.

    Raises
    ------
    ValueError
        A token is empty, repeated, already in the vocabulary or shadows an
        old token; the tokenizer and the model disagree on the vocabulary
        size; a shape is wrong.  The model and the tokenizer are then unchanged.
    TypeError
        ``tokens`` is a string (not a sequence of strings) or holds a non-string;
        the model's embedding or head is not a supported layer type.

    Notes
    -----
    ``config.vocab_size`` becomes ``n_base + n_new`` (transformers reads it as
    the logits width); :func:`remove_expansion` restores it.  Tokens added to a
    tokenizer cannot be removed from it: reload the tokenizer to drop them.
    Reserved tokens ``<|markovmem_reserved_N|>`` name padding rows the
    tokenizer had no token for (e.g. Qwen2's 151,936 rows for 151,665 tokens);
    they never occur in text.
    """
    if isinstance(tokens, (str, bytes)):
        raise TypeError(
            f"tokens must be a sequence of strings; got the single string {tokens!r} "
            f"(pass [{tokens!r}] to add it as one token)"
        )
    state = get_expansion(model)
    config = MarkovMemConfig(
        tokens=list(tokens),
        block_output=block_output,
        tie_output=tie_output,
        init=init,
        pad_tokenizer=pad_tokenizer,
        seed=seed,
    )
    m = len(config.tokens)
    if m == 0:
        raise ValueError("tokens is empty; expected at least one new token")
    if state is not None:
        for name in ("block_output", "tie_output"):
            if getattr(state.config, name) != getattr(config, name):
                raise ValueError(
                    f"{name} is {getattr(config, name)} but the model's expansion has "
                    f"{name}={getattr(state.config, name)}; one expansion has one setting"
                )
        clash = sorted(set(state.tokens) & set(config.tokens))
        if clash:
            raise ValueError(f"tokens {clash} were already added to this model")
        n_base = state.n_base
        first_id = n_base + state.n_new
        emb_weight = state.input_layer.base_layer.weight
        out_layer = state.output_layer.base_layer
    else:
        n_base = _model_n_base(model)
        first_id = n_base
        inp, out_layer = _io_modules(model)
        emb_weight = inp.weight
    d = emb_weight.shape[1]
    rows = (
        _as_rows(embeddings, (m, d), emb_weight, "embeddings")
        if embeddings is not None
        else _init_rows(emb_weight, m, config.init, config.seed)
    )
    out_rows = out_bias = None
    if output_embeddings is not None:
        if config.block_output or config.tie_output:
            raise ValueError(
                "output_embeddings needs block_output=False and tie_output=False "
                "(blocked tokens have no output rows; tied ones use their input rows)"
            )
        out_rows = _as_rows(output_embeddings, (m, out_layer.in_features), out_layer.weight, "output_embeddings")
    if output_bias is not None:
        if config.block_output:
            raise ValueError("output_bias needs block_output=False (blocked tokens have no logits to shift)")
        out_bias = _as_rows(output_bias, (m,), out_layer.weight, "output_bias")
    with _tokenizer_transaction(tokenizer):
        already = _prepare_tokenizer(
            tokenizer, config.tokens, first_id, n_base, config.pad_tokenizer, state is not None
        )
        if not already:
            _check_shadowing(tokenizer, config.tokens, n_base, allow_shadowing)
            n_added = tokenizer.add_tokens(list(config.tokens))
            ids = _tokenizer_ids(tokenizer, config.tokens)
            expected = list(range(first_id, first_id + m))
            if n_added != m or ids != expected:
                raise RuntimeError(f"tokenizer gave the new tokens ids {ids}; expected {expected}")
        if state is None:
            MarkovMemModel(model, config, rows, out_rows, out_bias)
        else:
            state.grow(config.tokens, rows, out_rows, out_bias)
    return list(range(first_id, first_id + m))


def _positions(state: MarkovMemModel, ids: Sequence[int]) -> torch.Tensor:
    ids = as_ids(ids, "ids").tolist()
    lo, hi = state.n_base, state.n_base + state.n_new
    for k, i in enumerate(ids):
        if not lo <= i < hi:
            raise IndexError(f"ids[{k}] = {i} is not a new token id; expected one in [{lo}, {hi})")
    if len(set(ids)) != len(ids):
        raise ValueError("ids has repeated entries")
    return torch.tensor([i - lo for i in ids], dtype=torch.long)


def set_embeddings(
    model: nn.Module,
    ids: Sequence[int],
    embeddings: Any = None,
    *,
    output_embeddings: Any = None,
    output_bias: Any = None,
) -> None:
    """Overwrite the input rows, output rows or output bias of tokens already added (e.g. with E^T alpha).

    Every argument left None keeps its current values, so fitted output rows
    can be written alone: ``set_embeddings(model, ids, output_embeddings=rows,
    output_bias=bias)``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model expanded by :func:`add_tokens`.
    ids : sequence of int
        New-token ids (``>= n_base``), distinct.
    embeddings : (len(ids), d) tensor or array, optional
        Their input rows; cast to the embedding's dtype and device.  With
        ``tie_output`` these are the output rows too.
    output_embeddings : (len(ids), d) tensor or array, optional
        Their own output rows (``block_output=False``, ``tie_output=False``).
    output_bias : (len(ids),) tensor or array, optional
        Bias of their logits (``block_output=False``).

    Raises
    ------
    ValueError
        The model has no expansion, a shape is wrong, a value is not finite,
        or the expansion has no such rows (blocked, or output tied to input).
    IndexError
        An id is not one of the new tokens.
    """
    state = _require_expansion(model)
    pos = _positions(state, ids)
    layer, out = state.input_layer, state.output_layer
    writes: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, values): all checked before any write
    if embeddings is not None:
        writes.append(
            (layer.new_weight, _as_rows(embeddings, (len(pos), layer.embedding_dim), layer.new_weight, "embeddings"))
        )
    if output_embeddings is not None:
        if out.new_weight is None or state.config.tie_output:
            raise ValueError(
                "output_embeddings needs an expansion with its own output rows "
                "(block_output=False, tie_output=False); this one "
                + ("blocks its new tokens" if out.new_weight is None else "ties them to the input rows")
            )
        writes.append(
            (
                out.new_weight,
                _as_rows(output_embeddings, (len(pos), out.in_features), out.new_weight, "output_embeddings"),
            )
        )
    if output_bias is not None:
        if out.new_bias is None:
            raise ValueError("output_bias needs an expansion with block_output=False; this one blocks its new tokens")
        writes.append((out.new_bias, _as_rows(output_bias, (len(pos),), out.new_bias, "output_bias")))
    with torch.no_grad():
        for param, values in writes:
            param[pos.to(param.device)] = values


def alpha_to_embeddings(model: nn.Module, alpha: Any) -> torch.Tensor:
    """Embeddings ``E^T alpha``: each new token as a sparse combination of base input rows.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Expanded or not; ``E`` is its base input embedding matrix (n_base, d).
    alpha : (m, n) scipy sparse matrix, dense array, or an AlphaFit (its ``.alpha``)
        Dictionary weights over states, ``n >= n_base``; columns ``>= n_base``
        must be empty (a new token is a combination of base tokens only).

    Returns
    -------
    (m, d) tensor
        In the embedding's dtype and on its device.  Computed sparsely
        (gather of the nnz rows, float32 accumulation), never as a dense
        (m, n_base) product.

    Raises
    ------
    ValueError
        ``alpha`` is not 2-D, has fewer than n_base columns, weights a state
        ``>= n_base``, holds non-finite values, or gives a row that overflows
        the embedding dtype (the message names the rows).
    """
    import scipy.sparse as sp

    if hasattr(alpha, "alpha") and not isinstance(alpha, np.ndarray):
        alpha = alpha.alpha
    state = get_expansion(model)
    weight = state.input_layer.base_layer.weight if state is not None else _io_modules(model)[0].weight
    n_base = int(weight.shape[0])
    csr = sp.csr_array(alpha)
    if csr.ndim != 2:
        raise ValueError(f"alpha must be 2-D (m, n_states); got shape {csr.shape}")
    m, n = csr.shape
    if n < n_base:
        raise ValueError(f"alpha has shape {(m, n)}; expected at least n_base = {n_base} columns")
    csr.sum_duplicates()
    if csr.nnz and int(csr.indices.max()) >= n_base:
        r = int(np.searchsorted(csr.indptr, int(np.flatnonzero(csr.indices >= n_base)[0]), side="right") - 1)
        raise ValueError(f"alpha row {r} weights a state >= n_base = {n_base}; only base tokens have embeddings")
    if not np.all(np.isfinite(csr.data)):
        raise ValueError("alpha has non-finite weights")
    # The scipy -> torch copy: nnz column ids, weights and their row ids.
    rows = torch.from_numpy(np.repeat(np.arange(m, dtype=np.int64), np.diff(csr.indptr))).to(weight.device)
    cols = torch.from_numpy(csr.indices.astype(np.int64)).to(weight.device)
    with np.errstate(over="ignore"):  # weights beyond float32 become inf: caught below, by row
        vals = torch.from_numpy(csr.data.astype(np.float32)).to(weight.device)
    with torch.no_grad():
        gathered = weight.detach()[cols].float() * vals[:, None]
        out = torch.zeros(m, weight.shape[1], dtype=torch.float32, device=weight.device)
        out.index_add_(0, rows, gathered)
        out = out.to(weight.dtype)
    bad = torch.nonzero(~torch.isfinite(out).all(1)).reshape(-1).tolist()
    if bad:
        # A non-finite row would poison every logit after the token: refuse rather than warn.
        big = float(np.max(np.abs(csr.data))) if csr.nnz else 0.0
        raise ValueError(
            f"alpha rows {bad[:10]} give non-finite embeddings in {weight.dtype} (largest |weight| {big:.3g}); "
            "rescale alpha so E^T alpha fits the embedding dtype"
        )
    return out


def remove_expansion(model: nn.Module) -> nn.Module:
    """Take the new tokens out of the model: the original modules come back, bit for bit.

    The base tensors were never written, so the result is the base model
    exactly (same parameters, same state_dict keys, same ``config.vocab_size``).
    The tokenizer keeps the tokens: reload it to drop them.

    Returns
    -------
    The same model object, unexpanded.

    Raises
    ------
    ValueError
        The model has no expansion.
    """
    return _require_expansion(model).detach()
