"""Long fuzz run: ``python -m tests.fuzz --mutants 10000`` (from the repository root).

Prints, per format, the mutants tried, the outcome of every load (exception types),
the signals and the hangs, and exits 1 if any mutant crashed, hung, or (expansions) was
accepted and then failed, raised something other than ValueError, or left the model or
tokenizer changed after a failed load.  MARKOVMEM_FUZZ_SOURCE=<dir> makes the worker
import markovmem from another copy of the package (e.g. an older version's python/
directory with a built _core), to see what the suite catches there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .runner import FORMATS, Worker, fuzz


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", type=int, default=10_000, help="mutants per format (default 10000)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="formats to fuzz")
    parser.add_argument(
        "--seed", type=int, default=None, help="hypothesis seed (default: derandomized, the same mutants every run)"
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        default=None,
        help="seed files to mutate (matrix: chain6 expanded8; expansion: llama qwen2 llama-v1)",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=Path("fuzz-failures"),
        help="directory for failing mutants (default ./fuzz-failures)",
    )
    args = parser.parse_args(argv)
    failed = False
    with tempfile.TemporaryDirectory(prefix="markovmem-fuzz-") as tmp:
        worker = Worker(Path(tmp))
        try:
            for fmt in args.formats:
                t0 = time.perf_counter()
                stats = fuzz(
                    fmt,
                    args.mutants,
                    Path(tmp),
                    args.keep,
                    worker,
                    seed_value=args.seed,
                    progress=True,
                    only=args.seeds,
                )
                print(stats.report())
                print(f"  {time.perf_counter() - t0:.0f} s, worker started {worker.starts} times so far", flush=True)
                failed |= bool(stats.failures)
        finally:
            worker.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
