"""The fuzz worker: a long-lived subprocess that loads mutant files named on stdin, one
JSON request per line, and answers one JSON line each on its original stdout.

Matrices: TransitionMatrix.load in all four mmap/verify modes, then row, prob and
validate.  Expansions: load_expansion onto a fresh tiny base, then the alpha as a dense
array, a forward over old and new ids, and save_expansion; after a failed load the
model and the tokenizer must be as before.  A crash of this process is what the parent
looks for; Python exceptions are answers.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mutants


def _outcome(fn: Any) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the answer is the exception's type
        return type(exc).__name__
    return "ok"


def run_matrix(path: str) -> dict[str, Any]:
    import markovmem as mm

    loads = {}
    for mmap in (True, False):
        for verify in (False, True):

            def use(mmap: bool = mmap, verify: bool = verify) -> None:
                P = mm.TransitionMatrix.load(path, mmap=mmap, verify=verify)
                for v in range(min(P.n_states, 4)):
                    P.row(v)
                    P.prob(v, 0)
                P.validate()

            loads[f"mmap={mmap},verify={verify}"] = _outcome(use)
    return {"outcomes": loads}


class ExpansionRunner:
    """Builds the tiny bases on first use, so a worker fuzzing matrices never imports torch."""

    def __init__(self) -> None:
        self.bases: dict[str, Any] = {}

    def warm(self) -> None:
        import torch

        from markovmem import llm  # noqa: F401  (imports transformers)

        if not self.bases:
            torch.set_num_threads(1)
            self.bases = {a: mutants.expansion_base(a) for a in mutants.EXPANSION_BASES}

    def __call__(self, path: str, arch: str, out: str) -> dict[str, Any]:
        import torch

        self.warm()

        from markovmem import llm
        from markovmem.llm.testing import tiny_tokenizer

        model, tok = copy.deepcopy(self.bases[arch]), tiny_tokenizer(mutants.V)
        before = (llm.base_fingerprint(model), sorted(model.state_dict()), tok.get_vocab(), len(tok))
        try:
            ids = llm.load_expansion(model, tok, path)
        except Exception as exc:  # noqa: BLE001 - any refusal is recorded and classified by the runner
            after = (llm.base_fingerprint(model), sorted(model.state_dict()), tok.get_vocab(), len(tok))
            dirty = after != before or llm.get_expansion(model) is not None
            return {
                "outcomes": {"load": type(exc).__name__},
                "dirty": dirty,
                "message": str(exc)[:300],
                "value_error": isinstance(exc, ValueError),
            }
        state = llm.get_expansion(model)
        stage = "use"
        try:
            if state.alpha is not None:
                state.alpha.toarray()
            with torch.no_grad():
                model(torch.tensor([[1, 5, ids[0], 7, ids[-1]]]))
            stage = "save"
            llm.save_expansion(model, tok, out)
        except Exception as exc:  # noqa: BLE001 - any failure after a load is recorded for the runner
            return {"outcomes": {"load": "ok", stage: type(exc).__name__}, "message": str(exc)[:300]}
        return {"outcomes": {"load": "ok"}}


def main() -> int:
    source = os.environ.get("MARKOVMEM_FUZZ_SOURCE")
    if source:
        # Fuzz another copy of the package (e.g. an older version's python/ directory holding a
        # built _core): drop the editable install's finder so that copy is the one imported.
        sys.meta_path[:] = [f for f in sys.meta_path if "_editable" not in type(f).__module__]
        sys.path.insert(0, source)
    # Replies go to the original stdout; anything else printed goes to stderr.
    reply = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    expansion = ExpansionRunner()
    for line in sys.stdin:
        request = json.loads(line)
        if request["kind"] == "ping":
            answer: dict[str, Any] = {"pong": True}
        elif request["kind"] == "warm":
            if request["fmt"] == "expansion":
                expansion.warm()
            answer = {"pong": True}
        elif request["kind"] == "selftest":  # lets the harness's own test see a crash and a hang
            if request["what"] == "signal":
                os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(3600)
        elif request["kind"] == "matrix":
            answer = run_matrix(request["path"])
        else:
            answer = expansion(request["path"], request["arch"], request["out"])
        reply.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
