// TransitionMatrix: an immutable sparse Markov transition matrix in CSR form
// (int64 row pointers, sorted int32 columns, float32 probabilities) plus one
// float64 tail mass per row, spread uniformly over the base states a row does
// not store (DESIGN §1).  Buffers are either owned or borrowed from a mapping.
#pragma once

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <array>
#include <functional>
#include <map>

#include "markovmem/buffer.hpp"
#include "markovmem/common.hpp"
#include "markovmem/hash.hpp"

namespace markovmem {

/// Non-owning view of a block of CSR rows (indptr[0] == 0, indptr has n_rows + 1 entries).
struct CsrView {
  Index n_rows = 0;
  const Index* indptr = nullptr;
  const StateIndex* indices = nullptr;
  const Prob* data = nullptr;
  Index nnz() const noexcept { return n_rows > 0 || indptr ? indptr[n_rows] : 0; }
};

/// The first row that breaks an invariant, and why.
struct Violation {
  Index row = -1;
  std::string reason;
};

/// What check_rows examines.
struct CheckOptions {
  bool values = true;         ///< finite, non-negative, row sum <= 1 + tol
  bool tail = true;           ///< stored tail equals max(0, 1 - row sum) within tol
  double tol = kRowSumTolerance;
  int n_threads = 0;
  const char* label = "row";  ///< how messages name a row ("row", "new row")
  Index first_row = 0;        ///< check rows [first_row, n_rows) only
};

/// Scans rows for the first broken invariant.  Structure is always checked
/// (indptr monotone and within nnz; columns sorted, unique, in [0, n_states)
/// and below n_base).  tail may be null when opts.tail is false.
/// O(nnz), parallel over rows; the row reported is the smallest offending one
/// whatever the thread count.  Never reads outside [indptr[0], indptr[n_rows]).
std::optional<Violation> check_rows(const CsrView& rows, const double* tail, Index nnz_capacity, Index n_states,
                                    Index n_base, const CheckOptions& opts);

/// One old->new block of an open expansion (DESIGN §1, "Open expansion").  The n_rows
/// states that existed before it may move to the m states it added, columns
/// [n_rows, n_rows + m): row v's entries are the true probabilities p~(c | v), leak[v]
/// their sum (in [0, 1)), and every other transition of row v is scaled by 1 - leak[v].
/// Column ids are absolute state ids.  Immutable once built; `owner` keeps the arrays alive.
struct OpenBlock {
  Index n_rows = 0;
  Index m = 0;
  const Index* indptr = nullptr;        ///< n_rows + 1 entries, indptr[0] == 0
  const StateIndex* indices = nullptr;  ///< sorted per row, in [n_rows, n_rows + m)
  const Prob* data = nullptr;
  const double* leak = nullptr;  ///< n_rows entries: the row sums, computed in double
  std::shared_ptr<const void> owner;

  Index nnz() const noexcept { return indptr[n_rows]; }
  /// The entry of row v (< n_rows) at column c, 0 when not stored.  O(log k).
  double entry(Index v, Index c) const noexcept;
  /// Bytes of the four arrays.
  Index storage_bytes() const noexcept;
  /// Appends (n_rows, m, nnz, XXH64 of each array) to a fingerprint's parts.
  void append_hashes(std::vector<std::uint64_t>& out) const;

  /// An owning block from absolute-column CSR arrays.  Checks indptr (starts at 0,
  /// non-decreasing, ends at indices.size()), columns (sorted, unique, in
  /// [n_rows, n_rows + m)), values (finite, >= 0) and row sums (< 1); computes the
  /// leak, or checks a given one equals the row sum within tol.  Throws
  /// InvariantViolation naming `label`, the row and the column.  O(n_rows + nnz).
  static OpenBlock build(Index n_rows, Index m, std::vector<Index> indptr, std::vector<StateIndex> indices,
                         std::vector<Prob> data, const double* leak, double tol, const std::string& label);
};

/// Immutable transition matrix.  Copies share storage (cheap); every method is
/// const and safe to call from several threads at once.
class TransitionMatrix {
 public:
  /// Builds an owning matrix from CSR arrays, computing tail = max(0, 1 - row sum)
  /// in double.  Checks structure and values first and throws InvariantViolation
  /// (a std::invalid_argument) naming the first offending row.  O(nnz).
  static TransitionMatrix from_csr(Index n_states, Index n_base, std::vector<Index> indptr,
                                   std::vector<StateIndex> indices, std::vector<Prob> data,
                                   double tol = kRowSumTolerance, int n_threads = 0);

  /// Copies borrowed CSR arrays (caller keeps them alive during the call) into an owning matrix.
  /// The tail is computed, or copied from `tail` (n_states entries) when given, after checking
  /// it equals max(0, 1 - row sum) within tol: a matrix rebuilt from its own four arrays
  /// keeps its bytes, hence its fingerprint.
  static TransitionMatrix copy_csr(Index n_states, Index n_base, const CsrView& rows, double tol = kRowSumTolerance,
                                   int n_threads = 0, const double* tail = nullptr);

