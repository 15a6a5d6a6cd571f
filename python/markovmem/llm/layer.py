"""The two modules that hold new tokens beside an untouched base model: an input
embedding wrapper (new rows in their own parameter) and an output-head wrapper
(base logits computed exactly as before, new tokens' logits appended)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NewTokenEmbeddingLayer", "NewTokenOutputLayer"]


class NewTokenEmbeddingLayer(nn.Module):
    """Input embedding of ``n_base`` base tokens plus ``n_new`` new ones.

    Ids below ``n_base`` are looked up by ``base_layer`` exactly as in the base
    model; ids ``n_base .. n_base + n_new - 1`` read row ``id - n_base`` of
    ``new_weight``.  The base weight is never written, so with tied input/output
    embeddings the output projection of the old tokens cannot change.

    Parameters
    ----------
    base_layer : torch.nn.Embedding
        The model's input embedding, kept as a submodule (``base_layer``).
    new_rows : (n_new, embedding_dim) tensor
        Initial rows of the new tokens; stored as the parameter ``new_weight``
        in the base weight's dtype and device.

    Notes
    -----
    Models that scale embeddings inside the module (an ``embed_scale``
    attribute, e.g. Gemma) get the same scale applied to the new rows.
    """

    def __init__(self, base_layer: nn.Embedding, new_rows: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"base_layer must be a torch.nn.Embedding; got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.n_base = int(base_layer.num_embeddings)
        w = base_layer.weight
        if new_rows.ndim != 2 or new_rows.shape[1] != w.shape[1]:
            raise ValueError(f"new_rows has shape {tuple(new_rows.shape)}; expected (n_new, {w.shape[1]})")
        self.new_weight = nn.Parameter(new_rows.detach().to(device=w.device, dtype=w.dtype).clone())

    @property
    def n_new(self) -> int:
        """Number of new tokens."""
        return int(self.new_weight.shape[0])

    @property
    def weight(self) -> torch.Tensor:
        """The base embedding matrix (n_base, d), for code that reads ``embeddings.weight``."""
        return self.base_layer.weight

    @property
    def embedding_dim(self) -> int:
        return int(self.base_layer.embedding_dim)

    @property
    def num_embeddings(self) -> int:
        """``n_base + n_new``: every id this layer accepts."""
        return self.n_base + self.n_new

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.n_base
        # Old ids go through the base module unchanged, and torch.where copies
        # those outputs bit for bit; new ids read a placeholder base row (0)
        # that is then discarded.
        base_out = self.base_layer(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        new_ids = torch.where(is_new, input_ids - self.n_base, torch.zeros_like(input_ids))
        new_out = F.embedding(new_ids, self.new_weight)
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is not None:
            new_out = new_out * (scale.to(new_out.dtype) if torch.is_tensor(scale) else scale)
        return torch.where(is_new.unsqueeze(-1), new_out.to(base_out.dtype), base_out)

    def extra_repr(self) -> str:
        return f"n_base={self.n_base}, n_new={self.n_new}"


class NewTokenOutputLayer(nn.Module):
    """Output head over ``n_base + n_new`` tokens that keeps the base logits bitwise.

    The base logits come from ``base_layer`` with the same weight and the same
    matmul shape as in the base model (a bigger output matrix could change GEMM
    blocking, hence the last bits of old logits); the ``n_new`` new columns are
    appended: ``-inf`` when ``block_output`` (probability exactly 0), else
    :meth:`new_logits`, ``hidden @ new_weight.T + new_bias + leak_offset``.

    Because the old logits and the hidden states are the base model's, the
    distribution over old tokens after any context is the base one scaled by
    ``1 - leak``, with ``leak = p(new tokens | context)``.

    Parameters
    ----------
    base_layer : torch.nn.Linear
        The model's output projection (lm_head), kept as ``base_layer``.
    n_new : int
        Number of new tokens.
    block_output : bool
        Append ``-inf`` logits instead of computing them.
    new_weight : torch.nn.Parameter, optional
        (n_new, d) output rows when not blocked.  Pass the embedding layer's
        ``new_weight`` to tie them to the new input rows.
    new_bias : torch.nn.Parameter, optional
        (n_new,) bias of the new logits when not blocked; zeros by default.  A
        new token has a bias even when the base head has none.

    Attributes
    ----------
    leak_offset : torch.Tensor
        Scalar float32 buffer (not persistent) added to every new logit; 0 by
        default, set by :func:`markovmem.llm.leak.calibrate_leak` to hold the
        leak under a bound.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        n_new: int,
        block_output: bool = True,
        new_weight: nn.Parameter | None = None,
        new_bias: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be a torch.nn.Linear; got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.n_base = int(base_layer.out_features)
        self.n_new = int(n_new)
        self.block_output = bool(block_output)
        w = base_layer.weight
        self.leak_offset: torch.Tensor
        self.register_buffer("leak_offset", torch.zeros((), dtype=torch.float32, device=w.device), persistent=False)
        self.new_weight: nn.Parameter | None
        self.new_bias: nn.Parameter | None
        if self.block_output:
            self.new_weight = None
            self.new_bias = None
        else:
            if new_weight is None or tuple(new_weight.shape) != (self.n_new, base_layer.in_features):
                got = None if new_weight is None else tuple(new_weight.shape)
                raise ValueError(f"new_weight is {got}; expected shape ({self.n_new}, {base_layer.in_features})")
            self.new_weight = new_weight
            if new_bias is None:
                new_bias = nn.Parameter(w.new_zeros(self.n_new))
            elif tuple(new_bias.shape) != (self.n_new,):
                raise ValueError(f"new_bias has shape {tuple(new_bias.shape)}; expected ({self.n_new},)")
            self.new_bias = new_bias

    @property
    def weight(self) -> torch.Tensor:
        """The base output matrix (n_base, d)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return int(self.base_layer.in_features)

    @property
    def out_features(self) -> int:
        """``n_base + n_new``: the width of the logits this layer returns."""
        return self.n_base + self.n_new

    def new_logits(self, hidden: torch.Tensor, offset: torch.Tensor | float | None = None) -> torch.Tensor:
        """The new tokens' logits (..., n_new) in ``hidden``'s dtype, as :meth:`forward` appends them.

        ``hidden @ new_weight.T + new_bias`` in ``hidden``'s dtype, then the
        offset added in float32 (or wider) and the sum rounded back once.  ``offset``
        (default: the ``leak_offset`` buffer) lets the leak gate evaluate a
        candidate offset with exactly the arithmetic of the forward pass.
        """
        if self.new_weight is None or self.new_bias is None:
            return hidden.new_full((*hidden.shape[:-1], self.n_new), float("-inf"))
        extra = F.linear(hidden, self.new_weight.to(hidden.dtype), self.new_bias.to(hidden.dtype))
        off = self.leak_offset if offset is None else torch.as_tensor(offset, dtype=torch.float32)
        # Widening, adding 0.0 and narrowing back are exact: with the default offset the logits are the matmul's.
        wide = torch.promote_types(extra.dtype, torch.float32)
        return (extra.to(wide) + off.to(device=extra.device, dtype=wide)).to(extra.dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base_layer(hidden)
        return torch.cat([logits, self.new_logits(hidden).to(logits.dtype)], dim=-1)

    def extra_repr(self) -> str:
        text = f"n_base={self.n_base}, n_new={self.n_new}, block_output={self.block_output}"
        if not self.block_output and float(self.leak_offset) != 0.0:
            text += f", leak_offset={float(self.leak_offset):.6g}"
        return text
