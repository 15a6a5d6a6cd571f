"""Bad input at every public entry point: each case runs in its own interpreter, so a
crash shows up as a signal (a negative return code) instead of killing pytest, and a hang
as a timeout.  A case passes when it raises the expected exception type (or a subclass)
and the process exits normally, or, for cases expecting None, when it runs to the end.

CASES is a plain table (id, code, expected exception name or None) that other suites
can run the same way; the code sees ``np``, ``mm``, ``sp``, ``os``, a small matrix ``P``,
its counts ``C``, its file ``GOOD`` (written with ``P.save``) and a scratch directory ``TMP``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

#: Seconds a case may take (a blocking open or a quadratic parse would exceed it).
TIMEOUT = 60

PRELUDE = """
import os, struct, sys, json
import numpy as np
import scipy.sparse as sp
import markovmem as mm
TMP = os.environ["MM_BAD_INPUT_TMP"]
P = mm.TransitionMatrix.from_scipy(np.array([[0.5, 0.25, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0],
                                             [0.1, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]))
C = sp.csr_array(np.array([[3.0, 1.0, 0.0, 0.0]]))
GOOD = os.path.join(TMP, "good.safetensors")
P.save(GOOD, metadata={"note": "original"})

def header_file(path, header, data=b""):
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(len(text) + 8)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
    return path
"""

WRAPPER = """
try:
{body}
except BaseException as exc:
    print("RAISED " + " ".join(c.__name__ for c in type(exc).__mro__), file=sys.stderr)
    raise
print("FINISHED", file=sys.stderr)
"""

# (id, code, expected exception class name, or None for "runs to the end without a signal")
CASES: list[tuple[str, str, str | None]] = [
    # -- n_threads: 1 to 4 x the processors; 0 or None is the OpenMP default (issue 18, item 5)
    (
        "softmax_topk-n_threads-200k",
        "mm.softmax_topk(np.zeros((2, 8), np.float32), 1, n_threads=200_000)",
        "ValueError",
    ),
    (
        "softmax_topk-n_threads-int32-max",
        "mm.softmax_topk(np.zeros((2, 8), np.float32), 1, n_threads=2**31 - 1)",
        "ValueError",
    ),
    ("softmax_topk-n_threads-2**40", "mm.softmax_topk(np.zeros((2, 8), np.float32), 1, n_threads=2**40)", "ValueError"),
    ("softmax_topk-n_threads-negative", "mm.softmax_topk(np.zeros((2, 8), np.float32), 1, n_threads=-1)", "ValueError"),
    ("softmax_topk-n_threads-float", "mm.softmax_topk(np.zeros((2, 8), np.float32), 1, n_threads=1.5)", "TypeError"),
    ("softmax_topk-n_threads-bool", "mm.softmax_topk(np.zeros((2, 8), np.float32), 1, n_threads=True)", "TypeError"),
    ("fit_alpha-n_threads", "mm.fit_alpha(P, C, s=1, n_threads=200_000, progress=False)", "ValueError"),
    ("closed_form_alpha-n_threads", "mm.closed_form_alpha(P, C, [[0]], n_threads=200_000)", "ValueError"),
    (
        "from_topk-n_threads",
        "mm.TransitionMatrix.from_topk(np.zeros((2, 1), np.int32), np.ones((2, 1), np.float32), n_threads=200_000)",
        "ValueError",
    ),
    ("from_sequences-n_threads", "mm.TransitionMatrix.from_sequences([[0, 1, 2]], 3, n_threads=200_000)", "ValueError"),
    ("from_scipy-n_threads", "mm.TransitionMatrix.from_scipy(np.eye(3), n_threads=2**31 - 1)", "ValueError"),
    ("load-n_threads", "mm.TransitionMatrix.load(GOOD, n_threads=200_000)", "ValueError"),
    ("prob-n_threads", "P.prob(np.arange(4), np.arange(4), n_threads=200_000)", "ValueError"),
    ("step-n_threads", "P.step(np.full(4, 0.25), n_threads=200_000)", "ValueError"),
    ("expand-n_threads", "P.expand(np.full((1, 4), 0.25), n_threads=200_000)", "ValueError"),
    ("verify_expansion-n_threads", "mm.verify_expansion(P, P, n_threads=200_000)", "ValueError"),
    # The core clamps what reaches it directly (the private module, bypassing the checks above).
    ("core-softmax_topk-n_threads-200k", "mm._core.softmax_topk(np.zeros((64, 8), np.float32), 1, 200_000)", None),
    (
        "core-fit-n_threads-int32-max",
        (
            "mm._core.closed_form_alpha(P._m, np.array([0, 1]), np.array([0], np.int32), np.array([1.0]),"
            " np.array([0, 1]), np.array([0], np.int32), 2**31 - 1)"
        ),
        None,
    ),
    # -- the header parser: linear, with caps on entries and nesting (item 6)
    (
        "header-160k-keys",
        (
            "meta = {'format': 'markovmem.TransitionMatrix', 'format_version': '1', 'n_states': '1', 'n_base': '1',"
            " 'nnz': '0', 'fingerprint': '0' * 16}\n"
            "meta.update({'k%d' % i: '' for i in range(160_000)})\n"
            "mm.TransitionMatrix.load(header_file(os.path.join(TMP, 'keys.safetensors'), {'__metadata__': meta}))"
        ),
        "ValueError",
    ),
    (
        "header-nesting-1000",
        "mm.TransitionMatrix.load(header_file(os.path.join(TMP, 'deep.safetensors'), b'[' * 1000 + b']' * 1000))",
        "ValueError",
    ),
    (
        "header-duplicate-key",
        (
            "blob = open(GOOD, 'rb').read().replace(b'\"note\"', b'\"nnz\"', 1)\n"
            "open(os.path.join(TMP, 'dup.safetensors'), 'wb').write(blob)\n"
            "mm.TransitionMatrix.load(os.path.join(TMP, 'dup.safetensors'))"
        ),
        "ValueError",
    ),
    # -- user metadata covered by verify=True (item 4)
    (
        "verify-edited-metadata",
        (
            "blob = open(GOOD, 'rb').read().replace(b'original', b'Original', 1)\n"
            "open(os.path.join(TMP, 'meta.safetensors'), 'wb').write(blob)\n"
            "mm.TransitionMatrix.load(os.path.join(TMP, 'meta.safetensors'), verify=True)"
        ),
        "ValueError",
    ),
    # -- a mapped file rewritten in place: values may change, addresses never (item 7)
    (
        "mmap-rewritten-in-place",
        (
            "Q = mm.TransitionMatrix.load(GOOD, mmap=True)\n"
            "n = struct.unpack('<Q', open(GOOD, 'rb').read(8))[0]\n"
            "size = os.path.getsize(GOOD)\n"
            "with open(GOOD, 'r+b') as f:\n"
            "    f.seek(8 + n)\n"
            "    f.write(b'\\xff' * (size - 8 - n))\n"
            "Q.row(3); Q.prob(3, 1); Q.prob(np.arange(4), np.arange(4)); Q.step(np.full(4, 0.25)); Q.to_dense()\n"
            "Q.to_scipy().toarray(); Q.sample(0, 20, seed=1); Q.log_likelihood([[0, 1, 2, 3]]); Q.fingerprint()\n"
            "Q.stationary(max_iter=5)\n"
            "for call in (lambda: Q.validate(), lambda: mm.fit_alpha(Q, C, s=2, progress=False),\n"
            "             lambda: mm.closed_form_alpha(Q, C, [[0, 3]]), lambda: Q.expand(np.full((1, 4), 0.25))):\n"
            "    try:\n"
            "        call()\n"
            "    except ValueError:\n"
            "        pass"
        ),
        None,
    ),
    # -- paths (item 11)
    (
        "load-fifo",
        "os.mkfifo(os.path.join(TMP, 'fifo'))\nmm.TransitionMatrix.load(os.path.join(TMP, 'fifo'))",
        "OSError",
    ),
    ("load-directory", "mm.TransitionMatrix.load(TMP)", "IsADirectoryError"),
    (
        "load-non-utf8-missing",
        "mm.TransitionMatrix.load(os.fsencode(TMP) + b'/\\xff\\xfe.safetensors')",
        "FileNotFoundError",
    ),
    (
        "load-non-utf8-corrupt",
        (
            "p = os.fsencode(TMP) + b'/bad-\\xff.safetensors'\nopen(p, 'wb').write(b'not a matrix file')\n"
            "mm.TransitionMatrix.load(p)"
        ),
        "ValueError",
    ),
    ("load-null-byte", "mm.TransitionMatrix.load(GOOD + '\\0.bak')", "ValueError"),
    ("save-non-utf8-missing-dir", "P.save(os.fsencode(TMP) + b'/\\xff/x.safetensors')", "FileNotFoundError"),
    # -- lax coercions: floats are not truncated, bools are not ids or sizes, strings not numbers (item 14)
    ("from_scipy-n_base-float", "mm.TransitionMatrix.from_scipy(np.eye(3), n_base=2.5)", "TypeError"),
    ("from_scipy-n_base-bool", "mm.TransitionMatrix.from_scipy(np.eye(3), n_base=True)", "TypeError"),
    (
        "from_topk-n_base-float",
        "mm.TransitionMatrix.from_topk(np.zeros((2, 1), np.int32), np.ones((2, 1), np.float32), n_base=2.0)",
        "TypeError",
    ),
    ("from_sequences-top_k-float", "mm.TransitionMatrix.from_sequences([[0, 1, 2]], 3, top_k=1.5)", "TypeError"),
    ("from_sequences-n_states-float", "mm.TransitionMatrix.from_sequences([[0, 1, 2]], 3.5)", "TypeError"),
    ("from_sequences-n_states-bool", "mm.TransitionMatrix.from_sequences([[0, 0]], True)", "TypeError"),
    ("from_sequences-smoothing-str", "mm.TransitionMatrix.from_sequences([[0, 1, 2]], 3, smoothing='1')", "TypeError"),
    ("from_sequences-bool-ids", "mm.TransitionMatrix.from_sequences([[True, False]], 2)", "TypeError"),
    ("fit_alpha-seed-float", "mm.fit_alpha(P, C, s=1, seed=1.5, progress=False)", "TypeError"),
    ("fit_alpha-s-bool", "mm.fit_alpha(P, C, s=True, progress=False)", "TypeError"),
    ("fit_alpha-max_iter-float", "mm.fit_alpha(P, C, s=1, max_iter=2.5, progress=False)", "TypeError"),
    ("fit_alpha-bound-str", "mm.fit_alpha(P, C, s=1, bound='10', progress=False)", "TypeError"),
    ("fit_alpha-support-bools", "mm.fit_alpha(P, C, support=[np.array([True, False])], progress=False)", "TypeError"),
    ("sample-seed-float", "P.sample(0, 5, seed=1.5)", "TypeError"),
    ("sample-start-bool", "P.sample(True, 5)", "TypeError"),
    ("sample-length-float", "P.sample(0, 5.5)", "TypeError"),
    ("prob-bool-state", "P.prob(True, 0)", "TypeError"),
    ("prob-bool-array", "P.prob(np.array([True]), np.array([0]))", "TypeError"),
    ("row-bool", "P.row(False)", "TypeError"),
    ("step-complex", "P.step(np.full(4, 0.25 + 0.5j))", "TypeError"),
    ("stationary-max_iter-float", "P.stationary(max_iter=10.5)", "TypeError"),
    ("softmax_topk-k-float", "mm.softmax_topk(np.zeros((2, 8), np.float32), 1.5)", "TypeError"),
    ("from_scipy-tol-str", "mm.TransitionMatrix.from_scipy(np.eye(3), tol='0.1')", "TypeError"),
]


def run_case(code: str, tmp_dir: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``code`` after PRELUDE in a fresh interpreter (stderr ends with RAISED <mro> or FINISHED)."""
    script = PRELUDE + WRAPPER.format(body=textwrap.indent(code, "    "))
    env = dict(os.environ, MM_BAD_INPUT_TMP=tmp_dir)
    return subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(("code", "expected"), [pytest.param(c, e, id=i) for i, c, e in CASES])
def test_bad_input_raises_without_a_signal(tmp_path, code, expected):
    out = run_case(code, str(tmp_path))
    assert out.returncode >= 0, f"killed by signal {-out.returncode}: {out.stderr[-2000:]}"
    if expected is None:
        assert out.returncode == 0 and "FINISHED" in out.stderr, out.stderr[-2000:]
    else:
        raised = [line for line in out.stderr.splitlines() if line.startswith("RAISED ")]
        assert raised, f"no exception (expected {expected}): {out.stderr[-2000:]}"
        assert expected in raised[-1].split()[1:], f"expected {expected}; got {raised[-1]}: {out.stderr[-2000:]}"
