"""Zero-forgetting verification of an expanded model against its base: logits
over the old vocabulary bit for bit, probability of new tokens after old-only
contexts, and checksums of every base tensor.  In the open mode (new tokens
that can be generated) the same pass certifies the exact forgetting: the
distribution over old tokens is the base one scaled by ``1 - leak``, so old
text loses exactly ``-log(1 - leak)`` nats per position."""

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
#: Statistics of the per-position leak that a bound (max_leak) can hold.
_LEAK_STATISTICS = ("max", "p99", "mean")


def _check_max_leak(max_leak: Any, name: str = "max_leak") -> float:
    """``max_leak`` as a float strictly inside (0, 1), or a ValueError naming it."""
    try:
        value = float(max_leak)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is {max_leak!r}; expected a probability in (0, 1)") from None
    if not 0.0 < value < 1.0:  # NaN fails this too
        raise ValueError(f"{name} is {max_leak!r}; expected a probability strictly between 0 and 1")
    return value


def _check_statistic(statistic: str, name: str = "statistic") -> str:
    if statistic not in _LEAK_STATISTICS:
        raise ValueError(f"{name} is {statistic!r}; expected one of {_LEAK_STATISTICS}")
    return statistic


def _summarize_leak(leak: np.ndarray, statistic: str) -> float:
    """``'max'``, ``'mean'`` or ``'p99'`` of per-position leaks (p99: the smallest measured leak that
    at least 99% of the positions do not exceed, so it is always one of the measured values)."""
    if leak.size == 0:
        return 0.0
    if statistic == "max":
        return float(leak.max())
    if statistic == "mean":
        return float(leak.mean())
    return float(np.quantile(leak, 0.99, method="inverted_cdf"))


