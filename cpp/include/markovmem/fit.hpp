// Sparse dictionary fit (DESIGN §1, the paper's token-to-dictionary mapping):
// each new token's empirical next-token counts are fitted as f(alpha) with at
// most s nonzero alpha over the rows of a TransitionMatrix, minimising
// KL(q_hat || f(alpha)) under the "logit" or the "mixture" link, with the tail rule.
#pragma once

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

#include "markovmem/transition_matrix.hpp"

namespace markovmem {

/// The link from alpha to a distribution over the base states.
enum class Link : int {
  kLogit = 0,    ///< f = softmax(sum_v alpha_v log p(.|v)), ||alpha||_2 <= bound
  kMixture = 1,  ///< f = sum_v alpha_v p(.|v), alpha on the simplex
};

/// Borrowed rows of next-token counts (or any non-negative weights; each row is
/// normalised to q_hat).  Columns are base states; values float64.
struct TargetsView {
  Index n_rows = 0;
  const Index* indptr = nullptr;        ///< n_rows + 1 entries, indptr[0] == 0
  const StateIndex* indices = nullptr;  ///< sorted, unique per row
  const double* data = nullptr;
};

/// Borrowed per-row sets of dictionary states (CSR pattern), with optional values
/// (starting points, or alpha itself where a function says so).
struct SupportView {
  Index n_rows = 0;
  const Index* indptr = nullptr;
  const StateIndex* indices = nullptr;
  const double* values = nullptr;  ///< nnz entries or null
};

/// Progress and cancellation of a long fit, shared with a caller on another thread:
/// `done` counts finished rows; setting `cancel` makes the remaining rows be skipped,
/// and the call then throws FitCancelled (rows already running finish first).
struct FitControl {
  std::atomic<std::int64_t> done{0};
  std::atomic<bool> cancel{false};
};

/// Thrown by a fit whose FitControl was cancelled.
class FitCancelled : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Options of fit_alpha and fit_on_support.
struct FitOptions {
  Link link = Link::kLogit;
  Index s = 16;                 ///< at most s nonzeros per row (fit_alpha)
  double bound = 10.0;          ///< logit: ||alpha||_2 <= bound
  Index n_candidates = 0;       ///< screened pool size per target; 0 = max(256, 16 s)
  double oversize = 0.0;        ///< forward selection grows to ceil(oversize * s) then prunes; 0 = link default
  Index swap_passes = 1;        ///< swap passes after selection (0 = none)
  /// logit: choose the ball radius among bound, rho / 2, rho / 4 (rho = ||alpha|| of the fit
  /// within bound) by two-fold cross-validation of the whole fit on thinned counts
  bool cv_bound = true;
  Index max_iter = 100;         ///< Newton iterations of the final refit
  double tol = 1e-10;           ///< stop when the Newton decrement is below tol * max(1, objective)
  int n_threads = 0;            ///< 0 = OpenMP default
  std::uint64_t seed = 0;       ///< orders the swap pass and draws the cross-validation folds (per-row streams)
  /// global index of target row 0: row r draws from the stream of row_offset + r, so a
  /// contiguous block of a larger target set (one rank's share) fits as it does in the whole
  Index row_offset = 0;
  const StateIndex* allowed = nullptr;  ///< sorted unique eligible states (null = every state)
  Index n_allowed = 0;
  FitControl* control = nullptr;  ///< progress counter and cancel flag (null = none); not owned
};

/// Result: alpha as CSR over states (support in selection order sorted by state
/// id; entries may be exactly 0 where the simplex solver put an atom on the boundary)
/// and per-row figures.
struct AlphaResult {
  std::vector<Index> indptr;
  std::vector<StateIndex> indices;
  std::vector<double> alpha;
  std::vector<double> kl;             ///< KL(q_hat || f(alpha)) in nats, tail included
  std::vector<std::int64_t> n_iter;   ///< Newton iterations over all refits of the row
  std::vector<std::uint8_t> converged;  ///< final refit met tol within max_iter
  std::vector<Index> n_candidates;    ///< candidates screened for the row (fit_alpha) or support size
};

/// Checks targets against P: rows non-empty with positive total, indices sorted,
/// unique and < n_base, values finite and >= 0.  Throws std::invalid_argument
/// naming the first offending row (std::out_of_range for a column >= n_base).  O(nnz).
void check_targets(const TransitionMatrix& P, const TargetsView& targets);

/// Sparse fit with support selection.  Per target: screening through column
/// access (a CSC of P kept with P after the first call; the product q_hat x P^T restricted to
/// the rows that store an observed token, scored by the gradient at a background
/// model), greedy forward selection by gain with a Newton refit after each
/// addition, pruning (logit: from 2 s) and a swap pass, for the logit link up to
/// three rounds that rescore a longer candidate list at the current fit, then a
/// final refit to tol.  The logit link runs the selection from two screens (the
/// scale-aware background and the uniform one) and keeps the lower objective; with
/// opts.cv_bound it then picks the ball radius by two-fold cross-validation (6 more
/// selections on half the counts, and a refit when a smaller radius wins).
/// Parallel over targets (OpenMP); results do not depend on the thread count.
/// Memory: O(nnz(P)) for the CSC (kept with P, see TransitionMatrix::derived, unless
/// opts.allowed restricts the atoms) plus O(n_states) per thread, kept for the next
/// call (see release_fit_workspaces).
AlphaResult fit_alpha(const TransitionMatrix& P, const TargetsView& targets, const FitOptions& opts);

/// Fit on a fixed support per row (no selection): Newton (logit, ball constraint)
/// or projected Newton on the simplex (mixture), started from support.values when
/// given, else from closed_form_alpha (logit) or the uniform blend after three EM
/// steps (mixture).  Per-matrix data comes from P's derived-data store.
AlphaResult fit_on_support(const TransitionMatrix& P, const TargetsView& targets, const SupportView& support,
                           const FitOptions& opts);

/// Weighted least squares in centred log-probability space on the given support:
/// minimises sum_x q_hat(x) (log q_hat(x) - c - sum_v alpha_v log p(x|v))^2 over
/// alpha and c (normal equations, |S| x |S| Cholesky with a 1e-10 relative ridge).
/// kl is the logit-link KL at the returned alpha; n_iter is 0.
AlphaResult closed_form_alpha(const TransitionMatrix& P, const TargetsView& targets, const SupportView& support,
                              int n_threads);

/// KL(q_hat || f(alpha)) per row and its gradient with respect to each entry of
/// alpha (support.values must be set), tail included.  grad has support nnz entries.
void fit_objective(const TransitionMatrix& P, const TargetsView& targets, const SupportView& alpha, Link link,
                   std::vector<double>& kl, std::vector<double>& grad, int n_threads);

/// Rows of f(alpha) over the base states: entries on the union of the support
/// rows' stored columns, the rest (uniform over the other base states) left as tail.
struct PredictedRows {
  std::vector<Index> indptr;
  std::vector<StateIndex> indices;
  std::vector<Prob> data;
};
PredictedRows predict_rows(const TransitionMatrix& P, const SupportView& alpha, Link link, int n_threads);

/// The calls above keep their per-thread scratch (25 bytes per state, 3.2 MB per thread at
/// T = 131k) for the next call instead of allocating and zeroing it each time.  This frees it.
void release_fit_workspaces();
/// (workspaces kept, whether all are in their clean between-targets state): for tests.
std::pair<std::size_t, bool> fit_workspaces_state();

}  // namespace markovmem
