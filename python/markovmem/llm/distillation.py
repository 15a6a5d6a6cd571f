"""Distilling a transformers model into a sparse TransitionMatrix (distill), and
counting the empirical next-token distributions of new tokens (next_token_counts).

Top-k runs on the model's device; only k indices and probabilities per row
cross to the host.  With ``out=DIR`` work is written in shards and resumed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _distributed
from .._checks import integer, real
from .._fileio import atomic_write
from .._matrix import TransitionMatrix
from .._topk import softmax_topk
from .model import _model_n_base, base_fingerprint, get_expansion

__all__ = ["dictionary_info", "distill", "next_token_counts"]

#: How corpus-mode rows seen rarely are completed (see distill).
FALLBACKS = ("token", "unigram", "none")
#: Pseudo-count of the fallback row in corpus mode: a row seen this many times is half corpus, half fallback.
DEFAULT_SHRINKAGE = 1.0
#: Bytes of logits-sized buffers (model logits, float32 probs, appended columns)
#: a default batch may take.
_AUTO_BATCH_BYTES = 256 * 2**20
_MANIFEST = "manifest.json"
_FORMAT = "markovmem-distill"


def _n_base(model: nn.Module) -> int:
    state = get_expansion(model)
    return state.n_base if state is not None else _model_n_base(model)


def _n_embeddable(model: nn.Module) -> int:
    state = get_expansion(model)
    return state.n_base + state.n_new if state is not None else _model_n_base(model)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _prepare_device(model: nn.Module, device: Any) -> torch.device:
    """The device to run on; moves the model there (in place) when ``device`` differs."""
    if device is None:
        return _model_device(model)
    dev = torch.device(device)
    if _model_device(model) != dev:
        model.to(dev)
    return dev


def _autocast(dev: torch.device, dtype: Any, model: nn.Module) -> Any:
    if dtype is None or dtype == _model_dtype(model):
        return nullcontext()
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype; got {dtype!r}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype is {dtype}; expected None (the model's dtype), torch.bfloat16 or torch.float16")
    return torch.autocast(device_type=dev.type, dtype=dtype)


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Ask for last-position logits only when the model supports it (saves the head on the prefix)."""
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}
    if "num_logits_to_keep" in params:
        return {"num_logits_to_keep": 1}
    return {}


def _auto_batch(n_logits_per_row: int) -> int:
    return int(max(1, min(512, _AUTO_BATCH_BYTES // max(1, 12 * n_logits_per_row))))


def _as_id_list(values: Any, name: str, upper: int) -> np.ndarray:
    arr = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids; got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= upper)
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise IndexError(f"{name}[{pos}] = {int(arr[pos])} is out of range [0, {upper})")
    return arr


def _as_sequences(sequences: Any, upper: int, name: str = "sequences") -> list[np.ndarray]:
    if sequences is None:
        raise ValueError(f"{name} is required")
    if isinstance(sequences, (str, bytes)):
        raise TypeError(f"{name} must be token-id sequences (tokenize the text first), not a string")
    if torch.is_tensor(sequences) or isinstance(sequences, np.ndarray):
        arr = sequences.detach().cpu().numpy() if torch.is_tensor(sequences) else sequences
        sequences = [arr] if arr.ndim == 1 else list(arr)
    out = []
    for i, s in enumerate(sequences):
        if isinstance(s, (str, bytes)):
            raise TypeError(f"{name}[{i}] is a string; expected token ids (tokenize the text first)")
        if isinstance(s, dict) or hasattr(s, "keys"):
            s = s["input_ids"]
        out.append(_as_id_list(s, f"{name}[{i}]", upper))
    if not out:
        raise ValueError(f"{name} is empty; expected at least one sequence")
    return out


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
        h.update(b"|")
    return h.hexdigest()


class _Shards:
    """Shard files under ``out`` plus a manifest that a rerun must match to resume.

    The shard layout (which rows or sequences shard ``i`` holds) depends on the settings
    in the manifest only, never on the number of ranks: shards written by a run on any
    world size are reused by a run on any other.
    """

    def __init__(self, out: str | os.PathLike[str] | None, manifest: dict[str, Any]) -> None:
        self.dir = None if out is None else Path(out)
        self.manifest = manifest

    def open(self) -> None:
        """Create ``out`` and write the manifest, or check the one there against this run's."""
        if self.dir is None:
            return
        if self.dir.exists() and not self.dir.is_dir():
            raise NotADirectoryError(f"out = {str(self.dir)!r} exists and is not a directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / _MANIFEST
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path} is not a readable distill manifest: {exc}") from exc
            diff = sorted(k for k in set(old) | set(self.manifest) if old.get(k) != self.manifest.get(k))
            if diff:
                detail = ", ".join(f"{k}: {old.get(k)!r} there, {self.manifest.get(k)!r} now" for k in diff[:3])
                raise ValueError(
                    f"out = {str(self.dir)!r} holds a distillation with other settings ({detail}); "
                    "pass another directory or delete it to start over"
                )
        else:
            # Every file of a sharded run goes through atomic_write: a reader sees the old file or
            # the whole new one, and ranks writing the same file at once never share a temporary.
            atomic_write(path, json.dumps(self.manifest, indent=1, sort_keys=True).encode())

    def path(self, i: int) -> Path | None:
        return None if self.dir is None else self.dir / f"shard-{i:06d}.safetensors"

    def load(self, i: int) -> dict[str, np.ndarray] | None:
        p = self.path(i)
        if p is None or not p.exists():
            return None
        from safetensors.numpy import load_file

        return load_file(str(p))

    def save(self, i: int, tensors: dict[str, np.ndarray]) -> None:
        p = self.path(i)
        if p is None:
            return
        from safetensors.numpy import save

        # A shard file either is complete or does not exist, so an interrupted run
        # resumes at the shards missing.
        atomic_write(p, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))


def _open_shards(shards: _Shards, ranks: _distributed.Ranks | None) -> None:
    """Rank 0 writes (or checks) the manifest before the others check it, so no two ranks
    create it at once; an error on any rank stops every rank."""
    rank = 0 if ranks is None else ranks.rank
    _distributed.exchange(ranks, lambda: shards.open() if rank == 0 else None)
    if ranks is not None:
        _distributed.exchange(ranks, lambda: shards.open() if rank != 0 else None)


def _run_shards(
    ranks: _distributed.Ranks | None,
    shards: _Shards,
    n_shards: int,
    span: Any,
    valid: Any,
    compute: Any,
    consume: Any,
    bar: Any,
) -> None:
    """Every shard, loaded from ``out`` when a valid file is there and computed otherwise.

    Shard ``s`` belongs to rank ``s % world``, which loads or computes it (and writes its
    file) in round ``s // world``; at the end of each round every rank receives that round's
    shards and calls ``consume(s, tensors)`` on them in shard order, so what is consumed,
    and in which order, is the same on every world size and whatever was resumed.  The
    exchange after each round is also where a failed rank stops the others.
    ``span(s)`` is the number of items (rows, sequences) of shard ``s``; ``valid(s,
    tensors)`` says whether a loaded file fits this run; ``compute(s)`` returns the shard's
    arrays, updating ``bar`` as it goes; ``bar`` counts the other ranks' computed items at
    the end of each round.
    """
    rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.world)

    def work(s: int) -> tuple[bool, dict[str, np.ndarray]] | None:
        if s >= n_shards:
            return None
        got = shards.load(s)
        if got is not None and valid(s, got):
            return False, got
        tensors = compute(s)
        shards.save(s, tensors)
        return True, tensors

    for start in range(0, n_shards, world):
        first = start + rank
        for j, item in enumerate(_distributed.exchange(ranks, functools.partial(work, first))):
            if item is None:
                continue
            computed, tensors = item
            if not computed or j != rank:
                bar.update(span(start + j))
            consume(start + j, tensors)


