"""The markovmem command: demo, inspect, verify and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

import markovmem as mm
from markovmem.cli import main


@pytest.fixture
def saved_pair(tmp_path):
    rng = np.random.default_rng(3)
    P = mm.TransitionMatrix.from_sequences(rng.integers(0, 20, size=400), 20)
    Q, _ = P.expand(sp.csr_array(np.full((2, 20), 0.05)))
    base, expanded = tmp_path / "base.safetensors", tmp_path / "expanded.safetensors"
    P.save(base)
    Q.save(expanded)
    return P, Q, base, expanded


def test_demo_prints_an_ok_certificate(capsys) -> None:
    assert main(["demo", "--core", "--sentences", "500", "--examples", "50"]) == 0
    out = capsys.readouterr().out
    assert "certificate                   OK" in out
    assert "old block byte-identical      True" in out
    assert "p(. | glorp)" in out


def test_inspect_reports_stats_as_json(saved_pair, capsys) -> None:
    P, _, base, _ = saved_pair
    assert main(["inspect", str(base), "--json", "--verify"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["n_states"] == P.n_states and stats["nnz"] == P.nnz
    assert stats["fingerprint"] == P.fingerprint() and stats["valid"] is True


def test_verify_passes_an_expansion_and_fails_a_change(saved_pair, tmp_path, capsys) -> None:
    P, _, base, expanded = saved_pair
    assert main(["verify", str(base), str(expanded), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    csr = P.to_scipy().copy()
    csr.data[0] *= 0.5  # one old transition changed
    changed = tmp_path / "changed.safetensors"
    mm.TransitionMatrix.from_scipy(csr).save(changed)
    assert main(["verify", str(base), str(changed)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_verify_prints_the_leak_of_an_open_expansion(saved_pair, tmp_path, capsys) -> None:
    P, _, base, _ = saved_pair
    incoming = np.zeros((P.n_states, 1))
    incoming[1, 0] = 0.2
    Q, _ = P.expand(np.full((1, P.n_base), 1.0 / P.n_base), incoming=incoming)
    opened = tmp_path / "open.safetensors"
    Q.save(opened)
    assert main(["verify", str(base), str(opened)]) == 0
    out = capsys.readouterr().out
    assert "open expansion: max leak      0.2 (row 1)" in out and "forgetting max (nats)" in out
    assert main(["verify", str(base), str(opened), "--max-leak", "0.1", "--json"]) == 1
    cert = json.loads(capsys.readouterr().out)
    assert cert["open"] is True and cert["worst_leak_row"] == 1 and cert["leak_bound"] == 0.1


def test_missing_file_is_a_clear_error(tmp_path, capsys) -> None:
    missing = tmp_path / "nope.safetensors"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "No such file" in err and "nope.safetensors" in err
