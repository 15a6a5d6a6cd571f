// TransitionMatrix construction, invariant checks and queries (prob, step,
// stationary distribution, likelihood, sampling, fingerprint).
#include "markovmem/transition_matrix.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <sstream>
#include <utility>

#include "markovmem/buffer.hpp"
#include "markovmem/hash.hpp"

#ifdef MARKOVMEM_HAVE_OPENMP
#include <omp.h>
#endif

namespace markovmem {

// Owned storage.  Buffers may be longer than the matrix that created them: the
// spare part lets an expansion append rows in place.  claimed_rows is the row
// count of the longest live matrix on this storage (only it may append).
struct TransitionMatrix::Owned {
  detail::Buffer<Index> indptr;
  detail::Buffer<StateIndex> indices;
  detail::Buffer<Prob> data;
  detail::Buffer<double> tail;
  std::mutex claim_mutex;
  Index claimed_rows = 0;
};

namespace {

template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  os.precision(9);
  (os << ... << args);
  return os.str();
}

// Describes the first problem of row r, or returns false.  Reads only
// entries inside [indptr[r], indptr[r+1]) after checking those bounds.
bool row_problem(const CsrView& rows, const double* tail, Index cap, Index n_states, Index n_base,
                 const CheckOptions& opts, Index r, std::string* msg) {
  const char* label = opts.label ? opts.label : "row";
  const Index a = rows.indptr[r], b = rows.indptr[r + 1];
  if (a < 0 || a > b) {
    if (msg)
      *msg = cat(label, " ", r, ": indptr[", r, "] = ", a, " > indptr[", r + 1, "] = ", b,
                 " (row pointers must not decrease)");
    return true;
  }
  if (b > cap) {
    if (msg) *msg = cat(label, " ", r, ": indptr[", r + 1, "] = ", b, " exceeds the number of stored entries ", cap);
    return true;
  }
  double sum = 0.0;
  for (Index j = a; j < b; ++j) {
    const Index c = rows.indices[j];
    if (c < 0 || c >= n_states) {
      if (msg) *msg = cat(label, " ", r, ": column index ", c, " is out of range [0, ", n_states, ")");
      return true;
    }
    if (c >= n_base) {
      if (msg)
        *msg = cat(label, " ", r, ": puts mass on state ", c, ", a new state (>= n_base = ", n_base,
                   "); rows may only put mass on base states");
      return true;
    }
    if (j > a) {
      const Index prev = rows.indices[j - 1];
      if (c == prev) {
        if (msg) *msg = cat(label, " ", r, ": duplicate column index ", c);
        return true;
      }
      if (c < prev) {
        if (msg) *msg = cat(label, " ", r, ": column indices are not sorted (", prev, " before ", c, ")");
        return true;
      }
    }
    if (opts.values) {
      const double p = rows.data[j];
      if (!std::isfinite(p)) {
        if (msg) *msg = cat(label, " ", r, ": probability at column ", c, " is not finite (", p, ")");
        return true;
      }
      if (p < 0.0) {
        if (msg) *msg = cat(label, " ", r, ": negative probability ", p, " at column ", c);
        return true;
      }
      sum += p;
    }
  }
  if (opts.values && sum > 1.0 + opts.tol) {
    if (msg) *msg = cat(label, " ", r, ": probabilities sum to ", sum, ", above 1 + ", opts.tol);
    return true;
  }
  if (opts.values && b - a >= n_base && sum < 1.0 - opts.tol) {
    if (msg)
      *msg = cat(label, " ", r, ": stores every base state but sums to ", sum, ", below 1 - ", opts.tol,
                 " (the missing mass has no state to go to)");
    return true;
  }
  if (opts.tail && tail) {
    const double t = tail[r];
    if (!std::isfinite(t) || t < 0.0 || t > 1.0) {
      if (msg) *msg = cat(label, " ", r, ": tail mass ", t, " is not in [0, 1]");
      return true;
    }
    const double expected = std::max(0.0, 1.0 - sum);
    if (std::abs(t - expected) > opts.tol) {
      if (msg) *msg = cat(label, " ", r, ": tail mass ", t, " does not equal 1 - row sum = ", expected);
      return true;
    }
    if (b - a >= n_base && t > opts.tol) {
      if (msg) *msg = cat(label, " ", r, ": stores every base state yet has tail mass ", t);
      return true;
    }
  }
  return false;
}

}  // namespace

namespace {

// The same verdict as row_problem without building a message: a tight,
// branch-light loop for the common case that every row is fine.  row_problem
// explains the (rare) row this flags.
bool row_ok_fast(const CsrView& rows, const double* tail, Index cap, Index n_base, const CheckOptions& opts, Index r) {
  const Index a = rows.indptr[r], b = rows.indptr[r + 1];
  if (a < 0 || a > b || b > cap) return false;
  if (a == b) return !opts.tail || !tail || (tail[r] >= 0.0 && tail[r] <= 1.0 && std::abs(tail[r] - 1.0) <= opts.tol);
  // Loops without early exits or carried state, so the compiler vectorises them.
  const StateIndex* idx = rows.indices;
  const auto nb = static_cast<std::uint32_t>(std::min<Index>(n_base, kMaxStates));
  unsigned bad = static_cast<std::uint32_t>(idx[a]) >= nb;  // negative ids wrap to huge values
  for (Index j = a + 1; j < b; ++j)
    bad |=
        static_cast<unsigned>(idx[j] <= idx[j - 1]) | static_cast<unsigned>(static_cast<std::uint32_t>(idx[j]) >= nb);
  if (bad) return false;
  if (!opts.values) return true;
  const Prob* p = rows.data;
  for (Index j = a; j < b; ++j)
    bad |= static_cast<unsigned>(!(p[j] >= 0.0f && p[j] <= std::numeric_limits<float>::max()));  // NaN, <0, inf
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  Index j = a;
  for (; j + 4 <= b; j += 4)
    for (int q = 0; q < 4; ++q) part[q] += p[j + q];
  for (; j < b; ++j) part[0] += p[j];
  const double sum = (part[0] + part[1]) + (part[2] + part[3]);
  if (bad || sum > 1.0 + opts.tol) return false;
  if (b - a >= n_base && sum < 1.0 - opts.tol) return false;
  if (opts.tail && tail) {
    const double t = tail[r];
    if (!(t >= 0.0 && t <= 1.0)) return false;
    if (std::abs(t - std::max(0.0, 1.0 - sum)) > opts.tol) return false;
    if (b - a >= n_base && t > opts.tol) return false;
  }
  return true;
}

}  // namespace

