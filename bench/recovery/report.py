"""Markdown table and PNG figure of the recovery benchmark (bench/recovery/run.py's results.json).

python bench/recovery/report.py bench/results/recovery/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

INIT_NAMES = {"alpha": "E^T alpha", "mean": "mean", "subword": "subword mean", "oracle": "oracle (true word)"}


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def write_report(results: dict[str, Any], out_dir: Path) -> None:
    """Write recovery.md and recovery.png under ``out_dir``."""
    cells = results["cells"]
    variants = list(dict.fromkeys(c["variant"] for c in cells))
    lines = [
        "# Real-model recovery benchmark",
        "",
        (
            "stories260k; pseudo-words stand for 20 frequent single-token words and 6 blends of two words "
            "(table below). `llm.learn_tokens` learns them from N sentences each; scores on held-out "
            "sentences. Loss: mean next-token loss right after the pseudo-word (nats), E^T alpha and the "
            'other inits with no training, and after the same embedding-tuning budget ("tuned").'
        ),
        "",
        f"Command: `{results['command']}`",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in results["environment"].items()),
        "",
    ]
    for v in variants:
        rows = [c for c in cells if c["variant"] == v]
        cfg = rows[0]["config"]
        lines += [
            f"## {v}",
            "",
            (
                f"distill_mode `{cfg['distill_mode']}`, link `{cfg['link']}`, s {cfg['s']}, "
                f"fallback `{cfg.get('fallback')}`, shrinkage {cfg.get('shrinkage')}, "
                f"evidence `{cfg.get('evidence', 'row')}`"
            ),
            "",
            (
                "| corpus | N | recall@1 | recall@s | E^T alpha | mean | subword mean | oracle "
                "| tuned: E^T alpha | tuned: mean | tuned: subword | tuned: oracle |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in rows:
            tuned = [f"{_mean(c['loss_tuned'][k]):.3f}" if c["loss_tuned"] else "-" for k in INIT_NAMES]
            lines.append(
                f"| {c['corpus']} | {c['n']} | {_mean(c['recall1']):.2f} | {_mean(c['recalls']):.2f} | "
                + " | ".join(f"{_mean(c['loss'][k]):.3f}" for k in INIT_NAMES)
                + " | "
                + " | ".join(tuned)
                + " |"
            )
        lines.append("")
    lines += ["## Pseudo-words", "", "| pseudo-word | stands for |", "|---|---|"]
    lines += [f"| {tok} | {' / '.join(words)} |" for tok, words in results["pseudo_words"]]
    lines.append("")
    (out_dir / "recovery.md").write_text("\n".join(lines))
    _figure(results, out_dir / "recovery.png")


def _figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in results["cells"] if c["variant"] == "default"] or results["cells"]
    corpora = list(dict.fromkeys(c["corpus"] for c in cells))
    fig, axes = plt.subplots(1, 2 * len(corpora), figsize=(5.5 * len(corpora) * 2, 4), squeeze=False)
    for j, corpus in enumerate(corpora):
        rows = sorted((c for c in cells if c["corpus"] == corpus), key=lambda c: c["n"])
        ns = [c["n"] for c in rows]
        for k, key, title in ((0, "loss", "no training"), (1, "loss_tuned", "after embedding tuning")):
            ax = axes[0, 2 * j + k]
            if not rows[0][key]:
                ax.axis("off")
                continue
            for init, name in INIT_NAMES.items():
                ax.plot(
                    ns,
                    [_mean(c[key][init]) for c in rows],
                    marker="o",
                    label=name,
                    linestyle="--" if init == "oracle" else "-",
                )
            ax.set_xscale("log")
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.set_xlabel("sentences per pseudo-word (N)")
            ax.set_ylabel("target loss after the pseudo-word (nats)")
            ax.set_title(f"{corpus}: {title}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/recovery/results.json")
    write_report(json.loads(src.read_text()), src.parent)
