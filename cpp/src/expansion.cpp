// expand() and verify_expansion(): growing a matrix and certifying the old block.
#include "markovmem/expansion.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <tuple>

#include "markovmem/buffer.hpp"
#include "markovmem/hash.hpp"

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
    if (x < lo)
      ++union_below_lo;
    else if (x < hi)
      ++union_lo_hi;
  }
  if (lo - union_below_lo > 0) worst = std::max(worst, std::abs(pa_unstored(0) - pb_unstored(0)));
  if (hi - lo - union_lo_hi > 0) worst = std::max(worst, std::abs(pa_unstored(lo) - pb_unstored(lo)));
  return worst;
}

}  // namespace

namespace {

// Byte-level evidence about the old block of `after`: per array, whether its
// first n_old rows equal `before`'s, and the chunk hashes of `after`.
struct BlockEvidence {
  ArrayHashes arrays[4];
  bool identical() const {
    for (const auto& a : arrays)
      if (!a.prefix_equal) return false;
    return true;
  }
};

// verify_expansion's evidence: one pass over `after` comparing its old block with
// `before` chunk by chunk and hashing each chunk while it is in cache.
BlockEvidence compare_and_hash(const TransitionMatrix& before, const TransitionMatrix& after, int n_threads) {
  BlockEvidence ev;
  const auto old = before.array_layout(before.n_states());
  const auto all = after.array_layout(before.n_states());
  for (int i = 0; i < 4; ++i) {
    ArrayHashes& h = ev.arrays[i];
    const bool same_length = old.full_bytes[i] == all.prefix_bytes[i];
    std::size_t first_chunk = 0;
    if (same_length && old.ptr[i] == all.ptr[i]) {
      // `after` extends `before` in place: its old block IS before's memory, so it is
      // byte-identical, and its whole chunks are before's (cached) chunk hashes.
      const ArrayHashes& mine = before.chunk_hashes()[static_cast<std::size_t>(i)];
      first_chunk = all.prefix_bytes[i] / kHashChunk;
      h.full_bytes = all.full_bytes[i];
      h.prefix_bytes = all.prefix_bytes[i];
      h.chunks.assign(n_chunks(all.full_bytes[i]), 0);
      std::copy(mine.chunks.begin(), mine.chunks.begin() + static_cast<std::ptrdiff_t>(first_chunk), h.chunks.begin());
    }
    // Old blocks of different byte lengths (row pointers disagree) cannot be equal: hash only.
    process_chunks(h, const_cast<void*>(all.ptr[i]), old.ptr[i], all.prefix_bytes[i], all.full_bytes[i],
                   all.full_bytes[i], first_chunk, n_chunks(all.full_bytes[i]),
                   same_length ? PrefixMode::kCompare : PrefixMode::kHashOnly, n_threads);
    if (!same_length) h.prefix_equal = false;
  }
  return ev;
}

// Whether `after` keeps `before`'s open blocks byte for byte (as the first of its own).
bool same_open_blocks(const TransitionMatrix& before, const TransitionMatrix& after) {
  const auto& a = before.open_blocks();
  const auto& b = after.open_blocks();
  if (b.size() < a.size()) return false;
  for (std::size_t k = 0; k < a.size(); ++k) {
    const OpenBlock &x = a[k], &y = b[k];
    if (x.n_rows != y.n_rows || x.m != y.m || x.nnz() != y.nnz()) return false;
    const auto nz = static_cast<std::size_t>(x.nnz()), nr = static_cast<std::size_t>(x.n_rows);
    if (std::memcmp(x.indptr, y.indptr, (nr + 1) * sizeof(Index)) != 0 ||
        std::memcmp(x.leak, y.leak, nr * sizeof(double)) != 0 ||
        std::memcmp(x.indices, y.indices, nz * sizeof(StateIndex)) != 0 ||
        std::memcmp(x.data, y.data, nz * sizeof(Prob)) != 0)
      return false;
  }
  return true;
}

// Leak and forgetting of the old rows through the open blocks `after` adds to `before`'s:
// per row, leak = eps_K + (1 - eps_K) leak (oldest block first; one block gives eps exactly)
// and forgetting = sum_k -log(1 - eps_k) = -log(1 - leak), the KL of the old distribution
// from the new one over the old states.
void measure_leak(const TransitionMatrix& before, const TransitionMatrix& after, ExpansionCertificate& c) {
  const auto& blocks = after.open_blocks();
  const std::size_t first = std::min(before.open_blocks().size(), blocks.size());
  c.open = blocks.size() > first;
  if (!c.open || c.n_old == 0) return;
  double sum_leak = 0.0, sum_forget = 0.0;
  for (Index v = 0; v < c.n_old; ++v) {
    double leak = 0.0, forget = 0.0;
    for (std::size_t k = first; k < blocks.size(); ++k) {
      if (v >= blocks[k].n_rows) continue;
      const double eps = blocks[k].leak[v];
      leak = eps + (1.0 - eps) * leak;
      forget += -std::log1p(-eps);
    }
    if (leak > c.max_leak || (c.worst_leak_row < 0 && leak > 0.0)) {
      c.max_leak = leak;
      c.worst_leak_row = v;
    }
    c.forgetting_max_nats = std::max(c.forgetting_max_nats, forget);
    sum_leak += leak;
    sum_forget += forget;
  }
  c.mean_leak = sum_leak / static_cast<double>(c.n_old);
  c.forgetting_mean_nats = sum_forget / static_cast<double>(c.n_old);
}

ExpansionCertificate certify(const TransitionMatrix& before, const TransitionMatrix& after, const BlockEvidence& ev,
                             double tol, int n_threads, double max_leak) {
  ExpansionCertificate c;
  const Index n_old = before.n_states();
  c.n_old = n_old;
  c.n_new = after.n_states() - n_old;
  c.n_base = before.n_base();
  c.same_n_base = after.n_base() == before.n_base();
  c.old_block_identical = c.same_n_base && ev.identical() && same_open_blocks(before, after);
  c.leak_bound = max_leak;
  measure_leak(before, after, c);

  const RowAccess A{before}, B{after};
  const int nt = detail::resolve_threads(n_threads);
  const long long n_old_ll = n_old, n_all = after.n_states();
  double diff = 0.0, leak = 0.0, new_new = 0.0, sum_err = 0.0;
  // Identical bytes give identical probabilities and row sums: for an identical
  // old block the diff is exactly 0 and the old rows' sums are before's own
  // (before.validate() checks them), so only the leak is measured on old rows.
  const bool identical = c.old_block_identical;
  const bool tail_reaches_new = after.n_base() > n_old;
#pragma omp parallel for schedule(dynamic, 4096) num_threads(nt) \
    reduction(max : diff, leak, new_new, sum_err) if (n_all > 4096)
  for (long long v = 0; v < n_all; ++v) {
    const Index a = B.begin(v), b = B.end(v);
    if (!identical || v >= n_old_ll) {
      double s = after.tail()[v];
      for (Index j = a; j < b; ++j) s += after.data()[j];
      sum_err = std::max(sum_err, std::abs(s - 1.0));
    }
    if (v < n_old_ll) {
      // Old states must not move to new ones: mass on [n_old, n_all).  Columns are
      // sorted, so a row whose last column is old and whose tail stays on old
      // base states puts exactly nothing there.
      if (tail_reaches_new || (b > a && after.indices()[b - 1] >= n_old))
        leak = std::max(leak, B.mass_in(v, n_old, n_all));
      if (!identical) diff = std::max(diff, row_max_diff(A, B, v, n_old));
    } else {
      new_new = std::max(new_new, B.mass_in(v, before.n_base(), n_all));
    }
  }
  c.max_abs_diff_old = diff;
  // `leak` is what the stored rows put on new states (0 for valid rows over base states);
  // an open expansion moves its leak through the blocks instead.
  const double stored_leak = leak;
  c.leaked_mass_to_new = std::max(leak, c.max_leak);
  c.new_to_new_mass = new_new;
  c.max_row_sum_error = sum_err;

  std::vector<std::uint64_t> pre, full;
  for (const auto& a : ev.arrays) {
    a.append_prefix(pre);
    a.append_full(full);
  }
  c.fingerprint_before = before.fingerprint();
  // Open blocks: those within the old states belong to the old block's fingerprint.
  for (const auto& b : after.open_blocks()) {
    if (b.n_rows + b.m <= n_old) b.append_hashes(pre);
    b.append_hashes(full);
  }
  c.fingerprint_after_old = fingerprint_from_parts(n_old, after.n_base(), after.indptr()[n_old], pre);
  c.fingerprint_after = fingerprint_from_parts(after.n_states(), after.n_base(), after.nnz(), full);
  std::array<ArrayHashes, 4> whole;
  for (int i = 0; i < 4; ++i) {
    whole[static_cast<std::size_t>(i)] = ev.arrays[i];
    whole[static_cast<std::size_t>(i)].prefix_bytes = ev.arrays[i].full_bytes;
  }
  after.seed_chunk_hashes(whole);  // these are hashes of after's own bytes
  // An identical old block is exactly as valid as `before` (before.validate() answers
  // that); the certificate checks what the expansion added, or everything otherwise.
  const Index first_checked = c.old_block_identical ? n_old : 0;
  if (auto v = after.find_violation(tol, n_threads, first_checked)) {
    c.after_valid = false;
    c.after_violation = v->reason;
  } else {
    c.after_valid = true;
  }
  const bool leak_ok =
      c.open ? stored_leak == 0.0 && c.max_leak < 1.0 && c.max_leak <= max_leak : c.leaked_mass_to_new == 0.0;
  c.ok = c.same_n_base && c.old_block_identical && c.max_abs_diff_old == 0.0 && leak_ok && c.new_to_new_mass == 0.0 &&
         c.max_row_sum_error <= tol && c.fingerprint_before == c.fingerprint_after_old && c.after_valid;
  return c;
}

}  // namespace

