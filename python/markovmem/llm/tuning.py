"""Embedding tuning (ET): train only the new tokens' rows with next-token
cross-entropy on sequences that contain them; every base tensor stays frozen
and bitwise unchanged."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TUNE_INITS
from .distillation import _as_sequences, _prepare_device, _progress
from .model import _init_rows, _positions, _require_expansion, alpha_to_embeddings, set_embeddings

__all__ = ["TuneHistory", "embedding_tune"]


@dataclass
class TuneHistory:
    """What :func:`embedding_tune` did.

    Attributes
    ----------
    loss : list of float
        Mean next-token cross-entropy (nats) of each step's batch, before its update.
    n_targets : list of int
        Target positions scored in each step.
    steps, batch_size : int
    lr : float
    init : str or None
        How the rows started ('alpha', 'mean', 'random', or None: as they were).
    n_trainable : int
        Scalars trained: input rows x width, plus, when not blocked, own output
        rows x width (unless tied to the input rows) and one bias per token.
    n_sequences : int
        Training sequences that contain a trained token.
    seconds : float
        Wall time of the loop.
    """

    loss: list[float] = field(default_factory=list)
    n_targets: list[int] = field(default_factory=list)
    steps: int = 0
    batch_size: int = 0
    lr: float = 0.0
    init: str | None = None
    n_trainable: int = 0
    n_sequences: int = 0
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """Loss of the last step (nan before any step)."""
        return self.loss[-1] if self.loss else float("nan")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _pad_batch(
    seqs: list[np.ndarray], new_ids: np.ndarray, n_base: int, block_output: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask and targets (-100 where not scored) of one right-padded batch."""
    length = max(s.size for s in seqs)
    ids = np.zeros((len(seqs), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    targets = np.full_like(ids, -100)
    for r, s in enumerate(seqs):
        ids[r, : s.size] = s
        mask[r, : s.size] = 1
        if s.size < 2:
            continue
        if not block_output:
            # Open output: every position's distribution holds the new logits (the position
            # before a new token is where it is a target; every other one, where its mass is
            # taken from the right token), so every position is scored, in every sequence.
            targets[r, : s.size - 1] = s[1:]
            continue
        hit = np.flatnonzero(np.isin(s, new_ids))
        if hit.size == 0:
            continue
        # Position t predicts s[t + 1]; only positions at or after the first new
        # token depend on its row, so only they are scored.
        first = int(hit[0])
        nxt = s[first + 1 :].copy()
        # Blocked tokens have logit -inf: they are never targets.
        nxt[nxt >= n_base] = -100
        targets[r, first : s.size - 1] = nxt
    return (
        torch.as_tensor(ids, device=device),
        torch.as_tensor(mask, device=device),
        torch.as_tensor(targets, device=device),
    )


Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``forward(input_ids, attention_mask) -> logits`` (batch, length, vocab) at the input positions."""


def _model_forward(model: nn.Module) -> Forward:
    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return forward


def _train_steps(
    forward: Forward,
    params: Sequence[torch.Tensor],
    seqs: list[np.ndarray],
    new_ids: np.ndarray,
    n_base: int,
    block_output: bool,
    *,
    history: TuneHistory,
    steps: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: Any = None,
    progress: bool = True,
    desc: str = "train",
) -> None:
    """The training loop of :func:`embedding_tune`, open to any parameters (e.g. the baselines of
    :mod:`markovmem.llm.pseudowords`): AdamW on next-token cross-entropy at the positions
    ``_pad_batch`` scores (blocked: from the first new token on, never a new token; open: all),
    ``batch_size`` sequences per step drawn without replacement and reshuffled each epoch
    (``seed``), so equal seeds give equal batches whatever is trained.  Appends each step's
    loss and number of targets to ``history``; the caller sets requires_grad and the mode."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(seqs))
    cursor = 0
    bar = _progress(int(steps), 0, desc, progress, "step")
    try:
        opt = torch.optim.AdamW(params, lr=float(lr), weight_decay=float(weight_decay))
        for _ in range(int(steps)):
            if cursor + batch_size > len(order):
                tail = order[cursor:]
                order = np.concatenate([tail, rng.permutation(len(seqs))])
                cursor = 0
            pick = order[cursor : cursor + batch_size]
            cursor += batch_size
            x, mask, targets = _pad_batch([seqs[i] for i in pick], new_ids, n_base, block_output, device)
            n_targets = int((targets != -100).sum())
            if n_targets == 0:
                history.loss.append(float("nan"))
                history.n_targets.append(0)
                bar.update(1)
                continue
            logits = forward(x, mask)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.loss.append(float(loss.detach()))
            history.n_targets.append(n_targets)
            bar.set_postfix(loss=f"{history.loss[-1]:.4f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()


def embedding_tune(
    model: nn.Module,
    new_token_ids: Sequence[int],
    sequences: Any,
    steps: int = 100,
    lr: float = 1e-2,
    batch_size: int = 8,
    init: str | None = None,
    alpha: Any = None,
    *,
    weight_decay: float = 0.0,
    max_length: int | None = None,
    seed: int = 0,
    device: Any = None,
    progress: bool = True,
) -> TuneHistory:
    """Embedding tuning: train only the new tokens' rows, every other weight frozen.

    The rows are trained with Adam on next-token cross-entropy over
    ``sequences``, scored from the first new token of each sequence on (earlier
    positions do not depend on it; in generate mode every position of every
    sequence, as each one's distribution holds the new logits).  The rows are separate parameters, so no
    gradient is ever computed for the base embedding or any base weight, and
    every base tensor is bitwise unchanged afterwards.  With ``block_output``
    (the default of :func:`add_tokens`) new tokens are never targets; the
    output side stays blocked, which keeps zero forgetting exact.  Without it
    (generate mode) the new tokens are targets too, and their output rows
    (when not tied to the input rows) and output bias are trained with the
    input rows; the leak offset is not trained.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Expanded by :func:`add_tokens`.  Runs in eval mode (no dropout); its
        mode and every ``requires_grad`` flag are restored afterwards.
    new_token_ids : sequence of int
        The new tokens to train (a subset of the expansion's); other new rows
        keep their exact values.
    sequences : iterable of token-id sequences
        Training text tokenized with the expanded tokenizer.  Sequences without
        any of ``new_token_ids`` are skipped.
    steps : int
        Optimizer steps.
    lr : float
        Adam learning rate.
    batch_size : int
        Sequences per step (drawn without replacement, reshuffled each epoch).
    init : {'alpha', 'mean', 'random'} or None
        Start rows: ``'alpha'`` writes ``E^T alpha`` (needs ``alpha``), ``'mean'``
        and ``'random'`` as in :func:`add_tokens`; None keeps the current rows
        (e.g. those written by :func:`set_embeddings`).
    alpha : (len(new_token_ids), n) sparse matrix or AlphaFit, optional
        Dictionary weights for ``init='alpha'``, rows in the order of ``new_token_ids``.
    weight_decay : float
        Adam(W) decoupled weight decay on the trained rows.
    max_length : int, optional
        Truncate sequences to this many tokens.
    seed : int
        Seeds batch order (and ``init='random'``).
    device : str or torch.device, optional
        Run there (the model is moved in place when it differs).
    progress : bool
        Show a tqdm progress bar with the running loss.

    Returns
    -------
    TuneHistory

    Raises
    ------
    ValueError
        No expansion, bad ``init``/``steps``/``lr``/``batch_size``, ``init='alpha'``
        without ``alpha``, or no sequence contains a trained token.
    IndexError
        An id is not a new token.
    """
    state = _require_expansion(model)
    if init is not None and init not in TUNE_INITS:
        raise ValueError(f"init is {init!r}; expected None or one of {TUNE_INITS}")
    if int(steps) < 0:
        raise ValueError(f"steps is {steps}; expected >= 0")
    if not float(lr) > 0:
        raise ValueError(f"lr is {lr}; expected > 0")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size is {batch_size}; expected >= 1")
    if max_length is not None and int(max_length) < 2:
        raise ValueError(f"max_length is {max_length}; expected None or >= 2")
    pos = _positions(state, new_token_ids)
    ids = [state.n_base + int(p) for p in pos]
    if init == "alpha":
        if alpha is None:
            raise ValueError("init='alpha' needs alpha (the fit's dictionary weights)")
        set_embeddings(model, ids, alpha_to_embeddings(model, alpha))
    elif init in ("mean", "random"):
        base_w = state.input_layer.base_layer.weight
        set_embeddings(model, ids, _init_rows(base_w, len(ids), init, seed))
    elif alpha is not None:
        raise ValueError("alpha is only used with init='alpha'")

    dev = _prepare_device(model, device)
    seqs = _as_sequences(sequences, state.n_base + state.n_new)
    if max_length is not None:
        seqs = [s[: int(max_length)] for s in seqs]
    ids_arr = np.asarray(ids, dtype=np.int64)
    seqs = [s for s in seqs if s.size >= 2 and np.isin(s[:-1], ids_arr).any()]
    if not seqs:
        raise ValueError(
            "no sequence contains a trained token before its last position; "
            "tokenize the training text with the expanded tokenizer"
        )

    inp, out = state.input_layer, state.output_layer
    block = state.config.block_output
    history = TuneHistory(steps=int(steps), batch_size=int(batch_size), lr=float(lr), init=init, n_sequences=len(seqs))
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    # Train float32 master copies (bf16 Adam updates would round away) of each trained
    # tensor: (owner module, attribute).  They are written back in the tensor's dtype at
    # the end, with the rows of tokens not trained restored exactly.
    trained: list[tuple[nn.Module, str]] = [(inp, "new_weight")]
    if not block:
        if not state.config.tie_output:
            trained.append((out, "new_weight"))
        trained.append((out, "new_bias"))
    snapshots = [getattr(owner, name).detach().clone() for owner, name in trained]
    masters = [nn.Parameter(snap.float().clone()) for snap in snapshots]
    row_mask = torch.zeros(inp.n_new, device=masters[0].device)
    row_mask[pos.to(row_mask.device)] = 1.0

    def masked(g: torch.Tensor) -> torch.Tensor:
        return g * row_mask.reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype)

    hooks = [p.register_hook(masked) for p in masters]
    history.n_trainable = int(sum(len(pos) * (p[0].numel() if p.dim() > 1 else 1) for p in masters))
    start = time.perf_counter()

    def install(tensors: Sequence[torch.Tensor]) -> None:
        for (owner, name), t in zip(trained, tensors, strict=True):
            setattr(owner, name, t)
        if not block and state.config.tie_output:
            out.new_weight = inp.new_weight

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        install(masters)
        model.eval()
        _train_steps(
            _model_forward(model),
            masters,
            seqs,
            ids_arr,
            state.n_base,
            block,
            history=history,
            steps=int(steps),
            lr=lr,
            batch_size=int(batch_size),
            weight_decay=weight_decay,
            seed=seed,
            device=dev,
            progress=progress,
            desc="embedding_tune",
        )
    finally:
        history.seconds = time.perf_counter() - start
        for h in hooks:
            h.remove()
        with torch.no_grad():
            keep = (row_mask == 0).to(snapshots[0].device)
            finals = []
            for master, snap in zip(masters, snapshots, strict=True):
                values = master.detach().to(snap.dtype)
                values[keep] = snap[keep]
                finals.append(nn.Parameter(values))
            install(finals)
        for p in model.parameters():
            if id(p) in flags:
                p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return history
