// expand() and verify_expansion(): growing a matrix and certifying the old block.
#include "markovmem/expansion.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

namespace markovmem {
namespace {

// Stored rows of one matrix and its tail rule, for row-wise comparisons.
struct RowAccess {
  const TransitionMatrix& m;
  Index begin(Index v) const { return m.indptr()[v]; }
  Index end(Index v) const { return m.indptr()[v + 1]; }
  // Uniform mass per unstored base state.
  double uniform(Index v) const {
    const Index free = m.n_base() - (end(v) - begin(v));
    return free > 0 ? m.tail()[v] / static_cast<double>(free) : 0.0;
  }
  // Mass row v puts on states in [lo, hi), stored entries and tail included.
  double mass_in(Index v, Index lo, Index hi) const {
    if (hi <= lo) return 0.0;
    const StateIndex* idx = m.indices();
    const Index a = begin(v), b = end(v);
    const Index p0 = std::lower_bound(idx + a, idx + b, lo) - idx;
    double mass = 0.0;
    Index stored_in_base = 0;
    for (Index j = p0; j < b && idx[j] < hi; ++j) {
      mass += m.data()[j];
      if (idx[j] < m.n_base()) ++stored_in_base;
    }
    const Index base_hi = std::min(hi, m.n_base());
    if (base_hi > lo) mass += uniform(v) * static_cast<double>(base_hi - lo - stored_in_base);
    return mass;
  }
};

// max_x |p_a(x|v) - p_b(x|v)| over x in [0, n_cols), by merging the stored entries
// and treating the unstored columns region by region (each has one value per matrix).
double row_max_diff(const RowAccess& A, const RowAccess& B, Index v, Index n_cols) {
  const StateIndex* ia = A.m.indices();
  const StateIndex* ib = B.m.indices();
  const Prob* da = A.m.data();
  const Prob* db = B.m.data();
  const double ua = A.uniform(v), ub = B.uniform(v);
  const Index nba = A.m.n_base(), nbb = B.m.n_base();
  auto pa_unstored = [&](Index x) { return x < nba ? ua : 0.0; };
  auto pb_unstored = [&](Index x) { return x < nbb ? ub : 0.0; };
  Index i = A.begin(v), ie = A.end(v), j = B.begin(v), je = B.end(v);
  double worst = 0.0;
  // Counts of union columns below each region boundary.
  const Index lo = std::min({nba, nbb, n_cols}), hi = std::min(std::max(nba, nbb), n_cols);
  Index union_below_lo = 0, union_lo_hi = 0;
  while (i < ie || j < je) {
    Index x;
    double pa, pb;
    if (j >= je || (i < ie && ia[i] < ib[j])) {
      x = ia[i];
      pa = da[i++];
      pb = pb_unstored(x);
    } else if (i >= ie || ib[j] < ia[i]) {
      x = ib[j];
      pb = db[j++];
      pa = pa_unstored(x);
    } else {
      x = ia[i];
      pa = da[i++];
      pb = db[j++];
    }
    if (x >= n_cols) continue;
    worst = std::max(worst, std::abs(pa - pb));
    if (x < lo) ++union_below_lo;
    else if (x < hi) ++union_lo_hi;
  }
  if (lo - union_below_lo > 0) worst = std::max(worst, std::abs(pa_unstored(0) - pb_unstored(0)));
  if (hi - lo - union_lo_hi > 0) worst = std::max(worst, std::abs(pa_unstored(lo) - pb_unstored(lo)));
  return worst;
}

}  // namespace

ExpansionCertificate verify_expansion(const TransitionMatrix& before, const TransitionMatrix& after,
                                      double tol, int n_threads) {
  if (after.n_states() < before.n_states()) {
    std::ostringstream os;
    os << "the expanded matrix has " << after.n_states() << " states, fewer than the original's "
       << before.n_states();
    throw std::invalid_argument(os.str());
  }
  ExpansionCertificate c;
  const Index n_old = before.n_states();
  c.n_old = n_old;
  c.n_new = after.n_states() - n_old;
  c.n_base = before.n_base();
  c.same_n_base = after.n_base() == before.n_base();
  const Index nnz_old = before.nnz();
  c.old_block_identical =
      c.same_n_base &&
      std::memcmp(before.indptr(), after.indptr(), sizeof(Index) * static_cast<std::size_t>(n_old + 1)) == 0 &&
      std::memcmp(before.indices(), after.indices(), sizeof(StateIndex) * static_cast<std::size_t>(nnz_old)) == 0 &&
      std::memcmp(before.data(), after.data(), sizeof(Prob) * static_cast<std::size_t>(nnz_old)) == 0 &&
      std::memcmp(before.tail(), after.tail(), sizeof(double) * static_cast<std::size_t>(n_old)) == 0;

  const RowAccess A{before}, B{after};
  const int nt = detail::resolve_threads(n_threads);
  const long long n_old_ll = n_old, n_all = after.n_states();
  double diff = 0.0, leak = 0.0, new_new = 0.0, sum_err = 0.0;
  // Identical bytes give identical probabilities: the diff is exactly 0 and need not be recomputed.
  const bool need_diff = !c.old_block_identical;
#pragma omp parallel for schedule(dynamic, 4096) num_threads(nt) \
    reduction(max : diff, leak, new_new, sum_err)
  for (long long v = 0; v < n_all; ++v) {
    const Index a = B.begin(v), b = B.end(v);
    double s = after.tail()[v];
    for (Index j = a; j < b; ++j) s += after.data()[j];
    sum_err = std::max(sum_err, std::abs(s - 1.0));
    if (v < n_old_ll) {
      // Old states must not move to new ones: mass on [n_old, n_all).
      leak = std::max(leak, B.mass_in(v, n_old, n_all));
      if (need_diff) diff = std::max(diff, row_max_diff(A, B, v, n_old));
    } else {
      new_new = std::max(new_new, B.mass_in(v, before.n_base(), n_all));
    }
  }
  c.max_abs_diff_old = diff;
  c.leaked_mass_to_new = leak;
  c.new_to_new_mass = new_new;
  c.max_row_sum_error = sum_err;
  c.fingerprint_before = before.fingerprint();
  c.fingerprint_after_old = after.fingerprint(n_old);
  c.fingerprint_after = after.fingerprint();
  // An identical old block is exactly as valid as `before` (before.validate() answers
  // that); the certificate checks what the expansion added, or everything otherwise.
  const Index first_checked = c.old_block_identical ? n_old : 0;
  if (auto v = after.find_violation(tol, n_threads, first_checked)) {
    c.after_valid = false;
    c.after_violation = v->reason;
  } else {
    c.after_valid = true;
  }
  c.ok = c.same_n_base && c.old_block_identical && c.max_abs_diff_old == 0.0 &&
         c.leaked_mass_to_new == 0.0 && c.new_to_new_mass == 0.0 && c.max_row_sum_error <= tol &&
         c.fingerprint_before == c.fingerprint_after_old && c.after_valid;
  return c;
}

Expansion expand(const TransitionMatrix& P, const CsrView& new_rows, double tol, int n_threads) {
  const Index m = new_rows.n_rows;
  if (m < 1) throw std::invalid_argument("new_rows has no rows; expected at least one new state");
  const Index n_old = P.n_states();
  check_sizes(n_old + m, P.n_base());
  const Index nnz_new = new_rows.indptr[m];
  CheckOptions opts;
  opts.tol = tol;
  opts.tail = false;
  opts.n_threads = n_threads;
  opts.label = "new row";
  if (nnz_new < 0) throw std::invalid_argument("new_rows.indptr[-1] is negative");
  if (auto v = check_rows(new_rows, nullptr, nnz_new, n_old + m, P.n_base(), opts))
    throw InvariantViolation(v->row, v->reason);

  const Index nnz_old = P.nnz();
  std::vector<Index> indptr(static_cast<std::size_t>(n_old + m + 1));
  std::vector<StateIndex> indices(static_cast<std::size_t>(nnz_old + nnz_new));
  std::vector<Prob> data(static_cast<std::size_t>(nnz_old + nnz_new));
  std::memcpy(indptr.data(), P.indptr(), sizeof(Index) * static_cast<std::size_t>(n_old + 1));
  for (Index r = 1; r <= m; ++r) indptr[static_cast<std::size_t>(n_old + r)] = nnz_old + new_rows.indptr[r];
  std::memcpy(indices.data(), P.indices(), sizeof(StateIndex) * static_cast<std::size_t>(nnz_old));
  std::memcpy(indices.data() + nnz_old, new_rows.indices, sizeof(StateIndex) * static_cast<std::size_t>(nnz_new));
  std::memcpy(data.data(), P.data(), sizeof(Prob) * static_cast<std::size_t>(nnz_old));
  std::memcpy(data.data() + nnz_old, new_rows.data, sizeof(Prob) * static_cast<std::size_t>(nnz_new));
  TransitionMatrix Q = TransitionMatrix::with_tail_prefix(n_old + m, P.n_base(), std::move(indptr),
                                                          std::move(indices), std::move(data),
                                                          P.tail(), n_old, n_threads);
  ExpansionCertificate cert = verify_expansion(P, Q, tol, n_threads);
  return Expansion{std::move(Q), std::move(cert)};
}

}  // namespace markovmem
