"""Short fuzz budget of the file formats (MARKOVMEM_FUZZ_MUTANTS per format, default 300):
no mutant may kill or hang the loading process, and a mutated expansion file is either
refused with ValueError leaving model and tokenizer unchanged, or fully usable."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("hypothesis")

from .runner import FORMATS, Worker, fuzz

N = int(os.environ.get("MARKOVMEM_FUZZ_MUTANTS", "300"))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("fuzz-worker"))
    yield w
    w.stop()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_mutants_never_crash_or_hang(fmt, worker, tmp_path):
    stats = fuzz(fmt, N, worker.workdir, tmp_path / "failures", worker)
    assert stats.mutants >= N * 0.9, stats.report()
    assert not stats.failures, stats.report()
    # The mutants reached the checks: most loads were refused, and some mutants still loaded.
    refused = sum(v for k, v in stats.outcomes.items() if not k.endswith(": ok"))
    assert refused > stats.mutants / 2, stats.report()


def test_the_harness_sees_a_signal_and_a_hang(tmp_path):
    w = Worker(tmp_path, hang_seconds=2.0)
    try:
        assert w.ask({"kind": "selftest", "what": "signal"}) == {"died": -11}
        assert w.ask({"kind": "selftest", "what": "hang"}) == {"hang": True}
        assert w.ask({"kind": "ping"}) == {"pong": True}
        assert w.starts == 3
    finally:
        w.stop()