def _leak_terms(lse_old: torch.Tensor, new_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position leak ``p(new tokens | context)`` and forgetting ``-log(1 - leak)``, in float64.

    With ``d = logsumexp(new logits) - logsumexp(old logits)`` (both in float64),
    ``leak = sigmoid(d)`` and ``-log(1 - leak) = log1p(exp(d)) = softplus(d)``:
    no ``1 - leak`` is ever formed, so a leak of 1e-12 gives its forgetting to
    full precision and blocked tokens (``-inf`` logits) give exactly 0.
    """
    d = torch.logsumexp(new_logits.double(), dim=-1) - lse_old.double()
    return torch.sigmoid(d), torch.nn.functional.softplus(d)


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
    old_conditional_bitwise_equal : bool
        ``log_softmax`` over the old columns of the expanded logits equals the
        base model's ``log_softmax`` bit for bit: the distribution over old
        tokens given that an old token comes next is the base one.
    leak_mean, leak_p99, leak_max : float
        Statistics over every scored position of ``leak = p(new tokens |
        context)`` (0.0 with block_output).  p99 is a measured value: the
        smallest leak that at least 99% of the positions do not exceed.
    forgetting_nats : float
        The exact forgetting on these contexts: the mean over positions of
        ``-log(1 - leak)``, nats per token, the increase of the loss of any
        old continuation at that position (0.0 with block_output).
    leak_offset : float
        The offset on the new logits set by the leak gate
        (:func:`markovmem.llm.leak.calibrate_leak`); 0.0 when none was set.
    max_leak : float or None
        The bound that ``leak_statistic`` of the leak had to hold, if one was given.
    leak_statistic : str
        Which statistic ``max_leak`` bounds: 'max', 'p99' or 'mean'.
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
    old_conditional_bitwise_equal: bool = True
    leak_mean: float = 0.0
    leak_p99: float = 0.0
    leak_max: float = 0.0
    forgetting_nats: float = 0.0
    leak_offset: float = 0.0
    max_leak: float | None = None
    leak_statistic: str = "max"

    @property
    def leak(self) -> float:
        """The leak statistic named by ``leak_statistic`` (what ``max_leak`` bounds)."""
        return {"max": self.leak_max, "p99": self.leak_p99, "mean": self.leak_mean}[self.leak_statistic]

    @property
    def ok(self) -> bool:
        """The certificate held on every context checked.

        Always: old-vocabulary logits and the old-conditional distribution
        bitwise equal to the base model's, every base tensor unchanged.  With
        block_output: new tokens get probability exactly 0.  In the open mode,
        when ``max_leak`` was given: the leak statistic is at most ``max_leak``.
        """
        return (
            self.max_abs_logit_diff == 0.0
            and self.logits_bitwise_equal
            and self.old_conditional_bitwise_equal
            and self.base_params_unchanged
            and (self.max_new_token_prob == 0.0 or not self.block_output)
            and (self.max_leak is None or self.leak <= self.max_leak)
        )

    def failures(self) -> list[str]:
        """Human-readable reasons ``ok`` is False (empty when it is True)."""
        out = []
        if self.max_abs_logit_diff != 0.0 or not self.logits_bitwise_equal:
            out.append(f"old-vocabulary logits differ from the base model (max |delta| {self.max_abs_logit_diff:.3g})")
        if not self.old_conditional_bitwise_equal:
            out.append("the distribution over old tokens differs from the base model's")
        if self.block_output and self.max_new_token_prob != 0.0:
            out.append(f"a new token gets probability {self.max_new_token_prob:.3g} after an old-only context")
        if self.max_leak is not None and not self.leak <= self.max_leak:
            out.append(f"leak {self.leak_statistic} {self.leak:.4g} exceeds max_leak = {self.max_leak:.4g}")
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
        ]
        if not self.block_output:
            bound = "" if self.max_leak is None else f" (bound on {self.leak_statistic}: {self.max_leak:.4g})"
            rows += [
                ("old-conditional bitwise equal", str(self.old_conditional_bitwise_equal)),
                ("leak mean / p99 / max", f"{self.leak_mean:.4g} / {self.leak_p99:.4g} / {self.leak_max:.4g}{bound}"),
                ("forgetting (nats/token)", f"{self.forgetting_nats:.4g}"),
                ("leak offset", f"{self.leak_offset:.6g}"),
            ]
        rows += [
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
    max_leak: float | None = None,
    leak_statistic: str = "max",
) -> ForgettingReport:
    """Check zero forgetting of an expanded model on contexts made of old tokens.

    Runs both models on every context (same batches, same shapes) and compares
    the logits over the old vocabulary bit for bit at every position, measures
    the largest probability given to a new token, and compares checksums of
    every base tensor (see :func:`base_checksums`).

    In the open mode (``block_output=False``: new tokens can be generated) the
    old logits are still bitwise the base model's, so after every context the
    distribution over old tokens is the base one scaled by ``1 - leak``,
    ``leak = p(new tokens | context)``; the report certifies this (old logits
    and the old-conditional ``log_softmax`` bitwise equal) and measures the
    leak (mean, p99, max over every position) and the exact forgetting on
    these contexts, the mean of ``-log(1 - leak)``, computed in float64 as
    ``softplus(logsumexp(new) - logsumexp(old))``.

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
    max_leak : float, optional
        A bound in (0, 1) on the leak: ``ok`` then also requires
        ``leak_statistic`` of the measured leak to be at most ``max_leak``.
    leak_statistic : {'max', 'p99', 'mean'}
        Which statistic ``max_leak`` bounds.

    Returns
    -------
    ForgettingReport
        ``report.ok`` is True when the certificate held (see :attr:`ForgettingReport.ok`).

    Raises
    ------
    ValueError
        ``model`` has no expansion, a context holds a new token, ``max_leak``
        is not in (0, 1) or ``leak_statistic`` is unknown.
    """
    state = _require_expansion(model)
    if base_model is model:
        base_model = None  # the same object: compare against its own base computation
    if int(batch_size) < 1:
        raise ValueError(f"batch_size is {batch_size}; expected >= 1")
    bound = None if max_leak is None else _check_max_leak(max_leak)
    _check_statistic(leak_statistic, "leak_statistic")
    seqs = _old_only_sequences(state, contexts, tokenizer, "contexts")
    n_base = state.n_base
    max_diff, bitwise, cond_bitwise, max_new, n_pos = 0.0, True, True, 0.0, 0
    leaks: list[np.ndarray] = []
    forget_sum = 0.0
    by_len = _by_length(seqs)
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
        for group in by_len.values():
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
                cond_bitwise = cond_bitwise and _bits_equal(torch.log_softmax(old, -1), torch.log_softmax(ref, -1))
                diff = (old.float() - ref.float()).abs()
                # nan - nan is nan: count any bit difference involving a NaN as infinite.
                diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
                max_diff = max(max_diff, float(diff.max()))
                if state.n_new:
                    probs = torch.softmax(got.float(), dim=-1)[..., n_base:]
                    max_new = max(max_new, float(probs.max()))
                    leak, forget = _leak_terms(torch.logsumexp(got[..., :n_base].double(), -1), got[..., n_base:])
                    leaks.append(leak.reshape(-1).cpu().numpy())
                    forget_sum += float(forget.sum())
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
    leak_all = np.concatenate(leaks) if leaks else np.zeros(0)
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
        old_conditional_bitwise_equal=cond_bitwise,
        leak_mean=_summarize_leak(leak_all, "mean"),
        leak_p99=_summarize_leak(leak_all, "p99"),
        leak_max=_summarize_leak(leak_all, "max"),
        forgetting_nats=forget_sum / max(n_pos, 1),
        leak_offset=float(state.output_layer.leak_offset),
        max_leak=bound,
        leak_statistic=leak_statistic,
    )


def _old_only_sequences(state: Any, contexts: Any, tokenizer: Any, name: str) -> list[np.ndarray]:
    """``contexts`` (id sequences, or strings with ``tokenizer``) as non-empty arrays of old ids only."""
    seqs = _token_sequences(state, contexts, tokenizer, name)
    for i, s in enumerate(seqs):
        if s.size == 0:
            raise ValueError(f"{name}[{i}] is empty")
        if (s >= state.n_base).any():
            raise ValueError(f"{name}[{i}] holds a new token (id >= n_base = {state.n_base}); {name} must be old-only")
    return seqs


def _token_sequences(state: Any, texts: Any, tokenizer: Any, name: str) -> list[np.ndarray]:
    """``texts`` (id sequences, or strings with ``tokenizer``) as id arrays below ``n_base + n_new``."""
    if isinstance(texts, (list, tuple)) and texts and isinstance(texts[0], str):
        if tokenizer is None:
            raise ValueError(f"{name} are strings; pass tokenizer= to tokenize them")
        texts = [tokenizer(c)["input_ids"] for c in texts]
    return _as_sequences(texts, state.n_base + state.n_new, name)


def _by_length(seqs: list[np.ndarray]) -> dict[int, list[np.ndarray]]:
    """Sequences grouped by length, shortest first, so that a batch needs no padding (every position scored)."""
    groups: dict[int, list[np.ndarray]] = {}
    for s in seqs:
        groups.setdefault(s.size, []).append(s)
    return {k: groups[k] for k in sorted(groups)}