def _progress(total: int, initial: int, desc: str, enabled: bool, unit: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def _select_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of softmax(logits) per row: (probs float32, ids int32), sorted by descending probability on CPU.

    On CPU the fused C++ kernel (markovmem.softmax_topk: one streaming pass per
    row for the log-sum-exp in double, then a selection that rereads only the
    chunks that can hold a winner; torch's thread count); elsewhere softmax and
    top-k in torch on the logits' device, so only k values per row leave it.
    """
    if logits.device.type != "cpu":
        values, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
        return values, ids.to(torch.int32)
    x = logits.detach()
    if x.dtype != torch.float32:
        x = x.float()
    # Zero-copy when each row is contiguous (a column slice of wider logits is fine).
    top_ids, top_values = softmax_topk(x.numpy(), k, n_threads=torch.get_num_threads())
    return torch.from_numpy(top_values), torch.from_numpy(top_ids)


#: Logits per batch (batch x base vocabulary) from which distill applies the head itself (see _HeadLogits).
_HEAD_MIN_LOGITS = 2**20
#: Corpus mode sums a shard's entries in a dense (n_base, n_base) float64 array up to this many cells (32 MB).
_DENSE_SUMS = 2**22
#: Logits per chunk when the head is applied at chosen positions (corpus mode): 128 MB of float32.
_HEAD_CHUNK_LOGITS = 2**25


class _HeadLogits:
    """Logits over the base vocabulary: at the last position of token contexts (token mode,
    ``__call__``) or at chosen positions of sequences, reduced to their top-k (corpus mode, ``topk_at``).

    In general the model's own forward (``logits_to_keep=1`` when supported, token mode).
    On CPU in the model's dtype (no autocast), float32, when the output head is
    a plain ``nn.Linear`` applied to the body's last hidden state (Llama, Qwen2,
    GPT-2, ...), the head runs here instead, into one logits buffer reused
    across batches: a fresh (rows x vocab) tensor per forward pays page faults
    that cost as much as the head's GEMM itself at small hidden sizes, and new
    tokens' columns are never computed.  In corpus mode the head is applied only
    at the counted positions, in chunks of rows whose logits stay in one buffer
    (no padded position, no copy of the selected rows).  The shortcut is checked once against
    the model's forward on the first two contexts and dropped if they disagree
    (soft-capped or scaled logits, a custom head).  Below ``_HEAD_MIN_LOGITS``
    logits per batch (a small vocabulary) fresh logits are cheap and the check
    would cost more than it saves, so the model's forward is used.

    ``batch`` is the number of logit rows per batch: contexts in token mode, sequences x
    longest sequence in corpus mode.
    """

    def __init__(self, model: nn.Module, n_base: int, dev: torch.device, dtype: Any, batch: int) -> None:
        self.model = model
        self.n_base = n_base
        self.kwargs = _forward_kwargs(model)
        self.buf: torch.Tensor | None = None
        self.head: tuple[nn.Module, torch.Tensor, torch.Tensor | None] | None = None
        self.checked = False
        get_output = getattr(model, "get_output_embeddings", None)  # transformers models have it
        out = get_output() if callable(get_output) else None
        base = getattr(out, "base_layer", out)  # NewTokenOutputLayer wraps the base head
        body = getattr(model, "base_model", None)
        if (
            dev.type == "cpu"
            and n_base * batch >= _HEAD_MIN_LOGITS
            and (dtype is None or dtype == _model_dtype(model))
            and isinstance(base, nn.Linear)
            and base.weight.dtype == torch.float32
            and isinstance(body, nn.Module)
            and body is not model
            and base.weight.shape[0] >= n_base
        ):
            self.head = (body, base.weight, base.bias)

    def _model_logits(self, inp: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=inp, use_cache=False, **self.kwargs).logits[:, -1, : self.n_base]

    def _head_logits(self, inp: torch.Tensor) -> torch.Tensor:
        assert self.head is not None
        return self._apply(self.head[0](input_ids=inp, use_cache=False).last_hidden_state[:, -1])

    def _check(self, reference: Callable[[], torch.Tensor], shortcut: Callable[[], torch.Tensor]) -> None:
        """Keep the head shortcut only if it gives the model's logits (done once, on two contexts)."""
        if self.head is None or self.checked:
            return
        self.checked = True
        ref = reference()
        try:
            got = shortcut()
            same = got.shape == ref.shape and torch.allclose(
                got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-6
            )
        except (TypeError, AttributeError, RuntimeError, ValueError):
            same = False
        if not same:
            self.head = None

    def decide(self, inp: torch.Tensor) -> None:
        """Keep the head shortcut only if it gives the model's logits on the contexts ``inp`` (done once)."""
        self._check(lambda: self._model_logits(inp[:2]), lambda: self._head_logits(inp[:2]))

    def __call__(self, inp: torch.Tensor) -> torch.Tensor:
        self.decide(inp)
        return self._head_logits(inp) if self.head is not None else self._model_logits(inp)

    def _apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on (rows, d) hidden states, into the reused buffer."""
        assert self.head is not None
        _, weight, bias = self.head
        rows = hidden.shape[0]
        if self.buf is None or self.buf.shape[0] < rows:
            self.buf = torch.empty(rows, self.n_base, dtype=torch.float32)
        out = self.buf[:rows]
        w = weight[: self.n_base]
        if bias is None:
            torch.mm(hidden, w.t(), out=out)
        else:
            torch.addmm(bias[: self.n_base], hidden, w.t(), out=out)
        return out

    def _decide_at(self, ids: torch.Tensor, attend: torch.Tensor, keep: torch.Tensor) -> None:
        def reference() -> torch.Tensor:
            logits = self.model(input_ids=ids[:2], attention_mask=attend[:2], use_cache=False).logits
            return logits[keep[:2]][:, : self.n_base]

        def shortcut() -> torch.Tensor:
            assert self.head is not None
            out = self.head[0](input_ids=ids[:2], attention_mask=attend[:2], use_cache=False)
            return self._apply(out.last_hidden_state[keep[:2]])

        self._check(reference, shortcut)

    def topk_at(
        self, ids: torch.Tensor, attend: torch.Tensor, keep: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of softmax over the base vocabulary at the positions ``keep`` (batch, length) of the
        right-padded batch ``ids``: (probs, ids) of shape (positions, k), positions in row-major order."""
        self._decide_at(ids, attend, keep)
        if self.head is None:
            logits = self.model(input_ids=ids, attention_mask=attend, use_cache=False).logits
            selected = logits[keep][:, : self.n_base]
            del logits
            return _select_topk(selected, k)
        hidden = self.head[0](input_ids=ids, attention_mask=attend, use_cache=False).last_hidden_state[keep]
        step = max(1, _HEAD_CHUNK_LOGITS // self.n_base)
        parts = [_select_topk(self._apply(hidden[a : a + step]), k) for a in range(0, hidden.shape[0], step)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


def distill(
    model: nn.Module,
    top_k: int = 256,
    batch_size: int | None = None,
    token_ids: Any = None,
    prefix: Sequence[int] | None = None,
    device: Any = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    mode: str = "token",
    sequences: Any = None,
    *,
    shard_rows: int | None = None,
    mask: Any = None,
    fallback: str = "token",
    shrinkage: float = DEFAULT_SHRINKAGE,
    window: int | None = None,
    dist: bool | None = None,
    group: Any = None,
) -> TransitionMatrix:
    """Distill a causal LM into a sparse Markov transition matrix over its base vocabulary.

    ``mode='token'``: row ``v`` is the model's next-token distribution after
    the one-token context ``prefix + [v]``.  ``mode='corpus'``: row ``v`` is
    the average of the next-token distributions at the ``n_v`` occurrences of
    ``v`` in ``sequences`` (in their real context), shrunk toward a fallback
    row ``f_v`` for rows seen rarely::

        row_v = (sum over occurrences of p(. | context) + shrinkage * f_v) / (n_v + shrinkage)

    so a row seen ``shrinkage`` times is half corpus, half fallback, and a row
    never seen is its fallback.  ``fallback='token'`` takes ``f_v`` = the
    one-token row ``p(. | prefix + [v])`` (one extra short forward per row);
    ``'unigram'`` takes the corpus's average next-token distribution (the same
    for every row, no extra forward); ``'none'`` leaves unseen rows empty
    (uniform tail) and uses no shrinkage.  Softmax is taken in float32 over the
    base vocabulary and the top ``top_k`` entries are selected on the device;
    only those indices and probabilities are copied to the host.  The mass
    left out becomes the row's tail.

    The returned matrix's :attr:`~markovmem.TransitionMatrix.metadata` records
    how it was made (``distill.mode``, ``distill.corpus`` fingerprint,
    ``distill.fallback``, ``distill.shrinkage``, per-row occurrence counts in
    ``distill.row_counts``; read them with :func:`dictionary_info`) and
    :meth:`~markovmem.TransitionMatrix.save` writes them into the file.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM, expanded or not (new tokens are never rows or columns).
        Run in eval mode (no dropout) under ``torch.no_grad()``; its
        train/eval mode is restored afterwards.
    top_k : int
        Entries kept per row (clamped to the vocabulary size).
    batch_size : int, optional
        Contexts (token mode) or sequences (corpus mode) per forward pass.
        Memory is bounded by ``batch_size x context x vocab`` logits; the default
        keeps that near 256 MiB.
    token_ids : (n,) int array, optional
        Rows to distill (default every base token).  Other rows are left empty
        (tail 1: uniform over the base states).
    prefix : sequence of int, optional
        Ids put before each token of a one-token context (token mode, and the
        corpus mode's ``'token'`` fallback), e.g. ``[tokenizer.bos_token_id]``
        for models trained with BOS.  Default: no prefix.
    device : str or torch.device, optional
        Device to run on; the model is moved there in place when it differs.
    dtype : torch.dtype, optional
        Compute dtype (``torch.bfloat16``/``torch.float16``, via ``torch.autocast``);
        default the parameters' dtype.  The softmax is float32 either way.
    progress : bool
        Show a tqdm progress bar.
    out : path, optional
        Directory for shards (``shard-NNNNNN.safetensors``), a ``manifest.json``
        and the final ``matrix.safetensors``.  A rerun with the same model and
        settings skips the shards already written; other settings raise.
    mode : {'token', 'corpus'}
    sequences : iterable of token-id sequences
        Corpus mode only: the texts, tokenized.  Each occurrence contributes its
        top-k entries; the rest of its mass counts toward the tail.  A sequence
        longer than ``window`` is cut into windows of ``window`` tokens that
        overlap by half; each position is counted once, in the first window
        that gives it at least half a window of context.
    shard_rows : int, optional
        Rows (token mode) or windows (corpus mode) per shard file.
    mask : iterable of bool sequences, optional
        Corpus mode: ``mask[i][t]`` False drops position ``t`` of sequence ``i``
        as an occurrence of its token (it still serves as context), e.g. the
        pieces of a word the model does not know yet.  Default: every position.
    fallback : {'token', 'unigram', 'none'}
        Corpus mode: what rarely seen rows shrink toward (see above).
    shrinkage : float
        Corpus mode: the pseudo-count of the fallback row (>= 0).
    window : int, optional
        Corpus mode: longest context fed to the model (default the model's
        ``max_position_embeddings`` / ``n_positions``, else no limit).
    dist : bool, optional
        Spread the shards over the ranks of a torch.distributed process group
        (e.g. under ``torchrun``).  None (default): when the default group is
        initialised; True: also initialise it from torchrun's environment when
        it is not (gloo, and NCCL for CUDA tensors); False: this process alone.
        Every rank passes the same model and arguments.  Shard ``i`` goes to
        rank ``i % world_size``, which writes it under ``out``; the layout does
        not depend on the world size, so a run resumes from the shards of a run
        on any number of ranks.  Every rank returns the same matrix, bitwise
        equal to a one-process run on the same kind of device; rank 0 writes
        ``matrix.safetensors``.  With ``device=None`` a model on the CPU runs
        on ``cuda:LOCAL_RANK`` when CUDA is available (a model already placed
        stays where it is).  Progress is shown on rank 0.  See
        docs/howto/distributed.md.
    group : torch.distributed.ProcessGroup, optional
        The group to spread over (default: the default group).

    Returns
    -------
    TransitionMatrix
        ``n_states = n_base`` (the model's base vocabulary), float32 rows.

    Raises
    ------
    ValueError
        Bad ``top_k``, ``batch_size``, ``mode``, ``fallback``, ``shrinkage``,
        missing ``sequences``, a ``mask`` that does not match them, a corpus
        with no counted position, or an ``out`` directory holding a run with
        other settings.
    IndexError
        A token id out of range.
    markovmem.DistributedError
        In a distributed run, instead of the above on every rank: some rank
        failed (the message names it and gives its error) or lost contact with
        the others within the process group's timeout.
    """
    ranks = _distributed.resolve(dist, group)
    if ranks is not None:
        progress = progress and ranks.rank == 0
        if device is None and _model_device(model).type == "cpu":
            # A model the caller placed (on a GPU, or over several with a device_map) stays there.
            device = _distributed.local_device()
    # Checked on every rank inside one exchange: a rank that refuses its arguments stops the others.
    rows, k, n_base, pre, seqs, masks, dev = _distributed.checked(
        ranks,
        lambda: _arguments(
            model,
            mode,
            top_k,
            batch_size,
            shard_rows,
            fallback,
            shrinkage,
            window,
            token_ids,
            prefix,
            sequences,
            mask,
            device,
        ),
    )
    was_training = model.training
    model.eval()
    try:
        job = _Job(model, k, n_base, batch_size, dev, dtype, progress, out, shard_rows, ranks)
        if mode == "token":
            return _distill_tokens(job, rows, pre)
        win = window if window is not None else _context_length(model)
        corpus = _distill_corpus(job, _windows(seqs, masks, win), rows)
        return _shrink(job, corpus, rows, pre, fallback, float(shrinkage), win)
    finally:
        model.train(was_training)


def _arguments(
    model: nn.Module,
    mode: str,
    top_k: Any,
    batch_size: Any,
    shard_rows: Any,
    fallback: Any,
    shrinkage: Any,
    window: Any,
    token_ids: Any,
    prefix: Any,
    sequences: Any,
    mask: Any,
    device: Any,
) -> tuple[np.ndarray, int, int, np.ndarray, Any, Any, torch.device]:
    """distill's arguments checked: (rows, k, n_base, prefix, the sequences and their masks (corpus
    mode; else None), the device, with the model moved there)."""
    if mode not in ("token", "corpus"):
        raise ValueError(f"mode is {mode!r}; expected 'token' or 'corpus'")
    if not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k is {top_k!r}; expected an integer >= 1")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size is {batch_size!r}; expected None or an integer >= 1")
    if shard_rows is not None and int(shard_rows) < 1:
        raise ValueError(f"shard_rows is {shard_rows!r}; expected None or an integer >= 1")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback is {fallback!r}; expected one of {FALLBACKS}")
    shrinkage = real(shrinkage, "shrinkage")
    if not (np.isfinite(shrinkage) and shrinkage >= 0):
        raise ValueError(f"shrinkage is {shrinkage!r}; expected a finite number >= 0")
    window = None if window is None else integer(window, "window", low=2)
    n_base = _n_base(model)
    k = int(min(top_k, n_base))
    rows = np.arange(n_base, dtype=np.int64) if token_ids is None else _as_id_list(token_ids, "token_ids", n_base)
    if rows.size == 0:
        raise ValueError("token_ids is empty; expected at least one token")
    if len(np.unique(rows)) != rows.size:
        raise ValueError("token_ids has repeated ids")
    pre = np.zeros(0, np.int64) if prefix is None else _as_id_list(prefix, "prefix", _n_embeddable(model))
    seqs = masks = None
    if mode == "token":
        if sequences is not None or mask is not None:
            raise ValueError("sequences and mask are only used with mode='corpus'")
    else:
        if prefix is not None and fallback != "token":
            raise ValueError("prefix is only used by token mode and the corpus mode's 'token' fallback")
        seqs = _as_sequences(sequences, _n_embeddable(model))
        masks = _as_masks(mask, seqs)
    return rows, k, n_base, pre, seqs, masks, _prepare_device(model, device)


def _finish(
    P: TransitionMatrix, out: Path | None, info: dict[str, Any], ranks: _distributed.Ranks | None
) -> TransitionMatrix:
    """Attach ``info`` (how the rows were made) as metadata; when sharded, rank 0 writes the final
    file and every rank returns once it is written."""
    meta = {f"distill.{key}": value if isinstance(value, str) else json.dumps(value) for key, value in info.items()}
    P = TransitionMatrix._with_metadata(P, meta)
    if out is not None:
        _distributed.checked(
            ranks, lambda: P.save(out / "matrix.safetensors") if ranks is None or ranks.rank == 0 else None
        )
    return P


@dataclasses.dataclass(frozen=True)
class _Job:
    """What every pass of one distill call shares (token rows, corpus sums, fallback rows)."""

    model: nn.Module
    k: int
    n_base: int
    batch_size: int | None
    dev: torch.device
    dtype: Any
    progress: bool
    out: Any
    shard_rows: int | None
    ranks: _distributed.Ranks | None

    def unpack(self) -> tuple[Any, ...]:
        """Every field, in order (shallow: dataclasses.astuple would deep-copy the model)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def _distill_tokens(job: _Job, rows: np.ndarray, pre: np.ndarray) -> TransitionMatrix:
    model, k, n_base, batch_size, dev, dtype, progress, out, shard_rows, ranks = job.unpack()
    n = rows.size
    n_logits = _n_embeddable(model)
    batch = int(batch_size) if batch_size is not None else _auto_batch(n_logits)
    per_shard = int(shard_rows) if shard_rows is not None else max(batch, (16 * 2**20) // (8 * k) // batch * batch)
    manifest = {
        "format": _FORMAT,
        "version": 1,
        "mode": "token",
        "top_k": k,
        "n_base": n_base,
        "prefix": [int(x) for x in pre],
        "rows": _digest(rows),
        "n_rows": int(n),
        "shard_rows": per_shard,
        "model": base_fingerprint(model) if out is not None else "",
    }
    shards = _Shards(out, manifest)
    _open_shards(shards, ranks)
    indices = np.empty((n, k), dtype=np.int32)
    probs = np.empty((n, k), dtype=np.float32)
    n_shards = -(-n // per_shard)
    last_logits = _HeadLogits(model, n_base, dev, dtype, batch)
    prefix_t = torch.as_tensor(pre, dtype=torch.long, device=dev)
    rows_t = torch.as_tensor(rows, dtype=torch.long)

    def contexts(i: int, j: int) -> torch.Tensor:
        last = rows_t[i:j].to(dev).unsqueeze(1)
        return torch.cat([prefix_t.expand(j - i, -1), last], dim=1) if pre.size else last

    def span(s: int) -> int:
        return min(n, (s + 1) * per_shard) - s * per_shard

    def valid(s: int, got: dict[str, np.ndarray]) -> bool:
        return got["indices"].shape == (span(s), k) and got["probs"].shape == (span(s), k)

    def compute(s: int) -> dict[str, np.ndarray]:
        a, b = s * per_shard, min(n, (s + 1) * per_shard)
        with torch.no_grad(), _autocast(dev, dtype, model):
            for i in range(a, b, batch):
                j = min(b, i + batch)
                logits = last_logits(contexts(i, j))
                values, ids = _select_topk(logits, k)
                # Drop this batch's logits before the next forward allocates its own,
                # so at most one batch of logits is alive.
                del logits
                # The device -> host copy: k probabilities and k ids per row, nothing else.
                probs[i:j] = values.cpu().numpy()
                indices[i:j] = ids.cpu().numpy()
                bar.update(j - i)
        return {"indices": indices[a:b], "probs": probs[a:b]}

    def consume(s: int, got: dict[str, np.ndarray]) -> None:
        a, b = s * per_shard, min(n, (s + 1) * per_shard)
        indices[a:b], probs[a:b] = got["indices"], got["probs"]

    with torch.no_grad():
        # Whether to apply the head here is decided on the first two rows of the whole run,
        # so every rank, and every resumed run, takes the same path.
        last_logits.decide(contexts(0, min(n, 2)))
    bar = _progress(n, 0, "distill", progress, "row")
    try:
        _run_shards(ranks, shards, n_shards, span, valid, compute, consume, bar)
    finally:
        bar.close()
    if n == n_base and np.array_equal(rows, np.arange(n_base)):
        P = TransitionMatrix.from_topk(indices, probs)
    else:
        P = _from_row_subset(rows, indices, probs, n_base)
    return _finish(
        P, shards.dir, {"mode": "token", "top_k": k, "prefix": [int(x) for x in pre], "n_rows": int(n)}, ranks
    )


def _from_row_subset(rows: np.ndarray, indices: np.ndarray, probs: np.ndarray, n_base: int) -> TransitionMatrix:
    """A matrix whose rows ``rows`` hold the given top-k entries and whose other rows are empty."""
    import scipy.sparse as sp

    order = np.argsort(indices, axis=1)
    indices = np.take_along_axis(indices, order, 1)
    probs = np.take_along_axis(probs, order, 1)
    k = indices.shape[1]
    counts = np.zeros(n_base, dtype=np.int64)
    counts[rows] = k
    indptr = np.zeros(n_base + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    by_row = np.argsort(rows, kind="stable")
    csr = sp.csr_array((probs[by_row].reshape(-1), indices[by_row].reshape(-1), indptr), shape=(n_base, n_base))
    return TransitionMatrix.from_scipy(csr)


def _as_masks(mask: Any, seqs: list[np.ndarray]) -> list[np.ndarray]:
    """One bool array per sequence (True: the position counts as an occurrence of its token)."""
    if mask is None:
        return [np.ones(s.size, dtype=bool) for s in seqs]
    if isinstance(mask, (str, bytes)):
        raise TypeError("mask must be a sequence of bool sequences, one per sequence")
    out = []
    for i, m in enumerate(mask):
        arr = m.detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m)
        arr = arr.reshape(-1)
        if arr.dtype != np.bool_:
            raise TypeError(f"mask[{i}] has dtype {arr.dtype}; expected bool")
        if i >= len(seqs) or arr.size != seqs[i].size:
            have = seqs[i].size if i < len(seqs) else None
            raise ValueError(f"mask[{i}] has {arr.size} entries; sequences[{i}] has {have} tokens")
        out.append(arr)
    if len(out) != len(seqs):
        raise ValueError(f"mask has {len(out)} entries; sequences has {len(seqs)}")
    return out


def _context_length(model: nn.Module) -> int | None:
    """The longest input the model's positions allow (None when the config does not say)."""
    cfg: Any = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value >= 2:
            return value
    return None


def _windows(
    seqs: list[np.ndarray], masks: list[np.ndarray], window: int | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, counted) pieces no longer than ``window``: a longer sequence becomes windows that overlap by
    half, and each position is counted in the first window that gives it >= window // 2 tokens of context
    (every position exactly once, none truncated away)."""
    out = []
    for ids, counted in zip(seqs, masks, strict=False):
        if window is None or ids.size <= window:
            out.append((ids, counted))
            continue
        stride = window // 2
        start, first_new = 0, 0
        while True:
            end = min(ids.size, start + window)
            keep = counted[start:end].copy()
            keep[: first_new - start] = False
            out.append((ids[start:end], keep))
            if end == ids.size:
                break
            first_new = end
            start = end - (window - stride)
    return out


def _distill_corpus(
    job: _Job, windows: list[tuple[np.ndarray, np.ndarray]], rows: np.ndarray
) -> tuple[Any, np.ndarray, str]:
    """Row sums of the top-k next-token probabilities at the counted positions, and the counts.

    Returns ``(total, counts, corpus)``: ``total`` an (n_base, n_base) float64 CSR of summed
    probabilities, ``counts`` (n_base,) int64 occurrences per row, ``corpus`` a fingerprint of
    the windows and their counted positions.
    """
    import scipy.sparse as sp

    model, k, n_base, batch_size, dev, dtype, progress, out, shard_rows, ranks = job.unpack()
    n_logits = _n_embeddable(model)
    max_len = max(ids.size for ids, _ in windows)
    batch = int(batch_size) if batch_size is not None else _auto_batch(n_logits * max(1, max_len))
    per_shard = int(shard_rows) if shard_rows is not None else max(batch, 256 // batch * batch)
    offsets = np.cumsum([0] + [ids.size for ids, _ in windows])
    corpus = _digest(np.concatenate([ids for ids, _ in windows]), np.concatenate([c for _, c in windows]), offsets)
    manifest = {
        "format": _FORMAT,
        "version": 2,
        "mode": "corpus",
        "top_k": k,
        "n_base": n_base,
        "rows": _digest(rows),
        "sequences": corpus,
        "n_sequences": len(windows),
        "shard_rows": per_shard,
        "model": base_fingerprint(model) if out is not None else "",
    }
    shards = _Shards(out, manifest)
    _open_shards(shards, ranks)
    wanted = np.zeros(n_logits, dtype=bool)
    wanted[rows] = True
    head = _HeadLogits(model, n_base, dev, dtype, batch * max_len)
    n_shards = -(-len(windows) // per_shard)
    total = sp.csr_array((n_base, n_base), dtype=np.float64)
    counts = np.zeros(n_base, dtype=np.int64)

    def span(s: int) -> int:
        return min(len(windows), (s + 1) * per_shard) - s * per_shard

    def valid(s: int, got: dict[str, np.ndarray]) -> bool:
        return (
            {"indptr", "indices", "data", "counts"} <= set(got)
            and got["counts"].shape == (n_base,)
            and got["indptr"].shape == (n_base + 1,)
        )

    def compute(s: int) -> dict[str, np.ndarray]:
        a, b = s * per_shard, min(len(windows), (s + 1) * per_shard)
        r_parts, c_parts, v_parts = [], [], []
        shard_counts = np.zeros(n_base, dtype=np.int64)
        with torch.no_grad(), _autocast(dev, dtype, model):
            for i in range(a, b, batch):
                chunk = windows[i : min(b, i + batch)]
                length = max(ids.size for ids, _ in chunk)
                ids = np.zeros((len(chunk), length), dtype=np.int64)
                attend = np.zeros((len(chunk), length), dtype=np.int64)
                keep = np.zeros((len(chunk), length), dtype=bool)
                for r, (c, counted) in enumerate(chunk):
                    ids[r, : c.size] = c
                    attend[r, : c.size] = 1
                    keep[r, : c.size] = counted & wanted[c]
                if not keep.any():
                    bar.update(len(chunk))
                    continue
                # Right padding leaves every real position's context unchanged.
                values, top = head.topk_at(
                    torch.as_tensor(ids, device=dev),
                    torch.as_tensor(attend, device=dev),
                    torch.as_tensor(keep, device=dev),
                    k,
                )
                # The device -> host copy: k ids and k probabilities per occurrence.
                owner = ids[keep]
                r_parts.append(np.repeat(owner, k))
                c_parts.append(top.cpu().numpy().reshape(-1))
                v_parts.append(values.cpu().numpy().reshape(-1).astype(np.float64))
                np.add.at(shard_counts, owner, 1)
                bar.update(len(chunk))
        if not r_parts:
            part = sp.csr_array((n_base, n_base), dtype=np.float64)
        elif n_base * n_base <= _DENSE_SUMS:
            # A small vocabulary: one bincount over (row, column) keys, in the order the entries
            # came, then the nonzeros; cheaper than building and sorting a COO of every entry.
            keys = np.concatenate(r_parts) * n_base + np.concatenate(c_parts)
            sums = np.bincount(keys, weights=np.concatenate(v_parts), minlength=n_base * n_base)
            part = sp.csr_array(sums.reshape(n_base, n_base))
        else:
            part = sp.coo_array(
                (np.concatenate(v_parts), (np.concatenate(r_parts), np.concatenate(c_parts))),
                shape=(n_base, n_base),
            ).tocsr()
        part.sum_duplicates()
        return {
            "indptr": part.indptr.astype(np.int64),
            "indices": part.indices.astype(np.int32),
            "data": part.data.astype(np.float64),
            "counts": shard_counts,
        }

    def consume(s: int, got: dict[str, np.ndarray]) -> None:
        # _run_shards hands the shards over in index order on every world size, whatever was
        # resumed, so these float64 sums are the same bits in every run.
        nonlocal total
        total = total + sp.csr_array((got["data"], got["indices"], got["indptr"]), shape=(n_base, n_base))
        counts[:] += got["counts"]

    bar = _progress(len(windows), 0, "distill (corpus)", progress, "seq")
    try:
        _run_shards(ranks, shards, n_shards, span, valid, compute, consume, bar)
    finally:
        bar.close()
    return sp.csr_array(total), counts, corpus


def _shrink(
    job: _Job,
    corpus: tuple[Any, np.ndarray, str],
    rows: np.ndarray,
    pre: np.ndarray,
    fallback: str,
    shrinkage: float,
    window: int | None,
) -> TransitionMatrix:
    """The corpus rows shrunk toward their fallback rows (see :func:`distill`), as a TransitionMatrix."""
    import scipy.sparse as sp

    k, n_base, out, ranks = job.k, job.n_base, job.out, job.ranks
    total, counts, digest = corpus
    if counts.sum() == 0:
        raise ValueError(
            "the corpus has no counted position of a distilled token; give texts (or a mask) in which the tokens occur"
        )
    lam = shrinkage if fallback != "none" else 0.0
    extra = None
    if lam > 0 and fallback == "token":
        sub = None if out is None else Path(out) / "fallback"
        T = _distill_tokens(dataclasses.replace(job, out=sub, shard_rows=None), rows, pre)
        extra = sp.csr_array(T.to_scipy(), dtype=np.float64) * lam
    elif lam > 0 and fallback == "unigram":
        mean = np.asarray(total.sum(axis=0)).reshape(-1) / counts.sum()
        top = np.sort(np.argpartition(-mean, min(k, n_base) - 1)[:k])
        rep = np.zeros(n_base, dtype=np.int64)
        rep[rows] = top.size
        indptr = np.concatenate([[0], np.cumsum(rep)])
        extra = sp.csr_array(
            (np.tile(mean[top] * lam, rows.size), np.tile(top, rows.size), indptr), shape=(n_base, n_base)
        )
    combined = total if extra is None else sp.csr_array(total + extra)
    denom = counts.astype(np.float64)
    if extra is not None:
        denom[rows] += lam
    P = _average_topk(combined, denom, k, n_base)
    info = {
        "mode": "corpus",
        "top_k": k,
        "corpus": digest,
        "fallback": fallback,
        "shrinkage": lam,
        "prefix": [int(x) for x in pre] if fallback == "token" else [],
        "window": window,
        "n_occurrences": int(counts.sum()),
        "rows_seen": int((counts[rows] > 0).sum()),
        "n_rows": int(rows.size),
        "row_counts": counts.tolist(),
    }
    return _finish(P, None if out is None else Path(out), info, ranks)


def _average_topk(total: Any, denom: np.ndarray, k: int, n_base: int) -> TransitionMatrix:
    """Rows of ``total / denom``, each cut to its ``k`` largest entries (sorted ids)."""
    import scipy.sparse as sp

    total.sum_duplicates()
    indptr, indices, data = total.indptr, total.indices, total.data
    out_ptr = np.zeros(n_base + 1, dtype=np.int64)
    out_idx, out_val = [], []
    for v in range(n_base):
        a, b = int(indptr[v]), int(indptr[v + 1])
        if b == a or denom[v] == 0:
            out_ptr[v + 1] = out_ptr[v]
            continue
        vals = data[a:b] / denom[v]
        cols = indices[a:b]
        if vals.size > k:
            sel = np.argpartition(-vals, k - 1)[:k]
            vals, cols = vals[sel], cols[sel]
        order = np.argsort(cols)
        out_idx.append(cols[order])
        out_val.append(vals[order])
        out_ptr[v + 1] = out_ptr[v] + order.size
    idx = np.concatenate(out_idx).astype(np.int32) if out_idx else np.zeros(0, np.int32)
    val = np.concatenate(out_val).astype(np.float32) if out_val else np.zeros(0, np.float32)
    return TransitionMatrix.from_scipy(sp.csr_array((val, idx, out_ptr), shape=(n_base, n_base)))


def dictionary_info(P: TransitionMatrix) -> dict[str, Any]:
    """How a distilled matrix was made, from its metadata (in memory or read back from its file).

    Returns
    -------
    dict
        ``mode`` ('token' or 'corpus'), ``top_k`` and ``prefix``; for corpus mode also
        ``corpus`` (fingerprint of the token windows and their counted positions),
        ``fallback``, ``shrinkage``, ``window``, ``n_occurrences``, ``rows_seen``,
        ``n_rows`` and ``row_counts`` ((n_base,) int64 occurrences per row).  Empty
        when the matrix was not made by :func:`distill`.

    Raises
    ------
    ValueError
        A ``distill.*`` metadata value is not valid JSON.
    """
    out: dict[str, Any] = {}
    for key, value in P.metadata.items():
        if not key.startswith("distill."):
            continue
        name = key[len("distill.") :]
        try:
            out[name] = json.loads(value)
        except ValueError:
            if name in ("mode", "corpus", "fallback"):
                out[name] = value
            else:
                raise ValueError(f"metadata {key!r} is not valid JSON: {value[:80]!r}") from None
    if "row_counts" in out:
        out["row_counts"] = np.asarray(out["row_counts"], dtype=np.int64)
    return out


def next_token_counts(
    sequences: Iterable[Sequence[int] | np.ndarray], new_token_ids: Sequence[int], n_base: int
) -> Any:
    """Empirical next-token counts of new tokens: the data behind q_hat(. | u).

    For every occurrence of ``new_token_ids[i]`` followed by a base token ``x``
    (``x < n_base``) in a sequence, ``C[i, x] += 1``.  Transitions into new
    tokens are not counted: a new token's row is a distribution over the base
    vocabulary (DESIGN §1), and transitions never cross two sequences.

    Parameters
    ----------
    sequences : iterable of token-id sequences (lists, arrays, 1-D tensors, or tokenizer outputs)
        Training text, tokenized with the expanded tokenizer.
    new_token_ids : sequence of int
        The ids whose rows to count (row ``i`` of the result is ``new_token_ids[i]``).
    n_base : int
        Base vocabulary size (``P.n_base`` of the distilled matrix).

    Returns
    -------
    scipy.sparse.csr_array
        (m, n_base) float64 counts, sorted indices.  A token that never
        precedes a base token has an empty row.

    Raises
    ------
    ValueError
        ``new_token_ids`` is empty or repeats an id, ``n_base < 1``.
    IndexError
        A negative token id, or one above both ``n_base`` and the largest new
        id (the message names the sequence and the position); checked before
        anything is allocated.
    TypeError
        An id or ``n_base`` is not an integer (floats and bools are refused).
    """
    import scipy.sparse as sp

    from ._ids import as_id, as_ids

    n_base = as_id(n_base, "n_base")
    if n_base < 1:
        raise ValueError(f"n_base is {n_base}; expected >= 1")
    new = as_ids(new_token_ids, "new_token_ids")
    if new.size == 0:
        raise ValueError("new_token_ids is empty; expected at least one id")
    if len(np.unique(new)) != new.size:
        raise ValueError("new_token_ids has repeated ids")
    if new.min() < 0:
        raise IndexError(f"new_token_ids holds a negative id ({int(new.min())})")
    # The vocabulary: base ids and the new ones (other new tokens sit between them).  Checked
    # before any array is sized, and none is sized by the largest id: rows are found by search.
    seqs = _as_sequences(sequences, max(n_base, int(new.max()) + 1))
    order = np.argsort(new, kind="stable")
    sorted_new = new[order]
    r_parts, c_parts = [], []
    for s in seqs:
        if s.size < 2:
            continue
        src, dst = s[:-1], s[1:]
        pos = np.minimum(np.searchsorted(sorted_new, src), sorted_new.size - 1)
        keep = (sorted_new[pos] == src) & (dst < n_base)
        r_parts.append(order[pos[keep]])
        c_parts.append(dst[keep])
    r = np.concatenate(r_parts) if r_parts else np.zeros(0, np.int64)
    c = np.concatenate(c_parts) if c_parts else np.zeros(0, np.int64)
    counts = sp.coo_array((np.ones(r.size), (r, c)), shape=(new.size, n_base)).tocsr()
    counts.sum_duplicates()
    counts.sort_indices()
    return counts
