"""llm.distill and fit_alpha on 1 process against N gloo processes (torch.distributed) on this machine.

Tasks, each run first in one process (``dist=False``, no process group: the baseline) and then
on ``--world`` spawned ranks of a gloo group, every process on ``--threads`` threads:

token-qwen2    token-mode distill of a Qwen2-style config with the 151,936-token vocabulary and
               random weights (hidden size ``--hidden``, 2 layers; only shapes matter for time),
               top_k 256, shards under a fresh ``out`` directory;
token-stories  token-mode distill of stories260k (``--model-dir`` or MARKOVMEM_TEST_MODEL),
               shards of ``--stories-shard-rows`` rows so that its 512 rows split at all;
corpus-stories corpus-mode distill of stories260k over TinyStories paragraphs
               (``--data-dir`` or MARKOVMEM_TEST_DATA);
fit-*          fit_alpha at T = ``--T`` on the planted problems of bench/bench_fit.py
               (bench/fit_reference.py: make_dictionary, planted_targets); the matrix is saved
               once and every process maps it (``TransitionMatrix.load(path, mmap=True)``).

Time is the wall time of the call alone, from a barrier after the model / matrix is loaded
to a barrier after every rank returned (so the slowest rank's), the fastest of ``--repeats``
calls in the same processes (each distill into a fresh ``out``; each fit after
``P.clear_cache()``, so it builds the matrix's column index, as a command-line run does).
The results of N ranks are checked bitwise against the one process's (matrix fingerprint;
alpha, KL and iteration arrays).  Speed-up = t(1) / t(N); parallel efficiency = speed-up / N.
Bytes written per row = every file under ``out`` (shards, manifest, matrix.safetensors)
divided by the rows distilled.

    python bench/bench_distributed.py --out bench/results/bench_distributed.md
    python bench/bench_distributed.py --quick      # smoke run, a minute
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_fit import loadavg

QWEN2_VOCAB = 151_936


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _digest(*arrays: Any) -> str:
    import numpy as np

    h = hashlib.blake2b(digest_size=12)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _prepare(task: dict[str, Any]) -> Any:
    """What the timed call needs, built before the clock starts (model, sequences, matrix, targets)."""
    import numpy as np
    import scipy.sparse as sp

    if task["kind"] == "fit":
        import markovmem as mm

        P = mm.TransitionMatrix.load(task["matrix"], mmap=True)
        with np.load(task["targets"]) as z:
            C = sp.csr_array((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        return P, C
    from bench_distill import build_model

    model, bos = build_model(task["model"])
    seqs = None
    if task["mode"] == "corpus":
        import json

        seqs = json.loads(Path(task["sequences"]).read_text())
    return model, bos, seqs


def _run(task: dict[str, Any], inputs: Any, out: Path, dist: bool) -> tuple[str, int]:
    """The timed call; returns (a digest of its result, its row count)."""
    import markovmem as mm
    from markovmem import llm

    if task["kind"] == "fit":
        P, C = inputs
        fit = mm.fit_alpha(P, C, s=task["s"], link=task["link"], n_threads=task["threads"], progress=False, dist=dist)
        return _digest(fit.alpha.indptr, fit.alpha.indices, fit.alpha.data, fit.kl, fit.n_iter), C.shape[0]
    model, bos, seqs = inputs
    kw: dict[str, Any] = {
        "top_k": task["top_k"],
        "out": out,
        "progress": False,
        "dist": dist,
        "shard_rows": task.get("shard_rows"),
    }
    if task["mode"] == "corpus":
        P = llm.distill(model, mode="corpus", sequences=seqs, **kw)
        return P.fingerprint(), P.n_base
    rows = task.get("rows")
    P = llm.distill(model, prefix=[bos], token_ids=None if rows is None else range(rows), **kw)
    return P.fingerprint(), P.n_base if rows is None else rows


def rank_main(rank: int, world: int, task: dict[str, Any], init_file: str, out: str, queue: Any) -> None:
    """One process of a run: load, barrier, the timed call, barrier; rank 0 reports."""
    import torch

    torch.set_num_threads(task["threads"])
    try:
        if world > 1:
            import torch.distributed as td

            td.init_process_group(
                "gloo",
                init_method=f"file://{init_file}",
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=1800),
            )
        inputs = _prepare(task)
        times = []
        for rep in range(task["repeats"]):
            if task["kind"] == "fit":
                inputs[0].clear_cache()  # every call builds the column index, as a fresh process does
            if world > 1:
                td.barrier()
            t0 = time.perf_counter()
            # A fresh directory per repeat: nothing is resumed; the last one is measured for bytes.
            digest, rows = _run(task, inputs, Path(out) / f"repeat-{rep}", world > 1)
            if world > 1:
                td.barrier()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            queue.put(
                {
                    "seconds": min(times),
                    "digest": digest,
                    "rows": rows,
                    "out": str(Path(out) / f"repeat-{task['repeats'] - 1}"),
                }
            )
        if world > 1:
            td.destroy_process_group()
    except BaseException as exc:
        queue.put({"error": f"rank {rank}: {type(exc).__name__}: {exc}"})
        raise


def timed(task: dict[str, Any], world: int, workdir: Path) -> dict[str, Any]:
    """Runs ``task`` on ``world`` fresh spawned processes; returns rank 0's report and the bytes written."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    out = run_dir / "out"
    procs = [
        ctx.Process(target=rank_main, args=(r, world, task, str(run_dir / "rendezvous"), str(out), queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    report = queue.get()
    for p in procs:
        p.join()
    if "error" in report or any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"{task['name']} on {world} process(es) failed: {report.get('error')}")
    last = Path(report["out"])
    report["bytes"] = _tree_bytes(last) if last.exists() else 0
    return report


def make_tasks(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    import json

    import numpy as np

    tasks: list[dict[str, Any]] = []
    common = {"threads": args.threads, "top_k": 256, "repeats": args.repeats}
    if "token-qwen2" in args.tasks:
        tasks.append(
            dict(
                common,
                name=f"token-qwen2 (V={QWEN2_VOCAB:,}, d={args.hidden})",
                kind="distill",
                mode="token",
                model={"kind": "qwen2", "vocab": QWEN2_VOCAB, "hidden": args.hidden, "layers": 2},
                rows=args.rows,
            )
        )
    model_dir = args.model_dir or os.environ.get("MARKOVMEM_TEST_MODEL")
    data_dir = args.data_dir or os.environ.get("MARKOVMEM_TEST_DATA")
    if model_dir and "token-stories" in args.tasks:
        tasks.append(
            dict(
                common,
                name="token-stories260k (V=512)",
                kind="distill",
                mode="token",
                model={"kind": "dir", "path": model_dir},
                shard_rows=args.stories_shard_rows,
            )
        )
    if model_dir and data_dir and "corpus-stories" in args.tasks:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        text = (Path(data_dir) / "tinystories-sample.txt").read_text(encoding="utf-8")
        paragraphs = [t.strip() for t in text.split("\n\n") if t.strip()][: args.paragraphs]
        seqs = [tok(t)["input_ids"] for t in paragraphs]
        path = workdir / "sequences.json"
        path.write_text(json.dumps(seqs))
        n_tok = sum(len(s) for s in seqs)
        tasks.append(
            dict(
                common,
                name=f"corpus-stories260k ({len(seqs)} texts, {n_tok:,} tokens)",
                kind="distill",
                mode="corpus",
                model={"kind": "dir", "path": model_dir},
                sequences=str(path),
                shard_rows=args.corpus_shard_rows,
            )
        )
    fits = [f for f in args.fits.split(",") if f] if "fit" in args.tasks else []
    if fits:
        import fit_reference as ref

        import markovmem as mm

        idx, probs = ref.make_dictionary(args.T, args.k, seed=0)
        P = mm.TransitionMatrix.from_topk(idx, probs)
        matrix = workdir / "P.safetensors"
        P.save(matrix)
        D = ref.Dictionary.from_matrix(P)
        for spec in fits:
            link, s, m = spec.split(":")
            _, _, _, C = ref.planted_targets(D, int(s), 100 * int(s), int(m), link, seed=1000 * int(s))
            tpath = workdir / f"targets-{link}-{s}-{m}.npz"
            np.savez(tpath, data=C.data, indices=C.indices, indptr=C.indptr, shape=np.array(C.shape))
            tasks.append(
                {
                    "name": f"fit {link} s={s} (T={args.T:,}, k={args.k}, {m} targets)",
                    "kind": "fit",
                    "matrix": str(matrix),
                    "targets": str(tpath),
                    "link": link,
                    "s": int(s),
                    "threads": args.threads,
                    "repeats": args.repeats,
                }
            )
    return tasks


HEADER = (
    "| task | rows / targets | 1 process (s) | {w} processes (s) | speed-up | parallel efficiency "
    "| bytes written / row (1 / {w}) | equal to 1 process |"
)
SEP = "|---|---|---|---|---|---|---|---|"


def fmt_row(task: dict[str, Any], one: dict[str, Any], many: dict[str, Any], world: int) -> str:
    speed = one["seconds"] / many["seconds"]
    rows = one["rows"]
    written = f"{one['bytes'] / rows:,.0f} / {many['bytes'] / rows:,.0f}" if task["kind"] == "distill" else "-"
    return (
        f"| {task['name']} | {rows:,} | {one['seconds']:.2f} | {many['seconds']:.2f} | {speed:.2f} | "
        f"{speed / world:.2f} | {written} | {'yes' if one['digest'] == many['digest'] else 'NO'} |"
    )


def environment(args: argparse.Namespace) -> str:
    import numpy as np
    import torch
    import transformers

    import markovmem as mm

    return (
        f"markovmem {mm.__version__}, torch {torch.__version__} (gloo), transformers {transformers.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"os.cpu_count() = {os.cpu_count()}, {args.threads} thread(s) per process"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2, help="gloo processes of the distributed runs (default 2)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch / OpenMP threads per process, in both runs (default 1: one core per rank)",
    )
    ap.add_argument(
        "--tasks",
        default="token-qwen2,token-stories,corpus-stories,fit",
        help="comma-separated subset of token-qwen2, token-stories, corpus-stories, fit",
    )
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the Qwen2-style model (default 64)")
    ap.add_argument(
        "--rows",
        type=int,
        default=None,
        help="token-qwen2: distill the first ROWS rows (default all 151,936; shards of 8,192 rows)",
    )
    ap.add_argument("--model-dir", help="stories260k directory (default: MARKOVMEM_TEST_MODEL)")
    ap.add_argument("--data-dir", help="directory of tinystories-sample.txt (default: MARKOVMEM_TEST_DATA)")
    ap.add_argument("--stories-shard-rows", type=int, default=64, help="rows per shard, token-stories (default 64)")
    ap.add_argument("--paragraphs", type=int, default=512, help="TinyStories paragraphs, corpus-stories (default 512)")
    ap.add_argument("--corpus-shard-rows", type=int, default=32, help="texts per shard, corpus-stories (default 32)")
    ap.add_argument("--T", type=int, default=131_072, help="fit: dictionary rows (default 131,072)")
    ap.add_argument("--k", type=int, default=64, help="fit: stored entries per dictionary row (default 64)")
    ap.add_argument(
        "--fits",
        default="mixture:16:1000,logit:16:48",
        help="fit: comma-separated link:s:targets (default mixture:16:1000,logit:16:48)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed calls per run, in the same processes; the table gives the fastest (default 3)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: small T, few targets, stories only")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.T, args.fits, args.paragraphs = 16_384, "mixture:4:64,logit:4:8", 64
        args.tasks = "token-stories,corpus-stories,fit"
    args.tasks = set(args.tasks.split(","))
    load_start = loadavg()
    env = environment(args)
    print(env)
    print(f"load average at start: {load_start}", flush=True)
    lines = []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        workdir = Path(tmp)
        tasks = make_tasks(args, workdir)
        print(HEADER.format(w=args.world))
        print(SEP, flush=True)
        for task in tasks:
            one = timed(task, 1, workdir)
            many = timed(task, args.world, workdir)
            lines.append(fmt_row(task, one, many, args.world))
            print(lines[-1], flush=True)
    load_end = loadavg()
    print(f"load average at end: {load_end}")
    if args.out:
        cmd = " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.out, "w") as fh:
            fh.write(f"Command: `python bench/bench_distributed.py {cmd}`\n\n{env}\n\n")
            fh.write(f"Load average (1/5/15 min) at start: {load_start}; at end: {load_end}\n\n")
            fh.write(HEADER.format(w=args.world) + "\n" + SEP + "\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