void detail::compute_tails(const CsrView& rows, double* tail, int n_threads) {
  const long long n = rows.n_rows;
#pragma omp parallel for schedule(static) num_threads(detail::resolve_threads(n_threads)) if (n > 4096)
  for (long long r = 0; r < n; ++r) {
    double s = 0.0;
    for (Index j = rows.indptr[r]; j < rows.indptr[r + 1]; ++j) s += rows.data[j];
    tail[r] = s < 1.0 ? 1.0 - s : 0.0;
  }
}

namespace {

inline std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace

std::optional<Violation> check_rows(const CsrView& rows, const double* tail, Index nnz_capacity, Index n_states,
                                    Index n_base, const CheckOptions& opts) {
  if (!(opts.tol >= 0.0) || !std::isfinite(opts.tol))
    throw std::invalid_argument(cat("tol is ", opts.tol, "; expected a finite number >= 0"));
  if (rows.n_rows < 0) return Violation{-1, "negative number of rows"};
  if (rows.indptr[0] != 0) return Violation{0, cat("indptr[0] is ", rows.indptr[0], "; expected 0")};
  const long long n = rows.n_rows;
  long long first = n;
  const long long r0 = std::max<Index>(0, opts.first_row);
#pragma omp parallel for schedule(dynamic, 4096) reduction(min : first) \
    num_threads(detail::resolve_threads(opts.n_threads)) if (n - r0 > 4096)
  for (long long r = r0; r < n; ++r) {
    if (r < first && !row_ok_fast(rows, tail, nnz_capacity, n_base, opts, r)) first = r;
  }
  if (first < n) {
    Violation v{first, {}};
    if (!row_problem(rows, tail, nnz_capacity, n_states, n_base, opts, first, &v.reason))
      v.reason = cat(opts.label ? opts.label : "row", " ", first, ": invalid (internal checks disagree)");
    return v;
  }
  if (rows.indptr[n] != nnz_capacity)
    return Violation{n > 0 ? n - 1 : -1,
                     cat("indptr[", n, "] = ", rows.indptr[n], " but ", nnz_capacity, " entries are stored")};
  return std::nullopt;
}

void check_sizes(Index n_states, Index n_base) {
  if (n_states < 1 || n_states > kMaxStates)
    throw std::invalid_argument(cat("n_states is ", n_states, "; expected 1 <= n_states <= ", kMaxStates));
  if (n_base < 1 || n_base > n_states)
    throw std::invalid_argument(cat("n_base is ", n_base, "; expected 1 <= n_base <= n_states = ", n_states));
}

TransitionMatrix TransitionMatrix::adopt(Index n_states, Index n_base, std::shared_ptr<Owned> owned) {
  TransitionMatrix m;
  m.n_states_ = n_states;
  m.n_base_ = n_base;
  m.indptr_ = owned->indptr.data();
  m.indices_ = owned->indices.data();
  m.data_ = owned->data.data();
  m.tail_ = owned->tail.data();
  owned->claimed_rows = n_states;
  m.owned_ = owned;
  m.owner_ = std::move(owned);
  return m;
}

std::pair<Index, Index> TransitionMatrix::headroom(Index n_rows, Index nnz) noexcept {
  // About 3% more, at least room for 1024 rows of average length: untouched
  // capacity is virtual memory only, and it makes typical expansions copy-free.
  const Index rows = std::max<Index>(n_rows / 32, 1024);
  const Index mean_k = std::max<Index>(1, n_rows > 0 ? nnz / n_rows : 1);
  return {rows, std::max<Index>(nnz / 32, 1024 * mean_k)};
}

std::optional<TransitionMatrix::Extension> TransitionMatrix::try_extend(Index m, Index extra_nnz) const {
  if (!owned_ || m < 0 || extra_nnz < 0) return std::nullopt;
  Owned& o = *owned_;
  const Index n = n_states_, nnz_now = nnz();
  if (static_cast<Index>(o.indptr.size()) < n + m + 1 || static_cast<Index>(o.tail.size()) < n + m ||
      static_cast<Index>(o.indices.size()) < nnz_now + extra_nnz ||
      static_cast<Index>(o.data.size()) < nnz_now + extra_nnz)
    return std::nullopt;
  {
    std::lock_guard<std::mutex> lock(o.claim_mutex);
    if (o.claimed_rows != n) return std::nullopt;  // a longer matrix already uses the spare part
    o.claimed_rows = n + m;
  }
  // The reservation lasts while the extended matrix (or any copy of it) lives.
  struct Claim {
    std::shared_ptr<Owned> owned;
    Index base_rows, rows;
    ~Claim() {
      std::lock_guard<std::mutex> lock(owned->claim_mutex);
      if (owned->claimed_rows == rows) owned->claimed_rows = base_rows;
    }
  };
  // Built in place: a temporary Claim's destructor would release the reservation at once.
  std::shared_ptr<Claim> claim(new Claim{owned_, n, n + m});
  return Extension{o.indptr.data(), o.indices.data(), o.data.data(), o.tail.data(), std::move(claim)};
}

TransitionMatrix TransitionMatrix::extended(Extension ext, Index m) const {
  TransitionMatrix q = *this;
  q.n_states_ = n_states_ + m;
  q.claim_ = std::move(ext.claim);
  q.hash_cache_ = std::make_shared<HashCache>();
  q.derived_ = std::make_shared<DerivedStore>();  // more rows: nothing derived from the old ones applies
  return q;
}

TransitionMatrix TransitionMatrix::from_csr(Index n_states, Index n_base, std::vector<Index> indptr,
                                            std::vector<StateIndex> indices, std::vector<Prob> data, double tol,
                                            int n_threads) {
  check_sizes(n_states, n_base);
  if (static_cast<Index>(indptr.size()) != n_states + 1)
    throw std::invalid_argument(cat("indptr has length ", indptr.size(), "; expected n_states + 1 = ", n_states + 1));
  if (indices.size() != data.size())
    throw std::invalid_argument(cat("indices has length ", indices.size(), " but data has length ", data.size()));
  auto owned = std::make_shared<Owned>();
  owned->indptr = detail::Buffer<Index>(std::move(indptr));
  owned->indices = detail::Buffer<StateIndex>(std::move(indices));
  owned->data = detail::Buffer<Prob>(std::move(data));
  CsrView view{n_states, owned->indptr.data(), owned->indices.data(), owned->data.data()};
  CheckOptions opts;
  opts.tol = tol;
  opts.tail = false;
  opts.n_threads = n_threads;
  if (auto v = check_rows(view, nullptr, static_cast<Index>(owned->data.size()), n_states, n_base, opts))
    throw InvariantViolation(v->row, v->reason);
  owned->tail = detail::Buffer<double>::uninitialized(static_cast<std::size_t>(n_states));
  detail::compute_tails(view, owned->tail.data(), n_threads);
  return adopt(n_states, n_base, std::move(owned));
}

TransitionMatrix TransitionMatrix::copy_csr(Index n_states, Index n_base, const CsrView& rows, double tol,
                                            int n_threads, const double* tail) {
  check_sizes(n_states, n_base);
  if (rows.n_rows != n_states)
    throw std::invalid_argument(cat("the matrix has ", rows.n_rows, " rows; expected n_states = ", n_states));
  const Index nnz = rows.indptr[n_states];
  if (nnz < 0) throw std::invalid_argument(cat("indptr[-1] is ", nnz, "; expected >= 0"));
  // Check before copying so a bad input costs no allocation; the caller
  // guarantees indices/data hold indptr[n_states] entries (checked in Python and the binding).
  CheckOptions opts;
  opts.tol = tol;
  opts.tail = tail != nullptr;
  opts.n_threads = n_threads;
  if (auto v = check_rows(rows, tail, nnz, n_states, n_base, opts)) throw InvariantViolation(v->row, v->reason);
  auto owned = std::make_shared<Owned>();
  const auto [spare_rows, spare_nnz] = headroom(n_states, nnz);
  owned->indptr = detail::Buffer<Index>::copy_of(rows.indptr, static_cast<std::size_t>(n_states + 1),
                                                 static_cast<std::size_t>(spare_rows), n_threads);
  owned->indices = detail::Buffer<StateIndex>::copy_of(rows.indices, static_cast<std::size_t>(nnz),
                                                       static_cast<std::size_t>(spare_nnz), n_threads);
  owned->data = detail::Buffer<Prob>::copy_of(rows.data, static_cast<std::size_t>(nnz),
                                              static_cast<std::size_t>(spare_nnz), n_threads);
  owned->tail = detail::Buffer<double>::uninitialized(static_cast<std::size_t>(n_states + spare_rows));
  if (tail)
    detail::parallel_copy(owned->tail.data(), tail, static_cast<std::size_t>(n_states) * sizeof(double), n_threads);
  else
    detail::compute_tails(rows, owned->tail.data(), n_threads);
  return adopt(n_states, n_base, std::move(owned));
}

template <class IndexT>
TransitionMatrix TransitionMatrix::from_topk(Index n_states, Index n_base, Index k, const IndexT* indices,
                                             const Prob* probs, double tol, int n_threads) {
  check_sizes(n_states, n_base);
  if (k < 0 || k > n_base) throw std::invalid_argument(cat("k is ", k, "; expected 0 <= k <= n_base = ", n_base));
  auto owned = std::make_shared<Owned>();
  const auto [spare_rows, spare_nnz] = headroom(n_states, n_states * k);
  owned->indptr = detail::Buffer<Index>::uninitialized(static_cast<std::size_t>(n_states + 1 + spare_rows));
  for (Index r = 0; r <= n_states; ++r) owned->indptr[static_cast<std::size_t>(r)] = r * k;
  owned->indices = detail::Buffer<StateIndex>::uninitialized(static_cast<std::size_t>(n_states * k + spare_nnz));
  owned->data = detail::Buffer<Prob>::uninitialized(static_cast<std::size_t>(n_states * k + spare_nnz));
  const long long n = n_states;
  long long bad = n;
#pragma omp parallel num_threads(detail::resolve_threads(n_threads)) if (n * k > 65536)
  {
    std::vector<std::pair<StateIndex, Prob>> buf(static_cast<std::size_t>(k));
#pragma omp for schedule(static) reduction(min : bad)
    for (long long r = 0; r < n; ++r) {
      bool ok = true;
      for (Index j = 0; j < k; ++j) {
        const auto raw = static_cast<long long>(indices[r * k + j]);
        if (raw < 0 || raw >= n_base) {
          ok = false;
          break;
        }
        buf[static_cast<std::size_t>(j)] = {static_cast<StateIndex>(raw), probs[r * k + j]};
      }
      if (!ok) {
        bad = std::min(bad, r);
        continue;
      }
      std::sort(buf.begin(), buf.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
      for (Index j = 0; j < k; ++j) {
        owned->indices[static_cast<std::size_t>(r * k + j)] = buf[static_cast<std::size_t>(j)].first;
        owned->data[static_cast<std::size_t>(r * k + j)] = buf[static_cast<std::size_t>(j)].second;
      }
    }
  }
  if (bad < n) {
    for (Index j = 0; j < k; ++j) {
      const auto raw = static_cast<long long>(indices[bad * k + j]);
      if (raw < 0 || raw >= n_base)
        throw InvariantViolation(
            bad, cat("row ", bad, ": index ", raw, " at position ", j, " is out of range [0, n_base = ", n_base, ")"));
    }
  }
  CsrView view{n_states, owned->indptr.data(), owned->indices.data(), owned->data.data()};
  CheckOptions opts;
  opts.tol = tol;
  opts.tail = false;
  opts.n_threads = n_threads;
  if (auto v = check_rows(view, nullptr, n_states * k, n_states, n_base, opts))
    throw InvariantViolation(v->row, v->reason);
  owned->tail = detail::Buffer<double>::uninitialized(static_cast<std::size_t>(n_states + spare_rows));
  detail::compute_tails(view, owned->tail.data(), n_threads);
  return adopt(n_states, n_base, std::move(owned));
}

template TransitionMatrix TransitionMatrix::from_topk<std::int32_t>(Index, Index, Index, const std::int32_t*,
                                                                    const Prob*, double, int);
template TransitionMatrix TransitionMatrix::from_topk<std::int64_t>(Index, Index, Index, const std::int64_t*,
                                                                    const Prob*, double, int);

TransitionMatrix TransitionMatrix::adopt_buffers(Index n_states, Index n_base, detail::Buffer<Index> indptr,
                                                 detail::Buffer<StateIndex> indices, detail::Buffer<Prob> data,
                                                 detail::Buffer<double> tail) {
  auto owned = std::make_shared<Owned>();
  owned->indptr = std::move(indptr);
  owned->indices = std::move(indices);
  owned->data = std::move(data);
  owned->tail = std::move(tail);
  return adopt(n_states, n_base, std::move(owned));
}

TransitionMatrix TransitionMatrix::from_buffers(Index n_states, Index n_base, Index nnz, const Index* indptr,
                                                const StateIndex* indices, const Prob* data, const double* tail,
                                                std::shared_ptr<const void> owner, bool check_values, int n_threads) {
  check_sizes(n_states, n_base);
  CsrView view{n_states, indptr, indices, data};
  CheckOptions opts;
  opts.values = check_values;
  opts.tail = check_values;
  opts.n_threads = n_threads;
  if (auto v = check_rows(view, tail, nnz, n_states, n_base, opts)) throw InvariantViolation(v->row, v->reason);
  TransitionMatrix m;
  m.n_states_ = n_states;
  m.n_base_ = n_base;
  m.indptr_ = indptr;
  m.indices_ = indices;
  m.data_ = data;
  m.tail_ = tail;
  m.owner_ = std::move(owner);
  return m;
}

Index TransitionMatrix::storage_bytes() const noexcept {
  Index bytes = (n_states_ + 1) * static_cast<Index>(sizeof(Index)) + n_states_ * static_cast<Index>(sizeof(double)) +
                nnz() * static_cast<Index>(sizeof(StateIndex) + sizeof(Prob));
  for (const auto& b : open_) bytes += b.storage_bytes();
  return bytes;
}

namespace {
// First problem of an open block, or nothing: the structure, values and row sums that
// OpenBlock::build promises.  Reads only inside the arrays' stated sizes.
std::optional<Violation> open_block_problem(const OpenBlock& b, std::size_t nnz_capacity, double tol,
                                            const std::string& label) {
  if (b.n_rows < 0 || b.m < 1)
    return Violation{-1, cat(label, ": ", b.n_rows, " rows and ", b.m, " new states; expected >= 0 and >= 1")};
  if (b.indptr[0] != 0) return Violation{-1, cat(label, ": indptr[0] = ", b.indptr[0], "; expected 0")};
  if (static_cast<std::size_t>(b.indptr[b.n_rows]) != nnz_capacity)
    return Violation{-1,
                     cat(label, ": indptr[-1] = ", b.indptr[b.n_rows], " but there are ", nnz_capacity, " entries")};
  for (Index r = 0; r < b.n_rows; ++r) {
    const Index a = b.indptr[r], e = b.indptr[r + 1];
    if (a > e || e > static_cast<Index>(nnz_capacity))
      return Violation{r, cat(label, " row ", r, ": indptr[", r + 1, "] = ", e, " is below indptr[", r, "] = ", a,
                              " or beyond the ", nnz_capacity, " entries")};
    double sum = 0.0;
    for (Index j = a; j < e; ++j) {
      const Index c = b.indices[j];
      if (c < b.n_rows || c >= b.n_rows + b.m)
        return Violation{r, cat(label, " row ", r, ": column ", c, " is not one of the added states [", b.n_rows, ", ",
                                b.n_rows + b.m, ")")};
      if (j > a && c <= b.indices[j - 1])
        return Violation{r, cat(label, " row ", r, ": column indices are not sorted and unique (", b.indices[j - 1],
                                " before ", c, ")")};
      const double p = b.data[j];
      if (!std::isfinite(p) || p < 0.0)
        return Violation{
            r, cat(label, " row ", r, ", column ", c, ": probability is ", p, "; expected a finite number >= 0")};
      sum += p;
    }
    if (!(sum < 1.0))
      return Violation{r, cat(label, " row ", r, ": the row sums to ", sum,
                              "; a leak to new states must be < 1 (the old states keep 1 - leak)")};
    if (b.leak) {
      const double l = b.leak[r];
      if (!std::isfinite(l) || l < 0.0 || l >= 1.0 || std::abs(l - sum) > tol)
        return Violation{r, cat(label, " row ", r, ": stored leak ", l, " is not the row sum ", sum)};
    }
  }
  return std::nullopt;
}

// An OpenBlock's arrays when it owns them.
struct OpenBlockStorage {
  std::vector<Index> indptr;
  std::vector<StateIndex> indices;
  std::vector<Prob> data;
  std::vector<double> leak;
};
}  // namespace

double OpenBlock::entry(Index v, Index c) const noexcept {
  const StateIndex* first = indices + indptr[v];
  const StateIndex* last = indices + indptr[v + 1];
  const StateIndex* it = std::lower_bound(first, last, static_cast<StateIndex>(c));
  return it != last && *it == c ? static_cast<double>(data[it - indices]) : 0.0;
}

Index OpenBlock::storage_bytes() const noexcept {
  return (n_rows + 1) * static_cast<Index>(sizeof(Index)) + n_rows * static_cast<Index>(sizeof(double)) +
         nnz() * static_cast<Index>(sizeof(StateIndex) + sizeof(Prob));
}

void OpenBlock::append_hashes(std::vector<std::uint64_t>& out) const {
  out.push_back(static_cast<std::uint64_t>(n_rows));
  out.push_back(static_cast<std::uint64_t>(m));
  out.push_back(static_cast<std::uint64_t>(nnz()));
  out.push_back(xxh64(indptr, sizeof(Index) * static_cast<std::size_t>(n_rows + 1)));
  out.push_back(xxh64(leak, sizeof(double) * static_cast<std::size_t>(n_rows)));
  out.push_back(xxh64(indices, sizeof(StateIndex) * static_cast<std::size_t>(nnz())));
  out.push_back(xxh64(data, sizeof(Prob) * static_cast<std::size_t>(nnz())));
}

OpenBlock OpenBlock::build(Index n_rows, Index m, std::vector<Index> indptr, std::vector<StateIndex> indices,
                           std::vector<Prob> data, const double* leak, double tol, const std::string& label) {
  if (n_rows < 0 || m < 1 || n_rows > kMaxStates || m > kMaxStates - n_rows)
    throw std::invalid_argument(cat(label, ": ", n_rows, " rows and ", m, " new states are out of range"));
  if (indptr.size() != static_cast<std::size_t>(n_rows + 1))
    throw std::invalid_argument(
        cat(label, ": indptr has ", indptr.size(), " entries; expected n_rows + 1 = ", n_rows + 1));
  if (data.size() != indices.size())
    throw std::invalid_argument(cat(label, ": data has ", data.size(), " entries but indices has ", indices.size()));
  auto own = std::make_shared<OpenBlockStorage>();
  own->indptr = std::move(indptr);
  own->indices = std::move(indices);
  own->data = std::move(data);
  OpenBlock b;
  b.n_rows = n_rows;
  b.m = m;
  b.indptr = own->indptr.data();
  b.indices = own->indices.data();
  b.data = own->data.data();
  b.leak = leak;  // checked against the sums below, then copied
  if (auto v = open_block_problem(b, own->indices.size(), tol, label)) throw InvariantViolation(v->row, v->reason);
  if (leak) {
    own->leak.assign(leak, leak + n_rows);
  } else {
    own->leak.assign(static_cast<std::size_t>(n_rows), 0.0);
    for (Index r = 0; r < n_rows; ++r)
      for (Index j = b.indptr[r]; j < b.indptr[r + 1]; ++j) own->leak[static_cast<std::size_t>(r)] += b.data[j];
  }
  b.leak = own->leak.data();
  b.owner = std::move(own);
  return b;
}

TransitionMatrix TransitionMatrix::with_open_blocks(std::vector<OpenBlock> blocks) const {
  Index end = n_base_;
  for (std::size_t k = 0; k < blocks.size(); ++k) {
    const OpenBlock& b = blocks[k];
    if (b.n_rows < end || b.n_rows + b.m > n_states_)
      throw std::invalid_argument(cat("open block ", k, " covers rows [0, ", b.n_rows, ") and new states [", b.n_rows,
                                      ", ", b.n_rows + b.m, "); expected rows >= ", end, " and new states within [0, ",
                                      n_states_, ") (blocks in order, after the base states)"));
    end = b.n_rows + b.m;
  }
  TransitionMatrix q = *this;
  q.open_ = std::move(blocks);
  return q;
}

std::vector<double> TransitionMatrix::total_leak() const {
  std::vector<double> leak(static_cast<std::size_t>(n_states_), 0.0);
  for (const auto& b : open_)
    for (Index v = 0; v < b.n_rows; ++v) {
      double& l = leak[static_cast<std::size_t>(v)];
      l = b.leak[v] + (1.0 - b.leak[v]) * l;
    }
  return leak;
}

void TransitionMatrix::check_state(Index v, const char* what) const {
  if (v < 0 || v >= n_states_)
    throw std::out_of_range(cat(what, " = ", v, " is out of range [0, n_states = ", n_states_, ")"));
}

namespace {
inline double stored_prob(const Index* indptr, const StateIndex* indices, const Prob* data, const double* tail,
                          Index n_base, Index v, Index x) {
  const StateIndex* first = indices + indptr[v];
  const StateIndex* last = indices + indptr[v + 1];
  const StateIndex* it = std::lower_bound(first, last, static_cast<StateIndex>(x));
  if (it != last && *it == x) return data[it - indices];
  if (x >= n_base) return 0.0;
  const Index free = n_base - (last - first);
  return free > 0 ? tail[v] / static_cast<double>(free) : 0.0;
}
}  // namespace

double TransitionMatrix::prob_unchecked(Index v, Index x) const noexcept {
  const double p = stored_prob(indptr_, indices_, data_, tail_, n_base_, v, x);
  // Newest block first: a block scales everything that existed before it, older blocks included.
  double scale = 1.0;
  for (auto b = open_.rbegin(); b != open_.rend(); ++b) {
    if (x >= b->n_rows && x < b->n_rows + b->m) return v < b->n_rows ? scale * b->entry(v, x) : 0.0;
    if (v < b->n_rows) scale *= 1.0 - b->leak[v];
  }
  return open_.empty() ? p : scale * p;
}

double TransitionMatrix::prob(Index v, Index x) const {
  check_state(v, "state v");
  check_state(x, "state x");
  return prob_unchecked(v, x);
}

double TransitionMatrix::log_prob(Index v, Index x) const { return std::log(std::max(prob(v, x), kLogFloor)); }

void TransitionMatrix::prob_many(const Index* v, const Index* x, Index n, double* out, bool log, int n_threads) const {
  for (Index i = 0; i < n; ++i) {
    if (v[i] < 0 || v[i] >= n_states_)
      throw std::out_of_range(cat("v[", i, "] = ", v[i], " is out of range [0, n_states = ", n_states_, ")"));
    if (x[i] < 0 || x[i] >= n_states_)
      throw std::out_of_range(cat("x[", i, "] = ", x[i], " is out of range [0, n_states = ", n_states_, ")"));
  }
  const long long nn = n;
#pragma omp parallel for schedule(static) num_threads(detail::resolve_threads(n_threads)) if (nn > 4096)
  for (long long i = 0; i < nn; ++i) {
    const double p = prob_unchecked(v[i], x[i]);
    out[i] = log ? std::log(std::max(p, kLogFloor)) : p;
  }
}

std::vector<double> TransitionMatrix::step(const double* dist_in, int n_threads) const {
  const Index n = n_states_;
  // With open blocks, the stored rows carry (1 - total leak) of each row's mass: weigh them so,
  // then add the blocks' own entries below.
  std::vector<double> scaled;
  const double* dist = dist_in;
  if (!open_.empty()) {
    const std::vector<double> leak = total_leak();
    scaled.assign(dist_in, dist_in + n);
    for (Index v = 0; v < n; ++v) scaled[static_cast<std::size_t>(v)] *= 1.0 - leak[static_cast<std::size_t>(v)];
    dist = scaled.data();
  }
  // A parallel region costs more than it saves on small matrices.
  const int nt = n + nnz() < (Index{1} << 16) ? 1 : detail::resolve_threads(n_threads);
  std::vector<std::vector<double>> partial(static_cast<std::size_t>(nt));
  std::vector<double> uniform(static_cast<std::size_t>(nt), 0.0);
#pragma omp parallel num_threads(nt)
  {
    int t = 0;
#ifdef MARKOVMEM_HAVE_OPENMP
    t = omp_get_thread_num();
#endif
    std::vector<double>& acc = partial[static_cast<std::size_t>(t)];
    acc.assign(static_cast<std::size_t>(n), 0.0);
    double u_acc = 0.0;
#pragma omp for schedule(static)
    for (long long v = 0; v < n; ++v) {
      const double w = dist[v];
      if (w == 0.0) continue;
      const Index a = indptr_[v], b = indptr_[v + 1];
      const Index free = n_base_ - (b - a);
      const double u = free > 0 ? tail_[v] / static_cast<double>(free) : 0.0;
      u_acc += w * u;
      for (Index j = a; j < b; ++j) acc[static_cast<std::size_t>(indices_[j])] += w * (data_[j] - u);
    }
    uniform[static_cast<std::size_t>(t)] = u_acc;
  }
  std::vector<double> out(static_cast<std::size_t>(n), 0.0);
  // Reduce in thread order so the result does not depend on scheduling.
  double u_total = 0.0;
  for (int t = 0; t < nt; ++t) {
    u_total += uniform[static_cast<std::size_t>(t)];
    const auto& acc = partial[static_cast<std::size_t>(t)];
    if (acc.empty()) continue;
    for (Index x = 0; x < n; ++x) out[static_cast<std::size_t>(x)] += acc[static_cast<std::size_t>(x)];
  }
  for (Index x = 0; x < n_base_; ++x) out[static_cast<std::size_t>(x)] += u_total;
  for (std::size_t k = 0; k < open_.size(); ++k) {
    const OpenBlock& b = open_[k];
    for (Index v = 0; v < b.n_rows; ++v) {
      double w = dist_in[v];
      if (w == 0.0) continue;
      // Entries of block k are scaled by every later block's 1 - leak.
      for (std::size_t l = k + 1; l < open_.size(); ++l)
        if (v < open_[l].n_rows) w *= 1.0 - open_[l].leak[v];
      for (Index j = b.indptr[v]; j < b.indptr[v + 1]; ++j)
        out[static_cast<std::size_t>(b.indices[j])] += w * b.data[j];
    }
  }
  return out;
}

TransitionMatrix::Stationary TransitionMatrix::stationary(double tol, Index max_iter, int n_threads) const {
  if (!(tol > 0.0)) throw std::invalid_argument(cat("tol is ", tol, "; expected > 0"));
  if (max_iter < 1) throw std::invalid_argument(cat("max_iter is ", max_iter, "; expected >= 1"));
  Stationary res;
  std::vector<double> x(static_cast<std::size_t>(n_states_), 0.0);
  for (Index i = 0; i < n_base_; ++i) x[static_cast<std::size_t>(i)] = 1.0 / static_cast<double>(n_base_);
  for (res.n_iter = 1; res.n_iter <= max_iter; ++res.n_iter) {
    std::vector<double> y = step(x.data(), n_threads);
    double total = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      y[i] = 0.5 * (x[i] + y[i]);
      total += y[i];
    }
    double diff = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      y[i] /= total;
      diff += std::abs(y[i] - x[i]);
    }
    x.swap(y);
    res.residual = diff;
    if (diff < tol) {
      res.converged = true;
      break;
    }
  }
  if (res.n_iter > max_iter) res.n_iter = max_iter;
  res.distribution = std::move(x);
  return res;
}

