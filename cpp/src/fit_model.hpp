// Private to the core: the per-target objective models of the sparse fit (logit
// and mixture link) on a small support, their Newton solvers and candidate
// gains, and the read-only per-call context they share (tails, log-rows, CSC).
#pragma once

#include <Eigen/Dense>

#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "markovmem/fit.hpp"

namespace markovmem::detail {

using Eigen::MatrixXd;
using Eigen::VectorXd;

/// Per-row constants of a matrix: p(x|v) of an unstored base state, its log, and
/// stored mass + tail.  Cached on the matrix (TransitionMatrix::derived).
struct RowConstants {
  std::vector<double> u, logu, total;
};

/// Logit: d_v(x) = log p(x|v) - logu_v per stored entry.  Cached on the matrix.
struct LogDeviations {
  std::vector<double> dev;
};

/// Screening data of one link: CSC of the eligible rows over base columns, with one
/// value per entry (mixture: p - u_v; logit: d_v(x)), and the link's background model.
/// Cached on the matrix when every row is eligible; built per call for a candidate subset.
struct ScreenIndex {
  std::vector<std::uint8_t> eligible;
  std::vector<Index> cptr;
  std::vector<StateIndex> crow;
  std::vector<float> cval;
  Index heavy_len = 0;  ///< columns longer than this are left out of the first screen
  std::vector<double> pbar;  ///< mixture: the average eligible row over base states
  std::vector<double> dbar;  ///< logit: the average eligible deviation row
  std::vector<double> grid_c, grid_logz;
  mutable std::vector<std::vector<double>> grid_ebg;  ///< filled on first use of each grid point
  mutable std::unique_ptr<std::once_flag[]> grid_once;
};

/// Read-only data shared by every target of one call (the heavy parts are shared
/// across calls through the matrix's derived-data store).
struct FitContext {
  /// Whether the logit deviations are stored (else computed per use by d_of).
  enum class Dev { kNo, kIfCached, kYes };
  FitContext(const TransitionMatrix& P, Link link, Dev with_dev, bool with_screening, const StateIndex* allowed,
             Index n_allowed, int n_threads);

  const TransitionMatrix& P;
  Link link;
  Index n_states, n_base;
  const Index* ip;
  const StateIndex* ix;
  const Prob* px;

 private:
  std::shared_ptr<const RowConstants> rows_;
  std::shared_ptr<const LogDeviations> devs_;
  std::shared_ptr<const ScreenIndex> screen_;
  static const ScreenIndex& empty_screen();

 public:
  const std::vector<double>& u;      ///< p(x|v) of an unstored base state x
  const std::vector<double>& logu;   ///< log(max(u, kLogFloor))
  const std::vector<double>& total;  ///< stored mass + tail of each row (1 up to rounding)
  const std::vector<double>& dev;    ///< logit: d_v(x) per stored entry (empty if not asked)
  const ScreenIndex& scr;            ///< screening data (empty if not asked)
  /// E_{softmax(c dbar)}[d_v] for every state, computed on first use of grid point i.
  const std::vector<double>& background_mean(std::size_t i) const;

