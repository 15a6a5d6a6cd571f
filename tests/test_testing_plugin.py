"""markovmem.testing helpers and the pytest plugin (fixture and --markovmem-expansion)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import markovmem as mm
from markovmem import testing

pytest_plugins = ["pytester"]


@pytest.fixture
def chain() -> mm.TransitionMatrix:
    rng = np.random.default_rng(7)
    return mm.TransitionMatrix.from_sequences(rng.integers(0, 12, size=300), 12, top_k=4)


def test_assert_expansion_preserves_accepts_an_expansion(chain) -> None:
    Q, _ = chain.expand(sp.csr_array(np.full((1, 12), 1 / 12)))
    cert = testing.assert_expansion_preserves(chain, Q)
    assert cert.ok and cert.n_new == 1


def test_assert_expansion_preserves_reports_a_changed_row(chain) -> None:
    csr = chain.to_scipy().copy()
    csr.data[-1] *= 0.5
    csr = sp.vstack([csr, sp.csr_array(np.zeros((1, 12)))]).tocsr()
    csr.resize((13, 13))
    changed = mm.TransitionMatrix.from_scipy(csr, n_base=12)
    with pytest.raises(AssertionError, match="old rows are not byte-identical"):
        testing.assert_expansion_preserves(chain, changed)


def test_row_stochastic_and_same_matrix(chain, tmp_path) -> None:
    testing.assert_row_stochastic(chain)
    path = tmp_path / "c.safetensors"
    chain.save(path)
    testing.assert_same_matrix(chain, path)
    other = mm.TransitionMatrix.from_sequences(np.arange(12), 12)
    with pytest.raises(AssertionError, match="differ"):
        testing.assert_same_matrix(chain, other)


def test_plugin_fixture_and_option(pytester, chain, tmp_path) -> None:
    base, good, bad = tmp_path / "base.st", tmp_path / "good.st", tmp_path / "bad.st"
    chain.save(base)
    chain.expand(sp.csr_array(np.full((2, 12), 1 / 12)))[0].save(good)
    # "bad": n_base grows with the new state, so old tails spread onto it.
    csr = chain.to_scipy().copy()
    csr.resize((13, 13))
    mm.TransitionMatrix.from_scipy(csr).save(bad)
    pytester.makepyfile(
        f"""
        def test_one_line(markov_invariants):
            markov_invariants.assert_expansion_preserves({str(base)!r}, {str(good)!r})
        """
    )
    result = pytester.runpytest(
        "-p",
        "no:cacheprovider",
        "--markovmem-expansion",
        str(base),
        str(good),
        "--markovmem-expansion",
        str(base),
        str(bad),
    )
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*n_base changed*"])
