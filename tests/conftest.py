"""Shared fixtures: seeded random generators and tiny canonical chains."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.sparse as sp

import markovmem as mm


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20260514)


@pytest.fixture
def chain4() -> mm.TransitionMatrix:
    """4 states: a row with a tail over 2 free states, a deterministic row,
    a row with a large tail, and an empty row (tail 1, uniform)."""
    dense = np.array(
        [
            [0.5, 0.25, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.1, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    return mm.TransitionMatrix.from_scipy(sp.csr_array(dense))


@pytest.fixture
def ergodic3() -> mm.TransitionMatrix:
    """3 fully stored states, irreducible and aperiodic (tail 0 everywhere)."""
    dense = np.array([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.25, 0.25, 0.5]])
    return mm.TransitionMatrix.from_scipy(dense)


@pytest.fixture
def expanded6() -> tuple[mm.TransitionMatrix, mm.TransitionMatrix]:
    """(P, Q): a 4-state chain and its expansion by 2 new states (n_base 4)."""
    P = mm.TransitionMatrix.from_scipy(
        np.array([[0.5, 0.25, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.4, 0.6]])
    )
    Q, _ = P.expand(np.array([[0.0, 0.5, 0.5, 0.0], [0.2, 0.0, 0.0, 0.0]]))
    return P, Q


@pytest.fixture(autouse=True)
def torch_one_thread():
    """Tiny models gain nothing from threads, and on a shared machine they spin.

    Applies only when a test module has imported torch (the core tests never do)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
