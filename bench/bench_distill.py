"""Time markovmem.llm.distill against a naive per-token loop and the pure batched forward pass.

For each model, in the same run and on the same token ids:

naive    one forward pass per token (context ``[BOS, v]``), float32 softmax,
         top-k, copy to the host: what a straightforward loop does.
floor    the batched forward passes distill makes (same batches, last-position
         logits only), with no softmax, no top-k and no copy: the floor any
         distillation built on the model's own forward pass pays.
floor-reuse  the same batches through the model's body and its output head
         into one logits buffer reused across batches (what distill does on
         CPU when the head is a plain linear layer), with no softmax, no top-k
         and no copy: the stricter floor, without the page faults a fresh
         (batch x vocab) logits tensor per forward pays.
distill  ``llm.distill(model, top_k, batch_size, token_ids, prefix=[BOS])``,
         including building the TransitionMatrix.

Times come from one subprocess that warms each method up, then runs the
three in turn ``--repeats`` times (interleaved, so drifting load on a shared
machine hits all of them) and reports medians.  Peak memory comes from a fresh
subprocess per method: the high-water mark of the resident set above its value
before one run, after a warm-up run (sampled every 2 ms).  Before timing,
distill's rows are checked against the naive loop's on 16 tokens: the same
top-k ids and probabilities within 1e-4 relative (a batched and a single
forward pass round differently in float32).

Models: a Qwen2-style config with the full 151,936-token vocabulary and small
hidden sizes (random weights; only shapes matter for time), and the real
stories260k Llama when ``--model-dir`` (or MARKOVMEM_TEST_MODEL) points to it.

    python bench/bench_distill.py                      # defaults, a few minutes
    python bench/bench_distill.py --hidden 64 128 896 --rows 2048
    python bench/bench_distill.py --quick              # smoke run
    python bench/bench_distill.py --corpus-only        # only the corpus-mode rows

Corpus mode (after the token rows): ``llm.distill(mode='corpus')`` over a corpus (TinyStories
paragraphs for stories260k, random ids for the random-weight configs) against *floor*, the model's
own forward pass over the same batches; with ``fallback='none'`` and with the one-token fallback
rows (the default of learn_tokens), which add a token-mode pass over the vocabulary.

The machine may be shared: times are noisy; the environment line says what ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

QWEN2_VOCAB = 151_936


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set every 2 ms; ``peak`` is the largest value seen above the start."""

    def __init__(self) -> None:
        self.start = _rss()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss() - self.start)
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:  # noqa: PYI034 - typing.Self needs Python 3.11; this class has no subclasses
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss() - self.start)


