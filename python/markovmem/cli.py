"""The ``markovmem`` command: each subcommand is a few calls to the public API."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _cmd_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from . import InvariantError, TransitionMatrix

    P = TransitionMatrix.load(args.path, mmap=True, verify=args.verify)
    k = np.diff(P.indptr)
    stats = {
        "path": args.path,
        "n_states": P.n_states,
        "n_base": P.n_base,
        "nnz": P.nnz,
        "entries_per_row": {"min": int(k.min()), "mean": float(k.mean()), "max": int(k.max())},
        "tail_mass": {"min": float(P.tail.min()), "mean": float(P.tail.mean()), "max": float(P.tail.max())},
        "nbytes": P.nbytes,
        "fingerprint": P.fingerprint(),
        "metadata": P.metadata,
    }
    try:
        P.validate()
        stats["valid"] = True
    except InvariantError as exc:
        stats["valid"] = False
        stats["violation"] = str(exc)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for key, value in stats.items():
            print(f"{key:>16}: {value}")
    return 0 if stats["valid"] else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from . import TransitionMatrix, verify_expansion

    before = TransitionMatrix.load(args.base, mmap=True, verify=True)
    after = TransitionMatrix.load(args.expanded, mmap=True, verify=True)
    cert = verify_expansion(before, after, max_leak=args.max_leak)
    print(json.dumps(cert.to_dict(), indent=2) if args.json else cert)
    return 0 if cert.ok else 1


def _save_csr_npz(path: str, **matrices: Any) -> None:
    """Write named scipy CSR matrices (and plain arrays) to one .npz file."""
    import numpy as np
    import scipy.sparse as sp

    arrays: dict[str, Any] = {}
    for name, m in matrices.items():
        if sp.issparse(m):
            m = sp.csr_array(m)
            arrays.update(
                {
                    f"{name}_indptr": m.indptr,
                    f"{name}_indices": m.indices,
                    f"{name}_data": m.data,
                    f"{name}_shape": np.array(m.shape),
                }
            )
        else:
            arrays[name] = np.asarray(m)
    np.savez(path, **arrays)


def _load_rows(path: str, name: str = "rows") -> Any:
    """A sparse (m, n) matrix from a ``markovmem fit`` output (its ``name`` block) or a scipy save_npz file."""
    import numpy as np
    import scipy.sparse as sp

    with np.load(path, allow_pickle=False) as z:
        if f"{name}_indptr" in z.files:
            return sp.csr_array(
                (z[f"{name}_data"], z[f"{name}_indices"], z[f"{name}_indptr"]), shape=tuple(z[f"{name}_shape"])
            )
    return sp.load_npz(path)


def _load_model(path: str, device: str | None, dtype: str | None, quiet: bool = False) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quiet:
        # transformers draws its own bars (e.g. "Loading weights") and info lines; --quiet means none.
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    kwargs: dict[str, Any] = {}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if device:
        # transformers declares PreTrainedModel.to through functools.wraps(nn.Module.to), whose type takes the
        # model as the first argument: the call is right, its declared type is not.
        model = model.to(device)  # type: ignore[arg-type]
    return model.eval(), tokenizer


def _read_texts(path: str) -> list[str]:
    """Paragraphs (blank-line separated) of a UTF-8 text file."""
    from pathlib import Path

    texts = [t.strip() for t in Path(path).read_text(encoding="utf-8").split("\n\n")]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"text file '{path}' holds no text")
    return texts


def _under_torchrun() -> bool:
    """True when started by torchrun (it sets RANK and WORLD_SIZE): the work is then spread over its ranks."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _rank0() -> bool:
    """This process writes the outputs and prints: the only one, or rank 0 of torchrun's."""
    return int(os.environ.get("RANK", "0")) == 0 if _under_torchrun() else True


