"""The rank side of tests/test_distributed.py: one spawned process per rank joins a gloo group
(file rendezvous under the test's tmp_path), runs the jobs it is given and writes what it
got (fingerprints, fitted alphas, shard writes, its error) to a result file per rank."""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

#: Modules the test's fork server imports once, so that each rank forked from it starts with them
#: (names importable from site-packages: the server does not see the tests directory).
PRELOAD = [
    "numpy",
    "scipy.sparse",
    "torch",
    "torch.distributed",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "safetensors.numpy",
    "markovmem.llm",
    "markovmem.llm.distillation",
    "markovmem.llm.testing",
]


def load_model(spec: dict[str, Any]) -> Any:
    """A stories260k-style directory (spec["path"]) or a tiny random model (spec["tiny"] = kwargs)."""
    if "path" in spec:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(spec["path"]).eval()
    from markovmem.llm.testing import tiny_model

    return tiny_model(**spec["tiny"])


def _patch_shards(rank: int, job: dict[str, Any], log: dict[str, Any]) -> None:
    """Count this rank's shard writes; kill this process (SIGKILL) after its n-th write, or make
    its first shard computation raise, when the job asks for it on this rank."""
    from markovmem.llm import distillation

    save = distillation._Shards.save
    log["saved"] = []

    def counted(self: Any, i: int, tensors: Any) -> None:
        save(self, i, tensors)
        log["saved"].append(i)
        if job.get("kill_rank") == rank and len(log["saved"]) >= job.get("kill_after", 1):
            Path(job["results"], f"killed-{rank}").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

    distillation._Shards.save = counted  # type: ignore[method-assign]
    if job.get("raise_rank") == rank:

        def failing(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("injected failure in the top-k selection")

        distillation._select_topk = failing


def run_jobs(rank: int, job: dict[str, Any], log: dict[str, Any]) -> None:
    import numpy as np
    import scipy.sparse as sp

    import markovmem as mm
    from markovmem import llm

    _patch_shards(rank, job, log)
    for name, kw in job.get("distill", {}).items():
        log["saved"] = log[f"saved_{name}"] = []  # this job's shard writes
        model = load_model(job["model"])
        kw = dict(kw)
        if "sequences_file" in kw:
            kw["sequences"] = json.loads(Path(kw.pop("sequences_file")).read_text())
        log[f"t_{name}_start"] = time.time()
        P = llm.distill(model, progress=False, **kw)
        log[name] = P.fingerprint()
        log[f"t_{name}_end"] = time.time()
    if "fit" in job:
        P = mm.TransitionMatrix.load(job["fit"]["matrix"], mmap=True)
        with np.load(job["fit"]["targets"]) as z:
            C = sp.csr_array((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        fit = mm.fit_alpha(P, C, progress=False, **job["fit"]["kwargs"])
        np.savez(
            Path(job["results"]) / f"fit-{rank}.npz",
            indptr=fit.alpha.indptr,
            indices=fit.alpha.indices,
            data=fit.alpha.data,
            kl=fit.kl,
            n_iter=fit.n_iter,
            converged=fit.converged,
        )


def main(rank: int, world: int, job: dict[str, Any]) -> None:
    """Entry point of a rank; exits 1 after writing its error when a job raises."""
    import threading

    import torch
    import torch.distributed as td
    from tqdm import tqdm

    torch.set_num_threads(1)
    # tqdm's default lock is a multiprocessing semaphore; a rank leaves by os._exit, so the
    # semaphore tracker would report it leaked.  Ranks print no bars: a thread lock does.
    tqdm.set_lock(threading.RLock())
    log: dict[str, Any] = {"rank": rank}
    out = Path(job["results"]) / f"rank-{rank}.json"
    code = 0
    log["t_start"] = time.time()
    try:
        td.init_process_group(
            "gloo",
            init_method=f"file://{job['init_file']}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=job.get("timeout", 30)),
        )
        log["t_group"] = time.time()
        run_jobs(rank, job, log)
    except Exception as exc:  # noqa: BLE001 - every failure is logged for the test to read
        log["error"] = f"{type(exc).__name__}: {exc}"
        log["error_at"] = time.time()
        log["traceback"] = traceback.format_exc()
        code = 1
    out.write_text(json.dumps(log))
    sys.stdout.flush()
    # Leave without tearing the group down: a peer may be gone, and the exit code is the result.
    os._exit(code)
