// State-space expansion (the paper's "Markov-based knowledge expansion") and
// the certificate that recomputes, from the two matrices alone, that nothing old changed.
#pragma once

#include <limits>
#include <string>

#include "markovmem/transition_matrix.hpp"

namespace markovmem {

/// Figures proving (or refuting) that `after` extends `before` without changing it.
struct ExpansionCertificate {
  Index n_old = 0;              ///< states of `before`
  Index n_new = 0;              ///< states added
  Index n_base = 0;             ///< base states of `before`
  bool same_n_base = false;     ///< after.n_base == before.n_base
  bool old_block_identical = false;  ///< rows [0, n_old) equal byte for byte (indptr, indices, data, tail)
  double max_abs_diff_old = 0;  ///< max |p_after(x|v) - p_before(x|v)| over old v, x < n_old (tail included)
  double leaked_mass_to_new = 0;  ///< max over old rows of the mass put on states >= n_old
  double new_to_new_mass = 0;     ///< max over new rows of the mass put on states >= n_base
  double max_row_sum_error = 0;   ///< max |stored + tail - 1| over all rows of `after`
  std::string fingerprint_before;     ///< fingerprint of `before`
  std::string fingerprint_after_old;  ///< fingerprint of the first n_old rows of `after`
  std::string fingerprint_after;      ///< fingerprint of `after`
  bool after_valid = false;       ///< `after` passes every invariant check
  std::string after_violation;    ///< the first broken invariant of `after`, if any
  /// Open expansion: `after` carries old->new blocks (open_blocks) beyond `before`'s.  Then
  /// leaked_mass_to_new is the largest leak, and ok requires instead: no stored mass on
  /// new states, every leak < 1 and <= leak_bound.
  bool open = false;
  double max_leak = 0;             ///< max over old rows v of leak_v, the mass moved to new states
  double mean_leak = 0;            ///< mean of leak_v over old rows
  Index worst_leak_row = -1;       ///< an old row with the largest leak (-1 when nothing leaks)
  double forgetting_max_nats = 0;  ///< max_v -log(1 - leak_v) = max_v KL(p_before(.|v) || p_after(.|v)) over old states
  double forgetting_mean_nats = 0;  ///< mean of -log(1 - leak_v) over old rows
  double leak_bound = std::numeric_limits<double>::infinity();  ///< the max_leak the caller allowed
  bool ok = false;  ///< every figure above is as an exact expansion requires
};

/// Recomputes the certificate from the two matrices, whatever produced `after`.
/// Throws std::invalid_argument if `after` has fewer states than `before`.
/// O(nnz) worst case; O(n_states + hashed bytes) when the old block is identical.
/// An open expansion is ok only when its largest leak is <= max_leak (infinity: any leak < 1).
ExpansionCertificate verify_expansion(const TransitionMatrix& before, const TransitionMatrix& after,
                                      double tol = kRowSumTolerance, int n_threads = 0,
                                      double max_leak = std::numeric_limits<double>::infinity());

/// Result of expand(): the grown matrix and its certificate.
struct Expansion {
  TransitionMatrix matrix;
  ExpansionCertificate certificate;
};

/// Appends `new_rows` (m rows over the base states of P, each a distribution
/// whose tail spreads over base states) as states n_states .. n_states + m - 1.
/// Old rows are copied byte for byte; the certificate is then recomputed by
/// verify_expansion.  Throws InvariantViolation naming the first bad new row.
/// With `incoming` (P.n_states() rows, columns relative to the new states, in [0, m)),
/// the expansion is open: Q carries it as a new OpenBlock (P's own blocks are kept), old
/// rows keep their stored bytes and p~(x | v) = (1 - eps_v) p(x | v) for old x, eps_v the
/// row sum of incoming (checked by OpenBlock::build; "incoming" names the row).
Expansion expand(const TransitionMatrix& P, const CsrView& new_rows, double tol = kRowSumTolerance, int n_threads = 0,
                 const CsrView* incoming = nullptr, double max_leak = std::numeric_limits<double>::infinity());

}  // namespace markovmem
