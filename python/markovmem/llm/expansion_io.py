"""Expansion files (save_expansion / load_expansion): only what an expansion adds,
tied to the fingerprint of the base model it applies to, in safetensors; and
export_merged, a plain transformers checkpoint of the expanded model."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .._fileio import atomic_publish_dir, atomic_write
from ._stfile import content_fingerprint, parse, tensor_record
from .model import (
    _io_modules,
    _model_n_base,
    _require_expansion,
    _text_config,
    _tokenizer_transaction,
    add_tokens,
    base_fingerprint,
    get_expansion,
    remove_expansion,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["export_merged", "load_expansion", "save_expansion"]

_FORMAT = "markovmem-expansion"
#: Version 2 added the content fingerprint; version 1 files, written without one, still load.
#: Version 3 added tie_output and leak_offset (open expansions: own output rows, bias, gate);
#: older files infer tie_output (an unblocked file without output rows tied them) and offset 0.
_VERSION = "3"
_READABLE = ("1", "2", "3")
#: Metadata key of the content fingerprint (blake2b over every tensor and the other metadata).
_CONTENT_KEY = "content_fingerprint"
#: Tensors an expansion file may hold.
_TENSORS = {"input_rows", "ids", "output_rows", "output_bias", "alpha_indptr", "alpha_indices", "alpha_data"}


def _describe(model: nn.Module, n_base: int, weight: torch.Tensor) -> dict[str, Any]:
    tc = _text_config(model)
    return {
        "class": type(model).__name__,
        "model_type": getattr(tc, "model_type", ""),
        "n_base": int(n_base),
        "hidden_size": int(weight.shape[1]),
        "dtype": str(weight.dtype).replace("torch.", ""),
    }


def _alpha_csr(alpha: Any, m: int) -> Any:
    import scipy.sparse as sp

    if hasattr(alpha, "alpha") and not isinstance(alpha, np.ndarray):
        alpha = alpha.alpha
    csr = sp.csr_array(alpha)
    if csr.ndim != 2 or csr.shape[0] != m:
        raise ValueError(f"alpha has shape {csr.shape}; expected ({m}, n_states), one row per new token")
    csr.sum_duplicates()
    csr.sort_indices()
    return csr


def _expansion_tensors(state: Any, alpha: Any) -> tuple[dict[str, torch.Tensor], str]:
    inp, out = state.input_layer, state.output_layer
    tensors: dict[str, torch.Tensor] = {
        "input_rows": inp.new_weight.detach().cpu().contiguous(),
        "ids": torch.tensor(state.new_ids, dtype=torch.int64),
    }
    if not state.config.block_output and not state.config.tie_output:
        tensors["output_rows"] = out.new_weight.detach().cpu().contiguous()
    if out.new_bias is not None:
        tensors["output_bias"] = out.new_bias.detach().cpu().contiguous()
    alpha_shape = ""
    if alpha is not None:
        csr = _alpha_csr(alpha, state.n_new)
        tensors["alpha_indptr"] = torch.from_numpy(csr.indptr.astype(np.int64))
        tensors["alpha_indices"] = torch.from_numpy(csr.indices.astype(np.int64))
        tensors["alpha_data"] = torch.from_numpy(csr.data.astype(np.float64))
        alpha_shape = json.dumps([int(x) for x in csr.shape])
    return tensors, alpha_shape


def save_expansion(model: nn.Module, tokenizer: Any, path: str | os.PathLike[str], *, alpha: Any = None) -> None:
    """Write what the expansion adds to a safetensors file, atomically.

    Stored: the tokens and their ids, the new input rows (in the model's
    dtype); when not blocked, the new output rows (unless tied to the input
    rows), the output bias and the leak offset; the dictionary weights
    ``alpha`` when known, block_output, tie_output, the fingerprint and a
    description of the base model, and a content fingerprint over all of it
    (checked by :func:`load_expansion`).  Nothing of the base model itself.
    Loading the file onto the base model gives bitwise the same logits.

    The file is written under a unique temporary name next to ``path``,
    fsynced and renamed over it, so readers and concurrent writers see the
    old file or a whole new one; it gets the mode ``open()`` would give it.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        An expanded model.
    tokenizer : transformers tokenizer
        Checked to hold the tokens at their ids.
    path : path
        File to write (conventionally ``*.safetensors``).
    alpha : (m, n_states) sparse matrix or AlphaFit, optional
        Dictionary weights to store; default the ones :func:`learn_tokens`
        recorded on the expansion, if any.  Its entries must weight base
        states only and be finite.

    Raises
    ------
    ValueError
        No expansion, the tokenizer does not map the tokens to their ids, or
        ``alpha`` is malformed.
    """
    from safetensors.torch import save as to_bytes

    state = _require_expansion(model)
    vocab = tokenizer.get_vocab()
    for t, i in zip(state.tokens, state.new_ids, strict=True):
        if vocab.get(t) != i:
            raise ValueError(f"tokenizer maps {t!r} to {vocab.get(t)}; the expansion gave it id {i}")
    alpha = alpha if alpha is not None else state.alpha
    tensors, alpha_shape = _expansion_tensors(state, alpha)
    if alpha is not None:
        _check_alpha(
            {k: v for k, v in tensors.items() if k.startswith("alpha_")},
            json.loads(alpha_shape),
            state.n_new,
            state.n_base,
            "alpha",
        )
    from .. import __version__

    metadata = {
        "format": _FORMAT,
        "version": _VERSION,
        "markovmem_version": str(__version__),
        "tokens": json.dumps(state.tokens, ensure_ascii=False),
        "n_base": str(state.n_base),
        "block_output": json.dumps(state.config.block_output),
        "tie_output": json.dumps(state.config.tie_output),
        # repr of a float round-trips exactly through JSON; the buffer is float32, so its value is too.
        "leak_offset": json.dumps(float(state.output_layer.leak_offset)),
        "tied": json.dumps(state.tied),
        "base_fingerprint": state.base_fingerprint,
        "base_model": json.dumps(_describe(model, state.n_base, state.input_layer.base_layer.weight)),
        "alpha_shape": alpha_shape,
    }
    records = [(name, tensor_record(t)) for name, t in tensors.items()]
    metadata[_CONTENT_KEY] = content_fingerprint(records, metadata, _CONTENT_KEY)
    atomic_write(path, to_bytes(tensors, metadata=metadata))


# ---------------------------------------------------------------------- reading
def _json_field(meta: dict[str, str], key: str, where: str) -> Any:
    if key not in meta:
        raise ValueError(f"{where} lacks the metadata field {key!r}")
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{where}: metadata field {key!r} is not valid JSON ({exc})") from exc


def _bool_field(meta: dict[str, str], key: str, where: str) -> bool:
    value = _json_field(meta, key, where)
    if not isinstance(value, bool):
        # A corrupt file, not a wrong argument: ValueError like every other corruption.
        raise ValueError(f"{where}: metadata field {key!r} is {meta[key]!r:.50}; expected true or false")  # noqa: TRY004
    return value


def _tensor(
    tensors: dict[str, torch.Tensor],
    key: str,
    where: str,
    shape: tuple[int | None, ...],
    kinds: tuple[torch.dtype, ...],
) -> torch.Tensor:
    """``tensors[key]`` checked to a dtype in ``kinds`` and ``shape`` (None: any size), finite if floating."""
    if key not in tensors:
        raise ValueError(f"{where} lacks the tensor {key!r}")
    t = tensors[key]
    if t.dtype not in kinds:
        raise ValueError(f"{where}: tensor {key!r} has dtype {t.dtype}; expected {' or '.join(map(str, kinds))}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape, strict=False)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}; expected {want}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = torch.nonzero(~torch.isfinite(t))[0].tolist()
        raise ValueError(f"{where}: tensor {key!r} has a non-finite entry at {tuple(bad)}")
    return t


_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check_alpha(parts: dict[str, torch.Tensor], shape: Any, m: int, n_base: int, where: str) -> None:
    """The CSR parts of alpha: (m, n) with n >= n_base, indptr from 0 to nnz and non-decreasing,
    column ids in [0, n_base) strictly increasing within each row, finite float64 data."""
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
    ):
        raise ValueError(f"{where}: alpha_shape is {shape!r:.80}; expected [m, n_states]")
    if shape[0] != m or not n_base <= shape[1] < 2**62:
        raise ValueError(
            f"{where}: alpha_shape is {tuple(shape)}; expected ({m}, n_states) with n_states >= n_base = {n_base}"
        )
    indptr = _tensor(parts, "alpha_indptr", where, (m + 1,), (torch.int64,)).numpy()
    indices = _tensor(parts, "alpha_indices", where, (None,), (torch.int64,)).numpy()
    _tensor(parts, "alpha_data", where, (indices.size,), (torch.float64,))
    if indptr[0] != 0 or indptr[-1] != indices.size:
        raise ValueError(
            f"{where}: alpha_indptr runs from {indptr[0]} to {indptr[-1]}; expected 0 to nnz = {indices.size}"
        )
    if np.any(np.diff(indptr) < 0):
        r = int(np.flatnonzero(np.diff(indptr) < 0)[0])
        raise ValueError(f"{where}: alpha_indptr decreases at row {r}")
    if indices.size:
        bad = (indices < 0) | (indices >= n_base)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}: alpha_indices[{k}] = {int(indices[k])} is outside [0, n_base = {n_base})")
        # Within a row the column ids strictly increase; a row start may step down.
        rises = np.diff(indices) > 0
        rises[indptr[1:-1][(indptr[1:-1] > 0) & (indptr[1:-1] < indices.size)] - 1] = True
        if not rises.all():
            k = int(np.flatnonzero(~rises)[0]) + 1
            raise ValueError(
                f"{where}: alpha_indices[{k}] = {int(indices[k])} does not increase within its row "
                "(expected sorted, distinct column ids)"
            )


def _tokens_field(meta: dict[str, str], m: int, where: str) -> list[str]:
    tokens = _json_field(meta, "tokens", where)
    if not isinstance(tokens, list) or len(tokens) != m:
        raise ValueError(
            f"{where}: metadata field 'tokens' must be a list of {m} strings (one per input row); "
            f"got {meta['tokens']!r:.80}"
        )
    seen: set[str] = set()
    for i, t in enumerate(tokens):
        if not isinstance(t, str) or not t:
            raise ValueError(f"{where}: tokens[{i}] is {t!r:.50}; expected a non-empty string")
        if t in seen:
            raise ValueError(f"{where}: tokens[{i}] = {t!r} appears twice")
        seen.add(t)
    return tokens


class _Expansion:
    """An expansion file read and checked in full, before anything is applied."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        where = repr(str(path))
        if not path.exists():
            raise FileNotFoundError(f"no expansion file at {where}")
        st = parse(path.read_bytes(), where)
        meta, tensors = st.metadata, st.tensors
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{where} is not a markovmem expansion file (format {meta.get('format')!r:.50})")
        version = meta.get("version")
        if version not in _READABLE:
            raise ValueError(f"{where} has expansion format version {version!r:.20}; expected one of {_READABLE}")
        if version != "1" or _CONTENT_KEY in meta:
            stored = meta.get(_CONTENT_KEY)
            if stored is None:
                raise ValueError(
                    f"{where} lacks the metadata field {_CONTENT_KEY!r} (version {version} files carry it)"
                )
            if content_fingerprint(st.records.items(), meta, _CONTENT_KEY) != stored:
                raise ValueError(
                    f"{where} is corrupt: its content does not match its fingerprint {stored!r:.40} "
                    "(changed bytes in the rows, alpha or metadata)"
                )
        unknown = sorted(set(tensors) - _TENSORS)
        if unknown:
            raise ValueError(f"{where} holds unknown tensors {unknown[:5]}; expected some of {sorted(_TENSORS)}")
        rows = _tensor(tensors, "input_rows", where, (None, None), _FLOATS)
        m, d = (int(x) for x in rows.shape)
        if m < 1 or d < 1:
            raise ValueError(f"{where}: tensor 'input_rows' has shape {(m, d)}; expected at least one row and column")
        n_base_text = meta.get("n_base", "")
        if not (n_base_text.isascii() and n_base_text.isdigit()) or not 1 <= int(n_base_text) < 2**62:
            raise ValueError(f"{where}: metadata field 'n_base' is {n_base_text!r:.30}; expected a positive integer")
        self.n_base = int(n_base_text)
        self.tokens = _tokens_field(meta, m, where)
        ids = _tensor(tensors, "ids", where, (m,), (torch.int64,))
        expected = torch.arange(self.n_base, self.n_base + m, dtype=torch.int64)
        if not torch.equal(ids, expected):
            raise ValueError(
                f"{where}: tensor 'ids' is {ids.tolist()[:8]}; expected n_base + 0 .. m - 1 = {expected.tolist()[:8]}"
            )
        self.block_output = _bool_field(meta, "block_output", where)
        self.tied = _bool_field(meta, "tied", where) if "tied" in meta else None
        self.output_rows = None
        if "output_rows" in tensors:
            if self.block_output:
                raise ValueError(f"{where} holds 'output_rows' but block_output is true (blocked tokens have none)")
            self.output_rows = _tensor(tensors, "output_rows", where, (m, None), _FLOATS)
        self.output_bias = _tensor(tensors, "output_bias", where, (m,), _FLOATS) if "output_bias" in tensors else None
        self._read_open_fields(meta, version, where)
        self.alpha = None
        alpha_shape = meta.get("alpha_shape", "")
        parts = {k: v for k, v in tensors.items() if k.startswith("alpha_")}
        if alpha_shape or parts:
            shape: Any = _json_field(meta, "alpha_shape", where) if alpha_shape else None
            _check_alpha(parts, shape, m, self.n_base, where)  # refuses a missing shape
            import scipy.sparse as sp

            self.alpha = sp.csr_array(
                (parts["alpha_data"].numpy(), parts["alpha_indices"].numpy(), parts["alpha_indptr"].numpy()),
                shape=tuple(shape),
            )
        stored = meta.get("base_model", "{}")
        try:
            self.base_model = json.loads(stored)
        except (ValueError, RecursionError):
            self.base_model = stored
        self.base_fingerprint = meta.get("base_fingerprint")
        self.rows = rows
        self.metadata = meta
        self.tensors = tensors
        self.where = where

    def _read_open_fields(self, meta: dict[str, str], version: str, where: str) -> None:
        """tie_output and leak_offset, checked against block_output and the output tensors."""
        if version in ("1", "2"):
            # Before version 3 an unblocked file without output rows tied them to the input rows.
            self.tie_output = not self.block_output and self.output_rows is None
            self.leak_offset = 0.0
        else:
            self.tie_output = _bool_field(meta, "tie_output", where)
            offset = _json_field(meta, "leak_offset", where)
            if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
                raise ValueError(
                    f"{where}: metadata field 'leak_offset' is {meta['leak_offset']!r:.50}; expected a finite number"
                )
            self.leak_offset = float(offset)
        if self.block_output:
            if self.tie_output or self.output_bias is not None or self.leak_offset != 0.0:
                raise ValueError(
                    f"{where} has block_output true but tie_output, 'output_bias' or a leak_offset "
                    "(blocked tokens have no output rows, bias or offset)"
                )
        elif self.tie_output and self.output_rows is not None:
            raise ValueError(f"{where} holds 'output_rows' but tie_output is true (tied tokens use their input rows)")
        elif not self.tie_output and self.output_rows is None:
            raise ValueError(f"{where} lacks the tensor 'output_rows' (block_output and tie_output are false)")


