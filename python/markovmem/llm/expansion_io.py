"""Expansion files (save_expansion / load_expansion): only what an expansion adds,
tied to the fingerprint of the base model it applies to, in safetensors; and
export_merged, a plain transformers checkpoint of the expanded model."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .model import (
    _io_modules,
    _model_n_base,
    _require_expansion,
    _text_config,
    add_tokens,
    base_fingerprint,
    get_expansion,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["export_merged", "load_expansion", "save_expansion"]

_FORMAT = "markovmem-expansion"
_VERSION = "1"


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


def save_expansion(model: nn.Module, tokenizer: Any, path: str | os.PathLike[str], *, alpha: Any = None) -> None:
    """Write what the expansion adds to a safetensors file (atomically).

    Stored: the tokens and their ids, the new input rows (in the model's
    dtype), the new output rows when not blocked and untied, the dictionary
    weights ``alpha`` when known, block_output, and the fingerprint and a
    description of the base model.  Nothing of the base model itself.

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
        recorded on the expansion, if any.

    Raises
    ------
    ValueError
        No expansion, or the tokenizer does not map the tokens to their ids.
    """
    from safetensors.torch import save_file

    state = _require_expansion(model)
    vocab = tokenizer.get_vocab()
    for t, i in zip(state.tokens, state.new_ids, strict=True):
        if vocab.get(t) != i:
            raise ValueError(f"tokenizer maps {t!r} to {vocab.get(t)}; the expansion gave it id {i}")
    inp, out = state.input_layer, state.output_layer
    tensors: dict[str, torch.Tensor] = {
        "input_rows": inp.new_weight.detach().cpu().contiguous(),
        "ids": torch.tensor(state.new_ids, dtype=torch.int64),
    }
    if out.new_weight is not None and not state.tied:  # own output rows: neither blocked nor tied
        tensors["output_rows"] = out.new_weight.detach().cpu().contiguous()
    if out.new_bias is not None:
        tensors["output_bias"] = out.new_bias.detach().cpu().contiguous()
    alpha = alpha if alpha is not None else state.alpha
    alpha_shape = ""
    if alpha is not None:
        csr = _alpha_csr(alpha, state.n_new)
        tensors["alpha_indptr"] = torch.from_numpy(csr.indptr.astype(np.int64))
        tensors["alpha_indices"] = torch.from_numpy(csr.indices.astype(np.int64))
        tensors["alpha_data"] = torch.from_numpy(csr.data.astype(np.float64))
        alpha_shape = json.dumps([int(x) for x in csr.shape])
    from .. import __version__

    metadata = {
        "format": _FORMAT,
        "version": _VERSION,
        "markovmem_version": str(__version__),
        "tokens": json.dumps(state.tokens, ensure_ascii=False),
        "n_base": str(state.n_base),
        "block_output": json.dumps(state.config.block_output),
        "tied": json.dumps(state.tied),
        "base_fingerprint": state.base_fingerprint,
        "base_model": json.dumps(_describe(model, state.n_base, inp.base_layer.weight)),
        "alpha_shape": alpha_shape,
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_expansion(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of an expansion file, after checking its format."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no expansion file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys() and no __iter__
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{str(path)!r} is not a safetensors file: {exc}") from exc
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{str(path)!r} is not a markovmem expansion file (format {meta.get('format')!r})")
    if meta.get("version") != _VERSION:
        raise ValueError(f"{str(path)!r} has expansion format version {meta.get('version')!r}; expected {_VERSION}")
    for key in ("input_rows", "ids"):
        if key not in tensors:
            raise ValueError(f"{str(path)!r} lacks the tensor {key!r}")
    return tensors, meta


def load_expansion(base_model: nn.Module, tokenizer: Any, path: str | os.PathLike[str], *,
                   check_base: bool = True) -> list[int]:
    """Re-apply an expansion file to its base model (and tokenizer), in place.

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

    Returns
    -------
    list of int
        The new ids (as when saved).

    Raises
    ------
    ValueError
        Not an expansion file, a different base model, or an already expanded model.
    FileNotFoundError
        No file at ``path``.
    """
    tensors, meta = read_expansion(path)
    if get_expansion(base_model) is not None:
        raise ValueError("base_model already carries an expansion; call remove_expansion(model) first")
    tokens = json.loads(meta["tokens"])
    n_base = _model_n_base(base_model)
    stored = json.loads(meta.get("base_model", "{}"))
    here = _describe(base_model, n_base, _io_modules(base_model)[0].weight)
    if check_base:
        fp = base_fingerprint(base_model)
        if fp != meta.get("base_fingerprint"):
            raise ValueError(
                f"{str(path)!r} was made for another base model (fingerprint {meta.get('base_fingerprint')}, "
                f"{stored}); this one is {fp}, {here}. Load the exact base model, or pass check_base=False"
            )
    elif int(meta["n_base"]) != n_base or int(tensors["input_rows"].shape[1]) != here["hidden_size"]:
        raise ValueError(
            f"{str(path)!r} needs n_base = {meta['n_base']} and width {tensors['input_rows'].shape[1]}; "
            f"this model has {n_base} and {here['hidden_size']}"
        )
    ids = add_tokens(
        base_model, tokenizer, tokens, embeddings=tensors["input_rows"],
        block_output=json.loads(meta["block_output"]), output_embeddings=tensors.get("output_rows"),
    )
    if ids != tensors["ids"].tolist():
        from .model import remove_expansion

        remove_expansion(base_model)
        raise ValueError(f"the tokens got ids {ids}; the file records {tensors['ids'].tolist()}")
    state = _require_expansion(base_model)
    if "output_bias" in tensors and state.output_layer.new_bias is not None:
        with torch.no_grad():
            state.output_layer.new_bias.copy_(tensors["output_bias"])
    if meta.get("alpha_shape"):
        import scipy.sparse as sp

        shape = tuple(json.loads(meta["alpha_shape"]))
        state.alpha = sp.csr_array(
            (tensors["alpha_data"].numpy(), tensors["alpha_indices"].numpy(), tensors["alpha_indptr"].numpy()),
            shape=shape,
        )
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


def export_merged(model: PreTrainedModel, tokenizer: Any, path: str | os.PathLike[str], *,
                  suppress_new_tokens: bool | None = None, **save_kwargs: Any) -> Path:
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
        Output directory.
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
        w_in = nn.Parameter(torch.cat([inp.base_layer.weight.detach(), inp.new_weight.detach()], 0),
                            requires_grad=False)
        if state.tied:
            w_out = w_in
        else:
            rows = out.new_weight.detach() if out.new_weight is not None else torch.zeros_like(inp.new_weight)
            w_out = nn.Parameter(torch.cat([out.base_layer.weight.detach(), rows.to(out.base_layer.weight)], 0),
                                 requires_grad=False)
        b_out = None
        if out.base_layer.bias is not None:
            extra = out.new_bias.detach() if out.new_bias is not None else out.base_layer.bias.new_zeros(state.n_new)
            b_out = nn.Parameter(torch.cat([out.base_layer.bias.detach(), extra]), requires_grad=False)
    merged = {"input": _merged_module(inp.base_layer, w_in), "output": _merged_module(out.base_layer, w_out, b_out)}
    gen = getattr(model, "generation_config", None)
    old_suppress = getattr(gen, "suppress_tokens", None) if gen is not None else None
    with state.disabled():
        try:
            for role in ("input", "output"):
                for parent, name in state._sites[role]:
                    setattr(parent, name, merged[role])
            _text_config(model).vocab_size = state.n_base + state.n_new
            if gen is not None and suppress_new_tokens:
                gen.suppress_tokens = sorted(set(old_suppress or []) | set(state.new_ids))
            model.save_pretrained(str(path), **save_kwargs)
            tokenizer.save_pretrained(str(path))
        finally:
            if gen is not None:
                gen.suppress_tokens = old_suppress
            for role in ("input", "output"):
                for parent, name in state._sites[role]:
                    setattr(parent, name, state._originals[role])
    return path