std::vector<double> TransitionMatrix::log_likelihood(const std::int32_t* tokens, Index n_tokens, const Index* offsets,
                                                     Index n_seq, int n_threads) const {
  if (n_seq < 0) throw std::invalid_argument("negative number of sequences");
  if (offsets[0] < 0) throw std::invalid_argument(cat("offsets[0] is ", offsets[0], "; expected >= 0"));
  for (Index s = 0; s < n_seq; ++s)
    if (offsets[s + 1] < offsets[s] || offsets[s + 1] > n_tokens)
      throw std::invalid_argument(cat("offsets[", s + 1, "] = ", offsets[s + 1], " is not within [offsets[", s,
                                      "], n_tokens = ", n_tokens, "]"));
  for (Index s = 0; s < n_seq; ++s)
    for (Index i = offsets[s]; i < offsets[s + 1]; ++i)
      if (tokens[i] < 0 || tokens[i] >= n_states_)
        throw std::out_of_range(cat("sequence ", s, " position ", i - offsets[s], ": token ", tokens[i],
                                    " is out of range [0, n_states = ", n_states_, ")"));
  std::vector<double> out(static_cast<std::size_t>(n_seq), 0.0);
  const long long ns = n_seq;
#pragma omp parallel for schedule(dynamic, 16) num_threads(detail::resolve_threads(n_threads)) if (n_tokens > 65536)
  for (long long s = 0; s < ns; ++s) {
    double ll = 0.0;
    for (Index i = offsets[s] + 1; i < offsets[s + 1]; ++i) {
      const double p = prob_unchecked(tokens[i - 1], tokens[i]);
      ll += std::log(std::max(p, kLogFloor));
    }
    out[static_cast<std::size_t>(s)] = ll;
  }
  return out;
}

