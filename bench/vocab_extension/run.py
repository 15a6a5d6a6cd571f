"""Vocabulary-extension benchmark: merge frequent multi-piece words into new tokens the model generates.

On stories260k (vocab 512, tied embeddings) and TinyStories: the paragraphs are split into train and
held-out (seeded); the ``--n-words`` most frequent words of the train split that the base tokenizer cuts
into two or more pieces (and whose text is in no base token, so ``add_tokens`` takes them) become new
tokens.  Each method gives them input and output rows; the benchmark scores, on the held-out split:

- **BPB**: bits per UTF-8 byte of the held-out paragraphs, each model on its own tokenization (the base
  model on the base tokenizer, every extended model on the tokenizer with the new tokens).  A paragraph
  is ``[BOS] t_1 .. t_n``; every ``t_i`` is predicted and the ``t_i`` together decode to the whole
  paragraph, so ``BPB = sum_i -log p(t_i | BOS t_<i) / ln 2 / bytes(paragraph)``, summed over paragraphs
  (numerator and denominator), identically for every model;
- **tokens per byte** of the held-out text, before and after the merge;
- **forgetting** on the held-out paragraphs that hold none of the merged words (their tokenization is
  the same with and without the new tokens): for an open expansion of markovmem the certified
  ``forgetting_nats`` of ``verify_no_forgetting`` (mean ``-log(1 - leak)`` per position); for every
  model the mean ``KL(base || model)`` over the old tokens per position (equal to the former when the
  old logits are the base model's) and the change of the mean NLL of that text;
- **generation**: ``--samples`` stories sampled from BOS (temperature 1, no top-k / top-p, seeded);
  the share of the merged-word occurrences in the decoded stories that the model emitted as the new
  token (the rest it spelled with old pieces).

Methods: new rows by the mean init, the subword mean (output row: the first piece's, or the mean of
the pieces'), and markovmem (``learn_tokens``: alpha input rows, beta output rows + bias), each without
and with ``embedding_tune`` of the new rows (same steps, lr, batch for all), markovmem also under the
leak gate; against full fine-tuning after ``resize_token_embeddings(mean_resizing=True)`` and peft LoRA
with ``trainable_token_indices`` on the new rows (same steps, batch, data).

    python bench/vocab_extension/run.py --threads 1   # writes bench/results/vocab_extension/{results.json,vocab_extension.md,vocab_extension.png}
    python bench/vocab_extension/run.py --quick       # smoke run (small data, few steps)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

#: A word as counted for the merge: letters starting the text or following whitespace (where the
#: tokenizer's normalizer puts its '▁'), ending before a non-letter.
_WORD = re.compile(r"(?:(?<=\s)|^)([A-Za-z]+)(?![A-Za-z])")


# ---------------------------------------------------------------------------------------------- data
def paragraphs(path: Path) -> list[str]:
    """The blank-line separated paragraphs of a text file, stripped, empty ones dropped."""
    text = Path(path).read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def split(paras: Sequence[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out): a seeded shuffle, the last ``holdout`` share held out."""
    order = np.random.default_rng(seed).permutation(len(paras))
    n_held = max(1, round(holdout * len(paras)))
    return [paras[i] for i in order[:-n_held]], [paras[i] for i in order[-n_held:]]


def merged_words(tok: Any, texts: Sequence[str], n: int) -> tuple[list[str], list[tuple[str, int, str]]]:
    """The ``n`` most frequent words of ``texts`` that the base tokenizer cuts into 2+ pieces and that
    ``add_tokens`` takes without ``allow_shadowing`` (their text occurs in no base token's text).

    Returns (words, skipped) with skipped = (word, count, reason) for the frequent multi-piece words
    left out.
    """
    from markovmem.llm.model import _shadowed

    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(m.group(1) for m in _WORD.finditer(t))
    words: list[str] = []
    skipped: list[tuple[str, int, str]] = []
    n_base = len(tok)
    for w, c in counts.most_common():
        if len(words) == n:
            break
        if len(tok(w, add_special_tokens=False)["input_ids"]) < 2:
            continue
        hit = _shadowed(tok, [w], n_base)
        if hit:
            skipped.append((w, c, f"occurs in base token {tok.convert_ids_to_tokens(hit[0][1])!r}"))
            continue
        words.append(w)
    return words, skipped


