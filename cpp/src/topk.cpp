// Fused row-wise softmax + top-k (see topk.hpp).
//
// Per row, one pass over chunks of kChunk logits:
//   * the chunk max (vectorised over kLanes independent lanes);
//   * the online log-sum-exp: when the chunk raises the running max m the
//     running sum is rescaled by exp(m_old - m_new); then the chunk adds
//     sum exp(x - m) computed with a vectorisable float exp into float lanes,
//     which are folded into a double accumulator per chunk;
//   * top-k candidates: once k entries are held, only entries strictly above
//     the current k-th largest (the threshold) are collected, and a chunk whose
//     max does not exceed the threshold is skipped without a scalar scan.
//     Entries equal to the threshold arrive at larger indices than the held
//     ones, so dropping them keeps ties broken by smaller index.  When the
//     candidate buffer fills it is cut back to the best k (nth_element) and the
//     threshold rises.
#include "markovmem/topk.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#ifdef MARKOVMEM_HAVE_OPENMP
#include <omp.h>
#endif

namespace markovmem {

namespace {

constexpr Index kChunk = 256;

struct Cand {
  float key;  // the logit, NaN mapped to -inf so the order is a strict weak order
  std::int32_t idx;
};

inline bool better(const Cand& a, const Cand& b) noexcept {
  return a.key > b.key || (a.key == b.key && a.idx < b.idx);
}

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

/// sum exp(x[j] - m) over [0, len) for finite m >= every x[j], in float.
MARKOVMEM_TOPK_CLONES float chunk_expsum(const float* x, Index len, float m) noexcept {
  float part = 0.0f;
#pragma omp simd reduction(+ : part)
  for (Index j = 0; j < len; ++j) part += fast_exp(x[j] - m);
  return part;
}

class RowWorker {
 public:
  explicit RowWorker(Index k) : k_(k), cap_(k + std::max<Index>(k, 512)) { buf_.reserve(cap_); }

  void run(const float* row, Index n, std::int32_t* out_idx, float* out_prob) {
    buf_.clear();
    const float ninf = -std::numeric_limits<float>::infinity();
    float m = ninf;  // running max
    double sum = 0.0;  // sum exp(x - m) so far
    bool bad = false;  // +inf or NaN seen: probabilities are NaN
    float thr = ninf;
    bool full = false;  // buf_ has held k entries since the last cut
    for (Index c0 = 0; c0 < n; c0 += kChunk) {
      const Index len = std::min(kChunk, n - c0);
      const float* x = row + c0;
      // Chunk max and NaN check.
      int any_nan = 0;
      const float cm = chunk_max(x, len, &any_nan);
      if (any_nan) bad = true;
      // Log-sum-exp.
      if (cm > m) {
        if (m != ninf) sum *= std::exp(static_cast<double>(m) - static_cast<double>(cm));
        m = cm;
      }
      if (m == std::numeric_limits<float>::infinity()) bad = true;
      if (!bad && m != ninf) {
        const float part = chunk_expsum(x, len, m);
        sum += part;
      }
      // Candidates.
      if (full && !(cm > thr)) continue;
      for (Index j = 0; j < len; ++j) {
        if (full && !(x[j] > thr)) continue;
        buf_.push_back(Cand{sort_key(x[j]), static_cast<std::int32_t>(c0 + j)});
        if (!full && static_cast<Index>(buf_.size()) == k_) {
          cut();
          full = true;
          thr = buf_.back().key;
        } else if (static_cast<Index>(buf_.size()) == cap_) {
          cut();
          thr = buf_.back().key;
        }
      }
    }
    // Exact top-k of the candidates, then probabilities.
    if (static_cast<Index>(buf_.size()) > k_)
      std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.end(), better);
    buf_.resize(static_cast<std::size_t>(k_));
    const double lse = static_cast<double>(m) + std::log(sum);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    probs_.resize(static_cast<std::size_t>(k_));
    order_.resize(static_cast<std::size_t>(k_));
    for (Index i = 0; i < k_; ++i) {
      const Cand& c = buf_[static_cast<std::size_t>(i)];
      const float xv = row[c.idx];
      probs_[static_cast<std::size_t>(i)] =
          static_cast<float>(bad || std::isnan(xv) ? nan : std::exp(static_cast<double>(xv) - lse));
      order_[static_cast<std::size_t>(i)] = i;
    }
    // Descending probability, ties by smaller index (the float rounding of two
    // different logits can tie).  NaN probabilities keep the logit order.
    std::sort(order_.begin(), order_.end(), [&](Index a, Index b) {
      const float pa = probs_[static_cast<std::size_t>(a)], pb = probs_[static_cast<std::size_t>(b)];
      const std::int32_t ia = buf_[static_cast<std::size_t>(a)].idx, ib = buf_[static_cast<std::size_t>(b)].idx;
      if (bad) return better(buf_[static_cast<std::size_t>(a)], buf_[static_cast<std::size_t>(b)]);
      const float ka = std::isnan(pa) ? -1.0f : pa, kb = std::isnan(pb) ? -1.0f : pb;
      return ka > kb || (ka == kb && ia < ib);
    });
    for (Index i = 0; i < k_; ++i) {
      const Index o = order_[static_cast<std::size_t>(i)];
      out_idx[i] = buf_[static_cast<std::size_t>(o)].idx;
      out_prob[i] = probs_[static_cast<std::size_t>(o)];
    }
  }

 private:
  // Keeps the best k of buf_, with the k-th best last.
  void cut() {
    if (static_cast<Index>(buf_.size()) > k_) {
      std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.end(), better);
      buf_.resize(static_cast<std::size_t>(k_));
    }
    // Move the worst of the k to the back.
    auto worst = std::min_element(buf_.begin(), buf_.end(), [](const Cand& a, const Cand& b) { return better(b, a); });
    std::iter_swap(worst, buf_.end() - 1);
  }

  Index k_;
  Index cap_;
  std::vector<Cand> buf_;
  std::vector<float> probs_;
  std::vector<Index> order_;
};

}  // namespace

namespace detail {
float fast_exp_nonpos(float x) noexcept { return fast_exp(x); }
}  // namespace detail

void softmax_topk(const float* logits, Index n_rows, Index n_cols, Index row_stride, Index k,
                  std::int32_t* indices, float* probs, int n_threads) {
  if (n_rows < 0) throw std::invalid_argument("n_rows is " + std::to_string(n_rows) + "; expected >= 0");
  if (n_cols < 1) throw std::invalid_argument("the rows are empty; expected at least one column");
  if (n_cols > kMaxStates)
    throw std::invalid_argument("n_cols is " + std::to_string(n_cols) + "; expected <= 2147483647");
  if (row_stride < n_cols)
    throw std::invalid_argument("row_stride is " + std::to_string(row_stride) + "; expected >= n_cols = " +
                                std::to_string(n_cols));
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