  double d_of(Index j, Index v) const {
    return dev.empty() ? std::log(std::max<double>(px[j], kLogFloor)) - logu[static_cast<std::size_t>(v)]
                       : dev[static_cast<std::size_t>(j)];
  }
};

/// Prefetches the stored entries of the atoms' rows in each of the given per-entry arrays
/// (indices, values, ...).  At vocabulary scale the rows are scattered over hundreds of MB,
/// so building a support's structure is bound by their cache misses; issued together (or
/// one target ahead) they overlap.
template <class AtomIt, class... Arr>
void prefetch_rows(AtomIt first, AtomIt last, const Index* ip, const Arr*... arrs) {
#if defined(__GNUC__) || defined(__clang__)
  auto range = [](const auto* b, const auto* e) {
    for (const char* p = reinterpret_cast<const char*>(b); p < reinterpret_cast<const char*>(e); p += 64)
      __builtin_prefetch(p);
  };
  for (; first != last; ++first) {
    const Index v = static_cast<Index>(*first);
    (range(arrs + ip[v], arrs + ip[v + 1]), ...);
  }
#else
  (void)first, (void)last, (void)ip, ((void)arrs, ...);
#endif
}

/// x = (H + ridge I)^-1 b by Cholesky, with ridge = rel_ridge * trace(H) / n growing
/// 100-fold until the matrix factorises; false (x unset) if it never does.
bool try_solve_spd(const MatrixXd& H, const VectorXd& b, double rel_ridge, VectorXd& x);

/// The support rows twice: by slot (each atom's entries as positions and values, in
/// the row's order) and by position (for each position p, a token of the model's
/// column set, the slots that store it, ascending, and their values).  The products
/// with a vector over slots or positions run by slot: a slot's entries hit distinct
/// positions, so gather's updates are independent and scatter's sums stay in a
/// register (by position, LM rows give 1.1-1.5 entries per position: short loops the
/// branch predictor loses, and sums into a handful of slots that wait on each
/// other's stores).  The Gram matrix takes its diagonal by slot and its off-diagonal
/// pairs from the positions shared by several slots.  Positions stored by at least a
/// third of the slots (the frequent tokens every LM row shares) are also kept as a
/// dense block, so their pairs cost one small GEMM.
struct SupportRows {
  std::vector<Index> ptr;  ///< n_pos + 1
  std::vector<std::int32_t> slot;
  std::vector<double> val;
  Index n_slots = 0;
  std::vector<Index> heavy;  ///< positions of the dense block
  std::vector<std::uint8_t> is_heavy;
  MatrixXd dense;  ///< heavy.size() x n_slots, zero where a slot does not store the position
  /// Fills the structure from the atoms' stored entries: pos_of(j) gives the
  /// position of entry j of P (or -1 to skip it), val_of(j, v) its value; both are
  /// called once per entry, atoms in order and each atom's entries in order.  O(entries).
  /// With `drop_empty` the positions no slot stores are dropped and the rest renumbered
  /// 0, 1, ... in order; `kept` (when given) receives the original position of each.
  template <class PosOf, class ValOf>
  void build(const std::vector<Index>& atoms, Index n_pos, const Index* ip, PosOf pos_of, ValOf val_of,
             bool drop_empty = false, std::vector<Index>* kept = nullptr) {
    const std::size_t np = static_cast<std::size_t>(n_pos);
    n_slots = static_cast<Index>(atoms.size());
    ptr.assign(np + 1, 0);
    // One pass over the atoms' entries, then a counting sort by position; slots stay
    // ascending within a position.  The pass is branch-free: every entry is written and
    // only a hit advances the cursor (a miss counts in ptr[0], reset after), since whether
    // a stored token is in the column set is a coin flip the branch predictor loses.
    std::size_t total = 0;
    for (Index v : atoms) total += static_cast<std::size_t>(ip[v + 1] - ip[v]);
    if (hits_.size() < total + 1) hits_.resize(total + 1);
    Hit* out = hits_.data();
    std::size_t nh = 0;
    Index* cnt = ptr.data();
    sptr_.resize(atoms.size() + 1);
    for (std::size_t i = 0; i < atoms.size(); ++i) {
      sptr_[i] = static_cast<Index>(nh);
      const Index v = atoms[i];
      for (Index j = ip[v]; j < ip[v + 1]; ++j) {
        const std::int32_t p = pos_of(j);
        out[nh] = {p, static_cast<std::int32_t>(i), val_of(j, v)};
        nh += p >= 0;
        ++cnt[p + 1];
      }
    }
    sptr_[atoms.size()] = static_cast<Index>(nh);
    ptr[0] = 0;
    for (std::size_t p = 0; p < np; ++p) ptr[p + 1] += ptr[p];
    slot.resize(nh);
    val.resize(nh);
    next_.assign(ptr.begin(), ptr.end() - 1);
    for (std::size_t n = 0; n < nh; ++n) {
      const Hit& h = out[n];
      const std::size_t k = static_cast<std::size_t>(next_[static_cast<std::size_t>(h.pos)]++);
      slot[k] = h.slot;
      val[k] = h.val;
    }
    spos_.resize(nh);
    sval_.resize(nh);
    if (drop_empty) {
      // In place: position p's range is read before ptr[w], w <= p, is written.
      // Branch-free: every position writes its slots and only a stored one advances w
      // (an empty position's writes land where the next stored one overwrites them).
      std::vector<Index>& renum = next_;  // old position -> new (its cursor role is over)
      std::vector<Index>& keep = kept ? *kept : kept_;
      keep.resize(np + 1);
      std::size_t w = 0;
      for (std::size_t p = 0; p < np; ++p) {
        keep[w] = static_cast<Index>(p);
        renum[p] = static_cast<Index>(w);
        ptr[w] = ptr[p];
        w += ptr[p + 1] > ptr[p];
      }
      keep.resize(w);
      ptr[w] = ptr[np];
      ptr.resize(w + 1);
      for (std::size_t n = 0; n < nh; ++n) {
        spos_[n] = static_cast<std::int32_t>(renum[static_cast<std::size_t>(out[n].pos)]);
        sval_[n] = out[n].val;
      }
    } else {
      if (kept) kept->clear();
      for (std::size_t n = 0; n < nh; ++n) {
        spos_[n] = out[n].pos;
        sval_[n] = out[n].val;
      }
    }
    finish();
  }
  /// out[p] = offset + sum over the position's slots of a[slot] * val (one entry per position).
  void gather(const VectorXd& a, double offset, double* out) const {
    std::fill(out, out + (ptr.size() - 1), offset);
    const std::int32_t* sp = spos_.data();
    const double* sv = sval_.data();
    for (Index i = 0; i < n_slots; ++i) {
      const double ai = a(i);
      for (Index k = sptr_[static_cast<std::size_t>(i)]; k < sptr_[static_cast<std::size_t>(i) + 1]; ++k)
        out[sp[k]] += ai * sv[k];
    }
  }
  /// out[slot] += sum over positions p of w[p] * val (the transpose of gather).
  void scatter(const double* w, VectorXd& out) const {
    const std::int32_t* sp = spos_.data();
    const double* sv = sval_.data();
    for (Index i = 0; i < n_slots; ++i) {
      const Index b = sptr_[static_cast<std::size_t>(i)], e = sptr_[static_cast<std::size_t>(i) + 1];
      double s0 = 0.0, s1 = 0.0;  // two chains of additions
      Index k = b;
      for (; k + 1 < e; k += 2) {
        s0 += w[sp[k]] * sv[k];
        s1 += w[sp[k + 1]] * sv[k + 1];
      }
      if (k < e) s0 += w[sp[k]] * sv[k];
      out(i) += s0 + s1;
    }
  }
  Index n_pos() const { return static_cast<Index>(ptr.size()) - 1; }
  /// G = sum_p w[p] v_p v_p^T (full, symmetric) and, when wsum is given,
  /// wsum = sum_p w[p] v_p, with v_p the position's row over the slots.  w >= 0.
  void weighted_gram(const double* w, MatrixXd& G, VectorXd* wsum) const;