namespace {
void check_max_leak(double max_leak) {
  if (!(max_leak >= 0.0)) {
    std::ostringstream os;
    os << "max_leak is " << max_leak << "; expected a number >= 0 (infinity: no bound)";
    throw std::invalid_argument(os.str());
  }
}
}  // namespace

ExpansionCertificate verify_expansion(const TransitionMatrix& before, const TransitionMatrix& after, double tol,
                                      int n_threads, double max_leak) {
  check_max_leak(max_leak);
  if (!(tol >= 0.0) || !std::isfinite(tol)) {
    std::ostringstream os;
    os << "tol is " << tol << "; expected a finite number >= 0";
    throw std::invalid_argument(os.str());
  }
  if (after.n_states() < before.n_states()) {
    std::ostringstream os;
    os << "the expanded matrix has " << after.n_states() << " states, fewer than the original's " << before.n_states();
    throw std::invalid_argument(os.str());
  }
  return certify(before, after, compare_and_hash(before, after, n_threads), tol, n_threads, max_leak);
}

namespace {
// The open blocks of an expansion of P by m states: P's own, then `incoming` (columns made
// absolute) when given.  Built before any copy so a bad block costs nothing.
std::vector<OpenBlock> grown_blocks(const TransitionMatrix& P, Index m, const CsrView* incoming, double tol) {
  std::vector<OpenBlock> blocks = P.open_blocks();
  if (!incoming) return blocks;
  const Index n_old = P.n_states();
  if (incoming->n_rows != n_old) {
    std::ostringstream os;
    os << "incoming has " << incoming->n_rows << " rows; expected one per old state, n_states = " << n_old;
    throw std::invalid_argument(os.str());
  }
  const Index nnz = incoming->indptr[n_old] - incoming->indptr[0];
  if (incoming->indptr[0] < 0 || nnz < 0)
    throw std::invalid_argument("incoming indptr is not a valid row pointer array");
  std::vector<Index> indptr(static_cast<std::size_t>(n_old + 1));
  for (Index r = 0; r <= n_old; ++r) indptr[static_cast<std::size_t>(r)] = incoming->indptr[r] - incoming->indptr[0];
  std::vector<StateIndex> indices(static_cast<std::size_t>(nnz));
  std::vector<Prob> data(static_cast<std::size_t>(nnz));
  // Columns relative to the new states become absolute ids; a column outside [0, m) stays
  // outside [n_old, n_old + m) (int64 arithmetic, clamped to int32), so build() reports it.
  for (Index j = 0; j < nnz; ++j) {
    const Index c = static_cast<Index>(incoming->indices[incoming->indptr[0] + j]);
    const Index a = (c >= 0 && c < m) ? n_old + c : (c < 0 ? 0 : std::numeric_limits<StateIndex>::max());
    indices[static_cast<std::size_t>(j)] = static_cast<StateIndex>(a);
    data[static_cast<std::size_t>(j)] = incoming->data[incoming->indptr[0] + j];
  }
  blocks.push_back(
      OpenBlock::build(n_old, m, std::move(indptr), std::move(indices), std::move(data), nullptr, tol, "incoming"));
  return blocks;
}
}  // namespace

