// count_transitions: bigram counts to a TransitionMatrix in O(n_tokens) with a
// counting sort by source state and per-thread dense counters.
#include "markovmem/counting.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <vector>

#ifdef MARKOVMEM_HAVE_OPENMP
#include <omp.h>
#endif

namespace markovmem {

TransitionMatrix count_transitions(const std::int32_t* tokens, Index n_tokens, const Index* offsets,
                                   Index n_seq, Index n_states, const CountOptions& opts) {
  check_sizes(n_states, n_states);
  if (opts.top_k < 0) throw std::invalid_argument("top_k must be >= 0 (0 keeps every count)");
  if (!(opts.smoothing >= 0.0) || !std::isfinite(opts.smoothing))
    throw std::invalid_argument("smoothing must be a finite number >= 0");
  if (n_seq < 0) throw std::invalid_argument("negative number of sequences");
  if (offsets[0] < 0) throw std::invalid_argument("offsets[0] must be >= 0");
  for (Index s = 0; s < n_seq; ++s) {
    if (offsets[s + 1] < offsets[s] || offsets[s + 1] > n_tokens) {
      std::ostringstream os;
      os << "offsets[" << s + 1 << "] = " << offsets[s + 1] << " is not within [offsets[" << s
         << "], n_tokens = " << n_tokens << "]";
      throw std::invalid_argument(os.str());
    }
  }
  // A parallel region costs more than it saves on small inputs.
  const int nt = n_tokens + n_states < (Index{1} << 16) ? 1 : detail::resolve_threads(opts.n_threads);
  // Mark, per token position, whether a transition starts there, and check ids.
  const long long n = n_tokens;
  long long bad = n;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(min : bad)
  for (long long i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= n_states) bad = std::min(bad, i);
  if (bad < n) {
    const Index s = std::upper_bound(offsets, offsets + n_seq + 1, static_cast<Index>(bad)) - offsets - 1;
    std::ostringstream os;
    if (s >= 0 && s < n_seq)
      os << "sequence " << s << " position " << bad - offsets[s] << ": token " << tokens[bad];
    else
      os << "token at position " << bad << " (outside every sequence) is " << tokens[bad] << ",";
    os << " is out of range [0, n_states = " << n_states << ")";
    throw std::out_of_range(os.str());
  }

  // Pass 1: transitions per source state, per thread over contiguous sequence ranges.
  const long long ns = n_seq;
  std::vector<std::vector<Index>> local(static_cast<std::size_t>(nt));
  std::vector<Index> start(static_cast<std::size_t>(n_states + 1), 0);
#pragma omp parallel num_threads(nt)
  {
    int t = 0;
#ifdef MARKOVMEM_HAVE_OPENMP
    t = omp_get_thread_num();
#endif
    auto& cnt = local[static_cast<std::size_t>(t)];
    cnt.assign(static_cast<std::size_t>(n_states), 0);
#pragma omp for schedule(static)
    for (long long s = 0; s < ns; ++s)
      for (Index i = offsets[s]; i + 1 < offsets[s + 1]; ++i) ++cnt[static_cast<std::size_t>(tokens[i])];
  }
  // Exclusive prefix over states, then per-thread write cursors (thread t after threads < t):
  // the bucket contents are in sequence order whatever the thread count.
  for (Index v = 0; v < n_states; ++v) {
    Index total = 0;
    for (int t = 0; t < nt; ++t) {
      auto& c = local[static_cast<std::size_t>(t)];
      if (c.empty()) continue;
      const Index here = c[static_cast<std::size_t>(v)];
      c[static_cast<std::size_t>(v)] = total;  // becomes the offset of thread t inside bucket v
      total += here;
    }
    start[static_cast<std::size_t>(v + 1)] = start[static_cast<std::size_t>(v)] + total;
  }
  const Index n_pairs = start[static_cast<std::size_t>(n_states)];
  std::vector<std::int32_t> bucket(static_cast<std::size_t>(n_pairs));
#pragma omp parallel num_threads(nt)
  {
    int t = 0;
#ifdef MARKOVMEM_HAVE_OPENMP
    t = omp_get_thread_num();
#endif
    auto& cur = local[static_cast<std::size_t>(t)];
#pragma omp for schedule(static)
    for (long long s = 0; s < ns; ++s)
      for (Index i = offsets[s]; i + 1 < offsets[s + 1]; ++i) {
        const auto v = static_cast<std::size_t>(tokens[i]);
        bucket[static_cast<std::size_t>(start[v] + cur[v]++)] = tokens[i + 1];
      }
  }
  local.clear();
  local.shrink_to_fit();

  // Pass 2: per source row, count successors with a dense counter and keep the top_k.
  const long long T = n_states;
  std::vector<Index> row_nnz(static_cast<std::size_t>(n_states), 0);
  std::vector<std::vector<StateIndex>> row_idx(static_cast<std::size_t>(n_states));
  std::vector<std::vector<Prob>> row_val(static_cast<std::size_t>(n_states));
  const double a = opts.smoothing;
#pragma omp parallel num_threads(nt)
  {
    std::vector<Index> counter(static_cast<std::size_t>(n_states), 0);
    std::vector<StateIndex> touched;
    std::vector<std::pair<Index, StateIndex>> order;
#pragma omp for schedule(dynamic, 256)
    for (long long v = 0; v < T; ++v) {
      const Index b0 = start[static_cast<std::size_t>(v)], b1 = start[static_cast<std::size_t>(v + 1)];
      if (b0 == b1) continue;
      touched.clear();
      for (Index j = b0; j < b1; ++j) {
        const auto x = bucket[static_cast<std::size_t>(j)];
        if (counter[static_cast<std::size_t>(x)]++ == 0) touched.push_back(x);
      }
      const double denom = static_cast<double>(b1 - b0) + a * static_cast<double>(n_states);
      if (opts.top_k > 0 && static_cast<Index>(touched.size()) > opts.top_k) {
        // Largest counts first, ties by smaller state id (deterministic).
        order.clear();
        for (auto x : touched) order.emplace_back(counter[static_cast<std::size_t>(x)], x);
        std::nth_element(order.begin(), order.begin() + opts.top_k, order.end(),
                         [](const auto& p, const auto& q) {
                           return p.first != q.first ? p.first > q.first : p.second < q.second;
                         });
        order.resize(static_cast<std::size_t>(opts.top_k));
        for (auto x : touched) counter[static_cast<std::size_t>(x)] = 0;
        touched.clear();
        for (const auto& pr : order) {
          touched.push_back(pr.second);
          counter[static_cast<std::size_t>(pr.second)] = pr.first;
        }
      }
      std::sort(touched.begin(), touched.end());
      auto& idx = row_idx[static_cast<std::size_t>(v)];
      auto& val = row_val[static_cast<std::size_t>(v)];
      idx.assign(touched.begin(), touched.end());
      val.resize(touched.size());
      for (std::size_t j = 0; j < touched.size(); ++j) {
        auto& c = counter[static_cast<std::size_t>(touched[j])];
        val[j] = static_cast<Prob>((static_cast<double>(c) + a) / denom);
        c = 0;
      }
      // Clear counters of states cut by top_k too (they were reset above already).
      row_nnz[static_cast<std::size_t>(v)] = static_cast<Index>(idx.size());
    }
  }
  std::vector<Index> indptr(static_cast<std::size_t>(n_states + 1), 0);
  for (Index v = 0; v < n_states; ++v)
    indptr[static_cast<std::size_t>(v + 1)] = indptr[static_cast<std::size_t>(v)] + row_nnz[static_cast<std::size_t>(v)];
  const Index nnz = indptr[static_cast<std::size_t>(n_states)];
  std::vector<StateIndex> indices(static_cast<std::size_t>(nnz));
  std::vector<Prob> data(static_cast<std::size_t>(nnz));
#pragma omp parallel for schedule(dynamic, 1024) num_threads(nt)
  for (long long v = 0; v < T; ++v) {
    auto& idx = row_idx[static_cast<std::size_t>(v)];
    auto& val = row_val[static_cast<std::size_t>(v)];
    std::copy(idx.begin(), idx.end(), indices.begin() + indptr[static_cast<std::size_t>(v)]);
    std::copy(val.begin(), val.end(), data.begin() + indptr[static_cast<std::size_t>(v)]);
    std::vector<StateIndex>().swap(idx);
    std::vector<Prob>().swap(val);
  }
  return TransitionMatrix::from_csr(n_states, n_states, std::move(indptr), std::move(indices),
                                    std::move(data), kRowSumTolerance, opts.n_threads);
}

}  // namespace markovmem
