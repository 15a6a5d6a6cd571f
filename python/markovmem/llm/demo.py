"""The built-in demo: teach a tiny arithmetic Llama a new multiplication operator
from a few examples, by E^T alpha and embedding tuning, against full fine-tuning.

Mirrors the paper's arithmetic-operator experiment.  Everything is generated
here (no downloads); the base model is trained once and cached.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .distillation import distill, next_token_counts
from .model import _io_modules, _require_expansion, add_tokens, alpha_to_embeddings, set_embeddings
from .tuning import embedding_tune
from .verify import verify_no_forgetting

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

__all__ = ["DemoResult", "run_demo"]

#: Symbols of the arithmetic language; the new operator is not among them.
DIGITS = "0123456789"
OPERATORS = "+*x"
NEW_OPERATOR = "#"
_SPECIALS = ["<pad>", "<s>", "</s>"]
#: Operand ranges: multiplication is the 12x12 times table (written '*' or 'x'),
#: addition takes operands 0..19.  They differ in the digits that follow the
#: operator, which is the Markov signal alpha can pick up.
MUL_RANGE = range(1, 13)
ADD_RANGE = range(20)
_CACHE_VERSION = "2"


@dataclass
class DemoResult:
    """What :func:`run_demo` measured.

    Attributes
    ----------
    rows : list of dict
        One per method: method, new_op_acc, mul_acc, add_acc, max_abs_logit_diff,
        trainable_params, seconds.
    decomposition : dict of str -> list of (str, float)
        Per link, the dictionary tokens E^T alpha decomposes the new operator
        into, largest |weight| first.
    settings : dict
    base_accuracy : dict
        Accuracies of the base model ('*', 'x', '+').
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    decomposition: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    base_accuracy: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """The result table as text."""
        head = [
            "method",
            f"acc '{NEW_OPERATOR}' (held out)",
            "acc '*' kept",
            "acc '+' kept",
            "max |delta logit| old",
            "trainable",
            "time s",
        ]
        lines = [head]
        for r in self.rows:
            lines.append(
                [
                    r["method"],
                    f"{r['new_op_acc']:.3f}",
                    f"{r['mul_acc']:.3f}",
                    f"{r['add_acc']:.3f}",
                    f"{r['max_abs_logit_diff']:.3g}",
                    f"{r['trainable_params']:,}",
                    f"{r['seconds']:.1f}",
                ]
            )
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        out = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            for row in lines
        ]
        out.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(out)

    def __str__(self) -> str:
        s = self.settings
        base = ", ".join(f"'{k}' {v:.3f}" for k, v in self.base_accuracy.items())
        deco = [
            f"E^T alpha, {link} link: '{NEW_OPERATOR}' = "
            + (" ".join(f"{w:+.3f} x {tok!r}" for tok, w in pairs) or "(empty)")
            for link, pairs in self.decomposition.items()
        ]
        return "\n".join(
            [
                (
                    f"markovmem demo: teach a tiny Llama the new operator '{NEW_OPERATOR}' (a{NEW_OPERATOR}b = a*b) "
                    f"from {s.get('n_examples')} examples"
                ),
                f"base model accuracy: {base}",
                "",
                self.table(),
                "",
                *deco,
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- data
def _equation(a: int, op: str, b: int) -> str:
    c = a * b if op in ("*", "x", NEW_OPERATOR) else a + b
    return f"{a}{op}{b}={c}"


def _base_corpus() -> list[str]:
    mul = [_equation(a, op, b) for op in ("*", "x") for a in MUL_RANGE for b in MUL_RANGE]
    add = [_equation(a, "+", b) for a in ADD_RANGE for b in ADD_RANGE]
    return mul + add


def _tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    symbols = list(DIGITS) + list(OPERATORS) + ["="]
    vocab = {t: i for i, t in enumerate(_SPECIALS + symbols)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _encode(tok: Any, texts: list[str]) -> list[list[int]]:
    eos = tok.eos_token_id
    return [tok(t)["input_ids"] + [eos] for t in texts]


def _batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    return ids, mask


# ---------------------------------------------------------------------- models
def _new_model(vocab_size: int, seed: int) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _train(
    model: nn.Module,
    seqs: list[list[int]],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool,
    desc: str,
    one_cycle: bool = False,
) -> float:
    """Full training of every parameter with next-token cross-entropy (AdamW, constant lr or
    one-cycle); returns seconds."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = None
    if one_cycle and steps >= 20:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in bar:
        pick = rng.integers(0, len(seqs), batch_size)
        ids, mask = _batch([seqs[i] for i in pick])
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
    model.eval()
    return time.perf_counter() - start


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("MARKOVMEM_CACHE"):
        return Path(os.environ["MARKOVMEM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "markovmem"


def _base_model(cache_dir: Any, steps: int, seed: int, progress: bool) -> tuple[LlamaForCausalLM, Any, float]:
    """The arithmetic Llama, trained once and cached; (model, tokenizer, seconds spent training now)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    key = hashlib.sha256(
        json.dumps([_CACHE_VERSION, steps, seed, list(MUL_RANGE), list(ADD_RANGE)]).encode()
    ).hexdigest()[:12]
    path = _cache_root(cache_dir) / f"demo-arith-llama-{key}"
    if (path / "config.json").exists():
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(path), 0.0
    tok = _tokenizer()
    model = _new_model(len(tok), seed)
    seconds = _train(
        model, _encode(tok, _base_corpus()), steps, 3e-3, 128, seed, progress, "train base model", one_cycle=True
    )
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if path.exists():  # another process finished first
        return model, tok, seconds
    os.replace(tmp, path)
    return model, tok, seconds


# ---------------------------------------------------------------------- evaluation
def _accuracy(model: nn.Module, tok: Any, pairs: list[tuple[int, int]], op: str) -> float:
    """Greedy exact-match accuracy of 'a op b =' -> the right result then EOS."""
    if not pairs:
        return float("nan")
    groups: dict[int, list[tuple[list[int], str]]] = {}
    for a, b in pairs:
        prompt = tok(f"{a}{op}{b}=")["input_ids"]
        answer = _equation(a, op, b).split("=")[1]
        groups.setdefault(len(prompt), []).append((prompt, answer))
    correct = 0
    eos = tok.eos_token_id
    with torch.no_grad():
        for items in groups.values():
            ids = torch.tensor([p for p, _ in items])
            for _ in range(5):
                nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
            start = len(items[0][0])
            for row, (_, answer) in zip(ids[:, start:].tolist(), items, strict=True):
                out = row[: row.index(eos)] if eos in row else None
                correct += out is not None and tok.decode(out).replace(" ", "") == answer
    return correct / len(pairs)


def _old_contexts(tok: Any, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    corpus = _base_corpus()
    return [tok(corpus[i])["input_ids"] for i in rng.choice(len(corpus), size=min(n, len(corpus)), replace=False)]


def _max_logit_diff(base: nn.Module, model: nn.Module, contexts: list[list[int]], n_base: int) -> float:
    diff = 0.0
    with torch.no_grad():
        for c in contexts:
            x = torch.tensor([c])
            a = base(input_ids=x, use_cache=False).logits[..., :n_base]
            b = model(input_ids=x, use_cache=False).logits[..., :n_base]
            diff = max(diff, float((a - b).abs().max()))
    return diff


# ---------------------------------------------------------------------- the demo
def run_demo(
    n_examples: int = 32,
    *,
    s: int = 2,
    tune_steps: int = 60,
    tune_lr: float = 0.05,
    finetune_lr: float = 1e-3,
    base_steps: int = 900,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    threads: int | None = 1,
    progress: bool = True,
    verbose: bool = True,
    fit: Callable[..., Any] | None = None,
) -> DemoResult:
    """Teach a tiny Llama a new operator from a few examples; compare E^T alpha, ET and full fine-tuning.

    A 2-layer Llama (width 64, tied embeddings, vocabulary of digits, ``+ * x =``) is
    trained on every ``a*b``, ``axb`` (times table to 12) and ``a+b`` (operands
    below 20) once, then cached.  The new token ``#`` is then learned from
    ``n_examples`` equations ``a#b=a*b``:

    - **E^T alpha**: distill the base model (corpus mode over its training
      equations), count what follows ``#`` in the examples, ``fit_alpha`` with
      the paper's logit link and with the mixture link, write ``E^T alpha`` as
      the row of ``#``; no training.
    - **ET from E^T alpha (logit)** and **ET from mean**: embedding tuning of
      the one new row for ``tune_steps`` steps, from each start.
    - **full fine-tuning**: the usual way, a resized vocabulary and every
      weight trained on the same examples for the same steps.

    Accuracy on ``#`` is measured on the times-table pairs not among the
    examples; ``'*'`` and ``'+'`` accuracy show what the other methods keep;
    max |delta logit| compares old-vocabulary logits with the base model on
    old-only equations.

    Parameters
    ----------
    n_examples : int
        Examples of the new operator (at most 143, leaving one held out).
    s : int
        Sparsity of alpha.
    tune_steps, tune_lr : int, float
        Steps (shared by ET and full fine-tuning) and ET's learning rate.
    finetune_lr : float
        Learning rate of full fine-tuning.
    base_steps : int
        Training steps of the base model (only when it is not cached).
    cache_dir : path, optional
        Where the base model is cached (default ``$MARKOVMEM_CACHE`` or
        ``~/.cache/markovmem``).
    seed : int
    threads : int or None
        ``torch.set_num_threads`` for the run (restored afterwards).  The
        model is so small that one thread is fastest; None keeps torch's setting.
    progress, verbose : bool
        Progress bars; print the result.
    fit : callable, optional
        ``fit(P, counts, s=s, link=...)`` returning an object with ``.alpha``;
        default ``markovmem.fit_alpha``.

    Returns
    -------
    DemoResult
    """
    n_mul = len(MUL_RANGE) ** 2
    if not 1 <= int(n_examples) < n_mul:
        raise ValueError(f"n_examples is {n_examples}; expected 1 .. {n_mul - 1}")
    if fit is None:
        import markovmem

        fit = getattr(markovmem, "fit_alpha", None)
        if fit is None:
            raise ImportError("the demo needs markovmem.fit_alpha, which this build of markovmem lacks")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run(
            int(n_examples), s, tune_steps, tune_lr, finetune_lr, base_steps, cache_dir, seed, progress, verbose, fit
        )
    finally:
        torch.set_num_threads(old_threads)


def _run(
    n_examples: int,
    s: int,
    tune_steps: int,
    tune_lr: float,
    finetune_lr: float,
    base_steps: int,
    cache_dir: Any,
    seed: int,
    progress: bool,
    verbose: bool,
    fit: Callable[..., Any],
) -> DemoResult:
    base, tok, train_seconds = _base_model(cache_dir, base_steps, seed, progress)
    n_base = _io_modules(base)[0].num_embeddings
    rng = np.random.default_rng(seed + 1)
    pairs = [(a, b) for a in MUL_RANGE for b in MUL_RANGE]
    order = rng.permutation(len(pairs))
    train_pairs = [pairs[i] for i in order[:n_examples]]
    held_out = [pairs[i] for i in order[n_examples:]]
    add_pairs = [(a, b) for a in ADD_RANGE for b in ADD_RANGE]
    contexts = _old_contexts(tok, 96, seed)
    result = DemoResult(
        settings={
            "n_examples": n_examples,
            "s": s,
            "tune_steps": tune_steps,
            "tune_lr": tune_lr,
            "finetune_lr": finetune_lr,
            "base_steps": base_steps,
            "seed": seed,
            "base_training_seconds_this_run": round(train_seconds, 1),
            "n_held_out": len(held_out),
        }
    )
    result.base_accuracy = {
        "*": _accuracy(base, tok, pairs, "*"),
        "x": _accuracy(base, tok, pairs, "x"),
        "+": _accuracy(base, tok, add_pairs, "+"),
    }
    examples = [_equation(a, NEW_OPERATOR, b) for a, b in train_pairs]

    def measure(
        method: str, model: nn.Module, tokenizer: Any, trainable: int, seconds: float, diff: float | None = None
    ) -> None:
        if diff is None:
            diff = _max_logit_diff(base, model, contexts, n_base)
        result.rows.append(
            {
                "method": method,
                "new_op_acc": _accuracy(model, tokenizer, held_out, NEW_OPERATOR),
                "mul_acc": _accuracy(model, tokenizer, pairs, "*"),
                "add_acc": _accuracy(model, tokenizer, add_pairs, "+"),
                "max_abs_logit_diff": diff,
                "trainable_params": int(trainable),
                "seconds": seconds,
            }
        )

    # 1. E^T alpha: distill once, count, fit (both links), write.  No gradient step.
    import scipy.sparse as sp

    t0 = time.perf_counter()
    P = distill(base, top_k=n_base, mode="corpus", sequences=_encode(tok, _base_corpus()), progress=False)
    seconds_distill = time.perf_counter() - t0
    alpha_models: dict[str, nn.Module] = {}
    alpha_seconds: dict[str, float] = {}
    for link in ("logit", "mixture"):
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        tok_a = copy.deepcopy(tok)
        ids = add_tokens(model, tok_a, [NEW_OPERATOR])
        seqs = _encode(tok_a, examples)
        counts = next_token_counts(seqs, ids, n_base)
        fitted = fit(P, counts, s=s, link=link)
        set_embeddings(model, ids, alpha_to_embeddings(model, fitted.alpha))
        _require_expansion(model).alpha = fitted.alpha
        alpha_seconds[link] = seconds_distill + time.perf_counter() - t0
        report = verify_no_forgetting(base, model, contexts)
        measure(
            f"E^T alpha, {link} link (no training)", model, tok_a, 0, alpha_seconds[link], report.max_abs_logit_diff
        )
        alpha = sp.csr_array(fitted.alpha)
        cols, vals = alpha.indices[alpha.indptr[0] : alpha.indptr[1]], alpha.data[alpha.indptr[0] : alpha.indptr[1]]
        order_a = np.argsort(-np.abs(vals))
        result.decomposition[link] = [
            (tok.convert_ids_to_tokens(int(c)), float(v)) for c, v in zip(cols[order_a], vals[order_a], strict=True)
        ]
        alpha_models[link] = model

    # 2. ET from E^T alpha (the paper's logit link), and from the mean embedding.
    for name, init in (("ET from E^T alpha (logit)", None), ("ET from mean embedding", "mean")):
        m = copy.deepcopy(alpha_models["logit"])
        t0 = time.perf_counter()
        history = embedding_tune(
            m,
            ids,
            seqs,
            steps=tune_steps,
            lr=tune_lr,
            batch_size=min(16, n_examples),
            init=init,
            seed=seed,
            progress=progress,
        )
        seconds = (alpha_seconds["logit"] if init is None else 0.0) + time.perf_counter() - t0
        report = verify_no_forgetting(base, m, contexts)
        measure(name, m, tok_a, history.n_trainable, seconds, report.max_abs_logit_diff)

    # 3. Full fine-tuning: resized vocabulary, every weight trained on the same examples.
    ft = copy.deepcopy(base)
    tok_f = copy.deepcopy(tok)
    tok_f.add_tokens([NEW_OPERATOR])
    ft.resize_token_embeddings(len(tok_f), mean_resizing=False)
    with torch.no_grad():
        ft_rows = _io_modules(ft)[0].weight
        ft_rows[n_base:] = ft_rows[:n_base].mean(0)
    seconds = _train(
        ft, _encode(tok_f, examples), tune_steps, finetune_lr, min(16, n_examples), seed, progress, "full fine-tuning"
    )
    measure("full fine-tuning", ft, tok_f, sum(p.numel() for p in ft.parameters()), seconds)
    if verbose:
        print(result)
    return result
