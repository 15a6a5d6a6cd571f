// Fused row-wise softmax + top-k over dense float32 logits (the CPU path of
// markovmem.llm.distill): one streaming pass per row computes the max, the
// log-sum-exp and a threshold-based candidate set, then the k winners are
// selected exactly and returned with their probabilities.
#pragma once

#include <cstdint>

#include "markovmem/common.hpp"

namespace markovmem {

/// For each of the `n_rows` rows of the (n_rows, n_cols) buffer `logits`
/// (row r at logits + r * row_stride, contiguous within the row), writes the `k` largest entries' column indices to
/// `indices[r * k ...]` and their softmax probabilities exp(logit - lse) to
/// `probs[r * k ...]`, sorted by descending probability (ties: smaller index
/// first).  Selection is by logit with ties broken by smaller index, so the
/// result is deterministic.  The log-sum-exp is accumulated in double over
/// float32 partial sums.  -inf entries are allowed (probability 0); a row of
/// only -inf or holding +inf/NaN yields NaN probabilities, as softmax does.
///
/// Throws std::invalid_argument when n_rows < 0, n_cols < 1, row_stride <
/// n_cols, k < 1 or k > n_cols (before any work).  n_threads <= 0: the OpenMP default.
void softmax_topk(const float* logits, Index n_rows, Index n_cols, Index row_stride, Index k, std::int32_t* indices,
                  float* probs, int n_threads);

namespace detail {
/// exp(x) for x <= 0 in float32 (Cody-Waite reduction + degree-6 polynomial,
/// within 2 ulp of std::exp for x >= -87; 0 below).  Exposed for tests.
float fast_exp_nonpos(float x) noexcept;
}  // namespace detail

}  // namespace markovmem
