"""Distilling a transformers model into a sparse TransitionMatrix (distill), and
counting the empirical next-token distributions of new tokens (next_token_counts).

Top-k runs on the model's device; only k indices and probabilities per row
cross to the host.  With ``out=DIR`` work is written in shards and resumed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .. import _distributed
from .._matrix import TransitionMatrix
from .._topk import softmax_topk
from .model import _model_n_base, base_fingerprint, get_expansion

__all__ = ["distill", "next_token_counts"]

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


def _write_file(path: Path, write: Any) -> None:
    """``write(tmp)`` into a temporary file unique to this process beside ``path``, flushed to
    disk, then renamed over ``path``: a reader sees the old file or the whole new one, never a
    part, and ranks that write the same file at once do not share a temporary.  Every file of
    a sharded run (manifest, shards) is written through here."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
            text = json.dumps(self.manifest, indent=1, sort_keys=True)
            _write_file(path, lambda tmp: tmp.write_text(text))

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
        from safetensors.numpy import save_file

        # A shard file either is complete or does not exist, so an interrupted run
        # resumes at the shards missing.
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        _write_file(p, lambda tmp: save_file(arrays, str(tmp)))


def _open_shards(shards: _Shards, ranks: _distributed.Ranks | None) -> None:
    """Rank 0 writes (or checks) the manifest before the others check it, so no two ranks
    create it at once; an error on any rank stops every rank."""
    rank = 0 if ranks is None else ranks.rank
    _distributed.exchange(ranks, lambda: shards.open() if rank == 0 else None)
    if ranks is not None:
        _distributed.exchange(ranks, lambda: shards.open() if rank != 0 else None)


def _run_shards(ranks: _distributed.Ranks | None, shards: _Shards, n_shards: int, span: Any, valid: Any,
                compute: Any, consume: Any, bar: Any) -> None:
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
        for j, item in enumerate(_distributed.exchange(ranks, lambda: work(start + rank))):
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
    ids, values = softmax_topk(x.numpy(), k, n_threads=torch.get_num_threads())
    return torch.from_numpy(values), torch.from_numpy(ids)


#: Logits per batch (batch x base vocabulary) from which distill applies the head itself (see _LastLogits).
_HEAD_MIN_LOGITS = 2**20


