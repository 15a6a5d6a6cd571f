"""Drives the fuzz worker: hypothesis draws mutants of the seed files, the persistent
worker loads each one, and a death by signal or a hang over ``HANG_SECONDS`` is recorded
as a failure naming the mutant (saved for reproduction); the worker is then restarted."""

from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from . import mutants

HANG_SECONDS = 20.0
#: Worker start-up (imports torch and transformers, builds the tiny bases).
START_SECONDS = 180.0
FORMATS = ("matrix", "expansion")


class Worker:
    """One ``worker.py`` subprocess, restarted after it dies or hangs."""

    def __init__(self, workdir: Path, hang_seconds: float = HANG_SECONDS) -> None:
        self.workdir = workdir
        self.hang_seconds = hang_seconds
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.starts = 0
        self.stderr: Any = None
        #: Formats whose set-up (torch import, tiny bases) a fresh worker does before timing starts.
        self.formats: set[str] = set()

    def _close_log(self) -> None:
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None

    def _start(self) -> None:
        self._close_log()
        self.starts += 1
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        # Open for the worker's whole life (closed when it is restarted or stopped).
        self.stderr = open(self.workdir / f"worker-{self.starts}.stderr", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("worker.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
            cwd=self.workdir,
        )
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True)
        self.reader.start()
        for request in [{"kind": "ping"}] + [{"kind": "warm", "fmt": f} for f in sorted(self.formats)]:
            answer = self._ask(request, START_SECONDS)
            if answer.get("pong") is not True:
                raise RuntimeError(f"the fuzz worker did not start: {answer}; see {self.stderr.name}")

    @staticmethod
    def _read(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def _ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            return {"hang": True}
        if line is None:
            rc = self.proc.wait(timeout=30)
            self._reap()
            return {"died": rc}
        return json.loads(line)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["kind"] in FORMATS and request["kind"] not in self.formats:
            self.formats.add(request["kind"])
            if self.proc is not None:
                self._ask({"kind": "warm", "fmt": request["kind"]}, START_SECONDS)
        if self.proc is None:
            self._start()
        return self._ask(request, self.hang_seconds)

    def _reap(self) -> None:
        """Close the pipes of the (dead) worker once its reader saw the end of its output."""
        assert self.proc is not None
        self.reader.join(timeout=30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except BrokenPipeError:  # unflushed request to a dead worker
                    pass
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # our own child, by its handle
            self.proc.wait(timeout=30)
            self._reap()
        self._close_log()


@dataclass
class Stats:
    """Figures of one fuzz run of one format."""

    fmt: str
    mutants: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    signals: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)
    dirty: list[str] = field(default_factory=list)
    late: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return self.signals + self.hangs + self.exits + self.dirty + self.late

    def report(self) -> str:
        lines = [
            f"{self.fmt}: {self.mutants} mutants",
            "  outcomes (per load/stage): " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
            f"  signals {len(self.signals)}, hangs {len(self.hangs)}, other worker exits {len(self.exits)}",
        ]
        if self.fmt == "expansion":
            lines.append(
                f"  failed loads that changed the model or tokenizer {len(self.dirty)}, "
                f"loads accepted that then failed to use or save {len(self.late)}"
            )
        lines += [f"  FAILURE {f}" for f in self.failures[:20]]
        return "\n".join(lines)


def fuzz(
    fmt: str,
    n: int,
    workdir: Path,
    keep: Path,
    worker: Worker,
    *,
    seed_value: int | None = None,
    progress: bool = False,
    only: list[str] | None = None,
) -> Stats:
    """Try ``n`` hypothesis-drawn mutants of the ``fmt`` seeds (those named in ``only``, default all);
    failing mutants are copied to ``keep``."""
    seeds = mutants.matrix_seeds(workdir) if fmt == "matrix" else mutants.expansion_seeds(workdir)
    if only:
        seeds = {k: v for k, v in seeds.items() if k in only}
        if not seeds:
            raise ValueError(f"no {fmt} seed among {only}")
    stats = Stats(fmt)
    target = workdir / f"mutant-{fmt}.safetensors"
    out = workdir / f"resaved-{fmt}.safetensors"
    keep.mkdir(parents=True, exist_ok=True)

    def record(kind: list[str], data: bytes, what: str) -> None:
        saved = keep / f"{fmt}-{stats.mutants}.safetensors"
        saved.write_bytes(data)
        kind.append(f"{what} (mutant saved to {saved})")

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=seed_value is None,
    )
    @given(data=st.data())
    def one(data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(seeds)))
        mutant, how = data.draw(mutants.mutation(seeds[name], resignable=fmt == "expansion"))
        target.write_bytes(mutant)
        request: dict[str, Any] = {"kind": fmt, "path": str(target)}
        if fmt == "expansion":
            request.update(arch=name.split("-")[0], out=str(out))
        answer = worker.ask(request)
        stats.mutants += 1
        what = f"{fmt} seed {name}, {how}"
        if "hang" in answer:
            record(stats.hangs, mutant, f"hang over {worker.hang_seconds:.0f} s: {what}")
        elif "died" in answer:
            rc = answer["died"]
            record(stats.signals if rc < 0 else stats.exits, mutant, f"worker exit status {rc}: {what}")
        else:
            for stage, outcome in answer["outcomes"].items():
                stats.outcomes[f"{stage if fmt == 'expansion' else 'load'}: {outcome}"] += 1
            if answer.get("dirty"):
                record(stats.dirty, mutant, f"failed load changed the model or tokenizer: {what}")
            if fmt == "expansion" and len(answer["outcomes"]) > 1:
                record(stats.late, mutant, f"accepted, then {answer['outcomes']}: {what}: {answer.get('message')}")
            if fmt == "expansion" and answer["outcomes"]["load"] != "ok" and not answer.get("value_error"):
                record(
                    stats.late,
                    mutant,
                    f"load raised {answer['outcomes']['load']}, not ValueError: {what}: {answer.get('message')}",
                )
        if progress and stats.mutants % 500 == 0:
            print(f"  {fmt}: {stats.mutants} mutants, {len(stats.failures)} failures", flush=True)

    if seed_value is not None:
        one = seed(seed_value)(one)
    one()
    for path in (target, out):
        path.unlink(missing_ok=True)
    shutil.rmtree(workdir / "__pycache__", ignore_errors=True)
    return stats
