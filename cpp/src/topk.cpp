// Fused row-wise softmax + top-k (see topk.hpp).
//
// Per row, two passes over chunks of kChunk = kLanes x kLanes logits:
//   1. streaming (vectorised): the maximum of each lane of a chunk (lane j
//      holds entries j, j + kLanes, ...: a vertical max, no horizontal work),
//      the chunk max, and the online log-sum-exp: when a chunk raises the
//      running max m the running sum is rescaled by exp(m_old - m_new), then
//      the chunk adds sum exp(x - m) computed with a vectorisable float exp,
//      folded into a double accumulator per chunk;
//   2. selection: the k-th largest chunk max (or lane max, when there are
//      fewer than k chunks) is a threshold with at least k entries at or above
//      it, so the top k are among the entries >= it.  Only chunks and lanes
//      whose max reaches it are read again (the row is still in cache); about
//      k chunks and one or two lanes each.  The candidates, a little over k,
//      are cut to the exact top k by nth_element under (logit desc, index asc),
//      so ties go to the smaller index whatever order they were found in.
#include "markovmem/topk.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#ifdef MARKOVMEM_HAVE_OPENMP
#include <omp.h>
#endif

namespace markovmem {

namespace {

constexpr Index kLanes = 16;
constexpr Index kChunk = kLanes * kLanes;

struct Cand {
  float key;  // the logit, NaN mapped to -inf so the order is a strict weak order
  std::int32_t idx;
};

inline bool better(const Cand& a, const Cand& b) noexcept { return a.key > b.key || (a.key == b.key && a.idx < b.idx); }

inline float sort_key(float x) noexcept { return std::isnan(x) ? -std::numeric_limits<float>::infinity() : x; }

inline float fast_exp(float x) noexcept {
  // exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2].
  const float xc = x > -87.0f ? x : -87.0f;  // keeps 2^n normal (and maps NaN, -inf to -87)
  const float t = xc * 1.44269504088896341f + 12582912.0f;  // round to nearest via 1.5 * 2^23
  const float n = t - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x > -87.0f ? p * scale : 0.0f;
}

// The two vectorised loops of a row's pass, compiled for AVX-512 and AVX2 as
// well as the baseline where the compiler can dispatch at load time (ifunc).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MARKOVMEM_TOPK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MARKOVMEM_TOPK_CLONES
#endif

/// Max of x[0, len) (NaN ignored); *any_nan set to 1 when some entry is NaN.
MARKOVMEM_TOPK_CLONES float chunk_max(const float* x, Index len, int* any_nan) noexcept {
  float cm = -std::numeric_limits<float>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : cm) reduction(| : nan)
  for (Index j = 0; j < len; ++j) {
    cm = x[j] > cm ? x[j] : cm;
    nan |= x[j] != x[j] ? 1 : 0;
  }
  *any_nan = nan;
  return cm;
}

/// Per-lane maxima of a full chunk (lane j: x[j], x[j + kLanes], ...; NaN
/// ignored) into lane_max[kLanes]; returns their max.  *any_nan set to 1 when
/// some entry is NaN.
MARKOVMEM_TOPK_CLONES float chunk_lane_max(const float* x, float* lane_max, int* any_nan) noexcept {
  float lm[kLanes];
  int nan[kLanes];
  for (Index j = 0; j < kLanes; ++j) {
    lm[j] = -std::numeric_limits<float>::infinity();
    nan[j] = 0;
  }
  for (Index i = 0; i < kChunk; i += kLanes) {
#pragma omp simd
    for (Index j = 0; j < kLanes; ++j) {
      const float v = x[i + j];
      lm[j] = v > lm[j] ? v : lm[j];
      nan[j] |= v != v ? 1 : 0;
    }
  }
  float cm = lm[0];
  int any = nan[0];
  for (Index j = 0; j < kLanes; ++j) {
    lane_max[j] = lm[j];
    cm = lm[j] > cm ? lm[j] : cm;
    any |= nan[j];
  }
  *any_nan = any;
  return cm;
}

/// sum exp(x[j] - m) over [0, len) for finite m >= every x[j], in float.
MARKOVMEM_TOPK_CLONES float chunk_expsum(const float* x, Index len, float m) noexcept {
  float part = 0.0f;
#pragma omp simd reduction(+ : part)
  for (Index j = 0; j < len; ++j) part += fast_exp(x[j] - m);
  return part;
}

class RowWorker {
 public:
  explicit RowWorker(Index k) : k_(k) {}

