"""llm.distill and fit_alpha across the ranks of a gloo process group (spawned processes, and
torchrun for the CLI) against one-process runs: the same fingerprint, the same alphas, resume
after a rank is killed, and every rank stopping with the failing rank's message."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import markovmem as mm
from markovmem import _distributed
from markovmem._fit import _concat_rows, _fit_block

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not torch.distributed.is_available():  # pragma: no cover - CPU builds of torch have gloo
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import itertools

import dist_workers

from markovmem import llm

MODEL_DIR = os.environ.get("MARKOVMEM_TEST_MODEL")
DATA_DIR = os.environ.get("MARKOVMEM_TEST_DATA")
#: stories260k when the environment names it, else a tiny random Llama (both tied, vocab 512 / 96)
MODEL = {"path": MODEL_DIR} if MODEL_DIR else {"tiny": {"arch": "llama", "vocab_size": 96, "hidden_size": 16}}
#: Seconds a spawned run may take before the test fails (imports of torch and transformers included)
LAUNCH_TIMEOUT = 120


@dataclass
class Run:
    codes: list[int | None]  # exit code per rank (-9: SIGKILL)
    logs: list[dict | None]  # what each rank wrote (None: it wrote nothing)
    elapsed: float  # seconds from the start to the last exit
    dir: Path  # the ranks' result files


def launch(tmp_path: Path, job: dict, world: int = 2) -> Run:
    """Runs ``job`` on ``world`` ranks of a gloo group and waits (at most LAUNCH_TIMEOUT) for them."""
    res = tmp_path / f"results-{time.monotonic_ns()}"
    res.mkdir()
    job = dict(job, results=str(res), init_file=str(res / "rendezvous"))
    # A fork server that has imported torch, transformers and markovmem once forks the ranks:
    # each starts in milliseconds instead of importing them again (seconds per rank), and
    # none inherits this process's threads.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(dist_workers.PRELOAD)
    procs = [ctx.Process(target=dist_workers.main, args=(r, world, job)) for r in range(world)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.1, t0 + LAUNCH_TIMEOUT - time.monotonic()))
    elapsed = time.monotonic() - t0
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {LAUNCH_TIMEOUT} s"
    logs = []
    for r in range(world):
        f = res / f"rank-{r}.json"
        logs.append(json.loads(f.read_text()) if f.exists() else None)
    return Run([p.exitcode for p in procs], logs, elapsed, res)


def model():
    return dist_workers.load_model(MODEL)


def corpus_sequences(tmp_path: Path, vocab: int) -> Path:
    """Token sequences of varied lengths: TinyStories paragraphs when the data is there, else random ids."""
    if DATA_DIR and MODEL_DIR:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(MODEL_DIR)
        text = (Path(DATA_DIR) / "tinystories-sample.txt").read_text(encoding="utf-8")
        paragraphs = [t.strip() for t in text.split("\n\n") if t.strip()][:24]
        seqs = [tok(t)["input_ids"][:48] for t in paragraphs]
    else:
        rng = np.random.default_rng(5)
        seqs = [rng.integers(0, vocab, size=int(n)).tolist() for n in rng.integers(3, 30, size=24)]
    path = tmp_path / "sequences.json"
    path.write_text(json.dumps(seqs))
    return path


def planted_fit_problem(tmp_path: Path) -> tuple[Path, Path, sp.csr_array]:
    """A random 600-state dictionary saved to a file, and 9 targets sampled from blends of its rows."""
    rng = np.random.default_rng(11)
    T, k = 600, 12
    idx = np.stack([np.sort(rng.choice(T, k, replace=False)) for _ in range(T)]).astype(np.int32)
    probs = rng.dirichlet(np.ones(k), size=T).astype(np.float32) * 0.9
    P = mm.TransitionMatrix.from_topk(idx, probs)
    path = tmp_path / "P.safetensors"
    P.save(path)
    dense = P.to_dense()
    rows = []
    for _ in range(9):
        atoms = rng.choice(T, 3, replace=False)
        q = dense[atoms].T @ rng.dirichlet(np.ones(3))
        rows.append(rng.multinomial(200, q / q.sum()))
    C = sp.csr_array(np.array(rows, dtype=np.float64))
    tpath = tmp_path / "targets.npz"
    np.savez(tpath, data=C.data, indices=C.indices, indptr=C.indptr, shape=np.array(C.shape))
    return path, tpath, C


# ----------------------------------------------------------------------------- in one process
def test_blocks_partition_the_rows_whatever_the_world_size():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            blocks = [_distributed.block(n, r, world) for r in range(world)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
            assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1


def test_rank_blocks_of_a_fit_join_into_the_whole_fit(tmp_path):
    """Each block fitted with its row offset draws the whole fit's random streams (logit + cv folds)."""
    path, _, C = planted_fit_problem(tmp_path)
    P = mm.TransitionMatrix.load(path, mmap=True)
    args = (P, C, 3, "logit", 10.0, None, 100, 1e-10, 1, 7, None, None, None, 1, True, False)
    whole, _ = _fit_block(*args, None)
    parts = [_fit_block(*args, _distributed.Ranks(None, r, 4))[0] for r in range(4)]
    for got, want in zip(_concat_rows(parts), whole):
        np.testing.assert_array_equal(got, want)


