// First-order transition counting from token-id sequences (from_sequences).
#pragma once

#include <cstdint>

#include "markovmem/transition_matrix.hpp"

namespace markovmem {

/// Options of count_transitions.
struct CountOptions {
  Index top_k = 0;         ///< keep the top_k largest counts per row (0 = all); dropped mass becomes tail
  double smoothing = 0.0;  ///< add-k pseudo-count on every base state (exact through the tail rule)
  int n_threads = 0;
};

/// Counts bigrams (s[i], s[i+1]) within each sequence and normalises rows:
/// p(x|v) = (c(v,x) + a) / (c(v) + a * n_states).  The a-mass of unseen states
/// and the mass cut by top_k are the tail.  A state never followed by anything
/// gets an empty row with tail 1 (uniform).  tokens holds the sequences end to end,
/// offsets (n_seq + 1, non-decreasing, last <= n_tokens) delimits them.  Ids are
/// checked (std::out_of_range names sequence and position) before anything is
/// counted.  O(n_tokens + nnz), no sort: one pass scatters the pairs into buckets of
/// source rows (placed from a sample of the row lengths), then each bucket is
/// grouped by row in cache and counted with per-thread dense counters; memory
/// O(n_tokens + n_states * threads).  The result is the same bit for bit whatever
/// the thread count.
TransitionMatrix count_transitions(const std::int32_t* tokens, Index n_tokens, const Index* offsets, Index n_seq,
                                   Index n_states, const CountOptions& opts);

}  // namespace markovmem