  /// Builds from dense (n_rows, k) top-k arrays (one row per state, any column
  /// order, row-major).  Sorts each row by column; rejects duplicates, ids out of
  /// [0, n_base), non-finite or negative values, rows summing above 1 + tol.
  template <class IndexT>
  static TransitionMatrix from_topk(Index n_states, Index n_base, Index k, const IndexT* indices, const Prob* probs,
                                    double tol = kRowSumTolerance, int n_threads = 0);

  /// Takes ownership of filled buffers (which may be longer than n_states rows /
  /// indptr[n_states] entries: the rest is spare capacity for in-place expansion).
  /// No checks: the caller (expand, counting) has validated every row and computed every tail.
  static TransitionMatrix adopt_buffers(Index n_states, Index n_base, detail::Buffer<Index> indptr,
                                        detail::Buffer<StateIndex> indices, detail::Buffer<Prob> data,
                                        detail::Buffer<double> tail);

  /// Views buffers owned by `owner` (e.g. a memory map) without copying.
  /// Checks structure (memory safety) always, values and tail when check_values.
  static TransitionMatrix from_buffers(Index n_states, Index n_base, Index nnz, const Index* indptr,
                                       const StateIndex* indices, const Prob* data, const double* tail,
                                       std::shared_ptr<const void> owner, bool check_values, int n_threads = 0);

  Index n_states() const noexcept { return n_states_; }
  Index n_base() const noexcept { return n_base_; }
  Index nnz() const noexcept { return indptr_[n_states_]; }
  const Index* indptr() const noexcept { return indptr_; }
  const StateIndex* indices() const noexcept { return indices_; }
  const Prob* data() const noexcept { return data_; }
  const double* tail() const noexcept { return tail_; }
  CsrView view() const noexcept { return {n_states_, indptr_, indices_, data_}; }
  /// Bytes of the four arrays.
  Index storage_bytes() const noexcept;

  /// Old->new blocks of the open expansions that made this matrix, oldest first (empty
  /// for a closed matrix).  The stored rows (indptr, indices, data, tail) are then the
  /// distributions *given* an old next state; prob() and friends give the true p~.
  const std::vector<OpenBlock>& open_blocks() const noexcept { return open_; }
  /// The same stored rows (shared) carrying `blocks` in place of this matrix's.  Checks
  /// that block k's rows are the states before it (n_rows_k >= n_base, blocks in order
  /// and disjoint: n_rows_k + m_k <= n_rows_{k+1}, the last ending at or before n_states).
  TransitionMatrix with_open_blocks(std::vector<OpenBlock> blocks) const;
  /// Per row, the total mass moved to added states by every open block:
  /// leak = eps_K + (1 - eps_K) * leak_before_K, oldest block first (one block: eps exactly).
  std::vector<double> total_leak() const;

  /// Throws std::out_of_range unless 0 <= v < n_states.
  void check_state(Index v, const char* what) const;

  /// p(x | v) with the tail rule, scaled by the open blocks (the true p~); O(log k_v + blocks).  Bounds-checked.
  double prob(Index v, Index x) const;
  /// log p(x | v), with kLogFloor in place of exact zeros.
  double log_prob(Index v, Index x) const;
  /// Vectorised prob / log_prob over n pairs.  Checks every id before the parallel loop.
  void prob_many(const Index* v, const Index* x, Index n, double* out, bool log, int n_threads) const;

  /// One step of the chain: out = dist^T P over n_states.  dist has n_states entries.
  std::vector<double> step(const double* dist, int n_threads) const;

  struct Stationary {
    std::vector<double> distribution;
    Index n_iter = 0;
    double residual = 0.0;  ///< L1 change of the last iteration
    bool converged = false;
  };
  /// Stationary distribution by power iteration on the lazy chain (I + P) / 2
  /// (same fixed points, no periodic oscillation), from the uniform distribution over base states.
  Stationary stationary(double tol, Index max_iter, int n_threads) const;

  /// Sum of log p(s[i+1] | s[i]) per sequence.  tokens holds all sequences end to end;
  /// offsets (n_seq + 1, non-decreasing, offsets[n_seq] <= n_tokens) delimits them.
  std::vector<double> log_likelihood(const std::int32_t* tokens, Index n_tokens, const Index* offsets, Index n_seq,
                                     int n_threads) const;

  /// A path of `length` states starting at `start` (included), drawn with a
  /// splitmix64 stream from `seed`: the same on every machine.
  std::vector<std::int32_t> sample(Index start, Index length, std::uint64_t seed) const;

  /// Stable content hash (16 hex digits) of the first n_rows rows (all when n_rows < 0):
  /// equal bytes give equal hashes on every machine and thread count.
  std::string fingerprint(Index n_rows = -1) const;
  /// Fingerprints of the first n_rows rows and of the whole matrix (0 <= n_rows <= n_states).
  std::pair<std::string, std::string> fingerprint_prefix_and_full(Index n_rows) const;
  /// Chunk hashes of the four arrays (whole matrix), computed once and cached;
  /// every fingerprint is assembled from them.  Thread-safe.
  const std::array<ArrayHashes, 4>& chunk_hashes() const;
  /// Stores chunk hashes the caller computed from exactly these arrays (no-op if cached).
  void seed_chunk_hashes(const std::array<ArrayHashes, 4>& hashes) const;