 private:
  void finish();
  struct Hit {
    std::int32_t pos, slot;
    double val;
  };
  std::vector<Hit> hits_;
  std::vector<Index> next_;
  std::vector<Index> kept_;            ///< build's renumbering when the caller does not ask for it
  std::vector<Index> sptr_;           ///< n_slots + 1: each slot's range in spos_ / sval_
  std::vector<std::int32_t> spos_;    ///< by slot: the entry's position
  std::vector<double> sval_;          ///< by slot: the entry's value
  std::vector<Index> shared_;         ///< positions stored by two slots or more, outside the dense block
  mutable MatrixXd scaled_;
  mutable VectorXd wh_;
};

/// Per-thread dense buffers over base states (kept zeroed / -1 between targets).
struct Workspace {
  std::vector<std::int32_t> pos;  ///< base state -> position in the current token list, or -1
  std::vector<double> q;          ///< q_hat over base states
  std::vector<double> acc;        ///< screening accumulator over states
  std::vector<std::uint8_t> mark; ///< states touched by the screening product
  std::vector<Index> touched;
  std::vector<std::int32_t> wpos;  ///< base state -> index in a model's pool column set W, or -1
  /// One bit per base state, set where pos is (mixture / closed form: the target's
  /// tokens).  16 KB at T = 131k: it stays in L1 and filters the pos lookups, which
  /// miss cache, down to the hits.
  std::vector<std::uint64_t> bits;
  bool has(StateIndex x) const { return (bits[static_cast<std::size_t>(x) >> 6] >> (x & 63)) & 1U; }
  void set_bit(StateIndex x) { bits[static_cast<std::size_t>(x) >> 6] |= std::uint64_t{1} << (x & 63); }
  void clear_bit(StateIndex x) { bits[static_cast<std::size_t>(x) >> 6] &= ~(std::uint64_t{1} << (x & 63)); }
  /// pos[x] for a state with its bit set, -1 otherwise.
  std::int32_t pos_if_set(StateIndex x) const { return has(x) ? pos[static_cast<std::size_t>(x)] : -1; }
  /// Whether every buffer is in its between-targets state (what each target must leave).
  bool clean() const;
  void ensure(Index n_base, Index n_states) {
    if (static_cast<Index>(pos.size()) != n_base) {
      pos.assign(static_cast<std::size_t>(n_base), -1);
      q.assign(static_cast<std::size_t>(n_base), 0.0);
      bits.assign(static_cast<std::size_t>(n_base) / 64 + 1, 0);
      wpos.assign(static_cast<std::size_t>(n_base), -1);
    }
    if (static_cast<Index>(acc.size()) != n_states) {
      acc.assign(static_cast<std::size_t>(n_states), 0.0);
      mark.assign(static_cast<std::size_t>(n_states), 0);
    }
  }
};

/// Result of a candidate search: the pool position, the step to take and its gain.
struct Pick {
  Index index = -1;
  double t = 0.0;
  double gain = -INFINITY;
};

/// Scratch of the Newton solvers, kept with a model so that a batch of targets of one
/// support size allocates it once.
struct NewtonScratch {
  VectorXd g, step, trial, gt, b, step2;
  MatrixXd H;
  std::vector<std::uint8_t> bind, bind2;
};

/// The objective at the point of the last evaluation that computed it.  The KL reported
/// after a solve is taken at the point the solver evaluated last, so kl() reads it here
/// instead of repeating a pass over the support (4-6% of a small fixed-support fit).
/// Only kl() reads it: an evaluation also leaves state (f, the last shift) that other
/// methods rely on.  Cleared whenever the support structure is rebuilt.
struct ValueMemo {
  VectorXd a;
  double value = NAN;
  bool valid = false;
  bool holds(const VectorXd& x) const { return valid && a.size() == x.size() && a == x; }
  /// The memo if it holds x, else compute().
  template <class Compute>
  double at(const VectorXd& x, Compute compute) const {
    return holds(x) ? value : compute();
  }
  void set(const VectorXd& x, double v) {
    a = x;
    value = v;
    valid = true;
  }
};

/// Common interface of the two link models (static polymorphism in the driver).
/// A model holds one target (q_hat) and a support (atoms, alpha); every method
/// leaves the workspace clean for the next target after unload().
class LogitModel {
 public:
  /// Without `selection` (a fixed support) q_hat is not scattered over the base states:
  /// only the candidate gains read it there, and the 1 MB of random writes and their
  /// reset was a tenth of a fixed-support target.
  LogitModel(const FitContext& c, Workspace& w, double bound, bool selection = true)
      : c_(c), w_(w), bound_(bound), selection_(selection) {}
  void load(const StateIndex* ids, const double* q, Index nq);
  void unload();
  /// Replaces the support; with `project` alpha is scaled into the ball ||alpha|| <= bound.
  void set_support(std::vector<Index> atoms, VectorXd alpha, bool project = true);
  /// Replaces alpha on the current support (projected into the ball with `project`).
  void set_alpha(VectorXd alpha, bool project = true);
  /// DESIGN §1's closed form on the current support: weighted least squares in centred
  /// log-probability space (normal equations, Cholesky with a 1e-10 relative ridge; zero
  /// if even a grown ridge does not factorise).  Does not change alpha.
  VectorXd closed_form();
  const std::vector<Index>& atoms() const { return atoms_; }
  const VectorXd& alpha() const { return alpha_; }
  Index size() const { return static_cast<Index>(atoms_.size()); }
  /// KL(q_hat || f(alpha)) at the current alpha.
  double kl() {
    return neg_h_ + memo_.at(alpha_, [&] { return value(); });
  }
  /// Objective (KL(q_hat || f) up to the constant sum q log q) at a; optional gradient and Hessian.
  double eval(const VectorXd& a, VectorXd* g, MatrixXd* H);
  double value() { return eval(alpha_, nullptr, nullptr); }
  double neg_entropy() const { return neg_h_; }
  /// Newton (ball-constrained); returns iterations, sets converged.
  Index newton(Index max_iter, double tol, bool& converged);
  void em(Index) {}  ///< no EM phase for the logit link
  /// Best single addition among pool entries not flagged in `taken` (second-order screen, exact line on a shortlist).
  Pick best_addition(const std::vector<Index>& pool, const std::vector<std::uint8_t>& taken);
  void add(Index atom, double t);
  void remove(Index slot);
  /// Slot whose removal is estimated to cost least (quadratic model at the current alpha).
  Index cheapest_removal();
  /// Rescreening at the current fit: the rows of `wide` (the screen's longer
  /// list) are scored by their second-order gain g^2 / (2 h) at the current
  /// alpha; returns the current atoms followed by the best of the rest, C in all.
  std::vector<Index> rescreen(const std::vector<Index>& wide, Index C);
  VectorXd gradient_kl() {
    VectorXd g;
    eval(alpha_, &g, nullptr);
    return g;
  }
  double empty_value() const { return std::log(static_cast<double>(c_.n_base)); }
  bool is_mixture() const { return false; }