def extended_tokenizer(tok: Any, words: Sequence[str]) -> Any:
    """A copy of ``tok`` with ``words`` added as ``add_tokens`` adds them (plain strings: normalized)."""
    ext = copy.deepcopy(tok)
    ext.add_tokens(list(words))
    return ext


def encode(tok: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text, BOS first."""
    return [np.asarray(x, dtype=np.int64) for x in tok(list(texts))["input_ids"]]


def coverage(ext: Any, words: Sequence[str], texts: Sequence[str], n_base: int) -> dict[str, Any]:
    """What the new tokens cover in ``texts``: per word, the new-token matches that are the whole word,
    those that are the start of a longer word ("girl" in "girls"), and the whole-word occurrences left
    in old pieces (not after whitespace or the text start, e.g. after a quote)."""
    enc = ext(list(texts), return_offsets_mapping=True)
    whole = np.zeros(len(words), dtype=np.int64)
    prefix = np.zeros(len(words), dtype=np.int64)
    for text, ids, offs in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
        for t, (_, b) in zip(ids, offs, strict=True):
            if t >= n_base:
                longer = b < len(text) and text[b].isalpha()
                (prefix if longer else whole)[t - n_base] += 1
    missed = np.zeros(len(words), dtype=np.int64)
    for i, w in enumerate(words):
        pat = re.compile(rf"(?<![A-Za-z]){re.escape(w)}(?![A-Za-z])")
        total = sum(len(pat.findall(t)) for t in texts)
        missed[i] = total - whole[i]
    return {
        "whole": whole.tolist(),
        "prefix": prefix.tolist(),
        "missed": missed.tolist(),
        "whole_total": int(whole.sum()),
        "prefix_total": int(prefix.sum()),
        "missed_total": int(missed.sum()),
    }


def covers_text(tok: Any, seqs: Sequence[np.ndarray], texts: Sequence[str]) -> bool:
    """Every sequence decodes back to its text exactly (so both tokenizations cover the same bytes)."""
    return all(tok.decode(s, skip_special_tokens=True) == t for s, t in zip(seqs, texts, strict=True))


# ---------------------------------------------------------------------------------------------- metrics
def sequence_nll(model: Any, seqs: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Per sequence, the sum (float64, nats) of ``-log p(t_i | t_<i)`` over i >= 1 (every token after BOS)."""
    import torch

    from markovmem.llm.selection import forward_batches

    out = np.zeros(len(seqs))
    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j]))
    for chunk, logits in forward_batches(model, seqs, order, batch_size):
        logp = torch.log_softmax(logits.double(), dim=-1)
        for r, j in enumerate(chunk):
            s = torch.as_tensor(seqs[j][1:], device=logp.device)
            out[j] = -float(logp[r, : len(s)].gather(-1, s[:, None]).sum())
    return out


def bits_per_byte(model: Any, seqs: Sequence[np.ndarray], texts: Sequence[str]) -> dict[str, float]:
    """BPB of ``texts`` (see the module docstring), with tokens per byte and NLL per token."""
    nll = sequence_nll(model, seqs)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tok = sum(len(s) - 1 for s in seqs)
    return {
        "bpb": float(nll.sum() / math.log(2) / n_bytes),
        "nll_per_token": float(nll.sum() / n_tok),
        "tokens": int(n_tok),
        "bytes": int(n_bytes),
        "tokens_per_byte": float(n_tok / n_bytes),
    }


