"""The fit's vectorised exp / log loops: every instruction set the CPU has against numpy
(lengths that exercise the partial last vector, extreme arguments), and the same fits
whichever set runs them."""

from __future__ import annotations

import numpy as np
import pytest
from test_fit import planted, zipf_dictionary

import markovmem as mm
from markovmem import _core

ULP = np.finfo(np.float64).eps


def available() -> list[str]:
    levels = []
    for name in ("generic", "avx2", "avx512"):
        try:
            _core.set_simd_level(name)
        except ValueError:
            continue
        levels.append(name)
    _core.set_simd_level("auto")
    return levels


LEVELS = available()


@pytest.fixture(params=LEVELS)
def level(request):
    _core.set_simd_level(request.param)
    assert _core.simd_level() == request.param
    yield request.param
    _core.set_simd_level("auto")


def test_auto_picks_the_widest_set_the_cpu_has():
    _core.set_simd_level("auto")
    assert _core.simd_level() == LEVELS[-1]


def test_unknown_or_missing_instruction_set_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        _core.set_simd_level("sse9")
    for name in {"avx2", "avx512"} - set(LEVELS):
        with pytest.raises(ValueError, match="not available"):
            _core.set_simd_level(name)
    assert _core.simd_level() == LEVELS[-1]  # a refused selection changes nothing


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 1000])
def test_exp_matches_numpy_at_every_length(level, n):
    z = np.random.default_rng(n).normal(0.0, 20.0, n)
    e, total = _core.exp_shifted_sum(z, 3.5)
    ref = np.exp(z - 3.5)
    np.testing.assert_allclose(e, ref, rtol=4 * ULP, atol=0)
    assert total == pytest.approx(ref.sum(), rel=1e-14)


def test_exp_at_the_ends_of_the_range(level):
    z = np.array([0.0, -1e-300, 1e-10, -700.0, -708.0, -709.0, -745.0, -1e4, -np.inf, 700.0, 709.0, np.log(2) * 1023])
    e, _ = _core.exp_shifted_sum(z, 0.0)
    normal = z >= -708.0
    np.testing.assert_allclose(e[normal], np.exp(z[normal]), rtol=4 * ULP, atol=0)
    # Below exp's normal range the result is clamped to the smallest normal power (~2e-308):
    # as good as 0 next to a softmax's largest term, which is 1.
    assert np.all(e[~normal] >= 0) and np.all(e[~normal] <= 3e-308)
    assert np.all(np.isfinite(e))


@pytest.mark.parametrize("n", [0, 1, 5, 8, 13, 1000])
def test_dot_log_matches_numpy(level, n):
    rng = np.random.default_rng(n)
    q = rng.random(n)
    x = np.exp(rng.uniform(-40.0, 0.0, n))  # down to 4e-18, below the log floor
    if n:
        x[0] = 0.0
    ref = q @ np.log(np.maximum(x, 1e-12))
    assert _core.dot_log(q, x) == pytest.approx(ref, rel=1e-14, abs=1e-300)


def test_log_is_accurate_across_binades(level):
    x = np.concatenate([np.geomspace(1e-12, 1.0, 997), [0.5, 0.70710678118654752, 0.7071067811865476, 1.0 - 1e-16]])
    for i in range(len(x)):  # one term at a time: the error of each log, not of a sum
        q = np.zeros_like(x)
        q[i] = 1.0
        assert _core.dot_log(q, x) == pytest.approx(np.log(x[i]), rel=4 * ULP, abs=4 * ULP)


@pytest.mark.parametrize("n", [0, 1, 6, 8, 11, 500])
def test_mixture_terms_match_numpy(level, n):
    rng = np.random.default_rng(100 + n)
    q = rng.random(n)
    f = rng.random(n) * 0.1
    if n > 2:
        f[1] = 0.0
        f[2] = -1e-3  # rounding below zero: clamped like zero
    fc, w1, w2, qlogf, s1, s2 = _core.mixture_terms(q, f)
    ref = np.maximum(f, 1e-12)
    np.testing.assert_array_equal(fc, ref)
    np.testing.assert_allclose(w1, q / ref, rtol=2 * ULP)
    np.testing.assert_allclose(w2, q / ref / ref, rtol=4 * ULP)
    assert qlogf == pytest.approx(q @ np.log(ref), rel=1e-14, abs=1e-300)
    assert s1 == pytest.approx((q / ref).sum(), rel=1e-14, abs=1e-300)
    assert s2 == pytest.approx((q / ref / ref).sum(), rel=1e-14, abs=1e-300)


def test_bad_shapes_and_dtypes_are_clear_errors():
    with pytest.raises(TypeError):
        _core.exp_shifted_sum(np.zeros(3, np.float32), 0.0)
    with pytest.raises(ValueError, match="x has length 2; expected 3"):
        _core.dot_log(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="q must be 1-D"):
        _core.mixture_terms(np.zeros((2, 2)), np.zeros(4))


@pytest.mark.parametrize("link", ["logit", "mixture"])
def test_fits_agree_across_instruction_sets(link):
    P = zipf_dictionary(3000, 48, seed=5)
    _, _, counts = planted(P, 4, 1600, 12, link, seed=9)
    fits = {}
    for name in LEVELS:
        _core.set_simd_level(name)
        try:
            fits[name] = mm.fit_alpha(P, counts, s=4, link=link, n_threads=1)
        finally:
            _core.set_simd_level("auto")
    ref = fits["generic"]
    for name, fit in fits.items():
        # The loops differ in the last bits, so a selection could in principle flip on a
        # near-tie; on these targets every support is the same and the objectives agree.
        np.testing.assert_array_equal(fit.alpha.indices, ref.alpha.indices, err_msg=name)
        np.testing.assert_allclose(fit.kl, ref.kl, rtol=1e-9, atol=1e-13, err_msg=name)


def test_dot_log_floor(level):
    q = np.array([0.0, 0.5, 0.5])
    x = np.array([0.0, 1e-200, 0.25])
    assert _core.dot_log(q, x, 1e-300) == pytest.approx(0.5 * np.log(1e-200) + 0.5 * np.log(0.25), rel=4 * ULP)
    assert _core.dot_log(q, x) == pytest.approx(0.5 * np.log(1e-12) + 0.5 * np.log(0.25), rel=4 * ULP)
    with pytest.raises(ValueError, match="floor must be a positive normal number"):
        _core.dot_log(q, x, 0.0)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_max_dot_matches_numpy(level, n):
    rng = np.random.default_rng(200 + n)
    z = rng.normal(-5.0, 3.0, n)  # all negative-ish: the padding lanes must not win the max
    q = rng.random(n)
    mx, dot = _core.max_dot(z, q)
    assert mx == (z.max() if n else -np.inf)
    assert dot == pytest.approx(q @ z, rel=1e-13, abs=1e-300)
