"""Reproduce the paper's synthetic-vocabulary experiments on a real pretrained model.

    python bench/paper/run.py table   # ET vs alpha only vs FFT / LoRA / prompt tuning at one N
    python bench/paper/run.py sweep   # sample efficiency: target loss and alpha recall vs N
    python bench/paper/run.py all     # both
    python bench/paper/run.py report  # rebuild the markdown and figures from the JSON results

The logic lives in markovmem.llm.pseudowords; this script parses arguments, runs it and
writes markdown tables, JSON and PNG figures under bench/results/paper/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinystories-sample.txt"
SWEEP_METHODS = ("et_alpha", "et_mean", "fft")
#: Learning rates tried at every N of the sweep (two or three per method to fit its time budget:
#: around the table's choices at N = 100, lower for FFT, which over-fits small N).
SWEEP_LRS = {"et_alpha": (1e-2, 3e-2), "et_mean": (3e-2, 1e-1), "fft": (3e-4, 1e-3, 3e-3)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "what", choices=("table", "sweep", "all", "report"), nargs="?", default="all", help="which experiment"
    )
    p.add_argument(
        "--model",
        default=os.environ.get("MARKOVMEM_TEST_MODEL"),
        help="transformers model directory (default: $MARKOVMEM_TEST_MODEL)",
    )
    p.add_argument(
        "--data",
        default=os.environ.get("MARKOVMEM_TEST_DATA", str(DEFAULT_DATA)),
        help="text, stories/paragraphs separated by blank lines, or a directory holding "
        "tinystories-sample.txt (default: $MARKOVMEM_TEST_DATA, else ../shared/data/tinystories-sample.txt "
        "beside the repository)",
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "paper"), help="output directory")
    p.add_argument("--n", type=int, default=100, help="train sentences per pseudo-word for the table")
    p.add_argument("--ns", type=int, nargs="+", default=[3, 10, 30, 100, 300], help="N of the sweep")
    p.add_argument("--repeats", type=int, default=1, help="draws of the train sentences per N in the sweep")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="methods of the table (default: all) or of the sweep (default: et_alpha et_mean fft; "
        "alpha only always runs there)",
    )
    p.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=LR[,LR...]",
        help="learning-rate grid of one method, e.g. fft=3e-4,1e-3 (repeatable; default: the module's "
        "grid for the table, SWEEP_LRS for the sweep)",
    )
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of every trained method")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per step")
    p.add_argument("--seed", type=int, default=0, help="seed of corpus draws, batch order and initialisation")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this model size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _setup(args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from markovmem.llm import PseudoWordBench, PseudoWordBenchConfig, build_corpus

    if not args.model:
        raise SystemExit("error: pass --model DIR or set MARKOVMEM_TEST_MODEL (e.g. ../shared/models/stories260k)")
    if not Path(args.model, "config.json").exists():
        raise SystemExit(f"error: --model {args.model} is not a transformers model directory (no config.json)")
    if Path(args.data).is_dir():  # MARKOVMEM_TEST_DATA names the directory in the tests and CI
        args.data = str(Path(args.data) / "tinystories-sample.txt")
    if not Path(args.data).is_file():
        raise SystemExit(f"error: --data {args.data} does not exist; pass --data FILE or set MARKOVMEM_TEST_DATA")
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    corpus = build_corpus(Path(args.data).read_text(encoding="utf-8"), tokenizer, seed=args.seed)
    try:
        config = PseudoWordBenchConfig(
            steps=args.steps, batch_size=args.batch_size, seed=args.seed, lrs=_lr_grids(args)
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return PseudoWordBench(model, tokenizer, corpus, config, progress=not args.no_progress)


def _lr_grids(args: argparse.Namespace) -> dict[str, tuple[float, ...]]:
    """The --lr options as {method: learning rates}."""
    lrs = {}
    for item in args.lr:
        method, _, values = item.partition("=")
        try:
            lrs[method] = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise SystemExit(f"error: --lr {item!r}: expected METHOD=LR[,LR...] with numbers") from None
    return lrs


def _environment(args: argparse.Namespace, bench: Any) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {
        "command": "python bench/paper/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "model": Path(args.model).name,
        "data": Path(args.data).name,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "config": bench.config.to_dict(),
        "corpus": bench.corpus.settings,
        "pseudo_words": [[p.token, list(p.words), list(p.weights)] for p in bench.corpus.pseudo_words],
        "n_val_sentences": len(bench.sequences("val")),
        "n_test_sentences": len(bench.sequences("test")),
        "n_old_contexts": len(bench.old_contexts),
        "base_old_nll": bench.base_old_nll,
        "distill_seconds": bench.distill_seconds,
    }


def _fmt(x: Any, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _table_md(rows: list[dict[str, Any]], env: dict[str, Any], n: int) -> str:
    head = (
        "| method | lr | val loss after | **test loss after** | test loss sentence | delta loss, old stories "
        "| max abs delta logit, old | trainable params | time s | alpha support P / R |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        support = (
            ""
            if "support_recall" not in r
            else (f"{r['support_precision']:.2f} / {r['support_recall']:.2f} ({r['alpha_link']}, s={r['alpha_s']})")
        )
        verified = " (verified)" if r.get("verified") else ""
        lines.append(
            f"| {r['method']} | {_fmt(r['lr'], 'g')} | {r['val_after']:.3f} | **{r['test_after']:.3f}** "
            f"| {r['test_sentence']:.3f} | {r['delta_old_loss']:+.4f} | {r['max_abs_logit_diff']:.3g}{verified} "
            f"| {r['trainable']:,} | {r['seconds']:.1f} | {support} |"
        )
    return (
        "\n".join(
            [
                (
                    f"# Synthetic vocabulary on {env['model']}: {len(env['pseudo_words'])} pseudo-words, N = {n} train "
                    f"sentences each"
                ),
                "",
                f"`{env['command']}`",
                "",
                *lines,
                "",
                (
                    "Losses are mean next-token NLL in nats on held-out sentences: *after* = the position right after "
                    "a pseudo-word, *sentence* = every position whose target is an old token. Delta loss is the change "
                    f"of mean NLL on {env['n_old_contexts']} held-out original stories (base: {env['base_old_nll']:.4f}); "
                    "max abs delta logit compares old-vocabulary logits with the base model there, and *(verified)* "
                    "means `verify_no_forgetting` also found bitwise-equal logits and unchanged base tensors. "
                    f"Time: fit + training of the kept candidate (the shared distillation took {env['distill_seconds']:.0f} s). "
                    f"{env['config']['steps']} steps of {env['config']['batch_size']} sentences for every trained method, "
                    "learning rate picked from the grid on the validation *after* loss."
                ),
                "",
                f"Environment: {json.dumps(env['versions'])}, {env['threads']} torch thread(s), {env['cpus']} CPUs.",
            ]
        )
        + "\n"
    )


def run_table(args: argparse.Namespace, bench: Any, env: dict[str, Any], out: Path) -> None:
    from markovmem.llm.pseudowords import METHODS

    methods = args.methods or list(METHODS)
    rows = [bench.reference(), bench.start()]
    for m in methods:
        t0 = time.perf_counter()
        rows.append(bench.run(m, args.n))
        print(f"[table] {m}: test after {rows[-1]['test_after']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    (out / "table.json").write_text(json.dumps({"environment": env, "n": args.n, "rows": rows}, indent=1) + "\n")
    (out / "table.md").write_text(_table_md(rows, env, args.n))
    print(_table_md(rows, env, args.n))


def run_sweep(args: argparse.Namespace, bench: Any, env: dict[str, Any], out: Path) -> None:
    rows = []
    ref = bench.reference()
    top = bench.corpus.max_train()
    ns = [n for n in args.ns if n <= top]
    if len(ns) < len(args.ns):
        print(f"[sweep] skipping N > {top}: not enough train sentences for every pseudo-word", flush=True)
    for repeat in range(args.repeats):
        for n in ns:
            for m in ("alpha", *(args.methods or SWEEP_METHODS)):
                t0 = time.perf_counter()
                lrs = None if m == "alpha" else _lr_grids(args).get(m, SWEEP_LRS[m])
                row = bench.run(m, n, repeat=repeat, lrs=lrs, full=False)
                if m == "alpha":
                    for link in ("logit", "mixture"):
                        fixed = bench.support(bench.fit(n, repeat, link=link, s=4).alpha)
                        row[f"recall_{link}_s4"] = fixed["support_recall"]
                        row[f"precision_{link}_s4"] = fixed["support_precision"]
                rows.append(row)
                print(
                    f"[sweep] repeat {repeat} N={n} {m}: test after {row['test_after']:.3f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
                (out / "sample_efficiency.json").write_text(
                    json.dumps({"environment": env, "reference": ref, "rows": rows}, indent=1) + "\n"
                )
    md = _sweep_md(rows, ref, env, ns)
    (out / "sample_efficiency.md").write_text(md)
    _sweep_png(rows, ref, ns, out / "sample_efficiency.png")
    print(md)


def _mean(rows: list[dict[str, Any]], key: str, m: str, n: int) -> float:
    import numpy as np

    return float(np.mean([r[key] for r in rows if r["key"] == m and r["n"] == n]))


def _sweep_md(rows: list[dict[str, Any]], ref: dict[str, Any], env: dict[str, Any], ns: list[int]) -> str:
    from markovmem.llm.pseudowords import METHOD_NAMES

    methods = [m for m in ("alpha", *SWEEP_METHODS) if any(r["key"] == m for r in rows)]
    lines = [
        "| N per pseudo-word | "
        + " | ".join(METHOD_NAMES[m] for m in methods)
        + " | alpha (link, s) chosen | support recall: chosen / mixture s=4 / logit s=4 |",
        "|" + "---|" * (len(methods) + 3),
    ]
    for n in ns:
        chosen = [r for r in rows if r["key"] == "alpha" and r["n"] == n]
        settings = ", ".join(sorted({f"{r['alpha_link']} s={r['alpha_s']}" for r in chosen}))
        lines.append(
            f"| {n} | "
            + " | ".join(f"{_mean(rows, 'test_after', m, n):.3f}" for m in methods)
            + f" | {settings} | {_mean(rows, 'support_recall', 'alpha', n):.2f} / "
            f"{_mean(rows, 'recall_mixture_s4', 'alpha', n):.2f} / {_mean(rows, 'recall_logit_s4', 'alpha', n):.2f} |"
        )
    repeats = len({r["repeat"] for r in rows})
    grids = {m: sorted({float(lr) for r in rows if r["key"] == m for lr in r["val_by_lr"]}) for m in methods[1:]}
    grid_text = "; ".join(f"{METHOD_NAMES[m]} {', '.join(f'{x:g}' for x in v)}" for m, v in grids.items())
    return (
        "\n".join(
            [
                f"# Sample efficiency on {env['model']}: held-out loss after the pseudo-word vs N",
                "",
                f"`{env['command']}`",
                "",
                *lines,
                "",
                (
                    f"Mean over {repeats} draw(s) of the train sentences; learning rate (and alpha's link and s) "
                    f"picked on validation at every N. Reference (base model with the real words in place): "
                    f"{ref['test_after']:.3f}. {env['config']['steps']} steps of {env['config']['batch_size']} sentences "
                    f"at every N. Learning rates tried: {grid_text}."
                ),
                "",
                f"Environment: {json.dumps(env['versions'])}, {env['threads']} torch thread(s), {env['cpus']} CPUs.",
            ]
        )
        + "\n"
    )


def _sweep_png(rows: list[dict[str, Any]], ref: dict[str, Any], ns: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from markovmem.llm.pseudowords import METHOD_NAMES

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m, style in (("alpha", "k:o"), ("et_alpha", "C0-o"), ("et_mean", "C1-s"), ("fft", "C3-^")):
        if not any(r["key"] == m for r in rows):
            continue
        ax1.plot(ns, [_mean(rows, "test_after", m, n) for n in ns], style, label=METHOD_NAMES[m])
    ax1.axhline(ref["test_after"], color="grey", lw=1, ls="--", label="base model, real words")
    ax1.set(
        xscale="log",
        xlabel="train sentences per pseudo-word (N)",
        ylabel="held-out NLL after pseudo-word (nats)",
        title="target loss vs N",
    )
    ax1.legend(fontsize=8)
    for key, style, label in (
        ("support_recall", "k-o", "alpha chosen on validation"),
        ("recall_mixture_s4", "C2-s", "mixture link, s=4"),
        ("recall_logit_s4", "C4-^", "logit link, s=4"),
    ):
        ax2.plot(ns, [_mean(rows, key, "alpha", n) for n in ns], style, label=label)
    ax2.set(
        xscale="log",
        ylim=(0, 1.02),
        xlabel="train sentences per pseudo-word (N)",
        ylabel="support recall of the source words",
        title="alpha recovers the words a pseudo-word stands for",
    )
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path) -> None:
    """Rewrite table.md, sample_efficiency.md and .png from the JSON files a run left in ``out``."""
    if (out / "table.json").exists():
        data = json.loads((out / "table.json").read_text())
        (out / "table.md").write_text(_table_md(data["rows"], data["environment"], data["n"]))
    if (out / "sample_efficiency.json").exists():
        data = json.loads((out / "sample_efficiency.json").read_text())
        rows = data["rows"]
        ns = sorted({r["n"] for r in rows})
        (out / "sample_efficiency.md").write_text(_sweep_md(rows, data["reference"], data["environment"], ns))
        _sweep_png(rows, data["reference"], ns, out / "sample_efficiency.png")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "report":
        report(out)
        return 0
    bench = _setup(args)
    env = _environment(args, bench)
    if args.what in ("table", "all"):
        run_table(args, bench, env, out)
    if args.what in ("sweep", "all"):
        run_sweep(args, bench, env, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