 private:
  void rebuild();
  /// Hessian at the point of the last eval() that computed a gradient (f over U is kept);
  /// m, when given, receives E_f[d] there.
  void hessian_at_last_eval(MatrixXd& H, VectorXd* m) const;
  /// Gradient g and curvature h of the objective along e_c at the last eval (f0: f of an unstored column).
  void candidate_moments(Index c, double f0, double& g, double& h) const;
  double line_gain(Index atom, double tmax, double& t);
  const FitContext& c_;
  Workspace& w_;
  double bound_;
  bool selection_;
  std::vector<Index> atoms_;
  VectorXd alpha_;
  double neg_h_ = 0.0;
  const StateIndex* ids_ = nullptr;
  Index nq_ = 0;
  // Support matrix by position in the union U of the atoms' stored columns.
  std::vector<StateIndex> ulist_;
  SupportRows rows_;
  std::vector<double> qn_;  ///< q_hat over the target's tokens (load)
  std::vector<std::int32_t> epos_;  ///< rebuild: the U position of each atom entry, in build order
  std::vector<double> qU_, zU_, eU_, fU_;
  VectorXd eq_;  ///< E_q_hat[d_i] per slot
  VectorXd m_;  ///< E_f[d_i] per slot at the last eval with a gradient
  mutable NewtonScratch nw_;
  ValueMemo memo_;
  double zmax_ = 0.0, zs_ = 1.0;  ///< shift and shifted partition function of the last eval
  // The pool's rows over W, the union of their stored columns, built once per target and
  // pool (best_addition runs dozens of times on one pool): the screen then reads f once
  // per column of W instead of looking up the U position of every stored entry, and
  // E_q[d_c] is computed once per candidate.
  void cache_pool(const std::vector<Index>& pool);
  bool pool_cached_ = false;
  std::vector<Index> cpool_;  ///< the pool the cache describes (compared by content)
  std::vector<Index> cptr_;  ///< per pool entry: its range in cw_ / cd_
  std::vector<std::int32_t> cw_;  ///< per stored entry: the column's index in W
  std::vector<double> cd_;  ///< per stored entry: d_c(x)
  std::vector<double> cmq_;  ///< per pool entry: E_q_hat[d_c]
  std::vector<StateIndex> wlist_;  ///< W
  std::vector<double> fW_;  ///< f over W at the last screen
};

class MixtureModel {
 public:
  MixtureModel(const FitContext& c, Workspace& w) : c_(c), w_(w) {}
  void load(const StateIndex* ids, const double* q, Index nq);
  void unload();
  /// Replaces the support; with `project` alpha is clipped at 0 and rescaled to total mass 1
  /// (uniform when nothing positive is left).
  void set_support(std::vector<Index> atoms, VectorXd alpha, bool project = true);
  const std::vector<Index>& atoms() const { return atoms_; }
  const VectorXd& alpha() const { return alpha_; }
  Index size() const { return static_cast<Index>(atoms_.size()); }
  /// KL(q_hat || f(alpha)) = sum q log q - sum q log f at the current alpha.
  double kl() {
    double mass = 0.0;
    for (Index i = 0; i < size(); ++i)
      mass += alpha_(i) * c_.total[static_cast<std::size_t>(atoms_[static_cast<std::size_t>(i)])];
    return neg_h_ + memo_.at(alpha_, [&] { return value(); }) - mass;
  }
  /// G(a) = -sum q log f + sum a_v total_v (its minimiser over a >= 0 lies on the simplex;
  /// on the simplex it equals KL(q_hat || f) - sum q log q + 1).  Without `with_value`
  /// (only the gradient or Hessian is wanted) the logs are skipped and NaN is returned.
  double eval(const VectorXd& a, VectorXd* g, MatrixXd* H, bool with_value = true);
  double value() { return eval(alpha_, nullptr, nullptr); }
  double neg_entropy() const { return neg_h_; }
  Index newton(Index max_iter, double tol, bool& converged);
  /// `steps` EM (multiplicative) updates of alpha on the simplex: each costs one
  /// objective and gradient, keeps alpha > 0 where it is, and never increases KL.
  void em(Index steps);
  Pick best_addition(const std::vector<Index>& pool, const std::vector<std::uint8_t>& taken);
  void add(Index atom, double t);
  void remove(Index slot);
  Index cheapest_removal();
  /// Gradient of KL(q_hat || f) with respect to alpha (not of G).
  VectorXd gradient_kl();
  double empty_value() const { return std::log(static_cast<double>(c_.n_base)) + 1.0; }
  bool is_mixture() const { return true; }

