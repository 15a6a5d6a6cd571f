"""A checked reader of safetensors bytes for expansion files: every header field is
validated (sizes, offsets, dtypes, shapes, duplicate keys) before a tensor is built,
and each error is a ValueError naming the file and the field."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["StFile", "content_fingerprint", "parse", "tensor_record"]

#: safetensors dtype names <-> torch dtypes (those expansion files use).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
}
_NAMES = {v: k for k, v in DTYPES.items()}
#: Cap on the JSON header (safetensors' own limit is 100 MB; an expansion header is a few KB
#: plus the token list).
MAX_HEADER = 100 * 2**20


class StFile:
    """Parsed safetensors bytes: ``tensors`` (name -> torch tensor owning its memory),
    ``metadata`` (str -> str) and ``records`` (name -> (dtype name, shape, raw bytes))."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str],
        records: dict[str, tuple[str, tuple[int, ...], bytes]],
    ) -> None:
        self.tensors = tensors
        self.metadata = metadata
        self.records = records


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice")
        out[k] = v
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse(data: bytes, where: str) -> StFile:
    """Check and parse a whole safetensors file held in memory.

    Parameters
    ----------
    data : bytes
        The file's bytes.
    where : str
        How to name the file in errors (its path, quoted).

    Raises
    ------
    ValueError
        Anything malformed; the message names ``where`` and the field.
    """
    if len(data) < 8:
        raise ValueError(f"{where} is not a safetensors file: {len(data)} bytes, shorter than the 8-byte header size")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER, len(data) - 8):
        raise ValueError(
            f"{where} is not a safetensors file: header size {n} exceeds the file "
            f"({len(data) - 8} bytes after the size) or {MAX_HEADER}"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{where} has a corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        # A corrupt file, not a wrong argument: ValueError like every other corruption.
        raise ValueError(f"{where} has a safetensors header that is a {type(header).__name__}; expected an object")  # noqa: TRY004
    body = memoryview(data)[8 + n :]
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"{where}: __metadata__ must map strings to strings")
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for name, info in header.items():
        field = f"{where}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{field} must have exactly dtype, shape and data_offsets; got {info!r:.200}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise ValueError(f"{field} has dtype {dtype!r:.50}; expected one of {sorted(DTYPES)}")
        # Sizes stay below 2**62 so torch (int64 sizes) never sees an overflowing dimension.
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(s) and 0 <= s < 2**62 for s in shape):
            raise ValueError(f"{field} has shape {shape!r:.100}; expected a list of at most 8 ints in [0, 2**62)")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= len(body)
        ):
            raise ValueError(
                f"{field} has data_offsets {offsets!r:.100}; expected [begin, end] within the {len(body)} data bytes"
            )
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != numel * itemsize:
            raise ValueError(
                f"{field} spans {offsets[1] - offsets[0]} bytes; shape {tuple(shape)} of "
                f"{dtype} needs {numel * itemsize}"
            )
        raw = bytes(body[offsets[0] : offsets[1]])
        # bytearray: the tensor owns writable memory (torch warns on read-only buffers).
        t = torch.frombuffer(bytearray(raw), dtype=DTYPES[dtype]) if raw else torch.empty(0, dtype=DTYPES[dtype])
        tensors[name] = t.reshape(shape)
        records[name] = (dtype, tuple(shape), raw)
    return StFile(tensors, dict(meta), records)


def tensor_record(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """(safetensors dtype name, shape, raw little-endian bytes) of a CPU tensor, as the file stores it."""
    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return _NAMES[t.dtype], tuple(t.shape), raw


def content_fingerprint(
    records: Iterable[tuple[str, tuple[str, tuple[int, ...], bytes]]], metadata: dict[str, str], skip: str
) -> str:
    """blake2b (32 hex digits) over every tensor (name, dtype, shape, bytes) and every metadata
    entry except ``skip`` (the key that stores the fingerprint itself)."""
    h = hashlib.blake2b(digest_size=16)
    for name, (dtype, shape, raw) in sorted(records):
        h.update(json.dumps([name, dtype, list(shape), len(raw)]).encode())
        h.update(raw)
    h.update(json.dumps(sorted((k, v) for k, v in metadata.items() if k != skip)).encode())
    return h.hexdigest()