Expansion expand(const TransitionMatrix& P, const CsrView& new_rows, double tol, int n_threads, const CsrView* incoming,
                 double max_leak) {
  check_max_leak(max_leak);
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
  std::vector<OpenBlock> blocks = grown_blocks(P, m, incoming, tol);

  const Index nnz_old = P.nnz(), nnz_all = nnz_old + nnz_new;
  if (auto ext = P.try_extend(m, nnz_new)) {
    // In place: the new rows go into P's spare capacity; nothing old is copied or touched.
    for (Index r = 1; r <= m; ++r) ext->indptr[n_old + r] = nnz_old + new_rows.indptr[r];
    std::memcpy(ext->indices + nnz_old, new_rows.indices, sizeof(StateIndex) * static_cast<std::size_t>(nnz_new));
    std::memcpy(ext->data + nnz_old, new_rows.data, sizeof(Prob) * static_cast<std::size_t>(nnz_new));
    detail::compute_tails(CsrView{m, ext->indptr + n_old, ext->indices, ext->data}, ext->tail + n_old, n_threads);
    TransitionMatrix Q = P.extended(std::move(*ext), m).with_open_blocks(std::move(blocks));
    ExpansionCertificate cert = certify(P, Q, compare_and_hash(P, Q, n_threads), tol, n_threads, max_leak);
    return Expansion{std::move(Q), std::move(cert)};
  }
  // Copy path (P's storage is borrowed, full, or held by a longer live matrix):
  // uninitialised buffers, with spare capacity again so that expanding Q later is
  // in place; each old chunk is copied, compared with its source and hashed while
  // hot in cache, so the old bytes are read from memory once and the
  // certificate's byte comparison and fingerprints cost no extra pass.
  using detail::Buffer;
  const auto [spare_rows, spare_nnz] = TransitionMatrix::headroom(n_old + m, nnz_all);
  auto indptr = Buffer<Index>::uninitialized(static_cast<std::size_t>(n_old + m + 1 + spare_rows));
  auto tail = Buffer<double>::uninitialized(static_cast<std::size_t>(n_old + m + spare_rows));
  auto indices = Buffer<StateIndex>::uninitialized(static_cast<std::size_t>(nnz_all + spare_nnz));
  auto data = Buffer<Prob>::uninitialized(static_cast<std::size_t>(nnz_all + spare_nnz));
  const auto old = P.array_layout(n_old);
  void* dst[4] = {indptr.data(), tail.data(), indices.data(), data.data()};
  const std::size_t full[4] = {
      sizeof(Index) * static_cast<std::size_t>(n_old + m + 1), sizeof(double) * static_cast<std::size_t>(n_old + m),
      sizeof(StateIndex) * static_cast<std::size_t>(nnz_all), sizeof(Prob) * static_cast<std::size_t>(nnz_all)};
  BlockEvidence ev;
  for (int i = 0; i < 4; ++i) {
    const std::size_t pre = old.full_bytes[i];
    // Whole chunks inside the old block now; the chunk straddling old and new bytes after the new rows land.
    process_chunks(ev.arrays[i], dst[i], old.ptr[i], pre, full[i], pre, 0, n_chunks(pre), PrefixMode::kCopyAndCompare,
                   n_threads);
  }
  for (Index r = 1; r <= m; ++r) indptr[static_cast<std::size_t>(n_old + r)] = nnz_old + new_rows.indptr[r];
  std::memcpy(indices.data() + nnz_old, new_rows.indices, sizeof(StateIndex) * static_cast<std::size_t>(nnz_new));
  std::memcpy(data.data() + nnz_old, new_rows.data, sizeof(Prob) * static_cast<std::size_t>(nnz_new));
  CsrView added{m, indptr.data() + n_old, indices.data(), data.data()};
  detail::compute_tails(added, tail.data() + n_old, n_threads);
  for (int i = 0; i < 4; ++i) {
    const std::size_t pre = old.full_bytes[i];
    const std::size_t first = pre / kHashChunk;  // the straddling (or first new) chunk
    process_chunks(ev.arrays[i], dst[i], nullptr, pre, full[i], full[i], first, n_chunks(full[i]),
                   PrefixMode::kHashOnly, n_threads);
  }
  TransitionMatrix Q = TransitionMatrix::adopt_buffers(n_old + m, P.n_base(), std::move(indptr), std::move(indices),
                                                       std::move(data), std::move(tail))
                           .with_open_blocks(std::move(blocks));
  ExpansionCertificate cert = certify(P, Q, ev, tol, n_threads, max_leak);
  return Expansion{std::move(Q), std::move(cert)};
}

}  // namespace markovmem