def _cmd_distill(args: argparse.Namespace) -> int:
    from . import llm

    model, tokenizer = _load_model(args.model, args.device, args.dtype, args.quiet)
    sequences = None
    kwargs: dict[str, Any] = {}
    if args.mode is None:
        args.mode = "corpus" if args.corpus else "token"
    if args.mode == "corpus":
        if not args.corpus:
            raise ValueError("--mode corpus needs --corpus FILE")
        sequences = [tokenizer(t)["input_ids"] for t in _read_texts(args.corpus)]
        kwargs = {"fallback": args.fallback, "shrinkage": args.shrinkage}
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None
    if args.mode == "corpus" and args.fallback != "token":
        prefix = None
    P = llm.distill(
        model,
        top_k=args.top_k,
        batch_size=args.batch_size,
        device=args.device,
        prefix=prefix,
        progress=not args.quiet,
        out=args.shards,
        mode=args.mode,
        sequences=sequences,
        shard_rows=args.shard_rows,
        dist=True if _under_torchrun() else None,
        **kwargs,
    )
    if _rank0():
        P.save(args.output, metadata={"model": str(args.model)})
        print(f"wrote {args.output}: {P}")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    import numpy as np

    from . import TransitionMatrix, fit_alpha

    P = TransitionMatrix.load(args.matrix, mmap=True)
    counts = _load_rows(args.counts, "counts")
    fit = fit_alpha(
        P,
        counts,
        s=args.s,
        link=args.link,
        bound=args.bound,
        progress=not args.quiet,
        dist=True if _under_torchrun() else None,
    )
    if not _rank0():
        return 0
    _save_csr_npz(args.output, alpha=fit.alpha, rows=fit.predict(), kl=fit.kl, converged=fit.converged)
    print(f"wrote {args.output}: {fit}")
    print(
        f"KL(q || f(alpha)) per target: mean {float(np.mean(fit.kl)):.4g}, max {float(np.max(fit.kl)):.4g}; "
        f"converged {int(np.sum(fit.converged))}/{len(fit.kl)}"
    )
    return 0


def _cmd_expand(args: argparse.Namespace) -> int:
    from . import TransitionMatrix

    P = TransitionMatrix.load(args.matrix)
    Q, cert = P.expand(_load_rows(args.rows, "rows"))
    if cert.ok:
        Q.save(
            args.output,
            metadata=P.metadata and {k: v for k, v in P.metadata.items() if k in ("model", "top_k", "mode")},
        )
    print(json.dumps(cert.to_dict(), indent=2) if args.json else cert)
    if cert.ok:
        print(f"wrote {args.output}: {Q}")
    return 0 if cert.ok else 1


def _cmd_add_tokens(args: argparse.Namespace) -> int:
    from . import llm

    model, tokenizer = _load_model(args.model, args.device, args.dtype, args.quiet)
    texts = _read_texts(args.text)
    corpus = _read_texts(args.corpus) if args.corpus else None
    options: dict[str, Any] = {} if args.link is None else {"link": args.link}
    if args.max_leak is not None and not args.generate:
        raise ValueError("--max-leak bounds the leak of generated tokens; add --generate")
    if args.generate:
        options.update(generate=True, max_leak=args.max_leak, leak_statistic=args.leak_statistic)
    result = llm.learn_tokens(
        model,
        tokenizer,
        args.tokens,
        texts,
        s=args.s,
        tune_steps=args.tune_steps,
        corpus=corpus,
        device=args.device,
        progress=not args.quiet,
        **options,
    )
    llm.save_expansion(model, tokenizer, args.output, alpha=result.alpha)
    info = llm.dictionary_info(result.matrix)
    seen = f", {info['rows_seen']} of {info['n_rows']} old tokens seen" if "rows_seen" in info else ""
    print(f"dictionary: {info.get('mode', '?')} mode{seen}")
    print(f"new tokens {args.tokens} -> ids {result.ids}")
    for rep in result.tokens_report:
        print("  " + str(rep).replace("\n", "\n  "))
    if result.output is not None:
        names = tokenizer.convert_ids_to_tokens([int(v) for v in result.output.support[:, 0]])
        for tok, name, b in zip(args.tokens, names, result.output.bias, strict=True):
            print(f"  output row of {tok} = {name!r}'s, bias {b:+.3f}")
    if result.leak is not None:
        print(result.leak)
    print(result.report)
    print(f"wrote {args.output} (apply with markovmem.llm.load_expansion(base_model, tokenizer, path))")
    if args.merged:
        out = llm.export_merged(model, tokenizer, args.merged)
        print(f"wrote merged model directory {out}")
    return 0 if result.report.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.core:
        return _cmd_demo_core(args)
    from . import llm

    result = llm.run_demo(args.examples or 32, cache_dir=args.cache_dir, seed=args.seed, progress=not args.quiet)
    # Every method that leaves the base weights alone must have forgotten exactly nothing.
    exact = all(r["max_abs_logit_diff"] == 0.0 for r in result.rows if r["method"] != "full fine-tuning")
    return 0 if exact else 1