 private:
  void rebuild();
  /// Hessian of G at the point of the last eval() that computed a gradient (its weights are kept).
  void hessian_at_last_eval(MatrixXd& H) const;
  /// newton()'s stopping test at alpha_ with gradient g and Hessian H.
  bool converged_with(const VectorXd& g, const MatrixXd& H, double G, double tol) const;
  double line_value(Index atom, double t) const;
  // The pool's rows restricted to J = supp(q_hat), built once per target and pool
  // so that every gain sweep reads only the entries that matter, contiguously.
  void cache_pool(const std::vector<Index>& pool);
  const Index* pool_data_ = nullptr;
  std::size_t pool_size_ = 0;
  std::vector<Index> hptr_;
  std::vector<std::int32_t> hpos_;
  std::vector<double> hval_;
  const FitContext& c_;
  Workspace& w_;
  std::vector<Index> atoms_;
  VectorXd alpha_;
  double neg_h_ = 0.0;
  const StateIndex* ids_ = nullptr;
  Index nq_ = 0;
  std::vector<double> qJ_;
  // Support matrix over the covered positions (the tokens of J = supp(q_hat) some atom
  // stores), renumbered 0 .. nc - 1; covered_[c] is the position in J.  Entries p(x|v) - u_v.
  // The uncovered tokens all have f = tau (the atoms' tails), so they never enter a loop.
  SupportRows rows_;
  std::vector<Index> covered_;
  std::vector<double> qc_, fc_, w1c_, w2c_;  ///< q_hat, f, q/f, q/f^2 on the covered positions
  double q_unc_ = 0.0;  ///< q_hat mass on the uncovered positions
  double ft_ = 1.0;  ///< f of an uncovered position at the last eval
  VectorXd uS_, tS_, s1_;  ///< per slot: u_v, total_v; gradient scratch
  std::vector<double> fJ_;  ///< f over J at the last eval, filled by fill_fJ()
  std::vector<double> rbuf_;
  double W1_ = 0.0, W2_ = 0.0, qsum_ = 0.0;
  mutable NewtonScratch nw_;
  ValueMemo memo_;
  /// fJ_ from the last eval (the candidate gains read f by position in J).
  void fill_fJ();
};

}  // namespace markovmem::detail
