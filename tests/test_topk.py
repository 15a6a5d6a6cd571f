"""markovmem.softmax_topk: the fused row-wise softmax + top-k kernel of the C++ core."""

from __future__ import annotations

import numpy as np
import pytest

import markovmem as mm


def _reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 softmax and the k largest logits (ties: smaller index first)."""
    if x.shape[0] == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k))
    x64 = x.astype(np.float64)
    m = x64.max(axis=1, keepdims=True)
    e = np.exp(x64 - m)
    p = e / e.sum(axis=1, keepdims=True)
    # lexsort: last key primary; -x descending, then index ascending.
    idx = np.stack([np.lexsort((np.arange(x.shape[1]), -x64[r]))[:k] for r in range(x.shape[0])])
    return idx.astype(np.int32), np.take_along_axis(p, idx, axis=1)


def _check(x: np.ndarray, k: int, n_threads: int | None = None) -> None:
    ids, probs = mm.softmax_topk(x, k, n_threads=n_threads)
    ref_ids, ref_p = _reference(x, k)
    assert ids.dtype == np.int32 and probs.dtype == np.float32
    assert ids.shape == probs.shape == (x.shape[0], k)
    # The same entries as the reference (selected by logit, ties by smaller index) ...
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(ref_ids, axis=1))
    order = np.argsort(ref_ids, axis=1)
    np.testing.assert_allclose(
        np.take_along_axis(probs, np.argsort(ids, axis=1), 1),
        np.take_along_axis(ref_p, order, 1),
        rtol=2e-6,
        atol=1e-30,
    )
    # ... ordered by descending probability, equal probabilities by smaller index.
    for r in range(ids.shape[0]):
        key = list(zip((-probs[r]).tolist(), ids[r].tolist()))
        assert key == sorted(key)
    # Where no two selected probabilities tie, the order is the reference's logit order.
    for r in range(ids.shape[0]):
        if len(set(probs[r].tolist())) == k:
            np.testing.assert_array_equal(ids[r], ref_ids[r])


@pytest.mark.parametrize("b, v, k", [(7, 10, 1), (7, 10, 10), (5, 1000, 3), (9, 4099, 256), (3, 1, 1), (0, 50, 5)])
def test_matches_numpy(b, v, k):
    x = (np.random.default_rng(v + k).standard_normal((b, v)) * 4).astype(np.float32)
    _check(x, k)


def test_large_vocab_threads():
    x = (np.random.default_rng(1).standard_normal((6, 151936)) * 3).astype(np.float32)
    _check(x, 256, n_threads=2)
    a = mm.softmax_topk(x, 256, n_threads=1)
    b = mm.softmax_topk(x, 256, n_threads=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_ties_smaller_index_first():
    rng = np.random.default_rng(2)
    x = rng.integers(-3, 3, size=(8, 3000)).astype(np.float32)  # many ties
    x[0] = 0.0  # all tied
    x[1, -5:] = 10.0  # winners at the end of the row
    for k in (1, 5, 17, 300, 3000):
        _check(x, k)
    ids, _ = mm.softmax_topk(x[:1], 4)
    assert ids.tolist() == [[0, 1, 2, 3]]


def test_neg_inf_entries():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 2000)).astype(np.float32)
    x[:, ::3] = -np.inf
    x[2, 1:] = -np.inf  # a single finite entry
    x[2, 0] = 1.5
    for k in (1, 10, 2000):
        _check(x, k)
    ids, probs = mm.softmax_topk(x[2:3], 3)
    assert ids[0, 0] == 0 and probs[0, 0] == 1.0 and np.all(probs[0, 1:] == 0.0)


def test_extreme_logits_are_stable():
    x = np.array([[1e4, 1e4 - 1, -1e4, 0.0], [-1e4, -1e4 - 1, -2e4, -3e4]], dtype=np.float32)
    _check(x, 4)


def test_strided_rows_are_used_in_place_and_other_layouts_copied():
    x = (np.random.default_rng(4).standard_normal((5, 700)) * 3).astype(np.float32)
    ref = mm.softmax_topk(np.ascontiguousarray(x[:, :500]), 20)
    for view in (x[:, :500], np.asfortranarray(x)[:, :500], x[::-1][::-1, :500]):
        got = mm.softmax_topk(view, 20)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    _check(x[::2, 100:600], 7)


def test_non_finite_rows_give_nan_probabilities():
    x = np.zeros((3, 100), dtype=np.float32)
    x[0] = -np.inf
    x[1, 7] = np.nan
    x[2, 9] = np.inf
    ids, probs = mm.softmax_topk(x, 5)
    assert np.isnan(probs).all()
    assert ids.shape == (3, 5) and ((ids >= 0) & (ids < 100)).all()
    assert all(len(set(r)) == 5 for r in ids.tolist())


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_wrong_dtype_raises_type_error(dtype):
    with pytest.raises(TypeError, match="float32"):
        mm.softmax_topk(np.zeros((2, 5), dtype=dtype), 1)


def test_bad_arguments_raise_value_error():
    x = np.zeros((2, 5), dtype=np.float32)
    for k in (0, -1, 6):
        with pytest.raises(ValueError, match="k is"):
            mm.softmax_topk(x, k)
    with pytest.raises(ValueError, match="2-D"):
        mm.softmax_topk(np.zeros(5, dtype=np.float32), 1)
    with pytest.raises(ValueError, match="2-D"):
        mm.softmax_topk(np.zeros((2, 2, 5), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="no columns"):
        mm.softmax_topk(np.zeros((2, 0), dtype=np.float32), 1)
    with pytest.raises(TypeError):
        mm.softmax_topk(x, 1.5)
    with pytest.raises(ValueError, match="n_threads"):
        mm.softmax_topk(x, 1, n_threads=-1)


def test_core_rejects_bad_layouts():
    x = np.zeros((3, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="contiguous"):
        mm._core.softmax_topk(x[:, ::2], 1, 0)
    with pytest.raises(ValueError, match="contiguous"):
        mm._core.softmax_topk(x[::-1], 1, 0)
    with pytest.raises(TypeError):
        mm._core.softmax_topk(x.astype(np.float64), 1, 0)


def test_distill_cpu_path_matches_torch_softmax():
    torch = pytest.importorskip("torch")
    from markovmem.llm.distillation import _select_topk

    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 5000, generator=gen) * 5
    logits = wide[:, :4099]  # strided rows, as the model's logits[:, -1, :n_base]
    values, ids = _select_topk(logits, 16)
    assert values.dtype == torch.float32 and ids.dtype == torch.int32
    ref = torch.softmax(logits.double(), -1)
    top = torch.topk(ref, 16, -1)
    assert torch.equal(ids.long(), top.indices)
    torch.testing.assert_close(values.double(), top.values, rtol=2e-6, atol=0)
    bf = _select_topk(logits.bfloat16(), 16)
    assert bf[0].dtype == torch.float32