def test_dist_false_with_a_group_is_refused():
    with pytest.raises(ValueError, match="group is given with dist=False"):
        _distributed.resolve(False, object())
    with pytest.raises(TypeError, match="dist must be None, True or False"):
        _distributed.resolve("yes", None)  # type: ignore[arg-type]


def test_dist_true_outside_torchrun_says_what_is_missing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="dist=True needs the environment torchrun sets"):
        llm.distill(dist_workers.load_model({"tiny": {"vocab_size": 16, "hidden_size": 8}}), dist=True)
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT missing"):
        mm.fit_alpha(
            mm.TransitionMatrix.from_topk(np.array([[0], [1]]), np.array([[0.5], [0.5]])),
            np.array([[1.0, 0.0]]),
            dist=True,
        )


# ----------------------------------------------------------------------------- across 2 ranks
def test_two_ranks_equal_one_process(tmp_path, monkeypatch):
    """Token- and corpus-mode distill and fit_alpha on 2 gloo ranks: the same matrix fingerprint
    (and the same file written by rank 0) and the same alphas, row for row, as one process; one
    process then resumes the 2-rank corpus run from its shards without computing any."""
    matrix, targets, C = planted_fit_problem(tmp_path)
    m = model()
    n_rows = m.config.vocab_size
    shard = -(-n_rows // 5)  # 5 shards: rank 0 takes 3, rank 1 takes 2
    seq_file = corpus_sequences(tmp_path, n_rows)
    seqs = json.loads(seq_file.read_text())
    corpus_kw = {"mode": "corpus", "top_k": 16, "batch_size": 4, "shard_rows": 5, "window": 32}
    one = llm.distill(m, top_k=16, batch_size=32, shard_rows=shard, out=tmp_path / "one", progress=False)
    one_corpus = llm.distill(m, sequences=seqs, progress=False, **corpus_kw)
    kwargs = {"s": 3, "link": "logit", "seed": 7, "n_threads": 1}
    ref = mm.fit_alpha(mm.TransitionMatrix.load(matrix, mmap=True), C, progress=False, **kwargs)
    job = {
        "model": MODEL,
        "distill": {
            "token": {"top_k": 16, "batch_size": 32, "shard_rows": shard, "out": str(tmp_path / "two")},
            "corpus": dict(corpus_kw, sequences_file=str(seq_file), out=str(tmp_path / "corpus")),
        },
        "fit": {"matrix": str(matrix), "targets": str(targets), "kwargs": kwargs},
    }
    run = launch(tmp_path, job)
    logs = run.logs
    assert run.codes == [0, 0], [log and log.get("traceback") for log in logs]
    assert logs[0]["token"] == logs[1]["token"] == one.fingerprint()
    assert logs[0]["corpus"] == logs[1]["corpus"] == one_corpus.fingerprint()
    assert logs[0]["saved_token"] == [0, 2, 4] and logs[1]["saved_token"] == [1, 3]
    assert logs[0]["saved_corpus"][:2] == [0, 2] and logs[1]["saved_corpus"][:2] == [1, 3]
    assert mm.TransitionMatrix.load(tmp_path / "two" / "matrix.safetensors").fingerprint() == one.fingerprint()
    # Another world size reuses the shards: the corpus sums are added in shard order either way.
    saved: list[int] = []
    monkeypatch.setattr(llm.distillation._Shards, "save", lambda self, i, tensors: saved.append(i))
    again = llm.distill(m, sequences=seqs, out=tmp_path / "corpus", progress=False, **corpus_kw)
    assert saved == [] and again.fingerprint() == one_corpus.fingerprint()
    for r in range(2):
        with np.load(run.dir / f"fit-{r}.npz") as got:
            np.testing.assert_array_equal(got["indptr"], ref.alpha.indptr)
            np.testing.assert_array_equal(got["indices"], ref.alpha.indices)
            np.testing.assert_array_equal(got["data"], ref.alpha.data)
            np.testing.assert_array_equal(got["kl"], ref.kl)
            np.testing.assert_array_equal(got["n_iter"], ref.n_iter)


def test_a_killed_rank_resumes_without_recomputing_written_shards(tmp_path):
    m = model()
    shard = -(-m.config.vocab_size // 6)
    out = tmp_path / "run"
    one = llm.distill(m, top_k=16, batch_size=32, shard_rows=shard, progress=False)
    job = {
        "model": MODEL,
        "distill": {"token": {"top_k": 16, "batch_size": 32, "shard_rows": shard, "out": str(out)}},
        "timeout": 20,
    }
    killed = launch(tmp_path, dict(job, kill_rank=1, kill_after=1))
    assert killed.codes[1] == -9 and killed.logs[1] is None  # SIGKILL after writing its first shard
    assert killed.codes[0] == 1 and "DistributedError: rank 0 of 2: a collective" in killed.logs[0]["error"]
    # Rank 0 stopped by itself, within the group's timeout of the kill.
    assert killed.logs[0]["error_at"] - float((killed.dir / "killed-1").read_text()) < job["timeout"]
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    assert "shard-000001.safetensors" in written and len(written) < 6
    run = launch(tmp_path, job)
    codes, logs = run.codes, run.logs
    assert codes == [0, 0], [log and log.get("traceback") for log in logs]
    assert logs[0]["token"] == logs[1]["token"] == one.fingerprint()
    recomputed = logs[0]["saved_token"] + logs[1]["saved_token"]
    assert len(recomputed) == 6 - len(written)
    assert not {f"shard-{i:06d}.safetensors" for i in recomputed} & set(written)
    assert all(out.joinpath(name).stat().st_mtime_ns == t for name, t in written.items())


def test_an_error_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    shard = -(-dist_workers.load_model(MODEL).config.vocab_size // 4)
    job = {
        "model": MODEL,
        "distill": {"token": {"top_k": 8, "batch_size": 32, "shard_rows": shard}},
        "raise_rank": 1,
        "timeout": 20,
    }
    run = launch(tmp_path, job)
    assert run.codes == [1, 1]
    for log in run.logs:
        assert log["error"].startswith("DistributedError: rank 1 of 2 failed: RuntimeError: injected failure"), log
    # Rank 0 stopped at the end of the round in which rank 1 failed, not at a timeout.
    assert abs(run.logs[0]["error_at"] - run.logs[1]["error_at"]) < job["timeout"]


def test_cli_distill_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node=2 -m markovmem distill` writes the one-process matrix."""
    if not MODEL_DIR:
        pytest.skip("MARKOVMEM_TEST_MODEL is not set (a stories260k directory)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    prefix = [tok.bos_token_id] if tok("a")["input_ids"][:1] == [tok.bos_token_id] else None  # as the CLI does
    one = llm.distill(
        AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval(), top_k=16, progress=False, shard_rows=128, prefix=prefix
    )
    out = tmp_path / "P.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", MARKOVMEM_DIST_TIMEOUT="60")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "markovmem",
        "distill",
        MODEL_DIR,
        "-o",
        str(out),
        "--top-k",
        "16",
        "--shard-rows",
        "128",
        "--shards",
        str(tmp_path / "shards"),
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert mm.TransitionMatrix.load(out).fingerprint() == one.fingerprint()
    assert proc.stdout.count("wrote ") == 1  # rank 0 only