def _cmd_demo_core(args: argparse.Namespace) -> int:
    import numpy as np
    import scipy.sparse as sp

    from . import TransitionMatrix
    from ._demo_text import base_sentences, pseudo_sentences

    t0 = time.perf_counter()
    train = base_sentences(args.sentences, seed=args.seed)
    vocab = sorted({w for s in train for w in s})
    ids = {w: i for i, w in enumerate(vocab)}
    P = TransitionMatrix.from_sequences([[ids[w] for w in s] for s in train], len(vocab), smoothing=0.01)
    held_out = [[ids[w] for w in s] for s in base_sentences(500, seed=args.seed + 1)]
    print(f"base chain from {args.sentences} built-in sentences: {P}")
    print(f"held-out perplexity {P.perplexity(held_out):.3f} over {len(vocab)} words\n")

    # The new word behaves like a blend of two nouns; its row is its empirical next-word distribution.
    new_words = {"glorp": {"cat": 0.7, "dog": 0.3}, "zorp": {"tree": 0.5, "ball": 0.5}}
    rows = []
    examples = args.examples or 200
    for j, (word, like) in enumerate(new_words.items()):
        counts = np.zeros(len(vocab))
        for s in pseudo_sentences(word, like, examples, seed=args.seed + 10 + j):
            for a, b in itertools.pairwise(s):
                if a == word:
                    counts[ids[b]] += 1
        rows.append(counts / counts.sum())
    Q, cert = P.expand(sp.csr_array(np.array(rows)))
    print(f"expanded with {list(new_words)} from {examples} example sentences each: {Q}\n")
    print(cert)
    print()
    for j, word in enumerate(new_words):
        r = Q.row(P.n_states + j)
        top = np.argsort(-r.probs)[:4]
        print(f"p(. | {word}): " + ", ".join(f"{vocab[r.indices[i]]} {r.probs[i]:.2f}" for i in top))
    path = Q.sample(P.n_states, 8, seed=args.seed)
    names = vocab + list(new_words)
    print("a walk from glorp: " + " ".join(names[int(i)] for i in path))
    print(
        f"\nheld-out perplexity after the expansion {Q.perplexity(held_out):.3f} (unchanged: old rows are byte-identical)"
    )
    print(f"done in {time.perf_counter() - t0:.2f} s")
    return 0 if cert.ok else 1


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="markovmem",
        description="An LLM's memory as a sparse Markov transition matrix: grow it with new tokens, "
        "certify nothing old changed.",
    )
    p.add_argument("--version", action="version", version=f"markovmem {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    q = sub.add_parser("inspect", help="statistics and invariant check of a matrix file")
    q.add_argument("path", help="a .safetensors file written by TransitionMatrix.save")
    q.add_argument("--verify", action="store_true", help="also check every value and the stored fingerprint")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_cmd_inspect)

    q = sub.add_parser("verify", help="certify that EXPANDED extends BASE without changing any old transition")
    q.add_argument("base", help="the matrix before the expansion")
    q.add_argument("expanded", help="the matrix after the expansion")
    q.add_argument(
        "--max-leak",
        type=float,
        default=None,
        help="for an open expansion (old states may move to new ones), the largest per-row leak allowed "
        "(default: any leak < 1; the leak and forgetting figures are printed either way)",
    )
    q.add_argument("--json", action="store_true", help="print the certificate as JSON")
    q.set_defaults(func=_cmd_verify)

    q = sub.add_parser("distill", help="distill a transformers model into a transition matrix file")
    q.add_argument("model", help="a local transformers model directory (weights + tokenizer)")
    q.add_argument("-o", "--output", required=True, help="matrix file to write (.safetensors)")
    q.add_argument("--top-k", type=int, default=256, help="entries kept per row (default 256)")
    q.add_argument(
        "--batch-size", type=int, default=None, help="contexts per forward pass (default: from the vocabulary)"
    )
    q.add_argument(
        "--mode",
        choices=("token", "corpus"),
        default=None,
        help="'corpus': row v averaged over v's occurrences in --corpus; 'token': p(.|v) after a one-token "
        "context (default: corpus when --corpus is given, else token)",
    )
    q.add_argument(
        "--corpus", "--text", dest="corpus", help="text file (blank-line separated paragraphs) for --mode corpus"
    )
    q.add_argument(
        "--fallback",
        choices=("token", "unigram", "none"),
        default="token",
        help="--mode corpus: what rows seen rarely shrink toward (default token)",
    )
    q.add_argument(
        "--shrinkage", type=float, default=1.0, help="--mode corpus: pseudo-count of the fallback row (default 1)"
    )
    q.add_argument("--shards", help="directory for resumable shards (a rerun resumes)")
    q.add_argument(
        "--shard-rows",
        type=int,
        default=None,
        help="rows (token mode) or texts (corpus mode) per shard: the unit of resume and of the work "
        "shared between torchrun's ranks (default: about 16 MiB of rows, 256 texts)",
    )
    q.add_argument("--device", help="torch device, e.g. cuda (default: the model's)")
    q.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="load the weights in this dtype")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_distill)

    q = sub.add_parser("fit", help="fit sparse alpha for new-token counts against a matrix")
    q.add_argument("matrix", help="a matrix file (.safetensors)")
    q.add_argument("counts", help="(m, n_base) next-token counts: a scipy save_npz file")
    q.add_argument("-o", "--output", required=True, help=".npz to write (alpha, predicted rows, kl, converged)")
    q.add_argument("--s", type=int, default=16, help="sparsity: dictionary rows per new token (default 16)")
    q.add_argument("--link", choices=("logit", "mixture"), default="logit", help="link function (default logit)")
    q.add_argument("--bound", type=float, default=10.0, help="||alpha||_2 bound of the logit link (default 10)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_fit)

    q = sub.add_parser("expand", help="grow a matrix with new rows and print the certificate")
    q.add_argument("matrix", help="a matrix file (.safetensors)")
    q.add_argument("rows", help="(m, n_base) new rows: the output of `markovmem fit`, or a scipy save_npz file")
    q.add_argument("-o", "--output", required=True, help="expanded matrix file to write (only if certified)")
    q.add_argument("--json", action="store_true", help="print the certificate as JSON")
    q.set_defaults(func=_cmd_expand)

    q = sub.add_parser("add-tokens", help="teach a model new tokens from text, with zero forgetting")
    q.add_argument("model", help="a local transformers model directory (weights + tokenizer)")
    q.add_argument("--tokens", nargs="+", required=True, help="the new tokens")
    q.add_argument("--text", required=True, help="training text using them (blank-line separated paragraphs)")
    q.add_argument("-o", "--output", required=True, help="expansion file to write (.safetensors)")
    q.add_argument("--merged", help="also export a merged transformers model directory here")
    q.add_argument(
        "--corpus",
        help="general text in the model's domain (blank-line separated paragraphs) "
        "added to --text for the dictionary rows",
    )
    q.add_argument("--s", type=int, default=None, help="sparsity of alpha (default: learn_tokens')")
    q.add_argument(
        "--link",
        choices=("mixture", "logit", "auto"),
        default=None,
        help="fit_alpha link; auto chooses link and s per token on held-out contexts (default: learn_tokens')",
    )
    q.add_argument(
        "--tune-steps", type=int, default=50, help="embedding-tuning steps, 0 for E^T alpha only (default 50)"
    )
    q.add_argument(
        "--generate",
        action="store_true",
        help="let the model generate the new tokens (output rows W^T beta; old logits stay bitwise, the report "
        "gives the leak and the exact forgetting on old text)",
    )
    q.add_argument(
        "--max-leak",
        type=float,
        default=None,
        help="with --generate: hold the new tokens' probability on old text under this bound (one offset)",
    )
    q.add_argument(
        "--leak-statistic",
        choices=("max", "p99", "mean"),
        default="max",
        help="which statistic of the per-position leak --max-leak bounds (default max)",
    )
    q.add_argument("--device", help="torch device, e.g. cuda")
    q.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="load the weights in this dtype")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_add_tokens)

    q = sub.add_parser("demo", help="the built-in demo: teach a tiny Llama a new operator (no downloads)")
    q.add_argument("--core", action="store_true", help="the matrix-only demo on built-in text (no torch needed)")
    q.add_argument(
        "--examples",
        type=int,
        default=None,
        help="training examples of the new operator (default 32); with --core, sentences per new word (200)",
    )
    q.add_argument("--sentences", type=int, default=5000, help="--core: built-in training sentences (default 5000)")
    q.add_argument("--cache-dir", help="where the trained base model is cached (default ~/.cache/markovmem)")
    q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 check failed, 2 error)."""
    from ._errors import DistributedError

    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ImportError as exc:
        print(
            f"markovmem {args.command}: error: {exc} (install markovmem[llm] for the model commands)", file=sys.stderr
        )
        return 2
    except (OSError, ValueError, IndexError, TypeError, DistributedError) as exc:
        print(f"markovmem {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _leave_group()


def _leave_group() -> None:
    """Tear down a process group the command set up (under torchrun), so the process exits cleanly."""
    td = sys.modules.get("torch.distributed")
    if td is not None and td.is_available() and td.is_initialized():
        td.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