class _LastLogits:
    """Last-position logits over the base vocabulary for a batch of token contexts.

    In general the model's own forward (``logits_to_keep=1`` when supported).
    On CPU in the model's dtype (no autocast), float32, when the output head is
    a plain ``nn.Linear`` applied to the body's last hidden state (Llama, Qwen2,
    GPT-2, ...), the head runs here instead, into one logits buffer reused
    across batches: a fresh (batch x vocab) tensor per forward pays page faults
    that cost as much as the head's GEMM itself at small hidden sizes, and new
    tokens' columns are never computed.  The shortcut is checked once against
    the model's forward on the first two contexts and dropped if they disagree
    (soft-capped or scaled logits, a custom head).  Below ``_HEAD_MIN_LOGITS``
    logits per batch (a small vocabulary) fresh logits are cheap and the check
    would cost more than it saves, so the model's forward is used.
    """

    def __init__(self, model: nn.Module, n_base: int, dev: torch.device, dtype: Any, batch: int) -> None:
        self.model = model
        self.n_base = n_base
        self.kwargs = _forward_kwargs(model)
        self.buf: torch.Tensor | None = None
        self.head: tuple[nn.Module, torch.Tensor, torch.Tensor | None] | None = None
        self.checked = False
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        base = getattr(out, "base_layer", out)  # NewTokenOutputLayer wraps the base head
        body = getattr(model, "base_model", None)
        if (dev.type == "cpu" and n_base * batch >= _HEAD_MIN_LOGITS
                and (dtype is None or dtype == _model_dtype(model)) and isinstance(base, nn.Linear)
                and base.weight.dtype == torch.float32 and isinstance(body, nn.Module) and body is not model
                and base.weight.shape[0] >= n_base):
            self.head = (body, base.weight, base.bias)

    def _model_logits(self, inp: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=inp, use_cache=False, **self.kwargs).logits[:, -1, : self.n_base]

    def _head_logits(self, inp: torch.Tensor) -> torch.Tensor:
        assert self.head is not None
        body, weight, bias = self.head
        hidden = body(input_ids=inp, use_cache=False).last_hidden_state[:, -1]
        b = inp.shape[0]
        if self.buf is None or self.buf.shape[0] < b:
            self.buf = torch.empty(b, self.n_base, dtype=torch.float32)
        out = self.buf[:b]
        w = weight[: self.n_base]
        if bias is None:
            torch.mm(hidden, w.t(), out=out)
        else:
            torch.addmm(bias[: self.n_base], hidden, w.t(), out=out)
        return out

    def decide(self, inp: torch.Tensor) -> None:
        """Keep the head shortcut only if it gives the model's logits on the contexts ``inp`` (done once)."""
        if self.head is None or self.checked:
            return
        self.checked = True
        ref = self._model_logits(inp[:2])
        try:
            got = self._head_logits(inp[:2])
            same = got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-4,
                                                             atol=1e-5 * float(ref.abs().max()) + 1e-6)
        except (TypeError, AttributeError, RuntimeError, ValueError):
            same = False
        if not same:
            self.head = None

    def __call__(self, inp: torch.Tensor) -> torch.Tensor:
        self.decide(inp)
        return self._head_logits(inp) if self.head is not None else self._model_logits(inp)


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
    dist: bool | None = None,
    group: Any = None,
) -> TransitionMatrix:
    """Distill a causal LM into a sparse Markov transition matrix over its base vocabulary.

    ``mode='token'``: row ``v`` is the model's next-token distribution after
    the one-token context ``prefix + [v]``.  ``mode='corpus'``: row ``v`` is
    the average of the next-token distributions at every occurrence of ``v`` in
    ``sequences`` (in its real context).  Softmax is taken in float32 over the
    base vocabulary and the top ``top_k`` entries are selected on the device;
    only those indices and probabilities are copied to the host.  The mass
    left out becomes the row's tail.

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
        Token mode: ids put before each token, e.g. ``[tokenizer.bos_token_id]``
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
        top-k entries; the rest of its mass counts toward the tail.
    shard_rows : int, optional
        Rows (token mode) or sequences (corpus mode) per shard file.
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
        ``matrix.safetensors``.  With ``device=None`` each rank runs on
        ``cuda:LOCAL_RANK`` when CUDA is available.  Progress is shown on rank
        0.  See docs/howto/distributed.md.
    group : torch.distributed.ProcessGroup, optional
        The group to spread over (default: the default group).

    Returns
    -------
    TransitionMatrix
        ``n_states = n_base`` (the model's base vocabulary), float32 rows.

    Raises
    ------
    ValueError
        Bad ``top_k``, ``batch_size``, ``mode``, missing ``sequences``, or an
        ``out`` directory holding a run with other settings.
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
        if device is None:
            device = _distributed.local_device()
    # Checked on every rank inside one exchange: a rank that refuses its arguments stops the others.
    rows, k, n_base, context, dev = _distributed.checked(ranks, lambda: _arguments(
        model, mode, top_k, batch_size, shard_rows, token_ids, prefix, sequences, device))
    was_training = model.training
    model.eval()
    try:
        if mode == "token":
            return _distill_tokens(model, rows, context, k, n_base, batch_size, dev, dtype, progress, out,
                                   shard_rows, ranks)
        return _distill_corpus(model, context, rows, k, n_base, batch_size, dev, dtype, progress, out, shard_rows,
                               ranks)
    finally:
        model.train(was_training)


def _arguments(model: nn.Module, mode: str, top_k: Any, batch_size: Any, shard_rows: Any, token_ids: Any,
               prefix: Any, sequences: Any, device: Any) -> tuple[np.ndarray, int, int, Any, torch.device]:
    """distill's arguments checked: (rows, k, n_base, the prefix (token mode) or the sequences
    (corpus mode), the device, with the model moved there)."""
    if mode not in ("token", "corpus"):
        raise ValueError(f"mode is {mode!r}; expected 'token' or 'corpus'")
    if not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k is {top_k!r}; expected an integer >= 1")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size is {batch_size!r}; expected None or an integer >= 1")
    if shard_rows is not None and int(shard_rows) < 1:
        raise ValueError(f"shard_rows is {shard_rows!r}; expected None or an integer >= 1")
    n_base = _n_base(model)
    k = int(min(top_k, n_base))
    rows = np.arange(n_base, dtype=np.int64) if token_ids is None else _as_id_list(token_ids, "token_ids", n_base)
    if rows.size == 0:
        raise ValueError("token_ids is empty; expected at least one token")
    if len(np.unique(rows)) != rows.size:
        raise ValueError("token_ids has repeated ids")
    if mode == "token":
        if sequences is not None:
            raise ValueError("sequences is only used with mode='corpus'")
        context: Any = np.zeros(0, np.int64) if prefix is None else _as_id_list(prefix, "prefix", _n_embeddable(model))
    else:
        if prefix is not None:
            raise ValueError("prefix is only used with mode='token' (corpus contexts are the sequences themselves)")
        context = _as_sequences(sequences, _n_embeddable(model))
    return rows, k, n_base, context, _prepare_device(model, device)


def _finish(P: TransitionMatrix, shards: _Shards, ranks: _distributed.Ranks | None) -> TransitionMatrix:
    """Rank 0 writes ``matrix.safetensors``; every rank returns once it is written."""
    def save() -> None:
        if shards.dir is not None and (ranks is None or ranks.rank == 0):
            meta = {f"distill.{key}": json.dumps(value) for key, value in shards.manifest.items()}
            P.save(shards.dir / "matrix.safetensors", metadata=meta)

    _distributed.checked(ranks, save)
    return P


def _distill_tokens(model: nn.Module, rows: np.ndarray, pre: np.ndarray, k: int, n_base: int,
                    batch_size: int | None, dev: torch.device, dtype: Any, progress: bool,
                    out: Any, shard_rows: int | None, ranks: _distributed.Ranks | None) -> TransitionMatrix:
    n = rows.size
    n_logits = _n_embeddable(model)
    batch = int(batch_size) if batch_size is not None else _auto_batch(n_logits)
    per_shard = int(shard_rows) if shard_rows is not None else max(batch, (16 * 2**20) // (8 * k) // batch * batch)
    manifest = {
        "format": _FORMAT, "version": 1, "mode": "token", "top_k": k, "n_base": n_base,
        "prefix": [int(x) for x in pre], "rows": _digest(rows), "n_rows": int(n),
        "shard_rows": per_shard, "model": base_fingerprint(model) if out is not None else "",
    }
    shards = _Shards(out, manifest)
    _open_shards(shards, ranks)
    indices = np.empty((n, k), dtype=np.int32)
    probs = np.empty((n, k), dtype=np.float32)
    n_shards = -(-n // per_shard)
    last_logits = _LastLogits(model, n_base, dev, dtype, batch)
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
    return _finish(P, shards, ranks)


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


def _distill_corpus(model: nn.Module, seqs: list[np.ndarray], rows: np.ndarray, k: int, n_base: int,
                    batch_size: int | None, dev: torch.device, dtype: Any, progress: bool,
                    out: Any, shard_rows: int | None, ranks: _distributed.Ranks | None) -> TransitionMatrix:
    import scipy.sparse as sp

    if ranks is not None:
        raise NotImplementedError("corpus mode across processes is not available yet")

    n_logits = _n_embeddable(model)
    max_len = max(s.size for s in seqs)
    batch = int(batch_size) if batch_size is not None else _auto_batch(n_logits * max(1, max_len))
    per_shard = int(shard_rows) if shard_rows is not None else max(batch, 256 // batch * batch)
    offsets = np.cumsum([0] + [s.size for s in seqs])
    manifest = {
        "format": _FORMAT, "version": 1, "mode": "corpus", "top_k": k, "n_base": n_base,
        "rows": _digest(rows), "sequences": _digest(np.concatenate(seqs), offsets), "n_sequences": len(seqs),
        "shard_rows": per_shard, "model": base_fingerprint(model) if out is not None else "",
    }
    shards = _Shards(out, manifest)
    shards.open()
    wanted = np.zeros(n_logits, dtype=bool)
    wanted[rows] = True
    wanted_t = torch.as_tensor(wanted, device=dev)
    total = sp.csr_array((n_base, n_base), dtype=np.float64)
    counts = np.zeros(n_base, dtype=np.int64)
    n_shards = -(-len(seqs) // per_shard)
    todo = []
    done = 0
    for s in range(n_shards):
        got = shards.load(s)
        if got is None:
            todo.append(s)
            continue
        total = total + sp.csr_array((got["data"], got["indices"], got["indptr"]), shape=(n_base, n_base))
        counts += got["counts"]
        done += min(len(seqs), (s + 1) * per_shard) - s * per_shard
    bar = _progress(len(seqs), done, "distill (corpus)", progress, "seq")
    try:
        with torch.no_grad(), _autocast(dev, dtype, model):
            for s in todo:
                a, b = s * per_shard, min(len(seqs), (s + 1) * per_shard)
                r_parts, c_parts, v_parts = [], [], []
                shard_counts = np.zeros(n_base, dtype=np.int64)
                for i in range(a, b, batch):
                    chunk = seqs[i:min(b, i + batch)]
                    length = max(c.size for c in chunk)
                    ids = np.zeros((len(chunk), length), dtype=np.int64)
                    mask = np.zeros((len(chunk), length), dtype=np.int64)
                    for r, c in enumerate(chunk):
                        ids[r, :c.size] = c
                        mask[r, :c.size] = 1
                    ids_t = torch.as_tensor(ids, device=dev)
                    mask_t = torch.as_tensor(mask, device=dev)
                    logits = model(input_ids=ids_t, attention_mask=mask_t, use_cache=False).logits
                    # Right padding leaves every real position's context unchanged.
                    keep = mask_t.bool() & wanted_t[ids_t]
                    if bool(keep.any()):
                        selected = logits[keep][:, :n_base]
                        del logits
                        values, top = _select_topk(selected, k)
                        del selected
                        # The device -> host copy: the owning token, k ids and k probabilities per occurrence.
                        owner = ids_t[keep].cpu().numpy()
                        r_parts.append(np.repeat(owner, k))
                        c_parts.append(top.cpu().numpy().reshape(-1))
                        v_parts.append(values.cpu().numpy().reshape(-1).astype(np.float64))
                        np.add.at(shard_counts, owner, 1)
                    else:
                        del logits
                    bar.update(len(chunk))
                if r_parts:
                    part = sp.coo_array(
                        (np.concatenate(v_parts), (np.concatenate(r_parts), np.concatenate(c_parts))),
                        shape=(n_base, n_base),
                    ).tocsr()
                else:
                    part = sp.csr_array((n_base, n_base), dtype=np.float64)
                part.sum_duplicates()
                shards.save(s, {"indptr": part.indptr.astype(np.int64), "indices": part.indices.astype(np.int32),
                                "data": part.data.astype(np.float64), "counts": shard_counts})
                total = total + part
                counts += shard_counts
    finally:
        bar.close()
    return _finish(_average_topk(sp.csr_array(total), counts, k, n_base), shards, None)


def _average_topk(total: Any, counts: np.ndarray, k: int, n_base: int) -> TransitionMatrix:
    """Rows of ``total / counts``, each cut to its ``k`` largest entries (sorted ids)."""
    import scipy.sparse as sp

    total.sum_duplicates()
    indptr, indices, data = total.indptr, total.indices, total.data
    out_ptr = np.zeros(n_base + 1, dtype=np.int64)
    out_idx, out_val = [], []
    for v in range(n_base):
        a, b = int(indptr[v]), int(indptr[v + 1])
        if b == a or counts[v] == 0:
            out_ptr[v + 1] = out_ptr[v]
            continue
        vals = data[a:b] / counts[v]
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


def next_token_counts(sequences: Iterable[Sequence[int]], new_token_ids: Sequence[int], n_base: int) -> Any:
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
        A negative token id.
    """
    import scipy.sparse as sp

    n_base = int(n_base)
    if n_base < 1:
        raise ValueError(f"n_base is {n_base}; expected >= 1")
    new = np.asarray(new_token_ids, dtype=np.int64).reshape(-1)
    if new.size == 0:
        raise ValueError("new_token_ids is empty; expected at least one id")
    if len(np.unique(new)) != new.size:
        raise ValueError("new_token_ids has repeated ids")
    if new.min() < 0:
        raise IndexError(f"new_token_ids holds a negative id ({int(new.min())})")
    seqs = _as_sequences(sequences, np.iinfo(np.int64).max)
    top = int(max(new.max(), max((int(s.max()) for s in seqs if s.size), default=0))) + 1
    row_of = np.full(top, -1, dtype=np.int64)
    row_of[new] = np.arange(new.size)
    r_parts, c_parts = [], []
    for s in seqs:
        if s.size < 2:
            continue
        src, dst = s[:-1], s[1:]
        keep = (row_of[src] >= 0) & (dst < n_base)
        r_parts.append(row_of[src[keep]])
        c_parts.append(dst[keep])
    r = np.concatenate(r_parts) if r_parts else np.zeros(0, np.int64)
    c = np.concatenate(c_parts) if c_parts else np.zeros(0, np.int64)
    counts = sp.coo_array((np.ones(r.size), (r, c)), shape=(new.size, n_base)).tocsr()
    counts.sum_duplicates()
    counts.sort_indices()
    return counts