def old_text_drift(base: Any, model: Any, seqs: Sequence[np.ndarray], n_base: int) -> dict[str, float]:
    """On old-only sequences: mean ``KL(base || model)`` over the old tokens per position (every prefix,
    as ``verify_no_forgetting`` counts them; the model's old-token probabilities are not renormalized, so
    mass it gives new tokens counts), and the change of the mean NLL of the sequences' own tokens."""
    import torch

    from markovmem.llm.selection import forward_batches

    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j]))
    kl_sum, n_pos, d_nll, n_tok = 0.0, 0, 0.0, 0
    # Two generators each entering torch.no_grad would restore the modes out of order: one outer block.
    with torch.no_grad():
        pairs = list(zip(forward_batches(base, seqs, order, 32), forward_batches(model, seqs, order, 32), strict=True))
    for (chunk, a), (_, b) in pairs:
        p = torch.log_softmax(a[..., :n_base].double(), dim=-1)
        q = torch.log_softmax(b.double(), dim=-1)[..., :n_base]
        for r, j in enumerate(chunk):
            L = len(seqs[j])
            kl_sum += float((p[r, :L].exp() * (p[r, :L] - q[r, :L])).sum())
            n_pos += L
            s = torch.as_tensor(seqs[j][1:], device=p.device)[:, None]
            d_nll += float(p[r, : L - 1].gather(-1, s).sum() - q[r, : L - 1].gather(-1, s).sum())
            n_tok += L - 1
    return {"kl_old": kl_sum / n_pos, "delta_nll": d_nll / n_tok, "positions": n_pos}


def sample_share(model: Any, ext: Any, n_base: int, n: int, length: int, seed: int, batch: int = 50) -> dict[str, Any]:
    """Sample ``n`` stories from BOS (temperature 1, no top-k/top-p; torch seeded per batch).  Returns the
    new ids emitted, the new ids in the decoded stories retokenized with ``ext`` (every merged-word
    occurrence the tokenizer would merge), their ratio ``share`` and the stories' bytes."""
    import torch

    bos = ext.bos_token_id
    emitted = merged = n_bytes = 0
    stories: list[str] = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        torch.manual_seed(seed + i)
        inp = torch.full((b, 1), bos, dtype=torch.long)
        with torch.no_grad():
            out = model.generate(
                input_ids=inp,
                attention_mask=torch.ones_like(inp),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=length,
                eos_token_id=bos,
                pad_token_id=bos,
            )
        for row in out[:, 1:].tolist():
            row = row[: row.index(bos)] if bos in row else row
            emitted += sum(t >= n_base for t in row)
            text = ext.decode(row, skip_special_tokens=True)
            merged += sum(t >= n_base for t in ext(text, add_special_tokens=False)["input_ids"])
            n_bytes += len(text.encode("utf-8"))
            stories.append(text)
    return {
        "emitted_new": int(emitted),
        "merged_occurrences": int(merged),
        "share": float(emitted / merged) if merged else float("nan"),
        "bytes": int(n_bytes),
        "example": stories[0][:300] if stories else "",
    }


# ---------------------------------------------------------------------------------------------- methods
def _special_ids(tok: Any, n_base: int) -> list[int]:
    return sorted({int(t) for t in tok.all_special_ids if 0 <= int(t) < n_base})


def markovmem_init(model: Any, tok: Any, words: Sequence[str], texts: Sequence[str], seed: int) -> dict[str, Any]:
    """markovmem's rows for the new tokens, written on ``model`` (expanded in place, open output) by
    ``learn_tokens(generate=True, tune_steps=0)``: alpha's input rows, beta's output rows and the
    maximum-likelihood bias (no tuning, no gate: the benchmark applies both to every init alike).
    Returns the ids and the init's figures."""
    from markovmem import llm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SampleSizeWarning for rare words: the token counts are reported
        res = llm.learn_tokens(
            model,
            tok,
            list(words),
            list(texts),
            generate=True,
            tune_steps=0,
            progress=False,
            seed=seed,
            diagnostics=False,
        )
    out = res.output
    path = "learn_tokens(generate=True, tune_steps=0)"
    return {
        "ids": list(res.ids),
        "path": path,
        "beta": [tok.convert_ids_to_tokens(int(v)) for v in out.support[:, 0]],
        "bias": [float(b) for b in out.bias],
        "alpha_top": {t: [(str(a), float(w)) for a, w in v[:3]] for t, v in res.decomposition(tok, top=3).items()},
    }


