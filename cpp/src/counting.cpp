// count_transitions: bigram counts to a TransitionMatrix in O(n_tokens + nnz),
// with one read of the tokens and no sort.
//
//   1. A sample of the transitions estimates how many each source row has; the
//      rows are cut into buckets of consecutive rows: about kTargetBuckets of
//      them with the same number of transitions, and a frequent row alone.
//   2. One pass over the tokens checks the ids and scatters every transition
//      (a, b), packed into one integer (a's position in its bucket, then b; just
//      b, in 16 bits when it fits, in a one-row bucket), into its bucket's
//      chunks.  The active chunks are few and close together, so this runs at
//      memory speed.
//   3. Per bucket (in parallel), the transitions are grouped by row in a
//      thread-local buffer that stays in cache (a one-row bucket needs no
//      grouping), counted with a dense per-thread counter and emitted in column
//      order: a two-level bitmap of the touched columns, a sort for short rows, a
//      scan of the counter for rows about as long as the vocabulary.  Thread 0
//      takes buckets from the front and writes straight into the final arrays;
//      the others take them from the back and copy their entries in at the end.
// Counts are integers and every row is emitted in column order, so the result
// is the same bit for bit whatever the thread count or the scatter order.
#include "markovmem/counting.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <utility>
#include <vector>

#ifdef MARKOVMEM_HAVE_OPENMP
#include <omp.h>
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#endif

