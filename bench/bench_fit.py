"""Benchmark of markovmem.fit_alpha at vocabulary scale against numpy/scipy baselines.

Planted problems (bench/fit_reference.py): a Zipf-like dictionary of T rows with
k stored entries sharing frequent tokens; each target is f(alpha*) for a random
s-sparse alpha* (weights in [1, 3], normalised), observed through N = 100 s samples.

Per (k, s, link) it times, in one process on the same data:
- markovmem's full fit (screening + selection + refits) over all targets, and
  its fixed-support fit on the planted support;
- scipy L-BFGS-B on the same planted support, per target, on a subset;
- a plain numpy greedy gain + swap selection (exact 1-D gains over a screened
  pool, Newton refits), per target, on a subset, within a time budget;
and prints the per-target time ratios, the objective gap on the fixed support,
KL(q || f(alpha_hat)) and support recall for both selections on the same targets.

    python bench/bench_fit.py                      # the issue's sizes (see --help)
    python bench/bench_fit.py --T 16384 --targets 100   # quick run
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time

# The baselines run single-threaded: numpy's and scipy's BLAS pools are limited before
# numpy loads (setting them later has no effect).  markovmem gets its threads explicitly
# (--threads, default every core), so OMP_NUM_THREADS is left alone.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fit_reference as ref

import markovmem as mm


class PeakRSS:
    """Samples the process RSS every 5 ms in a thread; .peak - .start is the working memory of the block."""

    def __enter__(self):
        import psutil

        self._p = psutil.Process()
        self.start = self.peak = self._p.memory_info().rss
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self._p.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self._p.memory_info().rss)


def paired_rounds(ours, baselines, rounds: int):
    """Times `ours` and then each of `baselines`, `rounds` times over, alternating.

    Returns (ours' times (rounds,), the baselines' times (len(baselines), rounds), ours'
    last result, each baseline's last result).  A per-target time on this shared machine
    moves by tens of percent with its state; timed back to back in every round, both
    sides of a ratio see the same state, and the median over rounds of the per-round
    ratios is not moved by one round that something disturbed on one side only.  (Load
    from other processes is not taken out: it slows ours on every core more than the
    single-threaded baseline.)"""
    t_ours = np.empty(max(1, rounds))
    t_base = np.empty((len(baselines), max(1, rounds)))
    out, outs = None, [None] * len(baselines)
    for r in range(max(1, rounds)):
        t0 = time.perf_counter()
        out = ours()
        t_ours[r] = time.perf_counter() - t0
        for i, fn in enumerate(baselines):
            t0 = time.perf_counter()
            outs[i] = fn()
            t_base[i, r] = time.perf_counter() - t0
    return t_ours, t_base, out, outs


def recall(S, sup) -> float:
    return float(np.isin(S, sup).mean())


def run_config(P, D, k, s, link, args, rows):
    m = args.targets if s < 64 else args.targets_s64
    if link == "logit":
        m = args.logit_targets if s < 64 else args.logit_targets_s64
    N = 100 * s
    S, _, qs, C = ref.planted_targets(D, s, N, m, link, seed=1000 * s + (link == "logit"))
    nt = args.threads or os.cpu_count()
    fit = mm.fit_alpha(P, C[: min(m, 4)], s=s, link=link, n_threads=nt)  # warm-up (page-in, allocator)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        fit = mm.fit_alpha(P, C, s=s, link=link, n_threads=nt)
        t_fit = time.perf_counter() - t0
    # Fixed support: ours on all m targets and (a) scipy L-BFGS-B on the first n_lb, per
    # target, timed in paired rounds.
    n_lb = min(args.lbfgs_targets, m)
    problems = []
    for i in range(n_lb):
        row = C[[i]]
        problems.append(ref.Problem(D, row.indices, row.data / row.data.sum(), S[i], link))
    lbfgs = [lambda pb=pb: pb.lbfgs(np.arange(s), np.full(s, 1.0 / s)) for pb in problems]
    t_ours, t_lbs, fixed, lb_out = paired_rounds(
        lambda: mm.fit_alpha(P, C, support=S, link=link, n_threads=nt), lbfgs, args.repeats
    )
    t_fixed = float(t_ours.min())
    f_hat = ref.tail_rows(fit.predict(), D.n_base)
    f_pl = ref.tail_rows(fixed.predict(), D.n_base)
    kl_hat = np.array([ref.kl_rows(qs[i], f_hat[i]) for i in range(m)])
    kl_pl = np.array([ref.kl_rows(qs[i], f_pl[i]) for i in range(m)])
    rec = np.array([recall(S[i], fit.support[i]) for i in range(m)])

    # (a) the objective gap on the L-BFGS-B targets; the ratio per round, and of the best times
    gaps = []
    for i, (pb, (a, _)) in enumerate(zip(problems, lb_out)):
        v = pb.kl(np.arange(s), a)
        gaps.append((fixed.kl[i] - v) / max(abs(v), 1e-300))
    round_ratios = t_lbs.mean(axis=0) / (t_ours / m) if n_lb else np.array([np.nan])
    per_lb = float(t_lbs.min(axis=1).mean()) if n_lb else np.nan

    # (b) numpy greedy gain + swap over a screened pool, per target, within a time budget
    pool_size = max(256, 16 * s)  # the default pool of fit_alpha
    n_gr, t_gr, timed_out = 0, 0.0, False
    gr_kl, gr_rec, ours_kl, ours_rec = [], [], [], []
    budget_end = time.perf_counter() + args.greedy_budget
    for i in range(m):
        row = C[[i]]
        ids, qp = row.indices, row.data / row.data.sum()
        t0 = time.perf_counter()
        try:
            pool = ref.screen(D, ids, qp, link, pool_size)
            pr = ref.Problem(D, ids, qp, pool, link)
            Sg, ag, _ = pr.select(s, "gain", swap=True, max_swap_passes=1, deadline=budget_end)
        except (TimeoutError, MemoryError):
            t_gr += time.perf_counter() - t0
            timed_out = n_gr == 0
            break
        t_gr += time.perf_counter() - t0
        n_gr += 1
        gr_kl.append(ref.kl_rows(qs[i], ref.f_row(D, Sg, ag, link)))
        gr_rec.append(recall(S[i], Sg))
        ours_kl.append(kl_hat[i])
        ours_rec.append(rec[i])
        if time.perf_counter() > budget_end:
            break
    per_fit = t_fit / m
    per_fixed = t_fixed / m
    row = dict(
        k=k,
        s=s,
        link=link,
        m=m,
        N=N,
        fit_tps=m / t_fit,
        fixed_tps=m / t_fixed,
        mem_mb=(mem.peak - mem.start) / 2**20,
        lb_n=n_lb,
        lb_ratio=float(np.median(round_ratios)),
        lb_lo=float(np.min(round_ratios)),
        lb_hi=float(np.max(round_ratios)),
        lb_best_ratio=per_lb / per_fixed,
        lb_ms=per_lb * 1e3,
        lb_gap=float(np.max(gaps)) if gaps else np.nan,
        gr_n=n_gr,
        gr_timeout=timed_out,
        gr_ratio=(t_gr / max(n_gr, 1)) / per_fit if not timed_out else t_gr / per_fit,
        ours_kl=float(np.mean(ours_kl)) if ours_kl else np.nan,
        gr_kl=float(np.mean(gr_kl)) if gr_kl else np.nan,
        ours_rec=float(np.mean(ours_rec)) if ours_rec else np.nan,
        gr_rec=float(np.mean(gr_rec)) if gr_rec else np.nan,
        kl_hat=float(kl_hat.mean()),
        kl_pl=float(kl_pl.mean()),
        recall=float(rec.mean()),
        kl_med_ratio=float(np.median(np.where(kl_pl > 0, kl_hat / np.maximum(kl_pl, 1e-300), 1.0))),
    )
    rows.append(row)
    print(fmt_row(row), flush=True)


HEADER = (
    "| k | s | link | targets | fit targets/s | fixed-support targets/s | fit memory (MB) "
    "| vs L-BFGS-B: median of paired rounds [range] (n) | L-BFGS-B ms / target | objective gap "
    "| vs numpy greedy (n) | KL(q‖f̂) ours / greedy | recall ours / greedy "
    "| recall (all) | KL(q‖f̂) / KL(q‖f_planted): ratio of means, median ratio |"
)
SEP = "|" + "---|" * 15


def fmt_row(r) -> str:
    gr = f"> {r['gr_ratio']:.0f}x (0, 1 target > budget)" if r["gr_timeout"] else f"{r['gr_ratio']:.0f}x ({r['gr_n']})"
    ratio = r["kl_hat"] / r["kl_pl"] if r["kl_pl"] > 0 else float("nan")
    med = r["kl_med_ratio"]
    return (
        f"| {r['k']} | {r['s']} | {r['link']} | {r['m']} | {r['fit_tps']:.3g} | {r['fixed_tps']:.0f} | "
        f"{r['mem_mb']:.0f} | {r['lb_ratio']:.0f}x [{r['lb_lo']:.0f}-{r['lb_hi']:.0f}x] ({r['lb_n']}) | "
        f"{r['lb_ms']:.2f} | {r['lb_gap']:+.1e} | {gr} | "
        f"{r['ours_kl']:.4g} / {r['gr_kl']:.4g} | {r['ours_rec']:.2f} / {r['gr_rec']:.2f} | "
        f"{r['recall']:.3f} | {ratio:.2f}, {med:.2f} |"
    )


def loadavg() -> str:
    """The 1/5/15-minute load averages (the machine is shared: timings depend on them)."""
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def environment(threads) -> str:
    import scipy

    nt = threads or os.cpu_count()
    return (
        f"markovmem {mm.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}, os.cpu_count() = {os.cpu_count()}, "
        f"markovmem threads = {nt} (OpenMP: {mm._core.has_openmp}), exp/log loops: {mm._core.simd_level()}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=131072, help="base states (dictionary rows)")
    ap.add_argument("--k", default="64,256", help="stored entries per row, comma-separated")
    ap.add_argument("--s", default="4,16,64", help="support sizes, comma-separated")
    ap.add_argument("--links", default="mixture,logit", help="links, comma-separated")
    ap.add_argument("--targets", type=int, default=1000, help="targets per config (s < 64)")
    ap.add_argument("--targets-s64", type=int, default=1000, help="targets per config at s = 64 (mixture)")
    ap.add_argument("--logit-targets", type=int, default=1000, help="targets per logit config (s < 64)")
    ap.add_argument("--logit-targets-s64", type=int, default=1000, help="targets per logit config at s = 64")
    ap.add_argument("--lbfgs-targets", type=int, default=10, help="targets timed with scipy L-BFGS-B")
    ap.add_argument(
        "--greedy-budget",
        type=float,
        default=60.0,
        help="seconds of numpy greedy baseline per config (targets run until it is spent)",
    )
    ap.add_argument("--threads", type=int, default=None, help="markovmem threads (default: all cores)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="paired rounds of the fixed-support timing (ours on every target, then L-BFGS-B on each "
        "of its targets); the ratio is the median of the per-round ratios",
    )
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)
    rows: list[dict] = []
    load_start = loadavg()
    print(environment(args.threads))
    print(f"load average at start: {load_start}")
    print(HEADER)
    print(SEP, flush=True)
    for k in [int(x) for x in args.k.split(",")]:
        t0 = time.perf_counter()
        idx, probs = ref.make_dictionary(args.T, k, seed=0)
        P = mm.TransitionMatrix.from_topk(idx, probs)
        D = ref.Dictionary.from_matrix(P)
        del idx, probs
        print(
            f"<!-- dictionary T={args.T} k={k}: {time.perf_counter() - t0:.0f} s to generate, "
            f"{P.nbytes / 2**20:.0f} MB -->",
            flush=True,
        )
        for s in [int(x) for x in args.s.split(",")]:
            for link in args.links.split(","):
                run_config(P, D, k, s, link, args, rows)
    load_end = loadavg()
    print(f"load average at end: {load_end}")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(f"Command: `python bench/bench_fit.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n")
            fh.write(environment(args.threads) + f", T = {args.T}\n\n")
            fh.write(f"Load average (1/5/15 min) at start: {load_start}; at end: {load_end}\n\n")
            fh.write(HEADER + "\n" + SEP + "\n")
            fh.writelines(fmt_row(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
