"""Markdown table and PNG figure of the vocabulary-extension benchmark (bench/vocab_extension/run.py's results.json).

python bench/vocab_extension/report.py bench/results/vocab_extension/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(results: dict[str, Any]) -> list[str]:
    """The results table: one line per method."""
    base_bpb = results["rows"][0]["bpb"]
    lines = [
        (
            "| method | BPB | vs base | tokens/byte | NLL/token | certified forgetting (nats/token) | leak max "
            "| KL(base‖model) old text | ΔNLL old text | new-token share in samples |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        cert = r.get("certificate")
        lines.append(
            f"| {r['method']} | {r['bpb']:.4f} | {r['bpb'] - base_bpb:+.4f} | {r['tokens_per_byte']:.4f} "
            f"| {r['nll_per_token']:.4f} | {_f(cert and cert['forgetting_nats'], '.5f')} "
            f"| {_f(cert and cert['leak_max'], '.4f')} | {r['kl_old']:.5f} | {r['delta_nll']:+.5f} "
            f"| {'-' if r['family'] == 'base' else format(r['sampling']['share'], '.3f')} |"
        )
    return lines


def write_report(results: dict[str, Any], out_dir: Path) -> None:
    """Write vocab_extension.md and vocab_extension.png under ``out_dir``."""
    d = results["data"]
    cov = d["coverage_heldout"]
    s = results["settings"]
    words = ", ".join(f"{w} ({c})" for w, c in zip(d["words"], d["train_occurrences"], strict=True))
    lines = [
        "# Vocabulary extension: merged words as new tokens the model generates",
        "",
        (
            f"stories260k, TinyStories paragraphs: {d['paragraphs_train']} train / {d['paragraphs_heldout']} "
            f"held-out. {len(d['words'])} new tokens (the most frequent multi-piece words of the train split). "
            f"BPB: bits per UTF-8 byte of the held-out paragraphs, each model on its own tokenization. "
            f"Forgetting: on the {d['old_paragraphs']} held-out paragraphs holding no merged word "
            f"({d['old_positions']} positions). Samples: {s['samples']} stories of up to {s['sample_length']} "
            "tokens from BOS, temperature 1."
        ),
        "",
        f"Command: `{results['command']}`",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in results["environment"].items()),
        "",
        (
            f"Training (every '+ ET' row, full fine-tuning, LoRA): {s['tune_steps']} steps of {s['batch_size']} "
            f"paragraphs (the same seeded batches); AdamW lr {s['tune_lr']:g} for ET (new rows only); full "
            f"fine-tuning and LoRA (r = {s['lora_r']}, plus the new rows) at the lrs in their names."
        ),
        "",
        *table(results),
        "",
        (
            f"Tokens per byte of the held-out text: {d['tokens_per_byte_base']:.4f} (base tokenizer) -> "
            f"{d['tokens_per_byte_extended']:.4f} (with the new tokens)."
        ),
        "",
        (
            f"What the new tokens cover on the held-out text: {cov['whole_total']} matches are a whole word, "
            f"{cov['prefix_total']} the start of a longer word (e.g. 'girl' in 'girls'), and "
            f"{cov['missed_total']} whole-word occurrences stay in old pieces (not after whitespace or the "
            "paragraph start, e.g. after a quote)."
        ),
        "",
        f"Merged words (train occurrences): {words}.",
        "",
    ]
    if d["skipped"]:
        lines += [
            "Skipped (their text occurs in a base token, which add_tokens refuses): "
            + ", ".join(f"{w} ({c})" for w, c, _ in d["skipped"])
            + ".",
            "",
        ]
    (out_dir / "vocab_extension.md").write_text("\n".join(lines))
    _figure(results, out_dir / "vocab_extension.png")


def _figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    base_bpb = rows[0]["bpb"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {"mean": "C0", "subword-first": "C1", "subword-mean": "C4", "markovmem": "C2", "fft": "C3", "lora": "C5"}
    for r in rows[1:]:
        forget = r["certificate"]["forgetting_nats"] if "certificate" in r else r["kl_old"]
        marker = "o" if r["tuned"] else "s"
        if "gate" in r:
            marker = "^" if r["gate"]["statistic"] == "max" else "v"
        ax.scatter(max(forget, 1e-7), r["bpb"], c=colors.get(r["family"], "k"), marker=marker, s=45)
        ax.annotate(r["method"], (max(forget, 1e-7), r["bpb"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.axhline(base_bpb, color="gray", ls="--", lw=1, label=f"base model {base_bpb:.4f}")
    ax.axvline(0.01, color="gray", ls=":", lw=1, label="0.01 nats")
    ax.set_xscale("log")
    ax.set_xlabel("forgetting on old text (nats/token; certified for markovmem expansions, else KL)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("Merged-word tokens on stories260k: BPB vs forgetting")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    res_path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/vocab_extension/results.json")
    write_report(json.loads(res_path.read_text()), res_path.parent)