def simple_rows(model: Any, base_tok: Any, words: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """(input rows, output rows) of the simple inits, from the base tables E (input) and W (output head):

    - ``mean``: mean of E, mean of W (transformers' ``mean_resizing`` without its sampling);
    - ``subword-first``: mean of the pieces' rows of E; the first piece's row of W (the new token is to be
      predicted where the word's first piece is);
    - ``subword-mean``: mean of the pieces' rows of E; mean of the pieces' rows of W.
    """
    import torch

    from markovmem import llm

    state = llm.get_expansion(model)
    E = state.input_layer.base_layer.weight.detach()
    W = state.output_layer.base_layer.weight.detach()
    pieces = [torch.as_tensor(base_tok(" " + w, add_special_tokens=False)["input_ids"]) for w in words]
    m = len(words)
    sub_in = torch.stack([E[p].mean(0) for p in pieces])
    return {
        "mean": (E.mean(0, keepdim=True).repeat(m, 1), W.mean(0, keepdim=True).repeat(m, 1)),
        "subword-first": (sub_in, torch.stack([W[p[0]] for p in pieces])),
        "subword-mean": (sub_in, torch.stack([W[p].mean(0) for p in pieces])),
    }


def _lm_train(
    model: Any, params: list[Any], seqs: list[np.ndarray], vocab: int, args: Any, lr: float, desc: str
) -> Any:
    """Next-token training of ``params`` at every position of ``seqs`` with markovmem's training loop
    (AdamW, the batches ``embedding_tune`` draws for the same seed)."""
    from markovmem.llm.tuning import TuneHistory, _model_forward, _train_steps

    history = TuneHistory(steps=args.tune_steps, batch_size=args.batch_size, lr=lr)
    # Every id counts as "new" for _pad_batch, so every position from the first on is scored:
    # the plain causal-LM objective of full fine-tuning and LoRA.
    _train_steps(
        _model_forward(model),
        params,
        seqs,
        np.arange(vocab, dtype=np.int64),
        vocab,
        False,
        history=history,
        steps=args.tune_steps,
        lr=lr,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=False,
        desc=desc,
    )
    return history


def full_finetune(base: Any, ext: Any, seqs: list[np.ndarray], lr: float, args: Any) -> tuple[Any, dict[str, Any]]:
    """Every weight trained, after ``resize_token_embeddings(len(ext), mean_resizing=True)``."""
    import torch

    model = copy.deepcopy(base)
    torch.manual_seed(args.seed)  # mean_resizing samples the new rows
    model.resize_token_embeddings(len(ext), mean_resizing=True)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    hist = _lm_train(model, params, seqs, len(ext), args, lr, "fft")
    for p in params:
        p.requires_grad_(False)
    n = sum(p.numel() for p in {id(p): p for p in params}.values())
    return model.eval(), {"trainable": int(n), "final_loss": hist.final_loss, "lr": lr}


def lora_finetune(
    base: Any, ext: Any, seqs: list[np.ndarray], new_ids: list[int], lr: float, args: Any
) -> tuple[Any, dict[str, Any]]:
    """peft LoRA on every attention and MLP projection plus ``trainable_token_indices`` on the new rows
    of the (tied) embedding, after ``resize_token_embeddings(mean_resizing=True)``; merged for scoring."""
    import torch
    from peft import LoraConfig, get_peft_model

    from markovmem.llm.pseudowords import _LORA_TARGETS, _quiet_peft

    model = copy.deepcopy(base)
    torch.manual_seed(args.seed)
    model.resize_token_embeddings(len(ext), mean_resizing=True)
    cfg = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        target_modules=_LORA_TARGETS,
        trainable_token_indices={"embed_tokens": list(new_ids)},
    )
    with _quiet_peft():
        peft_model = get_peft_model(model, cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    hist = _lm_train(peft_model, params, seqs, len(ext), args, lr, "lora")
    n = sum(p.numel() for p in params)
    with _quiet_peft():
        merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval(), {"trainable": int(n), "final_loss": hist.final_loss, "lr": lr}


# ---------------------------------------------------------------------------------------------- run
class Scorer:
    """Scores one model on the held-out data the same way for every method."""

    def __init__(self, base: Any, ext: Any, n_base: int, held: list[str], args: Any) -> None:
        self.base, self.ext, self.n_base, self.args = base, ext, n_base, args
        self.held = held
        self.seqs = encode(ext, held)
        self.old = [s for s in self.seqs if not (s >= n_base).any()][: args.n_old]

    def __call__(self, model: Any, certified: bool) -> dict[str, Any]:
        from markovmem import llm

        t0 = time.perf_counter()
        row: dict[str, Any] = bits_per_byte(model, self.seqs, self.held)
        row.update(old_text_drift(self.base, model, self.old, self.n_base))
        if certified:
            rep = llm.verify_no_forgetting(self.base, model, [s.tolist() for s in self.old])
            row["certificate"] = {
                k: getattr(rep, k)
                for k in ("forgetting_nats", "leak_mean", "leak_p99", "leak_max", "leak_offset", "logits_bitwise_equal")
            }
            row["certificate"]["ok"] = rep.ok
        t1 = time.perf_counter()
        row["sampling"] = sample_share(
            model, self.ext, self.n_base, self.args.samples, self.args.sample_length, self.args.seed
        )
        row["seconds_scoring"] = time.perf_counter() - t0
        row["seconds_sampling"] = time.perf_counter() - t1
        return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=os.environ.get("MARKOVMEM_TEST_MODEL", str(ROOT.parent / "shared/models/stories260k"))
    )
    p.add_argument(
        "--data",
        default=os.environ.get("MARKOVMEM_TEST_DATA", str(ROOT.parent / "shared/data")),
        help="directory holding tinystories-sample.txt (or the file)",
    )
    p.add_argument("--out", default=str(ROOT / "bench/results/vocab_extension"))
    p.add_argument("--n-words", type=int, default=50, help="merged words (new tokens)")
    p.add_argument("--holdout", type=float, default=0.2, help="share of paragraphs held out")
    p.add_argument("--tune-steps", type=int, default=200, help="training steps of every trained method")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step, every trained method")
    p.add_argument("--tune-lr", type=float, default=1e-2, help="Adam lr of embedding_tune (new rows only)")
    p.add_argument("--fft-lrs", type=float, nargs="+", default=[1e-4, 1e-3], help="AdamW lrs of full fine-tuning")
    p.add_argument(
        "--lora-lrs", type=float, nargs="+", default=[1e-3, 1e-2], help="AdamW lrs of LoRA and its trainable tokens"
    )
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2 r)")
    p.add_argument("--max-leak", type=float, default=0.01, help="leak gate bound")
    p.add_argument(
        "--gate-statistics", nargs="+", default=["max", "mean"], choices=["max", "p99", "mean"], help="gated variants"
    )
    p.add_argument("--n-old", type=int, default=400, help="old-only held-out paragraphs for the forgetting figures")
    p.add_argument("--samples", type=int, default=100, help="stories sampled per model")
    p.add_argument("--sample-length", type=int, default=256, help="max new tokens per sampled story")
    p.add_argument("--quick", action="store_true", help="smoke run: 600 paragraphs, 10 words, 20 steps, 20 samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_words, args.tune_steps, args.samples, args.sample_length, args.n_old = 10, 20, 20, 128, 100

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import markovmem
    from markovmem import llm

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    for q in base.parameters():
        q.requires_grad_(False)
    n_base = len(tok)
    data = Path(args.data)
    paras = paragraphs(data / "tinystories-sample.txt" if data.is_dir() else data)
    if args.quick:
        paras = paras[:600]
    train, held = split(paras, args.holdout, args.seed)
    words, skipped = merged_words(tok, train, args.n_words)
    ext = extended_tokenizer(tok, words)
    held_base, held_ext = encode(tok, held), encode(ext, held)
    limit = base.config.max_position_embeddings
    too_long = [j for j, s in enumerate(held_base) if len(s) > limit]
    if too_long:
        raise ValueError(f"held-out paragraphs {too_long[:5]} exceed the model's {limit} positions")
    if not (covers_text(tok, held_base, held) and covers_text(ext, held_ext, held)):
        raise RuntimeError("a held-out paragraph does not decode back to itself; the byte accounting would differ")
    train_ext = encode(ext, train)
    counts = np.bincount(np.concatenate([s[s >= n_base] - n_base for s in train_ext]), minlength=len(words))

    results: dict[str, Any] = {
        "command": "python bench/vocab_extension/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
            "markovmem": getattr(markovmem, "__version__", "?"),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "data", "out")},
        "data": {
            "paragraphs_train": len(train),
            "paragraphs_heldout": len(held),
            "words": words,
            "train_occurrences": counts.tolist(),
            "skipped": skipped,
            "coverage_heldout": coverage(ext, words, held, n_base),
            "tokens_per_byte_base": sum(len(s) - 1 for s in held_base) / sum(len(t.encode()) for t in held),
            "tokens_per_byte_extended": sum(len(s) - 1 for s in held_ext) / sum(len(t.encode()) for t in held),
        },
        "rows": [],
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    score = Scorer(base, ext, n_base, held, args)
    results["data"]["old_paragraphs"] = len(score.old)
    results["data"]["old_positions"] = int(sum(len(s) for s in score.old))

    def record(name: str, family: str, tuned: bool, row: dict[str, Any], **extra: Any) -> None:
        row.update(method=name, family=family, tuned=tuned, **extra)
        results["rows"].append(row)
        cert = row.get("certificate", {})
        print(
            f"{name:<34} BPB {row['bpb']:.4f}  KL(old) {row['kl_old']:.5f}"
            + (f"  certified {cert['forgetting_nats']:.5f}" if cert else "")
            + f"  share {row['sampling']['share']:.3f}  [{time.perf_counter() - t_start:.0f} s]",
            file=sys.stderr,
        )
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))

    # Base model on its own tokenization (the KL and sampling share are 0 by construction).
    base_row = bits_per_byte(base, held_base, held)
    base_row.update(
        kl_old=0.0, delta_nll=0.0, sampling=sample_share(base, tok, n_base, args.samples, args.sample_length, args.seed)
    )
    record("base (no new tokens)", "base", False, base_row)

    # markovmem expansion: learn_tokens' rows first, then every init written on the same expansion.
    model, mtok = copy.deepcopy(base), copy.deepcopy(tok)
    t0 = time.perf_counter()
    info = markovmem_init(model, mtok, words, train, args.seed)
    results["markovmem_init"] = {**info, "seconds": time.perf_counter() - t0}
    ids = info["ids"]
    state = llm.get_expansion(model)
    inits = {
        "markovmem": (
            state.input_layer.new_weight.detach().clone(),
            state.output_layer.new_weight.detach().clone(),
            state.output_layer.new_bias.detach().clone(),
        )
    }
    for name, (rin, rout) in simple_rows(model, tok, words).items():
        inits[name] = (rin, rout, torch.zeros(len(ids)))
    old_train = [s.tolist() for s in train_ext if not (s >= n_base).any()][: args.n_old]
    new_texts = [s.tolist() for s in train_ext if (s >= n_base).any()][: args.n_old]
    for name in ("mean", "subword-first", "subword-mean", "markovmem"):
        rin, rout, bias = inits[name]
        for tuned in (False, True):
            llm.set_embeddings(model, ids, rin, output_embeddings=rout, output_bias=bias)
            state.output_layer.leak_offset.fill_(0.0)
            extra: dict[str, Any] = {}
            if tuned:
                hist = llm.embedding_tune(
                    model,
                    ids,
                    train_ext,
                    steps=args.tune_steps,
                    lr=args.tune_lr,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    progress=False,
                )
                extra["train"] = {"trainable": hist.n_trainable, "final_loss": hist.final_loss, "lr": args.tune_lr}
            label = name + (" + ET" if tuned else "")
            record(label, name, tuned, score(model, certified=True), **extra)
            if name != "markovmem":
                continue
            for stat in args.gate_statistics:
                cal = llm.calibrate_leak(
                    model, old_train, args.max_leak, statistic=stat, texts=new_texts, progress=False
                )
                gate = {"statistic": stat, "max_leak": args.max_leak, "offset": cal.offset}
                record(
                    f"{label} + gate {stat} {args.max_leak:g}",
                    name,
                    tuned,
                    score(model, certified=True),
                    gate=gate,
                    **extra,
                )
                state.output_layer.leak_offset.fill_(0.0)

    for lr in args.fft_lrs:
        fft, info_fft = full_finetune(base, ext, train_ext, lr, args)
        record(f"full fine-tuning lr {lr:g}", "fft", True, score(fft, certified=False), train=info_fft)
    for lr in args.lora_lrs:
        new_ids = list(range(n_base, n_base + len(words)))
        lora, info_lora = lora_finetune(base, ext, train_ext, new_ids, lr, args)
        record(f"LoRA + trainable tokens lr {lr:g}", "lora", True, score(lora, certified=False), train=info_lora)
    results["seconds"] = time.perf_counter() - t_start
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    from report import write_report

    write_report(results, out_dir)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
