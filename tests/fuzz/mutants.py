"""Seed files and hypothesis strategies that mutate them: bit flips, truncation, byte
overwrites, header-size edits, JSON header edits, and tensor (CSR) rewrites, optionally
re-signed so an expansion file's content fingerprint matches and deeper checks run."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

#: Vocabulary of the tiny base models the expansion seeds are made for.
V = 48
#: (architecture, tied, block_output) of each expansion seed.
EXPANSION_BASES = {"llama": (True, True), "qwen2": (False, False)}

_NP = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "U32": "<u4",
    "I8": "i1",
    "U8": "u1",
    "U64": "<u8",
    "I16": "<i2",
    "U16": "<u2",
    "BOOL": "u1",
    "BF16": "<u2",
}
INTS = [0, 1, -1, 2, 3, 7, 8, 47, 48, 49, 255, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, -(2**63), 10**12]
FLOATS = [0.0, -0.0, 0.5, 1.0, 2.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-45, 3.4e38, 1e300]
JSON_VALUES = st.one_of(
    st.sampled_from(INTS),
    st.integers(-(2**64), 2**64),
    st.sampled_from([1.5, -0.0, 1e308, None, True, False]),
    st.text(max_size=8),
    st.lists(st.sampled_from(INTS), max_size=4),
    st.just({"a": 1}),
    st.just([[[[[[[[[[]]]]]]]]]]),
)
META_STRINGS = st.one_of(
    st.sampled_from(
        [
            "",
            "-1",
            "0",
            "2.5",
            "1e9",
            "true",
            "null",
            "[]",
            "[1, 2]",
            "[48, 1e30]",
            '["a", "a"]',
            '["", "b"]',
            "[1, 2]",
            '{"x": 1}',
            "[" * 100_000,
            "9" * 400,
            "NaN",
            '"x"',
            "\ud800",
        ]
    ),
    st.text(max_size=12),
    st.builds(json.dumps, st.lists(st.sampled_from(INTS), max_size=3)),
)


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header dict, data bytes) of a valid safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def blobs_of(header: dict[str, Any], body: bytes) -> dict[str, bytes]:
    return {k: body[v["data_offsets"][0] : v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}


def build(header: dict[str, Any], blobs: dict[str, bytes], *, keep_offsets: bool = False) -> bytes:
    """Serialise a safetensors file; offsets are recomputed in order unless ``keep_offsets``."""
    header = json.loads(json.dumps(header))
    body = b""
    for name, blob in blobs.items():
        if not keep_offsets and isinstance(header.get(name), dict):
            header[name]["data_offsets"] = [len(body), len(body) + len(blob)]
        body += blob
    text = json.dumps(header, ensure_ascii=False).encode("utf-8", "surrogatepass")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def resign(data: bytes) -> bytes:
    """The expansion file with its content fingerprint recomputed (as a forger would); as is if unparseable."""
    from markovmem.llm import _stfile
    from markovmem.llm.expansion_io import _CONTENT_KEY

    try:
        st_file = _stfile.parse(data, "mutant")
        header, body = split(data)
    except (ValueError, UnicodeDecodeError, struct.error):
        return data
    meta = dict(st_file.metadata)
    meta[_CONTENT_KEY] = _stfile.content_fingerprint(st_file.records.items(), meta, _CONTENT_KEY)
    header["__metadata__"] = meta
    return build(header, blobs_of(header, body), keep_offsets=True)


# ---------------------------------------------------------------------- seeds
def matrix_seeds(directory: Path) -> dict[str, bytes]:
    """Two TransitionMatrix.save outputs: a 6-state chain and its expansion by 2 states."""
    import scipy.sparse as sp

    import markovmem as mm

    rng = np.random.default_rng(7)
    dense = rng.random((6, 6)) * (rng.random((6, 6)) < 0.5)
    dense[dense.sum(1) > 0] /= dense[dense.sum(1) > 0].sum(1, keepdims=True) * 1.25
    P = mm.TransitionMatrix.from_scipy(sp.csr_array(dense))
    Q, _ = P.expand(np.array([[0.0, 0.5, 0.5, 0.0, 0.0, 0.0], [0.2, 0.0, 0.0, 0.3, 0.0, 0.0]]))
    out = {}
    for name, M in (("chain6", P), ("expanded8", Q)):
        path = directory / f"seed-{name}.safetensors"
        M.save(path, metadata={"note": "fuzz seed"})
        out[name] = path.read_bytes()
    return out


def expansion_base(arch: str) -> Any:
    from markovmem.llm.testing import tiny_model

    tied, _ = EXPANSION_BASES[arch]
    return tiny_model(arch, V, tied=tied, hidden_size=16, num_layers=1, seed=0)


def expansion_seeds(directory: Path) -> dict[str, bytes]:
    """llm.save_expansion outputs on tiny models: Llama tied and blocked, Qwen2 untied and
    unblocked (output rows stored), both with a sparse alpha; and the Llama one as a
    format-1 file.  Keys name the base architecture first (``arch-variant``)."""
    import scipy.sparse as sp
    import torch

    from markovmem import llm
    from markovmem.llm.testing import tiny_tokenizer

    out = {}
    for arch, (_, block) in EXPANSION_BASES.items():
        model, tok = expansion_base(arch), tiny_tokenizer(V)
        gen = torch.Generator().manual_seed(0)
        llm.add_tokens(
            model, tok, ["glorp", "blip", "zap"], embeddings=torch.randn(3, 16, generator=gen), block_output=block
        )
        alpha = sp.csr_array(([0.25, 0.75, 1.0, 0.5, 0.5], ([0, 0, 1, 2, 2], [3, 9, 11, 4, 40])), shape=(3, V))
        path = directory / f"seed-{arch}.safetensors"
        llm.save_expansion(model, tok, path, alpha=alpha)
        out[arch] = path.read_bytes()
    # A format-1 file (no content fingerprint): every mutant of it meets the structural checks.
    header, body = split(out["llama"])
    del header["__metadata__"]["content_fingerprint"]
    header["__metadata__"]["version"] = "1"
    out["llama-v1"] = build(header, blobs_of(header, body))
    return out


# ---------------------------------------------------------------------- mutations
def _tensor_values(dtype: str, n: int) -> st.SearchStrategy[bytes]:
    """``n`` values of a safetensors dtype, drawn from edge cases and random values, as bytes."""
    np_dtype = np.dtype(_NP.get(dtype, "u1"))
    if np_dtype.kind == "f" or dtype == "BF16":
        values = st.one_of(st.sampled_from(FLOATS), st.floats(allow_nan=True, allow_infinity=True, width=64))

        def pack(v: list[float]) -> bytes:
            with np.errstate(over="ignore", invalid="ignore"):
                arr = np.array(v, dtype=np.float64)
                if dtype == "BF16":
                    return (arr.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
                return arr.astype(np_dtype).tobytes()
    else:
        info = np.iinfo(np_dtype)
        values = st.one_of(
            st.sampled_from([x for x in INTS if info.min <= x <= info.max]), st.integers(int(info.min), int(info.max))
        )

        def pack(v: list[int]) -> bytes:
            return np.array(v, dtype=object).astype(np_dtype).tobytes()

    return st.lists(values, min_size=n, max_size=n).map(pack)


@st.composite
def _bit_flips(draw: Any, data: bytes) -> tuple[bytes, str]:
    bits = draw(st.lists(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=8))
    out = bytearray(data)
    for b in bits:
        out[b // 8] ^= 1 << (b % 8)
    return bytes(out), f"bit flips at {bits}"


@st.composite
def _truncate(draw: Any, data: bytes) -> tuple[bytes, str]:
    k = draw(st.integers(0, len(data) - 1))
    return data[:k], f"truncated to {k} bytes"


@st.composite
def _overwrite(draw: Any, data: bytes) -> tuple[bytes, str]:
    pos = draw(st.integers(0, len(data) - 1))
    junk = draw(st.binary(min_size=1, max_size=16))
    return data[:pos] + junk + data[pos + len(junk) :], f"bytes {junk!r} at {pos}"


@st.composite
def _header_size(draw: Any, data: bytes) -> tuple[bytes, str]:
    n = draw(
        st.one_of(
            st.sampled_from([0, 1, 7, 8, len(data) - 8, len(data), 100 * 2**20, 2**63, 2**64 - 1]),
            st.integers(0, 2**64 - 1),
        )
    )
    return struct.pack("<Q", n) + data[8:], f"header size {n}"


@st.composite
def _header_edit(draw: Any, data: bytes) -> tuple[bytes, str]:
    header, body = split(data)
    blobs = blobs_of(header, body)
    meta = header.get("__metadata__", {})
    keys = sorted(k for k in header if k != "__metadata__")
    where = draw(st.sampled_from(["tensor", "meta", "meta", "add_tensor", "drop"]))
    if where == "tensor":
        name = draw(st.sampled_from(keys))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "whole"]))
        if field == "dtype":
            value: Any = draw(
                st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "X9", "", 7, None])
            )
        elif field == "shape":
            value = draw(st.one_of(st.lists(st.sampled_from(INTS), max_size=4), JSON_VALUES))
        elif field == "data_offsets":
            value = draw(st.one_of(st.lists(st.sampled_from(INTS + [len(body)]), min_size=2, max_size=2), JSON_VALUES))
        elif field == "extra":
            value = draw(JSON_VALUES)
        else:
            header[name] = draw(JSON_VALUES)
            return build(header, blobs, keep_offsets=True), f"tensor {name} replaced"
        header[name][field if field != "extra" else "zz"] = value
        return build(header, blobs, keep_offsets=True), f"tensor {name}.{field} = {value!r:.60}"
    if where == "meta":
        key = draw(st.one_of(st.sampled_from(sorted(meta) or ["x"]), st.text(max_size=6)))
        value = draw(st.one_of(META_STRINGS, JSON_VALUES))
        meta[key] = value
        header["__metadata__"] = meta
        return build(header, blobs, keep_offsets=True), f"metadata {key!r} = {value!r:.60}"
    if where == "add_tensor":
        header["extra_tensor"] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        return build(header, blobs, keep_offsets=True), "unknown tensor added"
    victim = draw(st.sampled_from(keys + ["__metadata__"]))
    header.pop(victim, None)
    blobs.pop(victim, None)
    return build(header, blobs), f"{victim} removed"


@st.composite
def _tensor_edit(draw: Any, data: bytes) -> tuple[bytes, str]:
    """Rewrite a tensor's values (same size) or resize it (offsets and shape made consistent)."""
    header, body = split(data)
    blobs = blobs_of(header, body)
    name = draw(st.sampled_from(sorted(blobs)))
    dtype = header[name]["dtype"]
    itemsize = np.dtype(_NP.get(dtype, "u1")).itemsize
    n = len(blobs[name]) // itemsize
    if n and draw(st.booleans()):
        k = draw(st.integers(1, min(n, 4)))
        at = draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k))
        vals = draw(_tensor_values(dtype, k))
        blob = bytearray(blobs[name])
        for j, pos in enumerate(at):
            blob[pos * itemsize : (pos + 1) * itemsize] = vals[j * itemsize : (j + 1) * itemsize]
        blobs[name] = bytes(blob)
        return build(header, blobs), f"{name}: {k} values rewritten at {at}"
    new_n = draw(st.integers(0, max(2 * n, 4)))
    blobs[name] = draw(_tensor_values(dtype, new_n))
    shape = header[name]["shape"]
    width = shape[1] if len(shape) == 2 else 0
    header[name]["shape"] = [new_n // width, width] if width and new_n % width == 0 else [new_n]
    return build(header, blobs), f"{name}: resized to {new_n} values"


def mutation(data: bytes, resignable: bool) -> st.SearchStrategy[tuple[bytes, str]]:
    """One mutant of ``data`` and its description; expansion mutants are re-signed half the time
    after header or tensor edits, so the structural checks behind the fingerprint are reached."""
    plain = st.one_of(_bit_flips(data), _truncate(data), _overwrite(data), _header_size(data))
    edits = st.one_of(_header_edit(data), _tensor_edit(data))
    if resignable:
        edits = st.tuples(edits, st.booleans()).map(
            lambda e: (resign(e[0][0]), e[0][1] + " (re-signed)") if e[1] else e[0]
        )
    return st.one_of(plain, edits, edits)
