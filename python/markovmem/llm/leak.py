"""The leak gate of an open expansion: one offset on the new tokens' logits, set so that the
probability mass the new tokens take from old text (the leak) stays under a bound.

In the open mode the old logits and the hidden states are the base model's, so adding
``c`` to every new logit changes each position's leak ``sigmoid(lse_new - lse_old)``
monotonically in ``c`` and nothing else.  :func:`calibrate_leak` runs the model once over a
reference corpus of old text (and once over texts holding the new tokens), keeps the hidden
states that enter the output head, and then evaluates candidate offsets with the head's own
arithmetic (:meth:`NewTokenOutputLayer.new_logits`) - so the leak it bisects on is the leak
the model will produce, bit for bit, not an approximation of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .distillation import _prepare_device, _progress
from .layer import NewTokenOutputLayer
from .model import _require_expansion
from .verify import (
    _by_length,
    _check_max_leak,
    _check_statistic,
    _eval_mode,
    _leak_terms,
    _old_only_sequences,
    _summarize_leak,
    _token_sequences,
)

__all__ = ["LeakCalibration", "calibrate_leak"]

#: Positions per chunk when candidate offsets are evaluated on the cached hidden states.
_CHUNK = 1 << 14
#: Bisection stops after this many halvings even if float32 offsets are not yet adjacent.
_MAX_HALVINGS = 200


@dataclass
class LeakCalibration:
    """What :func:`calibrate_leak` measured and set.

    Attributes
    ----------
    offset : float
        The offset now on every new logit (the output layer's ``leak_offset``).
    offset_before : float
        The offset before the call.
    max_leak : float
        The bound.
    statistic : str
        Which statistic of the per-position leak is bounded: 'max', 'p99' or 'mean'.
    binding : bool
        The bound did not hold at offset 0, so the offset is negative.
    leak_before, leak_after : float
        The statistic of the leak on the reference corpus before and after.
    forgetting_before, forgetting_after : float
        The exact forgetting on the reference corpus (mean ``-log(1 - leak)``,
        nats per token) before and after.
    new_token_loss_before, new_token_loss_after : float
        Mean next-token loss (nats) on ``texts`` at the positions whose target
        is a new token: the cost of the gate on the new tokens' own loss (nan
        without ``texts``).
    n_contexts, n_positions : int
        Reference contexts and positions (every prefix) measured.
    n_new_token_targets : int
        Positions of ``texts`` whose target is a new token.
    n_evaluations : int
        Candidate offsets evaluated.
    seconds : float
        Wall time.
    """

    offset: float
    offset_before: float
    max_leak: float
    statistic: str
    binding: bool
    leak_before: float
    leak_after: float
    forgetting_before: float
    forgetting_after: float
    new_token_loss_before: float
    new_token_loss_after: float
    n_contexts: int
    n_positions: int
    n_new_token_targets: int
    n_evaluations: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)

    def __str__(self) -> str:
        rows = [
            ("reference contexts / positions", f"{self.n_contexts} / {self.n_positions}"),
            (f"leak {self.statistic} (bound {self.max_leak:.4g})", f"{self.leak_before:.4g} -> {self.leak_after:.4g}"),
            ("forgetting (nats/token)", f"{self.forgetting_before:.4g} -> {self.forgetting_after:.4g}"),
            ("offset on new logits", f"{self.offset_before:.6g} -> {self.offset:.6g}"),
        ]
        if self.n_new_token_targets:
            rows.append(
                (
                    f"new-token loss ({self.n_new_token_targets} targets)",
                    f"{self.new_token_loss_before:.4f} -> {self.new_token_loss_after:.4f}",
                )
            )
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@dataclass
class _Cache:
    """Hidden states entering the output head at the kept positions, and float64 logsumexp of
    the old logits there; ``target`` (index of the new token that comes next) for text positions."""

    hidden: torch.Tensor
    lse_old: torch.Tensor
    target: torch.Tensor | None = None

    def new_logits(self, layer: NewTokenOutputLayer, offset: float) -> list[tuple[slice, torch.Tensor]]:
        out = []
        with torch.no_grad():
            for start in range(0, self.hidden.shape[0], _CHUNK):
                part = slice(start, start + _CHUNK)
                out.append((part, layer.new_logits(self.hidden[part], offset).double()))
        return out

    def leak(self, layer: NewTokenOutputLayer, offset: float) -> tuple[np.ndarray, float]:
        """Per-position leak and mean forgetting at ``offset``."""
        leaks, forget = [], 0.0
        for part, new in self.new_logits(layer, offset):
            leak, f = _leak_terms(self.lse_old[part], new)
            leaks.append(leak.cpu().numpy())
            forget += float(f.sum())
        return np.concatenate(leaks), forget / max(int(self.hidden.shape[0]), 1)

    def new_token_loss(self, layer: NewTokenOutputLayer, offset: float) -> float:
        assert self.target is not None  # only text caches are scored
        total = 0.0
        for part, new in self.new_logits(layer, offset):
            lse_all = torch.logaddexp(self.lse_old[part], torch.logsumexp(new, -1))
            total += float((lse_all - new.gather(1, self.target[part, None]).squeeze(1)).sum())
        return total / int(self.hidden.shape[0])


def _capture(
    model: nn.Module,
    layer: NewTokenOutputLayer,
    seqs: list[np.ndarray],
    *,
    n_base: int,
    batch_size: int,
    device: torch.device,
    progress: bool,
    desc: str,
    keep: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> _Cache:
    """One pass of ``model`` over ``seqs`` (equal lengths batched, no padding).

    Keeps, at the positions ``keep(x)`` selects (default: all; it returns a
    (batch, length) mask and the targets at the kept positions), the hidden
    state the output head receives and the float64 logsumexp of the old
    logits.  Checks that the model's new logits are the head's
    ``new_logits(hidden)`` bit for bit, so candidate offsets evaluated on the
    cache give the model's own figures (a model that post-processes its
    logits, e.g. with soft-capping, is refused).
    """
    seen: dict[str, torch.Tensor] = {}

    def grab(_module: nn.Module, args: tuple[Any, ...]) -> None:
        seen["hidden"] = args[0].detach()

    groups = _by_length(seqs)
    n_batches = sum(math.ceil(len(g) / batch_size) for g in groups.values())
    hidden, lse, targets = [], [], []
    bar = _progress(n_batches, 0, desc, progress, "batch")
    handle = layer.register_forward_pre_hook(grab)
    try:
        with torch.no_grad(), _eval_mode(model):
            for group in groups.values():
                for i in range(0, len(group), batch_size):
                    x = torch.as_tensor(np.stack(group[i : i + batch_size])).to(device)
                    logits = model(input_ids=x, use_cache=False).logits
                    h = seen.pop("hidden")
                    if h.shape[:-1] != logits.shape[:-1] or not torch.equal(
                        logits[..., n_base:], layer.new_logits(h).to(logits.dtype)
                    ):
                        raise ValueError(
                            f"{type(model).__name__}'s logits are not its output head's (the model transforms "
                            "them after the head); calibrate_leak needs logits = head(hidden)"
                        )
                    mask, tgt = (
                        (torch.ones(x.shape, dtype=torch.bool, device=x.device), None) if keep is None else keep(x)
                    )
                    hidden.append(h[mask])
                    lse.append(torch.logsumexp(logits[..., :n_base][mask].double(), dim=-1))
                    if tgt is not None:
                        targets.append(tgt)
                    bar.update(1)
    finally:
        handle.remove()
        bar.close()
    return _Cache(torch.cat(hidden), torch.cat(lse), torch.cat(targets) if targets else None)


def calibrate_leak(
    model: nn.Module,
    reference_contexts: Any,
    max_leak: float,
    *,
    statistic: str = "max",
    texts: Any = None,
    tokenizer: Any = None,
    batch_size: int = 16,
    device: Any = None,
    progress: bool = True,
) -> LeakCalibration:
    """Set the one offset on the new logits that holds the leak on old text under ``max_leak``.

    In an open expansion (``block_output=False``) the leak at a position,
    ``p(new tokens | context)``, is the only thing that changes for old text:
    the loss of every old continuation grows by exactly ``-log(1 - leak)``.
    Adding an offset ``c`` to every new logit moves each leak monotonically,
    so the gate bisects (in float64, on float32 candidates, down to adjacent
    float32 values) for the largest ``c <= 0`` at which ``statistic`` of the
    measured leak over every position of ``reference_contexts`` is at most
    ``max_leak``, and writes it to the output layer's ``leak_offset``.  When
    the bound already holds at ``c = 0`` the offset becomes 0: the gate never
    raises the new tokens' probability above what their rows give.

    Each candidate is evaluated with the output head's own arithmetic on the
    hidden states cached from one forward pass, so the figures reported are the
    ones :func:`markovmem.llm.verify.verify_no_forgetting` then measures.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Expanded by :func:`add_tokens` with ``block_output=False``.
    reference_contexts : iterable of token-id sequences, or of str with ``tokenizer``
        Old text only (e.g. held-out text of the domain).  Every position of
        every context is one measured leak.
    max_leak : float
        The bound, strictly between 0 and 1.
    statistic : {'max', 'p99', 'mean'}
        Which statistic of the per-position leak must be ``<= max_leak``
        ('p99': the smallest measured leak that at least 99% of the positions
        do not exceed).  'max' bounds the forgetting at every measured position
        by ``-log(1 - max_leak)``; 'mean' bounds the average leak only.
    texts : iterable of token-id sequences, or of str with ``tokenizer``, optional
        Text holding the new tokens: the report gives the mean next-token loss
        at the positions whose target is a new token, before and after.
    tokenizer : transformers tokenizer, optional
        Tokenizes string contexts and texts (the expanded tokenizer).
    batch_size : int
        Sequences per forward pass.
    device : str or torch.device, optional
        Run there (the model is moved in place when it differs).
    progress : bool
        Show a tqdm progress bar over the forward passes.

    Returns
    -------
    LeakCalibration

    Raises
    ------
    ValueError
        No expansion, or one that blocks its new tokens; ``max_leak`` not in
        (0, 1) (NaN included); unknown ``statistic``; a reference context holds
        a new token; ``texts`` hold no position whose target is a new token;
        the model transforms the head's logits.
    """
    start = time.perf_counter()
    state = _require_expansion(model)
    if state.config.block_output:
        raise ValueError(
            "the model's expansion blocks its new tokens (block_output=True: leak exactly 0); "
            "calibrate_leak needs new tokens that can be generated (add_tokens(..., block_output=False))"
        )
    bound = _check_max_leak(max_leak)
    _check_statistic(statistic)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size is {batch_size}; expected >= 1")
    seqs = _old_only_sequences(state, reference_contexts, tokenizer, "reference_contexts")
    text_seqs = None if texts is None else _token_sequences(state, texts, tokenizer, "texts")
    dev = _prepare_device(model, device)
    layer, n_base = state.output_layer, state.n_base
    common: dict[str, Any] = dict(n_base=n_base, batch_size=int(batch_size), device=dev, progress=progress)
    ref = _capture(model, layer, seqs, desc="calibrate_leak: reference", **common)
    text_cache = None
    if text_seqs is not None:

        def new_targets(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
            mask[:, :-1] = x[:, 1:] >= n_base
            return mask, x[:, 1:][mask[:, :-1]] - n_base

        text_cache = _capture(model, layer, text_seqs, desc="calibrate_leak: texts", keep=new_targets, **common)
        if text_cache.hidden.shape[0] == 0:
            raise ValueError("texts hold no position whose next token is a new token")

    n_eval = 0

    def measure(offset: float) -> tuple[float, float]:
        nonlocal n_eval
        n_eval += 1
        leak, forget = ref.leak(layer, offset)
        return _summarize_leak(leak, statistic), forget

    def as_f32(value: float) -> float:
        return float(np.float32(value))

    offset_before = float(layer.leak_offset)
    leak_before, forget_before = measure(offset_before)
    offset = 0.0
    binding = measure(offset)[0] > bound
    if binding:
        # Bracket: leak_i(c) = sigmoid(d_i + c) in exact arithmetic, so c = logit(bound) - max_i d_i
        # holds even the max; one nat below it (doubling further down if rounding disagrees) is the
        # feasible end, 0 the infeasible one.
        d_max = max(
            float((torch.logsumexp(new, -1) - ref.lse_old[part]).max()) for part, new in ref.new_logits(layer, 0.0)
        )
        lo = as_f32(min(math.log(bound) - math.log1p(-bound) - d_max - 1.0, -1.0))
        step = 1.0
        while measure(lo)[0] > bound:
            step *= 2.0
            lo = as_f32(lo - step)
            if not math.isfinite(lo) or step > 1e30:
                raise RuntimeError("no finite offset holds the leak bound (non-finite new logits?)")
        hi = 0.0
        for _ in range(_MAX_HALVINGS):
            mid = as_f32(lo + (hi - lo) / 2)
            if mid in (lo, hi):
                break
            if measure(mid)[0] <= bound:
                lo = mid
            else:
                hi = mid
        offset = lo
    with torch.no_grad():
        layer.leak_offset.fill_(offset)
    leak_after, forget_after = measure(offset)
    loss_before = loss_after = float("nan")
    if text_cache is not None:
        loss_before = text_cache.new_token_loss(layer, offset_before)
        loss_after = text_cache.new_token_loss(layer, offset)
    return LeakCalibration(
        offset=float(layer.leak_offset),
        offset_before=offset_before,
        max_leak=bound,
        statistic=statistic,
        binding=binding,
        leak_before=leak_before,
        leak_after=leak_after,
        forgetting_before=forget_before,
        forgetting_after=forget_after,
        new_token_loss_before=loss_before,
        new_token_loss_after=loss_after,
        n_contexts=len(seqs),
        n_positions=int(ref.hidden.shape[0]),
        n_new_token_targets=0 if text_cache is None else int(text_cache.hidden.shape[0]),
        n_evaluations=n_eval,
        seconds=time.perf_counter() - start,
    )
