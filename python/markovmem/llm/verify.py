"""Zero-forgetting verification of an expanded model against its base: logits
over the old vocabulary bit for bit, probability of new tokens after old-only
contexts, and checksums of every base tensor."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .distillation import _as_sequences, _model_device
from .model import _fingerprint_of, _require_expansion, base_checksums

__all__ = ["ForgettingReport", "verify_no_forgetting"]

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class ForgettingReport:
    """What :func:`verify_no_forgetting` measured.  ``ok`` requires every figure to be exact.

    Attributes
    ----------
    n_contexts, n_positions : int
        Contexts checked and positions scored (every prefix of a context is one).
    n_base, n_new : int
    max_abs_logit_diff : float
        max |logit_expanded - logit_base| over the old vocabulary (0.0 required).
    logits_bitwise_equal : bool
        The old-vocabulary logits have identical bits (so -0.0 vs 0.0 counts).
    max_new_token_prob : float
        Largest probability the expanded model gives a new token after an
        old-only context (0.0 required with block_output).
    block_output : bool
    base_params_unchanged : bool
        The expanded model's base tensors have the checksums they had when the
        tokens were added and, when a separate base model is given, its checksums.
    changed_tensors : list of str
        Names of base tensors whose checksum differs.
    base_fingerprint_at_add, base_fingerprint_now, reference_fingerprint : str
        Fingerprints of the base tensors when the tokens were added, now, and of
        ``base_model`` ('' when the expanded model's own base was the reference).
    """

    n_contexts: int
    n_positions: int
    n_base: int
    n_new: int
    max_abs_logit_diff: float
    logits_bitwise_equal: bool
    max_new_token_prob: float
    block_output: bool
    base_params_unchanged: bool
    changed_tensors: list[str] = field(default_factory=list)
    base_fingerprint_at_add: str = ""
    base_fingerprint_now: str = ""
    reference_fingerprint: str = ""

    @property
    def ok(self) -> bool:
        """Zero forgetting held exactly on every context checked."""
        return (
            self.max_abs_logit_diff == 0.0
            and self.logits_bitwise_equal
            and self.base_params_unchanged
            and (self.max_new_token_prob == 0.0 or not self.block_output)
        )

    def failures(self) -> list[str]:
        """Human-readable reasons ``ok`` is False (empty when it is True)."""
        out = []
        if self.max_abs_logit_diff != 0.0 or not self.logits_bitwise_equal:
            out.append(f"old-vocabulary logits differ from the base model (max |delta| {self.max_abs_logit_diff:.3g})")
        if self.block_output and self.max_new_token_prob != 0.0:
            out.append(f"a new token gets probability {self.max_new_token_prob:.3g} after an old-only context")
        if not self.base_params_unchanged:
            names = ", ".join(self.changed_tensors[:5]) + (" ..." if len(self.changed_tensors) > 5 else "")
            out.append(f"base tensors changed: {names or 'fingerprint differs'}")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def __str__(self) -> str:
        rows = [
            ("contexts / positions", f"{self.n_contexts} / {self.n_positions}"),
            ("vocabulary", f"{self.n_base} base + {self.n_new} new"),
            ("max |delta logit| (old vocab)", f"{self.max_abs_logit_diff:.3g}"),
            ("old logits bitwise equal", str(self.logits_bitwise_equal)),
            ("max p(new token | old context)", f"{self.max_new_token_prob:.3g}"),
            ("base tensors unchanged", str(self.base_params_unchanged)),
            ("base fingerprint", self.base_fingerprint_now),
            ("no forgetting", "OK" if self.ok else "FAILED: " + "; ".join(self.failures())),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    int_t = _BITS.get(a.element_size())
    if int_t is None:
        return bool(torch.equal(a, b))
    return bool(torch.equal(a.contiguous().view(int_t), b.contiguous().view(int_t)))


def verify_no_forgetting(
    base_model: nn.Module | None,
    model: nn.Module,
    contexts: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
) -> ForgettingReport:
    """Check zero forgetting of an expanded model on contexts made of old tokens.

    Runs both models on every context (same batches, same shapes) and compares
    the logits over the old vocabulary bit for bit at every position, measures
    the largest probability given to a new token, and compares checksums of
    every base tensor (see :func:`base_checksums`).

    Parameters
    ----------
    base_model : transformers.PreTrainedModel or None
        The base model (a separately loaded copy).  None (or ``model`` itself)
        runs ``model`` with its expansion switched off, which checks the expansion mechanism;
        the checksum comparison against the state recorded by
        :func:`add_tokens` then catches changed base weights.
    model : transformers.PreTrainedModel
        The expanded model.
    contexts : iterable of token-id sequences, or of str with ``tokenizer``
        Old tokens only.  Contexts of equal length share a batch.
    tokenizer : transformers tokenizer, optional
        Tokenizes string contexts.
    batch_size : int
        Contexts per forward pass.

    Returns
    -------
    ForgettingReport
        ``report.ok`` is True when zero forgetting held exactly.

    Raises
    ------
    ValueError
        ``model`` has no expansion, or a context holds a new token.
    """
    state = _require_expansion(model)
    if base_model is model:
        base_model = None  # the same object: compare against its own base computation
    if int(batch_size) < 1:
        raise ValueError(f"batch_size is {batch_size}; expected >= 1")
    if isinstance(contexts, (list, tuple)) and contexts and isinstance(contexts[0], str):
        if tokenizer is None:
            raise ValueError("contexts are strings; pass tokenizer= to tokenize them")
        contexts = [tokenizer(c)["input_ids"] for c in contexts]
    seqs = _as_sequences(contexts, state.n_base + state.n_new, "contexts")
    for i, s in enumerate(seqs):
        if s.size == 0:
            raise ValueError(f"contexts[{i}] is empty")
        if (s >= state.n_base).any():
            raise ValueError(
                f"contexts[{i}] holds a new token (id >= n_base = {state.n_base}); contexts must be old-only"
            )
    n_base = state.n_base
    max_diff, bitwise, max_new, n_pos = 0.0, True, 0.0, 0
    by_len: dict[int, list[np.ndarray]] = {}
    for s in seqs:
        by_len.setdefault(s.size, []).append(s)
    dev = _model_device(model)
    ref_model = base_model if base_model is not None else model
    ref_dev = _model_device(ref_model)

    def reference_logits(x: torch.Tensor) -> torch.Tensor:
        if base_model is None:
            with state.disabled():
                return model(input_ids=x.to(dev), use_cache=False).logits
        return base_model(input_ids=x.to(ref_dev), use_cache=False).logits

    models = (model,) if base_model is None else (model, base_model)
    with torch.no_grad(), _eval_mode(*models):
        for length in sorted(by_len):
            group = by_len[length]
            for i in range(0, len(group), int(batch_size)):
                x = torch.as_tensor(np.stack(group[i : i + int(batch_size)]))
                ref = reference_logits(x)
                got = model(input_ids=x.to(dev), use_cache=False).logits
                if ref.shape[-1] != n_base:
                    raise ValueError(
                        f"base_model gives {ref.shape[-1]} logits per position; expected n_base = {n_base}"
                    )
                old = got[..., :n_base].to(ref.device)
                bitwise = bitwise and _bits_equal(old, ref)
                diff = (old.float() - ref.float()).abs()
                # nan - nan is nan: count any bit difference involving a NaN as infinite.
                diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
                max_diff = max(max_diff, float(diff.max()))
                if state.n_new:
                    probs = torch.softmax(got.float(), dim=-1)[..., n_base:]
                    max_new = max(max_new, float(probs.max()))
                n_pos += x.numel()
    sums_now = base_checksums(model)
    fp_now = _fingerprint_of(sums_now)
    changed: list[str] = []
    unchanged = fp_now == state.base_fingerprint
    ref_fp = ""
    if base_model is not None:
        sums_ref = base_checksums(base_model)
        ref_fp = _fingerprint_of(sums_ref)
        changed = sorted(k for k in set(sums_now) | set(sums_ref) if sums_now.get(k) != sums_ref.get(k))
        unchanged = unchanged and not changed
    if not unchanged and not changed:
        changed = ["(differs from the fingerprint recorded when the tokens were added)"]
    return ForgettingReport(
        n_contexts=len(seqs),
        n_positions=n_pos,
        n_base=n_base,
        n_new=state.n_new,
        max_abs_logit_diff=max_diff,
        logits_bitwise_equal=bitwise,
        max_new_token_prob=max_new,
        block_output=state.config.block_output,
        base_params_unchanged=unchanged,
        changed_tensors=changed,
        base_fingerprint_at_add=state.base_fingerprint,
        base_fingerprint_now=fp_now,
        reference_fingerprint=ref_fp,
    )
