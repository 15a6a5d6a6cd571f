"""Paired comparison of markovmem.fit_alpha (logit link) against the numpy greedy on true KL.

Planted logit problems as in bench/bench_fit.py (same dictionary seed, same
target seeds): a Zipf-like dictionary of T rows with k stored entries, targets
f(alpha*) for s-sparse alpha*, observed through N = 100 s samples.  For each
target both methods fit the same counts:

- ours: ``mm.fit_alpha(P, C, s=s, link="logit")`` (full fit, all targets at once);
- greedy: ``fit_reference.screen`` + ``Problem.select(s, "gain", swap=True,
  max_swap_passes=1)``, the baseline of bench_fit.py, per target, with a per-target
  time limit (targets it does not finish are left out of the pairing and counted).

It prints, per (k, s), on the targets the greedy finished: mean and median
KL(q || f(alpha_hat)) with q the TRUE planted distribution, the paired difference
ours - greedy (mean, standard error, wins), recall of the planted support, the
objective on the sampled counts KL(q_hat || f), ||alpha||_2 and the support size,
plus the time per target of both.  The greedy results do not depend on markovmem,
so they are cached (``--cache``) and a rerun after a change to the fit only refits ours.

    python bench/logit_vs_greedy.py --configs 64:4,64:16,256:4 --targets 40
    python bench/logit_vs_greedy.py --T 16384 --targets 40      # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fit_reference as ref
from bench_fit import loadavg

import markovmem as mm


def load_dictionary(T: int, k: int, cache: str | None):
    """(P, D) for the bench dictionary ``make_dictionary(T, k, seed=0)``, cached as npz under ``cache``."""
    path = os.path.join(cache, f"dict_T{T}_k{k}.npz") if cache else None
    if path and os.path.exists(path):
        z = np.load(path)
        idx, probs = z["idx"], z["probs"]
    else:
        idx, probs = ref.make_dictionary(T, k, seed=0)
        if path:
            np.savez(path, idx=idx, probs=probs)
    P = mm.TransitionMatrix.from_topk(idx, probs)
    return P, ref.Dictionary.from_matrix(P)


def greedy_results(D, C, qs, S, s: int, m: int, limit: float, path: str | None):
    """Per target (KL true, KL on q_hat, recall, ||alpha||, size, seconds) of the numpy greedy; NaN rows where it timed out."""
    res = np.full((m, 6), np.nan)
    if path and os.path.exists(path):
        old = np.load(path)["res"]
        res[: min(m, len(old))] = old[:m]
    todo = [i for i in range(m) if np.isnan(res[i, 5])]
    pool_size = max(256, 16 * s)
    for n, i in enumerate(todo):
        row = C[[i]]
        ids, qp = row.indices, row.data / row.data.sum()
        t0 = time.perf_counter()
        try:
            pool = ref.screen(D, ids, qp, "logit", pool_size)
            pr = ref.Problem(D, ids, qp, pool, "logit")
            Sg, ag, val = pr.select(s, "gain", swap=True, max_swap_passes=1, deadline=t0 + limit)
            dt = time.perf_counter() - t0
            kl_true = ref.kl_rows(qs[i], ref.f_row(D, Sg, ag, "logit"))
            res[i] = [kl_true, val, np.isin(S[i], Sg).mean(), np.linalg.norm(ag), np.count_nonzero(ag), dt]
        except (TimeoutError, MemoryError):
            res[i, 5] = np.inf  # timed out: remembered so a rerun does not retry it
        print(f"  greedy target {i} ({n + 1}/{len(todo)}): {res[i, 5]:.1f} s", file=sys.stderr, flush=True)
        if path:
            np.savez(path, res=res)
    return res


def ours_results(P, D, C, qs, S, s: int, fit_kwargs: dict):
    m = C.shape[0]
    mm.fit_alpha(P, C[: min(m, 4)], s=s, link="logit", n_threads=1, **fit_kwargs)  # warm-up (builds the CSC)
    t0 = time.perf_counter()
    fit = mm.fit_alpha(P, C, s=s, link="logit", n_threads=1, **fit_kwargs)
    dt = (time.perf_counter() - t0) / m
    f_hat = ref.tail_rows(fit.predict(), D.n_base)
    res = np.empty((m, 6))
    A = fit.alpha.tocsr()
    for i in range(m):
        a = A.data[A.indptr[i] : A.indptr[i + 1]]
        res[i] = [
            ref.kl_rows(qs[i], f_hat[i]),
            fit.kl[i],
            np.isin(S[i], fit.support[i]).mean(),
            np.linalg.norm(a),
            np.count_nonzero(a),
            dt,
        ]
    return res


def summary(ours, gr) -> dict:
    ok = np.isfinite(gr[:, 5])
    o, g = ours[ok], gr[ok]
    d = o[:, 0] - g[:, 0]
    n = int(ok.sum())
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
    return dict(
        n=n,
        n_timeout=int((~ok).sum()),
        ours_mean=o[:, 0].mean(),
        gr_mean=g[:, 0].mean(),
        ours_med=np.median(o[:, 0]),
        gr_med=np.median(g[:, 0]),
        diff=d.mean(),
        se=se,
        wins=int((d < 0).sum()),
        losses=int((d > 0).sum()),
        ours_rec=o[:, 2].mean(),
        gr_rec=g[:, 2].mean(),
        ours_obj=o[:, 1].mean(),
        gr_obj=g[:, 1].mean(),
        ours_norm=o[:, 3].mean(),
        gr_norm=g[:, 3].mean(),
        ours_size=o[:, 4].mean(),
        gr_size=g[:, 4].mean(),
        ours_t=ours[0, 5],
        gr_t=g[:, 5].mean() if n else np.nan,
        ours_all=ours[:, 0].mean(),
        ours_rec_all=ours[:, 2].mean(),
    )


HEADER = (
    "| k | s | n paired (greedy timeouts) | true KL mean ours / greedy | median ours / greedy "
    "| paired diff ours - greedy ± SE | wins / losses | recall ours / greedy | KL(q̂‖f) ours / greedy "
    "| ‖α‖ ours / greedy | size ours / greedy | s per target ours / greedy (ratio) |"
)
SEP = "|" + "---|" * 12


def fmt(k, s, r) -> str:
    return (
        f"| {k} | {s} | {r['n']} ({r['n_timeout']}) | {r['ours_mean']:.4f} / {r['gr_mean']:.4f} "
        f"| {r['ours_med']:.4f} / {r['gr_med']:.4f} | {r['diff']:+.4f} ± {r['se']:.4f} "
        f"| {r['wins']} / {r['losses']} | {r['ours_rec']:.2f} / {r['gr_rec']:.2f} "
        f"| {r['ours_obj']:.4f} / {r['gr_obj']:.4f} | {r['ours_norm']:.2f} / {r['gr_norm']:.2f} "
        f"| {r['ours_size']:.1f} / {r['gr_size']:.1f} "
        f"| {r['ours_t'] * 1e3:.2f} ms / {r['gr_t']:.1f} s ({r['gr_t'] / r['ours_t']:.0f}x) |"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=131072, help="base states (dictionary rows)")
    ap.add_argument("--configs", default="64:4,64:16,256:4", help="k:s pairs, comma-separated")
    ap.add_argument("--targets", type=int, default=40, help="targets per config (the greedy runs on each)")
    ap.add_argument("--greedy-limit", type=float, default=120.0, help="seconds of numpy greedy per target")
    ap.add_argument(
        "--cache", default="/tmp/logit_vs_greedy", help="directory for dictionaries and greedy results ('' = none)"
    )
    ap.add_argument("--no-greedy", action="store_true", help="only use cached greedy results (skip missing targets)")
    ap.add_argument("--oversize", type=float, default=None, help="fit_alpha oversize (default: the library's)")
    ap.add_argument("--bound", type=float, default=10.0, help="fit_alpha bound")
    args = ap.parse_args(argv)
    cache = args.cache or None
    if cache:
        os.makedirs(cache, exist_ok=True)
    fit_kwargs = dict(bound=args.bound)
    if args.oversize is not None:
        fit_kwargs["oversize"] = args.oversize
    print(
        f"markovmem {mm.__version__}, numpy {np.__version__}, T = {args.T}, fit options {fit_kwargs}, "
        f"load average at start: {loadavg()}"
    )
    print(HEADER)
    print(SEP, flush=True)
    for cfg in args.configs.split(","):
        k, s = (int(x) for x in cfg.split(":"))
        P, D = load_dictionary(args.T, k, cache)
        N = 100 * s
        S, _, qs, C = ref.planted_targets(D, s, N, args.targets, "logit", seed=1000 * s + 1)
        gpath = os.path.join(cache, f"greedy_T{args.T}_k{k}_s{s}.npz") if cache else None
        if args.no_greedy:
            gr = np.full((args.targets, 6), np.nan)
            if gpath and os.path.exists(gpath):
                old = np.load(gpath)["res"]
                gr[: min(len(old), args.targets)] = old[: args.targets]
            gr[~np.isfinite(gr[:, 5]), 5] = np.inf
        else:
            gr = greedy_results(D, C, qs, S, s, args.targets, args.greedy_limit, gpath)
        ours = ours_results(P, D, C, qs, S, s, fit_kwargs)
        if cache:
            np.savez(os.path.join(cache, f"ours_T{args.T}_k{k}_s{s}.npz"), res=ours)
        r = summary(ours, gr)
        print(fmt(k, s, r), flush=True)
        print(
            f"<!-- k={k} s={s}: ours on all {args.targets} targets: true KL {r['ours_all']:.4f}, "
            f"recall {r['ours_rec_all']:.3f} -->",
            flush=True,
        )
    print(f"load average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