  void run(const float* row, Index n, std::int32_t* out_idx, float* out_prob) {
    const float ninf = -std::numeric_limits<float>::infinity();
    const Index n_full = n / kChunk;  // full chunks; the rest is the tail
    if (static_cast<Index>(chunk_max_.size()) < n_full) {
      chunk_max_.resize(static_cast<std::size_t>(n_full));
      lane_max_.resize(static_cast<std::size_t>(n_full * kLanes));
    }
    // Pass 1: chunk and lane maxima, NaN check and the online log-sum-exp.
    float m = ninf;  // running max
    double sum = 0.0;  // sum exp(x - m) so far
    bool bad = false;  // +inf or NaN seen: probabilities are NaN
    for (Index c0 = 0, c = 0; c0 < n; c0 += kChunk, ++c) {
      const Index len = std::min(kChunk, n - c0);
      const float* x = row + c0;
      int any_nan = 0;
      const float cm = c < n_full ? chunk_lane_max(x, &lane_max_[static_cast<std::size_t>(c * kLanes)], &any_nan)
                                  : chunk_max(x, len, &any_nan);
      if (c < n_full) chunk_max_[static_cast<std::size_t>(c)] = cm;
      if (any_nan) bad = true;
      if (cm > m) {
        if (m != ninf) sum *= std::exp(static_cast<double>(m) - static_cast<double>(cm));
        m = cm;
      }
      if (m == std::numeric_limits<float>::infinity()) bad = true;
      if (!bad && m != ninf) sum += chunk_expsum(x, len, m);
    }
    // The threshold: the k-th largest of k or more maxima of disjoint groups is
    // an entry value with at least k entries at or above it, so the top k are
    // among the entries >= thr.  Chunk maxima are 16x fewer than lane maxima
    // (cheaper to select from, a lower but still tight threshold at vocabulary
    // scale); lanes serve when there are fewer than k chunks; with fewer than
    // k lanes every entry is a candidate.
    float thr = ninf;
    if (n_full >= k_)
      thr = kth_largest(chunk_max_.data(), n_full);
    else if (n_full * kLanes >= k_)
      thr = kth_largest(lane_max_.data(), n_full * kLanes);
    // Pass 2: the entries >= thr, visiting only chunks and lanes whose max
    // reaches it (sort_key maps NaN to -inf, a candidate only when thr is -inf).
    buf_.clear();
    for (Index c = 0; c < n_full; ++c) {
      if (!(chunk_max_[static_cast<std::size_t>(c)] >= thr)) continue;  // maxima are never NaN
      const float* x = row + c * kChunk;
      const float* lm = &lane_max_[static_cast<std::size_t>(c * kLanes)];
      for (Index j = 0; j < kLanes; ++j) {
        if (!(lm[j] >= thr)) continue;
        for (Index i = j; i < kChunk; i += kLanes)
          if (sort_key(x[i]) >= thr) buf_.push_back(Cand{sort_key(x[i]), static_cast<std::int32_t>(c * kChunk + i)});
      }
    }
    for (Index i = n_full * kChunk; i < n; ++i)
      if (sort_key(row[i]) >= thr) buf_.push_back(Cand{sort_key(row[i]), static_cast<std::int32_t>(i)});
    // Exact top-k of the candidates, then probabilities.
    if (static_cast<Index>(buf_.size()) > k_)
      std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.end(), better);
    buf_.resize(static_cast<std::size_t>(k_));
    // Logit order (desc, ties by smaller index) is probability order except where
    // the float rounding of two different logits gives equal probabilities:
    // those runs are put in index order afterwards.  NaN probabilities (a bad
    // row) keep the logit order.
    std::sort(buf_.begin(), buf_.end(), better);
    const double lse = static_cast<double>(m) + std::log(sum);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (Index i = 0; i < k_; ++i) {
      const Cand& c = buf_[static_cast<std::size_t>(i)];
      out_idx[i] = c.idx;
      out_prob[i] = static_cast<float>(bad ? nan : std::exp(static_cast<double>(row[c.idx]) - lse));
    }
    if (bad) return;
    for (Index i = 0; i < k_;) {
      Index j = i + 1;
      while (j < k_ && out_prob[j] == out_prob[i]) ++j;
      if (j - i > 1) std::sort(out_idx + i, out_idx + j);
      i = j;
    }
  }

 private:
  // The k-th largest of v[0, n) (n >= k), on a scratch copy.
  float kth_largest(const float* v, Index n) {
    scratch_.assign(v, v + n);
    std::nth_element(scratch_.begin(), scratch_.begin() + (k_ - 1), scratch_.end(), std::greater<float>());
    return scratch_[static_cast<std::size_t>(k_ - 1)];
  }

  Index k_;
  std::vector<float> chunk_max_;  // per full chunk
  std::vector<float> lane_max_;  // kLanes per full chunk
  std::vector<float> scratch_;
  std::vector<Cand> buf_;
};

}  // namespace

namespace detail {
float fast_exp_nonpos(float x) noexcept { return fast_exp(x); }
}  // namespace detail

void softmax_topk(const float* logits, Index n_rows, Index n_cols, Index row_stride, Index k, std::int32_t* indices,
                  float* probs, int n_threads) {
  if (n_rows < 0) throw std::invalid_argument("n_rows is " + std::to_string(n_rows) + "; expected >= 0");
  if (n_cols < 1) throw std::invalid_argument("the rows are empty; expected at least one column");
  if (n_cols > kMaxStates)
    throw std::invalid_argument("n_cols is " + std::to_string(n_cols) + "; expected <= 2147483647");
  if (row_stride < n_cols)
    throw std::invalid_argument("row_stride is " + std::to_string(row_stride) +
                                "; expected >= n_cols = " + std::to_string(n_cols));
  if (k < 1 || k > n_cols)
    throw std::invalid_argument("k is " + std::to_string(k) + "; expected 1 <= k <= " + std::to_string(n_cols));
  if (n_rows == 0) return;
  const int nt = n_rows == 1 ? 1 : detail::resolve_threads(n_threads);
  detail::ExceptionCollector errors;
#pragma omp parallel num_threads(nt)
  {
    // Every thread reaches the worksharing loop; one whose worker could not be
    // allocated records the error and skips its rows.
    std::unique_ptr<RowWorker> w;
    errors.run([&] { w = std::make_unique<RowWorker>(k); });
#pragma omp for schedule(dynamic, 1)
    for (Index r = 0; r < n_rows; ++r)
      if (w) errors.run([&] { w->run(logits + r * row_stride, n_cols, indices + r * k, probs + r * k); });
  }
  errors.rethrow();
}

}  // namespace markovmem
