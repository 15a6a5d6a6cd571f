"""The sample-complexity experiment: KL(q || f(alpha_hat)) against N for planted alpha*.

The paper's theorem: N >= O~(s log^2 c) samples per new token suffice,
independent of the vocabulary size T.  For each link, T and s, planted s-sparse
alpha* (weights in [1, 3], normalised) over a Zipf-like dictionary of T rows
with k stored entries (frequent tokens shared across rows) give q = f(alpha*);
N samples of q are fitted with markovmem.fit_alpha(s=s) and scored by the true
KL(q || f(alpha_hat)) over all T states (tail included) and by support recall.

Writes under bench/results/: fit_sample_complexity.png (KL against N, one panel
per link and T, one line per s), fit_sample_complexity.csv (every run) and
fit_sample_complexity.md (the N needed per s and T, with the command).

    python bench/sample_complexity.py                  # full run
    python bench/sample_complexity.py --T 1024,4096 --seeds 3   # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fit_reference as ref

import markovmem as mm

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(T: int, k: int, links, s_values, n_per_s, seeds, threads):
    t0 = time.perf_counter()
    idx, probs = ref.make_dictionary(T, k, seed=0)
    P = mm.TransitionMatrix.from_topk(idx, probs)
    D = ref.Dictionary.from_matrix(P)
    print(f"T={T} k={k}: dictionary in {time.perf_counter() - t0:.0f} s", flush=True)
    out = []
    for link in links:
        for s in s_values:
            t1 = time.perf_counter()
            rng = np.random.default_rng(7919 * s + T + (link == "logit"))
            Ss, qs, Ns, rows = [], [], [], []
            for mult in n_per_s:
                N = int(mult * s)
                for _ in range(seeds):
                    S, w = ref.planted_alpha(P.n_states, s, rng)
                    q = ref.f_row(D, S, w, link)
                    ids, cnt = ref.sample_counts(q, N, rng)
                    Ss.append(S)
                    qs.append(q)
                    Ns.append(N)
                    rows.append((ids, cnt))
            import scipy.sparse as sp

            m = len(rows)
            C = sp.csr_array(
                (
                    np.concatenate([c for _, c in rows]).astype(np.float64),
                    (np.repeat(np.arange(m), [len(i) for i, _ in rows]), np.concatenate([i for i, _ in rows])),
                ),
                shape=(m, T),
            )
            fit = mm.fit_alpha(P, C, s=s, link=link, n_threads=threads)
            planted = mm.fit_alpha(P, C, support=Ss, link=link, n_threads=threads)
            f_hat = ref.tail_rows(fit.predict(), T)
            f_pl = ref.tail_rows(planted.predict(), T)
            for i in range(m):
                out.append(
                    dict(
                        link=link,
                        T=T,
                        s=s,
                        N=Ns[i],
                        kl=ref.kl_rows(qs[i], f_hat[i]),
                        kl_planted=ref.kl_rows(qs[i], f_pl[i]),
                        recall=float(np.isin(Ss[i], fit.support[i]).mean()),
                    )
                )
            print(f"  {link} s={s}: {m} fits in {time.perf_counter() - t1:.1f} s", flush=True)
    return out


def needed_n(rows, link, T, s, key, thresh):
    """Smallest N on the grid from which the mean of `key` stays >= thresh (recall) for every larger N."""
    sel = [r for r in rows if r["link"] == link and r["T"] == T and r["s"] == s]
    Ns = sorted({r["N"] for r in sel})
    ok = [np.mean([r[key] for r in sel if r["N"] == N]) >= thresh for N in Ns]
    for j in range(len(Ns)):
        if all(ok[j:]):
            return Ns[j]
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="1024,16384,131072", help="vocabulary sizes, comma-separated")
    ap.add_argument("--k", type=int, default=64, help="stored entries per dictionary row")
    ap.add_argument("--s", default="1,2,4,8,16", help="support sizes, comma-separated")
    ap.add_argument(
        "--n-per-s", default="25,50,100,200,400,800,1600,3200", help="sample sizes as multiples of s, comma-separated"
    )
    ap.add_argument("--links", default="mixture,logit", help="links, comma-separated")
    ap.add_argument("--seeds", type=int, default=6, help="planted problems per (T, s, N)")
    ap.add_argument("--threads", type=int, default=None, help="markovmem threads (default: all cores)")
    ap.add_argument("--outdir", default=RESULTS, help="where the PNG, CSV and markdown go")
    args = ap.parse_args(argv)
    Ts = [int(x) for x in args.T.split(",")]
    s_values = [int(x) for x in args.s.split(",")]
    n_per_s = [float(x) for x in args.n_per_s.split(",")]
    links = args.links.split(",")
    rows = []
    for T in Ts:
        rows += run(T, args.k, links, s_values, n_per_s, args.seeds, args.threads)
    os.makedirs(args.outdir, exist_ok=True)
    with open(os.path.join(args.outdir, "fit_sample_complexity.csv"), "w") as fh:
        fh.write("link,T,s,N,kl,kl_planted,recall\n")
        fh.writelines(
            f"{r['link']},{r['T']},{r['s']},{r['N']},{r['kl']:.6g},{r['kl_planted']:.6g},{r['recall']:.4g}\n"
            for r in rows
        )
    plot(rows, Ts, s_values, links, os.path.join(args.outdir, "fit_sample_complexity.png"))
    cmd = "python bench/sample_complexity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"Command: `{cmd.strip()}` (k = {args.k}, {args.seeds} planted problems per point)", ""]
    for link in links:
        md.append(
            f"**{link} link** — smallest N (samples per new token) from which the mean support recall "
            "stays >= 0.9 on the grid (— : not reached):"
        )
        md.append("")
        md.append("| s | " + " | ".join(f"T = {T:,}" for T in Ts) + " |")
        md.append("|---|" + "---|" * len(Ts))
        for s in s_values:
            cells = [needed_n(rows, link, T, s, "recall", 0.9) for T in Ts]
            md.append(f"| {s} | " + " | ".join("—" if c is None else f"{c:,} ({c / s:g} s)" for c in cells) + " |")
        md.append("")
        md.append(
            f"**{link} link** — median KL(q ‖ f(alpha_hat)) in nats at N = 200 s and N = 3200 s "
            "(planted-support fit in brackets):"
        )
        md.append("")
        md.append("| s | " + " | ".join(f"T = {T:,}" for T in Ts) + " |")
        md.append("|---|" + "---|" * len(Ts))
        for s in s_values:
            cells = []
            for T in Ts:
                parts = []
                for mult in (200, 3200):
                    sel = [
                        r for r in rows if r["link"] == link and r["T"] == T and r["s"] == s and r["N"] == int(mult * s)
                    ]
                    if sel:
                        parts.append(
                            f"{np.median([r['kl'] for r in sel]):.2g} ({np.median([r['kl_planted'] for r in sel]):.2g})"
                        )
                cells.append(" / ".join(parts) if parts else "—")
            md.append(f"| {s} | " + " | ".join(cells) + " |")
        md.append("")
    with open(os.path.join(args.outdir, "fit_sample_complexity.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def plot(rows, Ts, s_values, links, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(links), len(Ts), figsize=(4.2 * len(Ts), 3.6 * len(links)), squeeze=False, sharey="row"
    )
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(s_values)))
    for a, link in enumerate(links):
        for b, T in enumerate(Ts):
            ax = axes[a][b]
            for c, s in enumerate(s_values):
                sel = [r for r in rows if r["link"] == link and r["T"] == T and r["s"] == s]
                if not sel:
                    continue
                Ns = sorted({r["N"] for r in sel})
                med = [np.median([max(r["kl"], 1e-7) for r in sel if r["N"] == N]) for N in Ns]
                pl = [np.median([max(r["kl_planted"], 1e-7) for r in sel if r["N"] == N]) for N in Ns]
                ax.loglog(Ns, med, "o-", color=colors[c], label=f"s = {s}", ms=3)
                ax.loglog(Ns, pl, ":", color=colors[c], lw=1)
            ax.set_title(f"{link}, T = {T:,}")
            ax.set_xlabel("N (samples per new token)")
            if b == 0:
                ax.set_ylabel("median KL(q ‖ f(α̂)) [nats]")
            ax.grid(True, which="major", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        "KL(q ‖ f(α̂)) against N — solid: fit_alpha (support selected); dotted: fit on the planted "
        "support.\nMixture s = 1 is fitted exactly (KL 0, drawn at 1e-7).",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