def build_model(spec: dict[str, Any]) -> tuple[Any, int]:
    """(model in eval mode, BOS id) for a spec {'kind': 'qwen2', hidden, layers} or {'kind': 'dir', path}."""
    import torch

    if spec["kind"] == "dir":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
        return model, int(AutoTokenizer.from_pretrained(spec["path"]).bos_token_id)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h = spec["hidden"]
    config = Qwen2Config(
        vocab_size=spec["vocab"],
        hidden_size=h,
        intermediate_size=4 * h,
        num_hidden_layers=spec["layers"],
        num_attention_heads=max(1, h // 32),
        num_key_value_heads=max(1, h // 64),
        max_position_embeddings=spec.get("max_pos", 64),
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # less flat rows than at init, more like a trained model (timing does not depend on it)
        model.get_output_embeddings().weight.mul_(5.0)
    return model, 1


def naive_rows(model: Any, ids: list[int], bos: int, k: int) -> tuple[Any, Any]:
    import numpy as np
    import torch

    out_i, out_p = [], []
    with torch.no_grad():
        for v in ids:
            logits = model(input_ids=torch.tensor([[bos, v]]), use_cache=False).logits[0, -1]
            p, i = torch.topk(torch.softmax(logits.float(), -1), k)
            out_i.append(i.cpu().numpy())
            out_p.append(p.cpu().numpy())
    return np.stack(out_i), np.stack(out_p)


def floor_pass(model: Any, ids: list[int], bos: int, batch: int) -> None:
    import torch

    ids_t = torch.tensor(ids)
    with torch.no_grad():
        for a in range(0, len(ids), batch):
            last = ids_t[a : a + batch].unsqueeze(1)
            inp = torch.cat([torch.full_like(last, bos), last], 1)
            model(input_ids=inp, use_cache=False, logits_to_keep=1)


def floor_reuse_pass(model: Any, ids: list[int], bos: int, batch: int) -> None:
    import torch

    from markovmem.llm.distillation import _HeadLogits, _n_base

    last = _HeadLogits(model, _n_base(model), torch.device("cpu"), None, batch)
    ids_t = torch.tensor(ids)
    with torch.no_grad():
        for a in range(0, len(ids), batch):
            tok = ids_t[a : a + batch].unsqueeze(1)
            last(torch.cat([torch.full_like(tok, bos), tok], 1))


def corpus_windows(spec: dict[str, Any], model: Any, n_seq: int, length: int, seed: int = 0) -> list[list[int]]:
    """The corpus of the corpus row: TinyStories paragraphs for stories260k (MARKOVMEM_TEST_DATA or
    ../shared/data), random ids for the random-weight configs; ``n_seq`` sequences of <= ``length`` tokens."""
    import numpy as np

    if spec["kind"] == "dir":
        from pathlib import Path

        from transformers import AutoTokenizer

        data = Path(os.environ.get("MARKOVMEM_TEST_DATA", Path(__file__).resolve().parents[2].parent / "shared/data"))
        data = data / "tinystories-sample.txt" if data.is_dir() else data
        paras = [p for p in data.read_text(encoding="utf-8").split("\n\n") if p.strip()][:n_seq]
        tok = AutoTokenizer.from_pretrained(spec["path"])
        return [ids[:length] for ids in tok(paras)["input_ids"]]
    rng = np.random.default_rng(seed)
    return [rng.integers(3, spec["vocab"], size=length).tolist() for _ in range(n_seq)]


def corpus_row(args: argparse.Namespace, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Corpus-mode distill against the model's own forward pass over the same batches (interleaved repeats)."""
    import numpy as np
    import torch

    from markovmem import llm

    torch.set_num_threads(args.threads)
    model, _ = build_model(spec)
    seqs = corpus_windows(spec, model, args.corpus_seqs, args.corpus_len)
    batch = args.corpus_batch

    def floor() -> None:
        with torch.no_grad():
            for a in range(0, len(seqs), batch):
                chunk = seqs[a : a + batch]
                n = max(len(c) for c in chunk)
                ids = np.zeros((len(chunk), n), dtype=np.int64)
                mask = np.zeros_like(ids)
                for r, c in enumerate(chunk):
                    ids[r, : len(c)] = c
                    mask[r, : len(c)] = 1
                model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), use_cache=False)

    def distill(fallback: str) -> Any:
        return llm.distill(
            model, top_k=args.top_k, batch_size=batch, mode="corpus", sequences=seqs, fallback=fallback, progress=False
        )

    methods = {"floor": floor, "corpus": lambda: distill("none")}
    if model.config.vocab_size <= args.fallback_max_vocab:
        # The token fallback adds a token-mode pass over the whole vocabulary: the token rows above
        # time that pass for the large vocabularies.
        methods["corpus+token"] = lambda: distill("token")
    for f in methods.values():
        f()
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m, f in methods.items():
            t0 = time.perf_counter()
            f()
            times[m].append(time.perf_counter() - t0)
    tokens = sum(len(c) for c in seqs)
    out = {m: statistics.median(t) for m, t in times.items()}
    fallback = (
        f", with the token fallback {out['corpus+token']:.2f} s = {out['corpus+token'] / out['floor']:.2f} x floor"
        if "corpus+token" in out
        else ", token fallback: a token-mode pass (rows above)"
    )
    print(
        f"{name:<34} corpus of {len(seqs)} sequences, {tokens} tokens, batch {batch}: floor {out['floor']:.2f} s, "
        f"distill (corpus) {out['corpus']:.2f} s = {out['corpus'] / out['floor']:.2f} x floor (target <= 1.3)"
        + fallback
    )
    return {"model": name, "tokens": tokens, "sequences": len(seqs), **{f"{m}_seconds": v for m, v in out.items()}}


def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    """In this (fresh) process: 'check' outputs, 'time' all three methods, or one method's peak memory."""
    import numpy as np
    import torch

    from markovmem import llm

    torch.set_num_threads(args.threads)
    spec = json.loads(args.phase_spec)
    model, bos = build_model(spec)
    vocab = model.get_output_embeddings().out_features
    order = np.random.default_rng(0).permutation(vocab).tolist()
    k = min(args.top_k, vocab)
    batch = args.batch_size
    ids = order[: min(args.rows, vocab)]
    naive_ids = order[: min(args.naive_rows, vocab)]
    fns = {
        "naive": lambda: naive_rows(model, naive_ids, bos, k),
        "floor": lambda: floor_pass(model, ids, bos, batch),
        "floor-reuse": lambda: floor_reuse_pass(model, ids, bos, batch),
        "distill": lambda: llm.distill(model, top_k=k, batch_size=batch, token_ids=ids, prefix=[bos], progress=False),
    }
    rows = {"naive": len(naive_ids), "floor": len(ids), "floor-reuse": len(ids), "distill": len(ids)}
    if args.phase == "check":
        m = min(16, len(ids))
        ni, np_ = naive_rows(model, ids[:m], bos, k)
        P = llm.distill(model, top_k=k, batch_size=batch, token_ids=ids[:m], prefix=[bos], progress=False)
        bad = 0
        for r, v in enumerate(ids[:m]):
            row = P.row(v)
            # A batched and a single forward pass round differently (relative ~1e-5 in
            # float32), so entries within 1e-4 of the k-th may swap; the rest must agree.
            cut = np.sort(np_[r])[0] * (1 + 1e-4) + 1e-12
            same = set(row.indices[row.probs > cut].tolist()) == set(ni[r][np_[r] > cut].tolist())
            close = np.allclose(np.sort(row.probs), np.sort(np_[r]), rtol=1e-4, atol=1e-9)
            bad += not (same and close)
        return {"mismatched_rows": bad, "checked_rows": m}
    if args.phase == "time":
        # Interleaved repeats: on a shared machine, load drifts; alternating the
        # methods exposes them to the same drift.
        times: dict[str, list[float]] = {name: [] for name in fns}
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        return {name: {"rows": rows[name], "seconds": statistics.median(t)} for name, t in times.items()}
    fns[args.phase]()  # warm-up: allocator caches, lazy init
    with PeakRSS() as mem:
        fns[args.phase]()
    return {"peak_mib": mem.peak / 2**20}


def spawn(args: argparse.Namespace, phase: str, spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--phase-spec",
        json.dumps(spec),
        "--threads",
        str(args.threads),
        "--rows",
        str(args.rows),
        "--naive-rows",
        str(args.naive_rows),
        "--top-k",
        str(args.top_k),
        "--batch-size",
        str(args.batch_size),
        "--repeats",
        str(args.repeats),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"phase {phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=[128, 896],
        help="hidden sizes of the Qwen2-style models (default: 128 896)",
    )
    parser.add_argument("--layers", type=int, default=2, help="layers of the Qwen2-style models (default: 2)")
    parser.add_argument("--vocab", type=int, default=QWEN2_VOCAB, help="vocabulary (default: Qwen2's 151936)")
    parser.add_argument(
        "--rows",
        type=int,
        default=1024,
        help="rows (token ids) timed for floor and distill; rows/s extrapolate (default: 1024)",
    )
    parser.add_argument("--naive-rows", type=int, default=128, help="rows timed for the naive loop (default: 128)")
    parser.add_argument("--top-k", type=int, default=256, help="entries per row (default: 256)")
    parser.add_argument("--batch-size", type=int, default=64, help="contexts per forward pass (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method, median reported (default: 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, min(2, os.cpu_count() or 1)),
        help="torch threads (default: min(2, CPU count))",
    )
    parser.add_argument(
        "--model-dir",
        default=os.environ.get("MARKOVMEM_TEST_MODEL"),
        help="a real model directory, e.g. stories260k (default: $MARKOVMEM_TEST_MODEL)",
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run (hidden 64, 128 rows, 1 repeat)")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--corpus-seqs", type=int, default=128, help="corpus row: sequences (default: 128)")
    parser.add_argument("--corpus-len", type=int, default=128, help="corpus row: tokens per sequence (default: 128)")
    parser.add_argument("--corpus-batch", type=int, default=16, help="corpus row: sequences per pass (default: 16)")
    parser.add_argument("--corpus-only", action="store_true", help="only the corpus-mode rows")
    parser.add_argument(
        "--fallback-max-vocab",
        type=int,
        default=50_000,
        help="corpus rows: time the token fallback only up to this vocabulary (default: 50000)",
    )
    parser.add_argument("--phase-spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(run_phase(args)))
        return 0
    if args.quick:
        args.hidden, args.rows, args.naive_rows, args.repeats = [64], 128, 16, 1
    specs = [
        (
            f"qwen2-style V={args.vocab} d={h} L={args.layers}",
            {"kind": "qwen2", "vocab": args.vocab, "hidden": h, "layers": args.layers},
        )
        for h in args.hidden
    ]
    if args.model_dir:
        specs.append(
            (
                f"stories260k ({os.path.basename(os.path.normpath(args.model_dir))})",
                {"kind": "dir", "path": args.model_dir},
            )
        )
    else:
        print("(no --model-dir / MARKOVMEM_TEST_MODEL: the real-model rows are skipped)")

    import torch
    import transformers

    print(
        f"environment: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
        f"top_k {args.top_k}, batch {args.batch_size}, median of {args.repeats}"
    )
    header = f"{'model':<34} {'method':<11} {'rows':>6} {'seconds':>9} {'rows/s':>10} {'x floor':>8} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    figures = []
    for name, spec in [] if args.corpus_only else specs:
        check = spawn(args, "check", spec)
        if check["mismatched_rows"]:
            print(
                f"{name}: {check['mismatched_rows']} of {check['checked_rows']} checked rows differ from the naive loop"
            )
            return 1
        res = spawn(args, "time", spec)
        for m in res:
            res[m].update(spawn(args, m, spec))
        rate = {m: r["rows"] / r["seconds"] for m, r in res.items()}
        for m in ("naive", "floor", "floor-reuse", "distill"):
            r = res[m]
            print(
                f"{name:<34} {m:<11} {r['rows']:>6} {r['seconds']:>9.3f} {rate[m]:>10.1f} "
                f"{rate['floor'] / rate[m]:>8.2f} {r['peak_mib']:>9.1f}"
            )
        vocab = args.vocab if spec["kind"] == "qwen2" else None
        full = f", full vocabulary in {vocab / rate['distill']:.0f} s" if vocab else ""
        print(
            f"{'':<34} distill / floor = {rate['floor'] / rate['distill']:.2f} (target <= 1.3), "
            f"distill / floor-reuse = {rate['floor-reuse'] / rate['distill']:.2f}, "
            f"distill vs naive = {rate['distill'] / rate['naive']:.1f}x faster{full}"
        )
        figures.append({"model": name, **{m: {**res[m], "rows_per_s": rate[m]} for m in res}})
    print("corpus mode: llm.distill(mode='corpus') against the forward pass over the same batches")
    for name, spec in specs:
        if spec["kind"] == "qwen2":
            spec = {**spec, "max_pos": args.corpus_len}
        figures.append(corpus_row(args, name, spec))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