namespace markovmem {
namespace {

/// About this many buckets of consecutive rows share the transitions (a bucket is
/// grouped by row in cache) ...
constexpr Index kTargetBuckets = 64;
/// ... and a row with more than 1/kSolo of a bucket's share gets a bucket of its
/// own: it needs no grouping, and its codes are just the successors.
constexpr Index kSolo = 64;
/// Tokens per block of the id check (branch-free per block, a search only in a failing one).
constexpr Index kBlock = 4096;
/// Bytes per chunk of a bucket's storage.
constexpr std::size_t kChunkBytes = 4096;
#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
constexpr bool kLittleEndian = false;
#else
constexpr bool kLittleEndian = true;
#endif
/// About this many transitions are sampled to place the bucket boundaries.
constexpr Index kSample = Index{1} << 20;

inline int thread_num() noexcept {
#ifdef MARKOVMEM_HAVE_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int team_size() noexcept {
#ifdef MARKOVMEM_HAVE_OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

inline int ctz64(std::uint64_t x) noexcept {  // x != 0
#if defined(_MSC_VER) && !defined(__clang__)
  unsigned long i;
  _BitScanForward64(&i, x);
  return static_cast<int>(i);
#else
  return __builtin_ctzll(x);
#endif
}

/// Smallest b with 2^b >= n (n >= 1).
inline int bits_for(Index n) noexcept {
  int b = 0;
  while ((Index{1} << b) < n) ++b;
  return b;
}

/// Calls f(b, e) for every maximal run [b, e) of transition starts (i with
/// tokens[i] -> tokens[i + 1] inside one sequence) with lo <= i < hi.
template <class F>
inline void for_each_run(const Index* offsets, Index n_seq, Index lo, Index hi, F&& f) {
  Index s = static_cast<Index>(std::upper_bound(offsets, offsets + n_seq + 1, lo) - offsets) - 1;
  if (s < 0) s = 0;
  for (; s < n_seq && offsets[s] < hi; ++s) {
    const Index b = std::max(lo, offsets[s]), e = std::min(hi, offsets[s + 1] - 1);
    if (b < e) f(b, e);
  }
}

/// A piece of a bucket's transitions: size codes of the bucket's width.
struct Segment {
  const unsigned char* data;
  Index size;
};

/// The T at p (any alignment, any storage).
template <class T>
inline T load(const unsigned char* p) noexcept {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

/// Per-thread dense counter over the columns; all zero between rows.
template <class Count>
class RowCounter {
 public:
  explicit RowCounter(Index n_states)
      : n_states_(n_states),
        n_words_((n_states + 63) / 64),
        n_summary_((n_words_ + 63) / 64),
        short_row_(std::max<Index>(32, n_summary_ / 4)),
        long_row_(std::max(short_row_, n_states / 2)),
        counter_(static_cast<std::size_t>(n_states), 0),
        lvl0_(static_cast<std::size_t>(n_words_), 0),
        lvl1_(static_cast<std::size_t>(n_summary_), 0),
        counts_(static_cast<std::size_t>(n_states)) {}

  /// Counts the len >= 1 successors of one row, which each_x(f) passes to f one by
  /// one, and calls emit(j, x, count) for the distinct successors x in increasing
  /// order, j = 0, 1, ...; returns their number t.  May also call emit(t, x, 0)
  /// (slot t must exist; it is overwritten by the next row or unused).
  template <class EachX, class Emit>
  Index count(EachX&& each_x, Index len, Emit&& emit) {
    Count* const counter = counter_.data();
    Index t = 0;
    if (len < short_row_) {
      touched_.clear();
      each_x([&](std::uint32_t x) {
        if (counter[x]++ == 0) touched_.push_back(static_cast<StateIndex>(x));
      });
      std::sort(touched_.begin(), touched_.end());
      for (const StateIndex x : touched_) {
        emit(t++, x, counter[x]);
        counter[x] = 0;
      }
    } else if (len < long_row_) {
      std::uint64_t* const lvl0 = lvl0_.data();
      std::uint64_t* const lvl1 = lvl1_.data();
      each_x([&](std::uint32_t x) {
        ++counter[x];
        lvl0[x >> 6] |= std::uint64_t{1} << (x & 63);
        lvl1[x >> 12] |= std::uint64_t{1} << ((x >> 6) & 63);
      });
      for (Index s = 0; s < n_summary_; ++s) {
        std::uint64_t sw = lvl1[s];
        if (!sw) continue;
        lvl1[s] = 0;
        do {
          const Index wi = s * 64 + ctz64(sw);
          sw &= sw - 1;
          std::uint64_t bits = lvl0[wi];
          lvl0[wi] = 0;
          do {
            const Index x = wi * 64 + ctz64(bits);
            bits &= bits - 1;
            emit(t++, static_cast<StateIndex>(x), counter[x]);
            counter[x] = 0;
          } while (bits);
        } while (sw);
      }
    } else {
      each_x([&](std::uint32_t x) { ++counter[x]; });
      for (Index x = 0; x < n_states_; ++x) {  // branch-free: a zero entry is overwritten by the next
        const Count cx = counter[x];
        emit(t, static_cast<StateIndex>(x), cx);
        t += cx != 0;
        counter[x] = 0;
      }
    }
    return t;
  }

  /// Keeps the top_k largest counts of ids/counts[0, t) (ties: smaller id), in column order.
  Index keep_top(StateIndex* ids, Count* counts, Index t, Index top_k) {
    order_.clear();
    for (Index j = 0; j < t; ++j) order_.emplace_back(counts[j], ids[j]);
    std::nth_element(order_.begin(), order_.begin() + top_k, order_.end(), [](const auto& p, const auto& q) {
      return p.first != q.first ? p.first > q.first : p.second < q.second;
    });
    order_.resize(static_cast<std::size_t>(top_k));
    std::sort(order_.begin(), order_.end(), [](const auto& p, const auto& q) { return p.second < q.second; });
    for (Index j = 0; j < top_k; ++j) {
      ids[j] = order_[static_cast<std::size_t>(j)].second;
      counts[j] = order_[static_cast<std::size_t>(j)].first;
    }
    return top_k;
  }

  /// Room for one row's counts.
  Count* counts() noexcept { return counts_.data(); }

 private:
  Index n_states_, n_words_, n_summary_, short_row_, long_row_;
  std::vector<Count> counter_;
  std::vector<std::uint64_t> lvl0_;  // bit x: column x touched
  std::vector<std::uint64_t> lvl1_;  // bit w: lvl0_[w] != 0
  std::vector<Count> counts_;
  std::vector<StateIndex> touched_;
  std::vector<std::pair<Count, StateIndex>> order_;
};

/// Where one bucket's entries (its rows' entries end to end) were written, if not in place.
struct BucketOut {
  const StateIndex* idx = nullptr;
  const Prob* val = nullptr;
  Index nnz = 0;
};

[[noreturn]] void throw_bad_token(const std::int32_t* tokens, Index bad, const Index* offsets, Index n_seq,
                                  Index n_states) {
  const Index s = std::upper_bound(offsets, offsets + n_seq + 1, bad) - offsets - 1;
  std::ostringstream os;
  if (s >= 0 && s < n_seq)
    os << "sequence " << s << " position " << bad - offsets[s] << ": token " << tokens[bad];
  else
    os << "token at position " << bad << " (outside every sequence) is " << tokens[bad] << ",";
  os << " is out of range [0, n_states = " << n_states << ")";
  throw std::out_of_range(os.str());
}

template <class Code, class Count, class Local>
TransitionMatrix count_impl(const std::int32_t* tokens, Index n_tokens, const Index* offsets, Index n_seq,
                            Index n_states, Index n_pairs, const CountOptions& opts, int nt) {
  // Code: (a - first row of a's bucket) << b_bits | b.  A bucket of one row (code b)
  // stores it in solo_width bytes, the others in sizeof(Code): the scatter writes
  // sizeof(Code) bytes and advances by the width (little-endian keeps the low bytes).
  const int b_bits = bits_for(n_states);
  const int fine_bits = static_cast<int>(8 * sizeof(Code)) - b_bits;
  const Index max_rows = fine_bits >= 40 ? n_states : std::min(n_states, Index{1} << fine_bits);
  const Code b_mask = static_cast<Code>((Code{1} << b_bits) - 1);  // b_bits <= 31
  const double target = static_cast<double>(std::max<Index>(n_pairs / kTargetBuckets, Index{1} << 15));
  const auto V = static_cast<std::size_t>(n_states);
  const auto un = static_cast<std::uint32_t>(n_states);  // n_states <= kMaxStates
  const Index stride = std::max<Index>(1, n_pairs / kSample);  // sample every stride-th block

  // 1 + 2 in one region; thread t handles tokens [lo_t, hi_t).  Chunks come from one
  // pool, kChunkBytes-aligned: a bucket's last chunk of each thread is partly used, the
  // others are full.
  const std::size_t solo_width = kLittleEndian && b_bits <= 16 ? 2 : kLittleEndian ? 4 : sizeof(Code);
  // Codes of width w a chunk holds: written while sizeof(Code) bytes still fit.
  const auto per_chunk = [](std::size_t w) { return static_cast<Index>((kChunkBytes - sizeof(Code)) / w + 1); };
  detail::Buffer<unsigned char> pool;
  unsigned char* pool_start = nullptr;
  std::atomic<Index> pool_next{0};
  struct ChunkRec {
    unsigned char* data;
    std::size_t bucket;
  };
  std::vector<std::vector<ChunkRec>> chunks(static_cast<std::size_t>(nt));
  std::vector<unsigned char*> cursors(static_cast<std::size_t>(nt) * V);  // next free byte, per thread and bucket
  std::vector<Count> sample(static_cast<std::size_t>(nt) * V, 0);
  std::vector<Index> first_bad(static_cast<std::size_t>(nt), n_tokens);
  std::vector<std::uint64_t> place(V);  // row v: bucket << 36 | width << 32 | (v - first row of the bucket)
  std::vector<Index> bfirst;            // first row of each bucket, then n_states
  bfirst.reserve(V + 1);
  int team_used = 1;
  detail::ExceptionCollector alloc_error;
#pragma omp parallel num_threads(nt)
  {
    const int t = thread_num(), team = team_size();
    const auto ut = static_cast<std::size_t>(t);
    const Index lo = n_tokens * t / team, hi = n_tokens * (t + 1) / team;
    Count* const h = sample.data() + ut * V;
    for (Index b = lo; b < hi; b += stride * kBlock)
      for_each_run(offsets, n_seq, b, std::min(hi, b + kBlock), [&](Index rb, Index re) {
        for (Index i = rb; i < re; ++i) {
          const auto a = static_cast<std::uint32_t>(tokens[i]);
          if (a < un) ++h[a];  // ids are checked below
        }
      });
#pragma omp barrier
#pragma omp single
    {
      team_used = team;
      for (int u = 1; u < team; ++u)
        for (std::size_t v = 0; v < V; ++v) sample[v] += sample[static_cast<std::size_t>(u) * V + v];
      double sampled = 0;
      for (std::size_t v = 0; v < V; ++v) sampled += static_cast<double>(sample[v]);
      const double scale = sampled > 0 ? static_cast<double>(n_pairs) / sampled : 0.0;
      // Buckets of consecutive rows, each closed before the row that would take it
      // past `target` (estimated) pairs, or past max_rows rows; a long row is alone.
      double in_bucket = 0;
      Index rows = 0;
      bool alone = false;
      for (Index v = 0; v < n_states; ++v) {
        const double len = scale * static_cast<double>(sample[static_cast<std::size_t>(v)]);
        const bool long_row = len >= target / kSolo;
        if (rows > 0 && (in_bucket + len > target || rows == max_rows || long_row || alone)) in_bucket = 0, rows = 0;
        alone = long_row;
        if (rows == 0) bfirst.push_back(v);
        in_bucket += len;
        ++rows;
      }
      bfirst.push_back(n_states);
      for (std::size_t c = 0; c + 1 < bfirst.size(); ++c) {
        const Index r0 = bfirst[c], r1 = bfirst[c + 1];
        const std::uint64_t w = r1 - r0 == 1 ? solo_width : sizeof(Code);
        for (Index v = r0; v < r1; ++v)
          place[static_cast<std::size_t>(v)] =
              static_cast<std::uint64_t>(c) << 36 | w << 32 | static_cast<std::uint64_t>(v - r0);
      }
      const auto nb = static_cast<Index>(bfirst.size()) - 1;
      const Index pool_chunks = n_pairs / per_chunk(sizeof(Code)) + team * (nb + 1) + 1;
      alloc_error.run([&] {
        pool = detail::Buffer<unsigned char>::uninitialized(static_cast<std::size_t>(pool_chunks) * kChunkBytes);
        for (int u = 0; u < team; ++u)
          chunks[static_cast<std::size_t>(u)].reserve(static_cast<std::size_t>(pool_chunks));
        pool_start = reinterpret_cast<unsigned char*>(
            (reinterpret_cast<std::uintptr_t>(pool.data()) + kChunkBytes - 1) & ~(kChunkBytes - 1));
      });
    }  // implicit barrier
    if (pool_start) {  // else the pool could not be allocated
      const auto nb = static_cast<std::size_t>(bfirst.size() - 1);
      auto& mine = chunks[ut];
      unsigned char** const cur = cursors.data() + ut * V;
      auto new_chunk = [&](std::size_t c) {
        unsigned char* const p =
            pool_start + static_cast<std::size_t>(pool_next.fetch_add(1, std::memory_order_relaxed)) * kChunkBytes;
        mine.push_back({p, c});
        return p;
      };
      for (std::size_t c = 0; c < nb; ++c) cur[c] = new_chunk(c);
      const std::uint64_t* const pl = place.data();
      for (Index b = lo; b < hi; b += kBlock) {
        const Index e = std::min(hi, b + kBlock);
        unsigned any = 0;
        for (Index i = b; i < e; ++i) any |= static_cast<unsigned>(static_cast<std::uint32_t>(tokens[i]) >= un);
        if (any) {
          Index i = b;
          while (static_cast<std::uint32_t>(tokens[i]) < un) ++i;
          first_bad[ut] = i;
          break;
        }
        // tokens[e] may not be checked yet: it is only stored, and a bad id stops everything.
        for_each_run(offsets, n_seq, b, e, [&](Index rb, Index re) {
          for (Index i = rb; i < re; ++i) {
            const std::uint64_t p = pl[tokens[i]];
            const auto c = static_cast<std::size_t>(p >> 36);
            unsigned char* w = cur[c];
            const Code code = static_cast<Code>(static_cast<Code>(static_cast<std::uint32_t>(p)) << b_bits) |
                              static_cast<Code>(static_cast<std::uint32_t>(tokens[i + 1]));
            std::memcpy(w, &code, sizeof(Code));
            w += (p >> 32) & 15;
            // Full when sizeof(Code) more bytes do not fit before the chunk's end (or w is at it).
            if (((reinterpret_cast<std::uintptr_t>(w) - 1) & (kChunkBytes - 1)) >= kChunkBytes - sizeof(Code))
              w = new_chunk(c);
            cur[c] = w;
          }
        });
      }
    }
  }
  alloc_error.rethrow();
  Index bad = n_tokens;
  for (const Index b : first_bad) bad = std::min(bad, b);
  if (bad < n_tokens) throw_bad_token(tokens, bad, offsets, n_seq, n_states);
  sample = std::vector<Count>();
  place = std::vector<std::uint64_t>();
  const auto n_buckets = static_cast<Index>(bfirst.size()) - 1;

  // Each bucket's pieces: a chunk is full unless its thread's cursor of the bucket is in it.
  std::vector<std::vector<Segment>> segments(static_cast<std::size_t>(n_buckets));
  std::vector<Index> bucket_size(static_cast<std::size_t>(n_buckets), 0);
  for (int u = 0; u < team_used; ++u) {
    const auto uu = static_cast<std::size_t>(u);
    for (const ChunkRec& r : chunks[uu]) {
      const unsigned char* c = cursors[uu * V + r.bucket];
      const std::size_t w = bfirst[r.bucket + 1] - bfirst[r.bucket] == 1 ? solo_width : sizeof(Code);
      const Index n = c >= r.data && c < r.data + kChunkBytes
                          ? static_cast<Index>(static_cast<std::size_t>(c - r.data) / w)
                          : per_chunk(w);
      if (n == 0) continue;
      segments[r.bucket].push_back({r.data, n});
      bucket_size[r.bucket] += n;
    }
  }
  chunks = std::vector<std::vector<ChunkRec>>();
  cursors = std::vector<unsigned char*>();

  // 3. Per bucket: group by row, count, emit.  Thread 0 takes buckets from the
  //    front in row order and writes straight into the final arrays (its offsets
  //    are running sums); the others take them from the back and write into their
  //    own arenas, copied into place at the end.  The final arrays are sized for
  //    the worst case (n_pairs entries): address space only, the pages past the
  //    nnz written are never touched.
  Index max_local = 1;
  for (Index c = 0; c < n_buckets; ++c)
    if (bfirst[static_cast<std::size_t>(c + 1)] - bfirst[static_cast<std::size_t>(c)] > 1)
      max_local = std::max(max_local, bucket_size[static_cast<std::size_t>(c)]);
  const Index spare_rows = TransitionMatrix::headroom(n_states, 0).first;
  const Index capacity = n_pairs + 1 + TransitionMatrix::headroom(n_states, n_pairs).second;  // >= nnz + headroom
  auto indptr = detail::Buffer<Index>::uninitialized(static_cast<std::size_t>(n_states + 1 + spare_rows));
  auto indices = detail::Buffer<StateIndex>::uninitialized(static_cast<std::size_t>(capacity));
  auto data = detail::Buffer<Prob>::uninitialized(static_cast<std::size_t>(capacity));
  auto tail = detail::Buffer<double>::uninitialized(static_cast<std::size_t>(n_states + spare_rows));
  double* const tails = tail.data();
  indptr[0] = 0;
  Index* const row_end = indptr.data() + 1;  // row v's nnz goes to indptr[v + 1], prefix-summed below
  std::vector<BucketOut> bout(static_cast<std::size_t>(n_buckets));
  std::vector<RowCounter<Count>> counters;
  std::vector<std::unique_ptr<Local[]>> locals;
  std::vector<std::vector<Index>> scratch(static_cast<std::size_t>(nt));
  std::vector<detail::Buffer<StateIndex>> arena_idx(static_cast<std::size_t>(nt));
  std::vector<detail::Buffer<Prob>> arena_val(static_cast<std::size_t>(nt));
  std::vector<Index> fills(static_cast<std::size_t>(nt), 0);
  for (int u = 0; u < nt; ++u) {
    counters.emplace_back(n_states);
    locals.emplace_back(new Local[static_cast<std::size_t>(max_local)]);
    if (u > 0) {  // address space only, like the final arrays
      arena_idx[static_cast<std::size_t>(u)] =
          detail::Buffer<StateIndex>::uninitialized(static_cast<std::size_t>(n_pairs + 1));
      arena_val[static_cast<std::size_t>(u)] =
          detail::Buffer<Prob>::uninitialized(static_cast<std::size_t>(n_pairs + 1));
    }
  }
  const Index top_k = opts.top_k;
  const double a = opts.smoothing, an = opts.smoothing * static_cast<double>(n_states);
  Index next_front = 0, next_back = n_buckets - 1;
  detail::ExceptionCollector errors;
#pragma omp parallel num_threads(nt)
  {
    const int t = thread_num();
    const auto ut = static_cast<std::size_t>(t);
    RowCounter<Count>& rc = counters[ut];
    Local* const local = locals[ut].get();
    StateIndex* const base_idx = t == 0 ? indices.data() : arena_idx[ut].data();
    Prob* const base_val = t == 0 ? data.data() : arena_val[ut].data();
    Index& fill = fills[ut];
    for (;;) {
      Index take = -1;
#pragma omp critical(markovmem_count_take)
      if (next_front <= next_back) take = t == 0 ? next_front++ : next_back--;
      if (take < 0) break;
      errors.run([&] {
        const auto c = static_cast<std::size_t>(take);
        const Index r0 = bfirst[c], n_rows = bfirst[c + 1] - r0;
        const auto& segs = segments[c];
        StateIndex* const out_idx = base_idx + fill;
        Prob* const out_val = base_val + fill;
        Index pos = 0;  // at most the bucket's pairs, and one more slot may be written (see RowCounter::count)
        // Row v: len successors, passed one by one by each_x -> its entries at pos.
        auto do_row = [&](Index v, auto&& each_x, Index len) {
          Index nz = 0;
          StateIndex* const ids = out_idx + pos;
          Prob* const vals = out_val + pos;
          if (len > 0) {
            Count* const counts = rc.counts();
            nz = rc.count(each_x, len, [&](Index j, StateIndex x, Count n) {
              ids[j] = x;
              counts[j] = n;
            });
            if (top_k > 0 && nz > top_k) nz = rc.keep_top(ids, counts, nz, top_k);
            const double denom = static_cast<double>(len) + an;
            for (Index j = 0; j < nz; ++j) vals[j] = static_cast<Prob>((static_cast<double>(counts[j]) + a) / denom);
          }
          // The tail exactly as detail::compute_tails (from_csr) computes it: the
          // stored values summed in column order in double, max(0, 1 - sum).
          double sum = 0.0;
          for (Index j = 0; j < nz; ++j) sum += vals[j];
          tails[v] = sum < 1.0 ? 1.0 - sum : 0.0;
          row_end[v] = nz;
          pos += nz;
        };
        if (n_rows == 1) {
          // The code of a single-row bucket is the successor itself.
          if (solo_width == 2)
            do_row(
                r0,
                [&](auto&& f) {
                  for (const auto& sg : segs)
                    for (Index j = 0; j < sg.size; ++j)
                      f(static_cast<std::uint32_t>(load<std::uint16_t>(sg.data + 2 * j)));
                },
                bucket_size[c]);
          else if (solo_width == 4)
            do_row(
                r0,
                [&](auto&& f) {
                  for (const auto& sg : segs)
                    for (Index j = 0; j < sg.size; ++j) f(load<std::uint32_t>(sg.data + 4 * j));
                },
                bucket_size[c]);
          else
            do_row(
                r0,
                [&](auto&& f) {
                  for (const auto& sg : segs)
                    for (Index j = 0; j < sg.size; ++j)
                      f(static_cast<std::uint32_t>(load<Code>(sg.data + sizeof(Code) * j)));
                },
                bucket_size[c]);
        } else {
          // Group by row: a counting sort.  Two independent chains of counter updates,
          // so a row that dominates the bucket does not serialise the loops: even and
          // odd positions are counted apart; the first half of each piece fills each
          // row from its start, the second half from its end (order inside a row is free).
          auto& sc = scratch[ut];
          sc.assign(4 * static_cast<std::size_t>(n_rows), 0);
          Index* const h0 = sc.data();
          Index* const h1 = h0 + n_rows;
          Index* const head = h1 + n_rows;
          Index* const back = head + n_rows;
          for (const auto& sg : segs) {
            const Index even = sg.size & ~Index{1};
            const unsigned char* const d = sg.data;
            for (Index j = 0; j < even; j += 2) {
              ++h0[load<Code>(d + sizeof(Code) * j) >> b_bits];
              ++h1[load<Code>(d + sizeof(Code) * (j + 1)) >> b_bits];
            }
            if (sg.size & 1) ++h0[load<Code>(d + sizeof(Code) * even) >> b_bits];
          }
          for (Index r = 0, s = 0; r < n_rows; ++r) {
            h0[r] += h1[r];  // the row's length
            head[r] = s;
            s += h0[r];
            back[r] = s;
          }
          for (const auto& sg : segs) {
            const Index half = sg.size / 2;
            const unsigned char* const in = sg.data;
            const unsigned char* const in2 = in + sizeof(Code) * half;
            for (Index j = 0; j < half; ++j) {
              const Code p = load<Code>(in + sizeof(Code) * j), q = load<Code>(in2 + sizeof(Code) * j);
              local[head[p >> b_bits]++] = static_cast<Local>(p & b_mask);
              local[--back[q >> b_bits]] = static_cast<Local>(q & b_mask);
            }
            if (sg.size & 1) {
              const Code q = load<Code>(in + sizeof(Code) * (sg.size - 1));
              local[--back[q >> b_bits]] = static_cast<Local>(q & b_mask);
            }
          }
          for (Index r = 0, s = 0; r < n_rows; ++r) {
            const Index len = h0[r];
            const Local* const xs = local + s;
            do_row(
                r0 + r,
                [&](auto&& f) {
                  for (Index j = 0; j < len; ++j) f(static_cast<std::uint32_t>(xs[j]));
                },
                len);
            s += len;
          }
        }
        bout[c] = BucketOut{t == 0 ? nullptr : out_idx, t == 0 ? nullptr : out_val, pos};
        fill += pos;
      });
    }
  }
  errors.rethrow();
  pool = detail::Buffer<unsigned char>();
  counters.clear();
  locals.clear();

  // 4. Row pointers, the back buckets' entries into place.
  for (Index v = 0; v < n_states; ++v) row_end[v] += row_end[v - 1];
  const long long n_back = n_buckets - next_front;  // buckets next_front .. n_buckets - 1
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (n_back > 1)
  for (long long k = 0; k < n_back; ++k) {
    const auto c = static_cast<std::size_t>(next_front + k);
    const BucketOut& o = bout[c];
    const Index at = indptr[static_cast<std::size_t>(bfirst[c])];
    if (o.nnz) {
      std::memcpy(indices.data() + at, o.idx, static_cast<std::size_t>(o.nnz) * sizeof(StateIndex));
      std::memcpy(data.data() + at, o.val, static_cast<std::size_t>(o.nnz) * sizeof(Prob));
    }
  }
  arena_idx.clear();
  arena_val.clear();
  // Valid by construction, so no check pass: columns are emitted strictly
  // increasing and in [0, n_states); values are float32((c + a) / (c_v + a n))
  // with the kept counts c summing to at most c_v, so they are finite, >= 0 and
  // sum to 1 up to float32 rounding; tails are computed as from_csr does.
  return TransitionMatrix::adopt_buffers(n_states, n_states, std::move(indptr), std::move(indices), std::move(data),
                                         std::move(tail));
}

}  // namespace

TransitionMatrix count_transitions(const std::int32_t* tokens, Index n_tokens, const Index* offsets, Index n_seq,
                                   Index n_states, const CountOptions& opts) {
  check_sizes(n_states, n_states);
  if (opts.top_k < 0) throw std::invalid_argument("top_k must be >= 0 (0 keeps every count)");
  if (!(opts.smoothing >= 0.0) || !std::isfinite(opts.smoothing))
    throw std::invalid_argument("smoothing must be a finite number >= 0");
  if (n_seq < 0) throw std::invalid_argument("negative number of sequences");
  if (offsets[0] < 0) throw std::invalid_argument("offsets[0] must be >= 0");
  Index n_pairs = 0;
  for (Index s = 0; s < n_seq; ++s) {
    if (offsets[s + 1] < offsets[s] || offsets[s + 1] > n_tokens) {
      std::ostringstream os;
      os << "offsets[" << s + 1 << "] = " << offsets[s + 1] << " is not within [offsets[" << s
         << "], n_tokens = " << n_tokens << "]";
      throw std::invalid_argument(os.str());
    }
    n_pairs += std::max<Index>(0, offsets[s + 1] - offsets[s] - 1);
  }
  // A parallel region costs more than it saves on small inputs.
  const int nt = n_tokens + n_states < (Index{1} << 16) ? 1 : detail::resolve_threads(opts.n_threads);
  // 32-bit codes when a bucket may span enough rows ((32 - b_bits) bits for the row in its bucket).
  const int b_bits = bits_for(n_states);
  const bool wide_code = (n_states >> (32 - b_bits)) > 256;
  const bool wide_count = n_pairs > static_cast<Index>(std::numeric_limits<std::uint32_t>::max());
  // Successors grouped by row take 16 bits each when the ids fit.
  const bool wide_local = b_bits > 16;
  const auto run = [&](auto code, auto count, auto local) {
    return count_impl<decltype(code), decltype(count), decltype(local)>(tokens, n_tokens, offsets, n_seq, n_states,
                                                                        n_pairs, opts, nt);
  };
  using u16 = std::uint16_t;
  using u32 = std::uint32_t;
  using u64 = std::uint64_t;
  if (wide_code) return wide_count ? run(u64{}, u64{}, u32{}) : run(u64{}, u32{}, u32{});
  if (wide_local) return wide_count ? run(u32{}, u64{}, u32{}) : run(u32{}, u32{}, u32{});
  return wide_count ? run(u32{}, u64{}, u16{}) : run(u32{}, u32{}, u16{});
}

}  // namespace markovmem