def read_expansion(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of an expansion file, after checking all of it (see load_expansion)."""
    exp = _Expansion(path)
    return exp.tensors, exp.metadata


def load_expansion(
    base_model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike[str],
    *,
    check_base: bool = True,
    allow_shadowing: bool = False,
) -> list[int]:
    """Re-apply an expansion file to its base model (and tokenizer), in place, all or nothing.

    The whole file is read and checked before the model or the tokenizer is
    touched: the safetensors header (sizes, offsets, dtypes, shapes), each
    tensor's dtype, shape and finiteness, the CSR parts of ``alpha``
    (indptr from 0 to nnz and non-decreasing, column ids below n_base and
    increasing within each row), the ids (``n_base .. n_base + m - 1``), the
    tokens (distinct non-empty strings, one per row), and the content
    fingerprint (over every tensor and the metadata).  Files of format
    version 1, written before the content fingerprint existed, carry none and
    load with every other check.  If applying still fails, the model and the
    tokenizer are put back as they were.

    Parameters
    ----------
    base_model : transformers.PreTrainedModel
        The base model the expansion was made for, unexpanded.
    tokenizer : transformers tokenizer
        Its tokenizer; receives the tokens (a tokenizer that already holds them
        at the same ids, e.g. one saved after the expansion, is accepted as is).
    path : path
        A file written by :func:`save_expansion`.
    check_base : bool
        Refuse a base model whose fingerprint differs from the stored one (any
        changed bit, dtype or shape).  False only checks the vocabulary size
        and width; zero forgetting still holds structurally, but the rows were
        fitted for another model.
    allow_shadowing : bool
        Passed to :func:`add_tokens`: accept tokens that shadow old words.

    Returns
    -------
    list of int
        The new ids (as when saved).

    Raises
    ------
    ValueError
        Not an expansion file, a corrupt or inconsistent one (the message
        names the file and the field), a different base model, or an already
        expanded model.
    FileNotFoundError
        No file at ``path``.
    """
    exp = _Expansion(path)
    where = exp.where
    if get_expansion(base_model) is not None:
        raise ValueError("base_model already carries an expansion; call remove_expansion(model) first")
    n_base = _model_n_base(base_model)
    here = _describe(base_model, n_base, _io_modules(base_model)[0].weight)
    if check_base:
        fp = base_fingerprint(base_model)
        if fp != exp.base_fingerprint:
            raise ValueError(
                f"{where} was made for another base model (fingerprint {exp.base_fingerprint!r:.40}, "
                f"{exp.base_model!r:.300}); this one is {fp}, {here}. Load the exact base model, or pass "
                "check_base=False"
            )
    if exp.n_base != n_base or int(exp.rows.shape[1]) != here["hidden_size"]:
        raise ValueError(
            f"{where} needs n_base = {exp.n_base} and width {exp.rows.shape[1]}; "
            f"this model has {n_base} and {here['hidden_size']}"
        )
    out_features = _io_modules(base_model)[1].in_features
    if exp.output_rows is not None and exp.output_rows.shape[1] != out_features:
        raise ValueError(
            f"{where}: tensor 'output_rows' has width {exp.output_rows.shape[1]}; the model's output "
            f"head takes {out_features}"
        )
    with _tokenizer_transaction(tokenizer):
        ids = add_tokens(
            base_model,
            tokenizer,
            exp.tokens,
            embeddings=exp.rows,
            block_output=exp.block_output,
            output_embeddings=exp.output_rows,
            output_bias=exp.output_bias,
            tie_output=exp.tie_output,
            allow_shadowing=allow_shadowing,
        )
        try:
            state = _require_expansion(base_model)
            with torch.no_grad():
                state.output_layer.leak_offset.fill_(exp.leak_offset)
            state.alpha = exp.alpha
        except BaseException:
            remove_expansion(base_model)
            raise
    return ids


def _merged_module(
    original: nn.Embedding | nn.Linear, weight: nn.Parameter, bias: nn.Parameter | None = None
) -> nn.Module:
    """A copy of an Embedding/Linear (same class, same settings) over new parameters."""
    merged = copy.copy(original)
    # copy.copy shares the parameter dict: give the copy its own before assigning.
    merged._parameters = dict(original._parameters)
    merged.weight = weight
    if isinstance(merged, nn.Embedding):
        merged.num_embeddings = int(weight.shape[0])
    elif isinstance(merged, nn.Linear):
        merged.out_features = int(weight.shape[0])
        if bias is not None:
            merged.bias = bias
    return merged


def _sequence_bias_list(value: Any) -> list[list[Any]]:
    """A generation config's ``sequence_bias`` (dict of id tuples, or the list form) as the JSON-able
    list form ``[[[ids...], bias], ...]`` that transformers' SequenceBiasLogitsProcessor also reads."""
    if not value:
        return []
    items = value.items() if isinstance(value, dict) else value
    return [[[int(i) for i in ids], float(bias)] for ids, bias in items]


def export_merged(
    model: PreTrainedModel,
    tokenizer: Any,
    path: str | os.PathLike[str],
    *,
    suppress_new_tokens: bool | None = None,
    **save_kwargs: Any,
) -> Path:
    """Save the expanded model as a plain transformers checkpoint (``save_pretrained``).

    The input embedding and the output head become ordinary matrices of
    ``n_base + m`` rows, so any transformers code loads the directory with
    ``from_pretrained``, no markovmem needed.  The model object itself is not
    changed (the merged modules exist only while saving).

    What a merged export cannot enforce, unlike the expansion it comes from:

    - **Bitwise old logits.** The output matmul is now ``n_base + m`` wide; a
      different GEMM shape may round old logits differently in the last bits.
      They stay equal up to floating-point rounding, not bit for bit.
    - **p(u|v) = 0.** A checkpoint cannot hold ``-inf`` logits.  With tied
      embeddings the new tokens' output rows are their input rows, so they get
      the finite logit ``h . e_u``; untied models get zero output rows (logit 0
      plus bias).  ``generation_config.suppress_tokens`` lists the new ids when
      ``suppress_new_tokens`` (default: the expansion's block_output), so
      ``generate()`` never emits them, but ``forward()`` and other decoders do
      give them probability.
    - **The new tokens' bias and leak offset in forward().** In the open mode
      (``block_output=False``) the new output rows become the last rows of
      ``lm_head`` (a base model that ties its embeddings is untied in the
      exported config, with its own ``lm_head.weight``, when the new output
      rows differ from the new input rows).  A head with a bias takes
      ``new_bias + leak_offset`` into it.  Most heads (Llama, Qwen2, GPT-2)
      have none; ``new_bias + leak_offset`` then goes to
      ``generation_config.sequence_bias`` as ``[[[id], value], ...]``, which
      transformers' ``generate()`` adds to the float32 scores of each step
      (``SequenceBiasLogitsProcessor``), so greedy and sampled generation see
      the expansion's logits, up to rounding.  A plain ``forward()`` of the
      exported model (and any decoder that ignores the generation config) does
      not add it: its new logits are ``h . w_u`` only, without the per-token
      bias and the gate.
    - **Reversibility and certification.** The base rows are the first
      ``n_base`` rows, but nothing records or checks that; the base fingerprint
      is not in the checkpoint.

    To keep every guarantee, ship the base model plus the expansion file
    (:func:`save_expansion`) and apply it with :func:`load_expansion`.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        An expanded model.
    tokenizer : transformers tokenizer
        Saved next to the model (it holds the new tokens).
    path : path
        Output directory.  Written under a temporary name next to it, fsynced,
        then renamed into place, so it is either the old directory or the
        whole export.  An existing directory is replaced only when the export
        rewrites every entry in it (a previous export); otherwise
        FileExistsError.
    suppress_new_tokens : bool, optional
        Put the new ids in ``generation_config.suppress_tokens``.
    **save_kwargs
        Passed to ``model.save_pretrained``.

    Returns
    -------
    pathlib.Path
        The directory.
    """
    state = _require_expansion(model)
    if suppress_new_tokens is None:
        suppress_new_tokens = state.config.block_output
    path = Path(path)
    inp, out = state.input_layer, state.output_layer
    with torch.no_grad():
        w_in = nn.Parameter(
            torch.cat([inp.base_layer.weight.detach(), inp.new_weight.detach()], 0), requires_grad=False
        )
        # Tied export when the base ties and the new output rows are (bitwise) the new input rows.
        untie = state.tied and out.new_weight is not None and not torch.equal(out.new_weight, inp.new_weight)
        if state.tied and not untie:
            w_out = w_in
        else:
            rows = out.new_weight.detach() if out.new_weight is not None else torch.zeros_like(inp.new_weight)
            w_out = nn.Parameter(
                torch.cat([out.base_layer.weight.detach(), rows.to(out.base_layer.weight)], 0), requires_grad=False
            )
        # new_bias + leak_offset, as the expansion adds them (float32).
        shift = None
        if out.new_bias is not None:
            shift = out.new_bias.detach().float() + out.leak_offset.float()
        b_out = None
        if out.base_layer.bias is not None:
            extra = shift if shift is not None else torch.zeros(state.n_new)
            b_out = nn.Parameter(
                torch.cat([out.base_layer.bias.detach(), extra.to(out.base_layer.bias)]), requires_grad=False
            )
    merged = {"input": _merged_module(inp.base_layer, w_in), "output": _merged_module(out.base_layer, w_out, b_out)}
    gen = getattr(model, "generation_config", None)
    old_suppress = getattr(gen, "suppress_tokens", None) if gen is not None else None
    old_sequence_bias = getattr(gen, "sequence_bias", None) if gen is not None else None
    sequence_bias = None
    if shift is not None and b_out is None:
        sequence_bias = _sequence_bias_list(old_sequence_bias)
        sequence_bias += [[[i], float(v)] for i, v in zip(state.new_ids, shift.tolist(), strict=True) if v != 0.0]
    configs = [c for c in {id(c): c for c in (model.config, _text_config(model))}.values()]
    old_tie = [getattr(c, "tie_word_embeddings", None) for c in configs]

    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp), **save_kwargs)
        tokenizer.save_pretrained(str(tmp))

    with state.disabled():
        try:
            for role in ("input", "output"):
                for parent, name in state._sites[role]:
                    setattr(parent, name, merged[role])
            _text_config(model).vocab_size = state.n_base + state.n_new
            if untie:
                for c in configs:
                    c.tie_word_embeddings = False
            if gen is not None and suppress_new_tokens:
                gen.suppress_tokens = sorted(set(old_suppress or []) | set(state.new_ids))
            if gen is not None and sequence_bias:
                gen.sequence_bias = sequence_bias
            atomic_publish_dir(path, fill)
        finally:
            for c, tie in zip(configs, old_tie, strict=True):
                if tie is not None:
                    c.tie_word_embeddings = tie
            if gen is not None:
                gen.suppress_tokens = old_suppress
                gen.sequence_bias = old_sequence_bias
            for role in ("input", "output"):
                for parent, name in state._sites[role]:
                    setattr(parent, name, state._originals[role])
    return path
