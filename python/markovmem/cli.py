"""The ``markovmem`` command: each subcommand is a few calls to the public API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

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
    cert = verify_expansion(before, after)
    print(json.dumps(cert.to_dict(), indent=2) if args.json else cert)
    return 0 if cert.ok else 1


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
    for j, (word, like) in enumerate(new_words.items()):
        counts = np.zeros(len(vocab))
        for s in pseudo_sentences(word, like, args.examples, seed=args.seed + 10 + j):
            for a, b in zip(s, s[1:]):
                if a == word:
                    counts[ids[b]] += 1
        rows.append(counts / counts.sum())
    Q, cert = P.expand(sp.csr_array(np.array(rows)))
    print(f"expanded with {list(new_words)} from {args.examples} example sentences each: {Q}\n")
    print(cert)
    print()
    for j, word in enumerate(new_words):
        r = Q.row(P.n_states + j)
        top = np.argsort(-r.probs)[:4]
        print(f"p(. | {word}): " + ", ".join(f"{vocab[r.indices[i]]} {r.probs[i]:.2f}" for i in top))
    path = Q.sample(P.n_states, 8, seed=args.seed)
    names = vocab + list(new_words)
    print("a walk from glorp: " + " ".join(names[int(i)] for i in path))
    print(f"\nheld-out perplexity after the expansion {Q.perplexity(held_out):.3f} (unchanged: old rows are byte-identical)")
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
    q.add_argument("--json", action="store_true", help="print the certificate as JSON")
    q.set_defaults(func=_cmd_verify)

    q = sub.add_parser("demo", help="the built-in demo (no downloads)")
    q.add_argument("--sentences", type=int, default=5000, help="built-in training sentences (default 5000)")
    q.add_argument("--examples", type=int, default=200, help="example sentences per new word (default 200)")
    q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    q.set_defaults(func=_cmd_demo_core)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 check failed, 2 error)."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError, IndexError, TypeError) as exc:
        print(f"markovmem {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