  /// The four arrays in fingerprint order (indptr, tail, indices, data) with the
  /// byte sizes of the first n_rows rows and of the whole matrix.
  struct ArrayLayout {
    const void* ptr[4];
    std::size_t prefix_bytes[4];
    std::size_t full_bytes[4];
  };
  ArrayLayout array_layout(Index n_rows) const noexcept;

  /// Writable spare storage right after this matrix's arrays, reserved for
  /// appending rows in place (an expansion that copies nothing old).
  struct Extension {
    Index* indptr;          ///< entries n_states + 1 .. n_states + m (absolute offsets)
    StateIndex* indices;    ///< entries nnz .. nnz + extra_nnz - 1
    Prob* data;             ///< same positions as indices
    double* tail;           ///< entries n_states .. n_states + m - 1
    std::shared_ptr<void> claim;  ///< releases the reservation when the last user is gone
  };
  /// Reserves m rows and extra_nnz entries after this matrix in its own storage,
  /// when the storage is owned, has the capacity, and no longer matrix uses it
  /// (matrices never change: bytes past this matrix's end are not part of it).
  /// Returns nothing otherwise; the caller then copies.  Thread-safe.
  std::optional<Extension> try_extend(Index m, Index extra_nnz) const;
  /// The matrix of n_states + m rows over this storage once `ext` has been filled
  /// (rows validated, tails computed by the caller).
  TransitionMatrix extended(Extension ext, Index m) const;
  /// Rows and entries of spare capacity to allocate after n_rows rows and nnz entries.
  static std::pair<Index, Index> headroom(Index n_rows, Index nnz) noexcept;

  /// Data derived from this matrix's rows (the fit's per-row constants and
  /// inverted index), built once by `make` and kept, under `key`, until this
  /// matrix and its copies are gone or clear_derived() is called.  A matrix never
  /// changes, so an entry never goes stale: every new matrix (an expansion, a
  /// load, any constructor) starts with an empty store of its own.  Thread-safe:
  /// concurrent callers of one key wait for a single `make`; `make` must not call
  /// derived() itself.
  std::shared_ptr<const void> derived(const std::string& key,
                                      const std::function<std::shared_ptr<const void>()>& make) const;
  /// The entry under `key` if it is held now, else null (never builds).
  std::shared_ptr<const void> find_derived(const std::string& key) const;
  /// Forgets every derived entry (their memory goes once no running call holds it).
  void clear_derived() const;
  /// Keys of the derived entries held now, sorted.
  std::vector<std::string> derived_keys() const;

  /// First broken invariant (structure, values, tail, open blocks) or nothing.
  std::optional<Violation> find_violation(double tol = kRowSumTolerance, int n_threads = 0, Index first_row = 0) const;

 private:
  struct Owned;
  TransitionMatrix() = default;
  static TransitionMatrix adopt(Index n_states, Index n_base, std::shared_ptr<Owned> owned);

  Index n_states_ = 0;
  Index n_base_ = 0;
  const Index* indptr_ = nullptr;
  const StateIndex* indices_ = nullptr;
  const Prob* data_ = nullptr;
  const double* tail_ = nullptr;
  double prob_unchecked(Index v, Index x) const noexcept;
  /// Appends the hashes of the open blocks lying within the first n_rows states.
  void append_open_hashes(std::vector<std::uint64_t>& parts, Index n_rows) const;

  std::vector<OpenBlock> open_;        ///< old->new blocks, oldest first
  std::shared_ptr<const void> owner_;  ///< keeps the arrays alive (Owned, or a file mapping)
  std::shared_ptr<Owned> owned_;       ///< set when the storage is ours (in-place expansion possible)
  std::shared_ptr<void> claim_;        ///< this matrix's reservation of its storage, if extended
  struct HashCache {
    std::mutex mutex;
    bool set = false;
    std::array<ArrayHashes, 4> hashes;
  };
  std::shared_ptr<HashCache> hash_cache_ = std::make_shared<HashCache>();
  struct DerivedStore {
    std::mutex mutex;
    std::map<std::string, std::shared_ptr<const void>> entries;
  };
  std::shared_ptr<DerivedStore> derived_ = std::make_shared<DerivedStore>();
};

namespace detail {
/// tail[r] = max(0, 1 - sum of row r's stored values) in double, for every row of `rows`.
void compute_tails(const CsrView& rows, double* tail, int n_threads);
}  // namespace detail

/// Validates the arguments of a matrix size: 1 <= n_base <= n_states <= kMaxStates.
void check_sizes(Index n_states, Index n_base);

extern template TransitionMatrix TransitionMatrix::from_topk<std::int32_t>(Index, Index, Index, const std::int32_t*,
                                                                           const Prob*, double, int);
extern template TransitionMatrix TransitionMatrix::from_topk<std::int64_t>(Index, Index, Index, const std::int64_t*,
                                                                           const Prob*, double, int);

}  // namespace markovmem