std::vector<std::int32_t> TransitionMatrix::sample(Index start, Index length, std::uint64_t seed) const {
  check_state(start, "start");
  if (length < 1) throw std::invalid_argument(cat("length is ", length, "; expected >= 1"));
  std::vector<std::int32_t> path(static_cast<std::size_t>(length));
  std::uint64_t state = seed;
  Index v = start;
  path[0] = static_cast<std::int32_t>(v);
  for (Index i = 1; i < length; ++i) {
    const Index a = indptr_[v], b = indptr_[v + 1];
    double u = static_cast<double>(splitmix64(state) >> 11) * 0x1.0p-53;
    double acc = 0.0;
    Index next = -1;
    // Open blocks, newest first: with probability leak_k[v] the step goes to one of block
    // k's states, else u is rescaled to [0, 1) and the distribution before block k is drawn.
    for (auto blk = open_.rbegin(); blk != open_.rend() && next < 0; ++blk) {
      if (v >= blk->n_rows) continue;
      const double eps = blk->leak[v];
      if (u < eps) {
        for (Index j = blk->indptr[v]; j < blk->indptr[v + 1] && next < 0; ++j) {
          acc += blk->data[j];
          if (u < acc) next = blk->indices[j];
        }
        // Rounding left u above the summed entries: take the last positive one.
        for (Index j = blk->indptr[v + 1] - 1; j >= blk->indptr[v] && next < 0; --j)
          if (blk->data[j] > 0.0f) next = blk->indices[j];
      } else {
        u = (u - eps) / (1.0 - eps);
      }
    }
    acc = 0.0;
    for (Index j = a; j < b && next < 0; ++j) {
      acc += data_[j];
      if (u < acc) next = indices_[j];
    }
    if (next < 0) {
      const Index free = n_base_ - (b - a);
      if (free > 0 && tail_[v] > 0.0) {
        // The r-th base state the row does not store, r uniform in [0, free).
        // Unbiased: reject the low draws that would make the modulo uneven.
        const auto range = static_cast<std::uint64_t>(free);
        const std::uint64_t threshold = (0 - range) % range;
        std::uint64_t draw = splitmix64(state);
        while (draw < threshold) draw = splitmix64(state);
        Index c = static_cast<Index>(draw % range);
        for (Index j = a; j < b && indices_[j] <= c; ++j) ++c;
        next = c;
      } else {
        // Rounding left u above the stored mass: take the last positive entry.
        for (Index j = b - 1; j >= a && next < 0; --j)
          if (data_[j] > 0.0f) next = indices_[j];
        if (next < 0) next = v;
      }
    }
    path[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(next);
    v = next;
  }
  return path;
}

std::shared_ptr<const void> TransitionMatrix::derived(const std::string& key,
                                                      const std::function<std::shared_ptr<const void>()>& make) const {
  // Built under the lock so that concurrent callers of one key pay for one build.
  std::lock_guard<std::mutex> lock(derived_->mutex);
  auto it = derived_->entries.find(key);
  if (it != derived_->entries.end()) return it->second;
  std::shared_ptr<const void> value = make();
  derived_->entries.emplace(key, value);
  return value;
}

std::shared_ptr<const void> TransitionMatrix::find_derived(const std::string& key) const {
  std::lock_guard<std::mutex> lock(derived_->mutex);
  auto it = derived_->entries.find(key);
  return it == derived_->entries.end() ? nullptr : it->second;
}

void TransitionMatrix::clear_derived() const {
  std::lock_guard<std::mutex> lock(derived_->mutex);
  derived_->entries.clear();
}

std::vector<std::string> TransitionMatrix::derived_keys() const {
  std::lock_guard<std::mutex> lock(derived_->mutex);
  std::vector<std::string> keys;
  for (const auto& kv : derived_->entries) keys.push_back(kv.first);
  return keys;
}

const std::array<ArrayHashes, 4>& TransitionMatrix::chunk_hashes() const {
  {
    std::lock_guard<std::mutex> lock(hash_cache_->mutex);
    if (hash_cache_->set) return hash_cache_->hashes;
  }
  // Hash outside the lock (two threads may both hash; the first result is kept, both are equal).
  const ArrayLayout layout = array_layout(n_states_);
  std::array<ArrayHashes, 4> hashes;
  for (int i = 0; i < 4; ++i)
    process_chunks(hashes[static_cast<std::size_t>(i)], const_cast<void*>(layout.ptr[i]), nullptr, layout.full_bytes[i],
                   layout.full_bytes[i], layout.full_bytes[i], 0, n_chunks(layout.full_bytes[i]), PrefixMode::kHashOnly,
                   0);
  seed_chunk_hashes(hashes);
  std::lock_guard<std::mutex> lock(hash_cache_->mutex);
  return hash_cache_->hashes;
}

void TransitionMatrix::seed_chunk_hashes(const std::array<ArrayHashes, 4>& hashes) const {
  std::lock_guard<std::mutex> lock(hash_cache_->mutex);
  if (!hash_cache_->set) {
    hash_cache_->hashes = hashes;
    hash_cache_->set = true;
  }
}

std::pair<std::string, std::string> TransitionMatrix::fingerprint_prefix_and_full(Index n_rows) const {
  if (n_rows < 0 || n_rows > n_states_)
    throw std::out_of_range(cat("n_rows = ", n_rows, " is not in [0, n_states = ", n_states_, "]"));
  // A prefix shares the whole chunks of the full arrays; only its last partial chunk is hashed anew.
  const auto& hashes = chunk_hashes();
  const ArrayLayout layout = array_layout(n_rows);
  std::vector<std::uint64_t> pre, full;
  for (int i = 0; i < 4; ++i) {
    const ArrayHashes& h = hashes[static_cast<std::size_t>(i)];
    h.append_full(full);
    const std::size_t whole = layout.prefix_bytes[i] / kHashChunk;
    pre.insert(pre.end(), h.chunks.begin(), h.chunks.begin() + static_cast<std::ptrdiff_t>(whole));
    if (layout.prefix_bytes[i] % kHashChunk != 0)
      pre.push_back(
          xxh64(static_cast<const char*>(layout.ptr[i]) + whole * kHashChunk, layout.prefix_bytes[i] % kHashChunk));
  }
  append_open_hashes(pre, n_rows);
  append_open_hashes(full, n_states_);
  return {fingerprint_from_parts(n_rows, n_base_, indptr_[n_rows], pre),
          fingerprint_from_parts(n_states_, n_base_, nnz(), full)};
}

TransitionMatrix::ArrayLayout TransitionMatrix::array_layout(Index n_rows) const noexcept {
  const Index nnz_pre = indptr_[n_rows], nnz_all = nnz();
  return ArrayLayout{
      {indptr_, tail_, indices_, data_},
      {static_cast<std::size_t>(n_rows + 1) * sizeof(Index), static_cast<std::size_t>(n_rows) * sizeof(double),
       static_cast<std::size_t>(nnz_pre) * sizeof(StateIndex), static_cast<std::size_t>(nnz_pre) * sizeof(Prob)},
      {static_cast<std::size_t>(n_states_ + 1) * sizeof(Index), static_cast<std::size_t>(n_states_) * sizeof(double),
       static_cast<std::size_t>(nnz_all) * sizeof(StateIndex), static_cast<std::size_t>(nnz_all) * sizeof(Prob)}};
}

std::string TransitionMatrix::fingerprint(Index n_rows) const {
  if (n_rows < 0 || n_rows == n_states_) {
    std::vector<std::uint64_t> full;
    for (const auto& h : chunk_hashes()) h.append_full(full);
    append_open_hashes(full, n_states_);
    return fingerprint_from_parts(n_states_, n_base_, nnz(), full);
  }
  return fingerprint_prefix_and_full(n_rows).first;
}

std::optional<Violation> TransitionMatrix::find_violation(double tol, int n_threads, Index first_row) const {
  CheckOptions opts;
  opts.tol = tol;
  opts.n_threads = n_threads;
  opts.first_row = first_row;
  if (auto v = check_rows(view(), tail_, nnz(), n_states_, n_base_, opts)) return v;
  for (std::size_t k = 0; k < open_.size(); ++k)
    if (auto v = open_block_problem(open_[k], static_cast<std::size_t>(open_[k].nnz()), tol, cat("open block ", k)))
      return v;
  return std::nullopt;
}

void TransitionMatrix::append_open_hashes(std::vector<std::uint64_t>& parts, Index n_rows) const {
  // Blocks wholly inside the first n_rows states belong to that prefix (a closed matrix adds nothing,
  // so its fingerprint is the same as before open blocks existed).
  for (const auto& b : open_)
    if (b.n_rows + b.m <= n_rows) b.append_hashes(parts);
}

}  // namespace markovmem
