// The two link models of the sparse fit on a small support: exact objective,
// gradient and Hessian with the tail rule (sparse in the support rows), Newton
// solvers (ball-constrained for logit, projected on alpha >= 0 for mixture) and
// the per-candidate gains that drive greedy selection.
#include "fit_model.hpp"

#include "markovmem/vector_math.hpp"

#include <algorithm>
#include <array>
#include <limits>
#include <numeric>

namespace markovmem::detail {

namespace {

// Cholesky factor of H + ridge I, ridge = rel_ridge * trace(H) / n growing 100-fold until
// it factorises; null if it never does.  One factorisation object per thread: its storage
// is reused across the many small solves of a batch instead of allocated per call.
const Eigen::LLT<MatrixXd>* factor_spd(const MatrixXd& H, double rel_ridge) {
  thread_local Eigen::LLT<MatrixXd> llt;
  const Index n = H.rows();
  double ridge = rel_ridge * (std::abs(H.trace()) / static_cast<double>(std::max<Index>(n, 1))) + 1e-300;
  for (int k = 0; k < 12; ++k) {
    llt.compute(H + ridge * MatrixXd::Identity(n, n));
    if (llt.info() == Eigen::Success) return &llt;
    ridge *= 100.0;
  }
  return nullptr;
}

}  // namespace

bool try_solve_spd(const MatrixXd& H, const VectorXd& b, double rel_ridge, VectorXd& x) {
  const Eigen::LLT<MatrixXd>* llt = factor_spd(H, rel_ridge);
  if (!llt) return false;
  x = b;
  llt->solveInPlace(x);
  return true;
}

namespace {

constexpr int kShortlist = 4;  // candidates whose gain is computed exactly after the second-order screen

// x = -(H + ridge I)^-1 b (a Newton direction for gradient b) with a ridge that grows until
// H + ridge I factorises; a scaled gradient step if it never does.
void newton_direction(const MatrixXd& H, const VectorXd& b, VectorXd& x) {
  if (!try_solve_spd(H, b, 1e-12, x)) x = b / std::max(H.diagonal().maxCoeff(), 1e-300);
  x = -x;
}

// Diagonal of (H + ridge I)^-1 (for the removal estimate).
VectorXd inverse_diagonal(const MatrixXd& H) {
  const Index n = H.rows();
  if (const Eigen::LLT<MatrixXd>* llt = factor_spd(H, 1e-10)) return llt->solve(MatrixXd::Identity(n, n)).diagonal();
  return VectorXd::Constant(n, 1.0);
}

/// Removes support slot `slot` from both the atoms and their coefficients.
void erase_slot(std::vector<Index>& atoms, VectorXd& alpha, Index slot) {
  atoms.erase(atoms.begin() + slot);
  VectorXd a(static_cast<Index>(atoms.size()));
  for (Index i = 0, k = 0; i < alpha.size(); ++i)
    if (i != slot) a(k++) = alpha(i);
  alpha = std::move(a);
}

// Slot whose removal costs least under the quadratic model at alpha with Hessian H:
// alpha_i^2 / (2 [H^-1]_ii), the smallest slot on ties.  Shared by both links.
Index cheapest_slot(const VectorXd& alpha, const MatrixXd& H) {
  const VectorXd hinv = inverse_diagonal(H);
  Index best = 0;
  double best_cost = INFINITY;
  for (Index i = 0; i < alpha.size(); ++i) {
    const double cost = alpha(i) * alpha(i) / (2.0 * std::max(hinv(i), 1e-300));
    if (cost < best_cost) {
      best_cost = cost;
      best = i;
    }
  }
  return best;
}

// The projected Newton direction of Bertsekas (1982) on alpha >= 0 at a with gradient g
// and Hessian H: a variable at 0 (within eps) with a positive gradient is bound and
// pushed to 0, the free ones take the Newton step on their block.  Returns the
// decrement of each part; fills step and bind (1 for a bound variable).
struct ProjectedStep {
  double dec_free = 0.0, dec_bound = 0.0;
};
ProjectedStep projected_step(const VectorXd& a, const VectorXd& g, const MatrixXd& H, VectorXd& step,
                             std::vector<std::uint8_t>& bind) {
  const Index n = a.size();
  const double eps = std::min(1e-12, (a - (a - g).cwiseMax(0.0)).norm());
  thread_local std::vector<Index> fr;
  fr.clear();
  bind.assign(static_cast<std::size_t>(n), 0);
  for (Index i = 0; i < n; ++i) {
    bind[static_cast<std::size_t>(i)] = a(i) <= eps && g(i) > 0;
    if (!bind[static_cast<std::size_t>(i)]) fr.push_back(i);
  }
  ProjectedStep d;
  if (static_cast<Index>(fr.size()) == n) {
    newton_direction(H, g, step);
    d.dec_free = -g.dot(step);
  } else if (!fr.empty()) {
    step = VectorXd::Zero(n);
    const Index nf = static_cast<Index>(fr.size());
    MatrixXd Hf(nf, nf);
    VectorXd gf(nf);
    for (Index r = 0; r < nf; ++r) {
      gf(r) = g(fr[static_cast<std::size_t>(r)]);
      for (Index c = 0; c < nf; ++c) Hf(r, c) = H(fr[static_cast<std::size_t>(r)], fr[static_cast<std::size_t>(c)]);
    }
    VectorXd sf;
    newton_direction(Hf, gf, sf);
    for (Index r = 0; r < nf; ++r) step(fr[static_cast<std::size_t>(r)]) = sf(r);
    d.dec_free = -gf.dot(sf);
  } else {
    step = VectorXd::Zero(n);
  }
  for (Index i = 0; i < n; ++i)
    if (bind[static_cast<std::size_t>(i)]) {
      step(i) = -a(i);
      d.dec_bound += g(i) * a(i);
    }
  return d;
}

// argmin over y of g.(y - a) + (y - a)' H (y - a) / 2 subject to ||y|| <= B, i.e. of
// y' H y / 2 - b' y with b = H a - g: y(l) = (H + l I)^-1 b with l >= 0 found by bisection on ||y(l)|| = B.
VectorXd ball_step(const MatrixXd& H, const VectorXd& g, const VectorXd& a, double B) {
  Eigen::SelfAdjointEigenSolver<MatrixXd> es(H);
  const VectorXd lam = es.eigenvalues().cwiseMax(0.0);
  const VectorXd beta = es.eigenvectors().transpose() * (H * a - g);
  auto norm_at = [&](double l) { return (beta.array() / (lam.array() + l)).matrix().norm(); };
  double lo = 0.0, hi = beta.norm() / B + 1e-300;
  if (lam.minCoeff() > 0 && norm_at(0.0) <= B) lo = hi = 0.0;
  for (int it = 0; it < 200 && hi - lo > 1e-15 * hi; ++it) {
    const double mid = 0.5 * (lo + hi);
    (norm_at(mid) > B ? lo : hi) = mid;
  }
  VectorXd y = es.eigenvectors() * (beta.array() / (lam.array() + hi)).matrix();
  const double ny = y.norm();
  if (ny > B) y *= B / ny;
  return y;
}

// Keeps the kShortlist best (score, pool index) pairs; ties go to the smaller index.
struct Shortlist {
  std::array<std::pair<double, Index>, kShortlist> best;
  int n = 0;
  void offer(double score, Index i) {
    if (n < kShortlist) {
      best[static_cast<std::size_t>(n++)] = {score, i};
    } else if (score > best[kShortlist - 1].first) {
      best[kShortlist - 1] = {score, i};
    } else {
      return;
    }
    for (int k = n - 1; k > 0 && best[static_cast<std::size_t>(k)].first > best[static_cast<std::size_t>(k - 1)].first;
         --k)
      std::swap(best[static_cast<std::size_t>(k)], best[static_cast<std::size_t>(k - 1)]);
  }
};

// Minimiser of a convex function on [lo, hi] from its first and second
// derivatives: Newton steps kept inside a shrinking bracket of the root of the
// derivative, bisection when a step leaves it.  O(iterations) calls of derivs.
template <class Derivs>
double minimise_1d(Derivs derivs, double lo, double hi) {
  double d1, d2;
  derivs(lo, d1, d2);
  if (d1 >= 0) return lo;
  derivs(hi, d1, d2);
  if (d1 <= 0) return hi;
  double t = 0.0 >= lo && 0.0 <= hi ? 0.0 : 0.5 * (lo + hi);
  for (int it = 0; it < 100 && hi - lo > 1e-10 * (1.0 + std::abs(t)); ++it) {
    derivs(t, d1, d2);
    if (d1 == 0) return t;
    (d1 > 0 ? hi : lo) = t;
    double tn = d2 > 0 ? t - d1 / d2 : 0.5 * (lo + hi);
    if (!(tn > lo && tn < hi)) tn = 0.5 * (lo + hi);
    if (std::abs(tn - t) < 1e-10 * (1.0 + std::abs(t))) return tn;
    t = tn;
  }
  return t;
}

}  // namespace

bool Workspace::clean() const {
  auto all = [](const auto& v, auto x) { return std::all_of(v.begin(), v.end(), [x](auto y) { return y == x; }); };
  return all(pos, -1) && all(q, 0.0) && all(acc, 0.0) && all(mark, 0) && all(bits, 0) && all(wpos, -1);
}

// ============================================================================ support rows
void SupportRows::finish() {
  const std::size_t np = ptr.size() - 1;
  is_heavy.assign(np, 0);
  heavy.clear();
  // A dense row costs n^2 / 2 vectorised multiply-adds against c^2 / 2 scattered ones
  // for c entries: worth it from about c >= n / 3 (measured on LM-like rows).
  if (n_slots >= 8)
    for (std::size_t p = 0; p < np; ++p)
      if (3 * (ptr[p + 1] - ptr[p]) >= n_slots) {
        is_heavy[p] = 1;
        heavy.push_back(static_cast<Index>(p));
      }
  shared_.clear();
  for (std::size_t p = 0; p < np; ++p)
    if (!is_heavy[p] && ptr[p + 1] - ptr[p] >= 2) shared_.push_back(static_cast<Index>(p));
  dense.setZero(static_cast<Index>(heavy.size()), n_slots);
  for (std::size_t h = 0; h < heavy.size(); ++h) {
    const std::size_t p = static_cast<std::size_t>(heavy[h]);
    for (Index k = ptr[p]; k < ptr[p + 1]; ++k)
      dense(static_cast<Index>(h), slot[static_cast<std::size_t>(k)]) = val[static_cast<std::size_t>(k)];
  }
}

void SupportRows::weighted_gram(const double* w, MatrixXd& G, VectorXd* wsum) const {
  const Index n = n_slots;
  G.setZero(n, n);
  if (wsum) wsum->resize(n);
  // Diagonal (and wsum) by slot, every entry.
  const std::int32_t* sp = spos_.data();
  const double* sv = sval_.data();
  for (Index i = 0; i < n; ++i) {
    double d = 0.0, ws = 0.0;
    for (Index k = sptr_[static_cast<std::size_t>(i)]; k < sptr_[static_cast<std::size_t>(i) + 1]; ++k) {
      const double wv = w[sp[k]] * sv[k];
      ws += wv;
      d += wv * sv[k];
    }
    G(i, i) = d;
    if (wsum) (*wsum)(i) = ws;
  }
  // Off-diagonal pairs of the shared positions outside the dense block.
  for (Index p : shared_) {
    const double wp = w[p];
    if (wp == 0.0) continue;
    const Index b = ptr[static_cast<std::size_t>(p)], e = ptr[static_cast<std::size_t>(p) + 1];
    for (Index k = b; k < e; ++k) {
      const double wv = wp * val[static_cast<std::size_t>(k)];
      // Slots ascend within a position: (slot[l], si) with l > k is in the lower triangle,
      // and column si is walked downwards (contiguous in column-major storage).
      double* col = G.data() + static_cast<std::ptrdiff_t>(slot[static_cast<std::size_t>(k)]) * n;
      for (Index l = k + 1; l < e; ++l) col[slot[static_cast<std::size_t>(l)]] += wv * val[static_cast<std::size_t>(l)];
    }
  }
  if (!heavy.empty()) {
    // The dense block's pairs; its diagonal is already in (it was counted by slot).
    const Index nh = static_cast<Index>(heavy.size());
    wh_.resize(nh);
    for (Index h = 0; h < nh; ++h)
      wh_(h) = std::max(w[static_cast<std::size_t>(heavy[static_cast<std::size_t>(h)])], 0.0);
    scaled_.noalias() = wh_.cwiseSqrt().asDiagonal() * dense;
    G.diagonal() -= scaled_.colwise().squaredNorm().transpose();
    G.selfadjointView<Eigen::Lower>().rankUpdate(scaled_.transpose());  // lower triangle only: half a GEMM
  }
  G.triangularView<Eigen::StrictlyUpper>() = G.transpose();
}

// ============================================================================ logit
void LogitModel::load(const StateIndex* ids, const double* q, Index nq) {
  ids_ = ids;
  nq_ = nq;
  double total = 0.0;
  for (Index i = 0; i < nq; ++i) total += q[i];
  qn_.resize(static_cast<std::size_t>(nq));
  for (Index i = 0; i < nq; ++i) {
    const double p = q[i] / total;
    if (selection_) w_.q[static_cast<std::size_t>(ids[i])] = p;
    qn_[static_cast<std::size_t>(i)] = p;
  }
  neg_h_ = dot_log(qn_.data(), qn_.data(), qn_.size(), 1e-300);  // a zero weight contributes 0
  atoms_.clear();
  alpha_.resize(0);
  pool_cached_ = false;
  rebuild();
}

void LogitModel::unload() {
  if (selection_)
    for (Index i = 0; i < nq_; ++i) w_.q[static_cast<std::size_t>(ids_[i])] = 0.0;
  for (StateIndex x : ulist_) w_.pos[static_cast<std::size_t>(x)] = -1;
  ulist_.clear();
  atoms_.clear();
  alpha_.resize(0);
}

void LogitModel::set_support(std::vector<Index> atoms, VectorXd alpha, bool project) {
  atoms_ = std::move(atoms);
  set_alpha(std::move(alpha), project);
  rebuild();
}

void LogitModel::rebuild() {
  memo_.valid = false;
  if (c_.dev.empty())
    prefetch_rows(atoms_.begin(), atoms_.end(), c_.ip, c_.ix, c_.px);
  else
    prefetch_rows(atoms_.begin(), atoms_.end(), c_.ip, c_.ix, c_.dev.data());
  for (StateIndex x : ulist_) w_.pos[static_cast<std::size_t>(x)] = -1;
  ulist_.clear();
  // Each entry's position is looked up once (the 512 KB pos array misses cache) and kept
  // for the build, which visits the entries in the same order.
  epos_.clear();
  for (Index v : atoms_)
    for (Index j = c_.ip[v]; j < c_.ip[v + 1]; ++j) {
      std::int32_t& p = w_.pos[static_cast<std::size_t>(c_.ix[j])];
      if (p < 0) {
        p = static_cast<std::int32_t>(ulist_.size());
        ulist_.push_back(c_.ix[j]);
      }
      epos_.push_back(p);
    }
  const std::size_t nU = ulist_.size();
  rows_.build(
      atoms_, static_cast<Index>(nU), c_.ip, [&, k = std::size_t{0}](Index) mutable { return epos_[k++]; },
      [&](Index j, Index v) { return c_.d_of(j, v); });
  qU_.resize(nU);
  if (selection_) {
    for (std::size_t p = 0; p < nU; ++p) qU_[p] = w_.q[static_cast<std::size_t>(ulist_[p])];
  } else {
    std::fill(qU_.begin(), qU_.end(), 0.0);
    for (Index i = 0; i < nq_; ++i) {
      const std::int32_t p = w_.pos[static_cast<std::size_t>(ids_[i])];
      if (p >= 0) qU_[static_cast<std::size_t>(p)] = qn_[static_cast<std::size_t>(i)];
    }
  }
  eq_ = VectorXd::Zero(static_cast<Index>(atoms_.size()));
  rows_.scatter(qU_.data(), eq_);
  zU_.assign(nU, 0.0);
  eU_.assign(nU, 0.0);
  fU_.assign(nU, 0.0);
}

VectorXd LogitModel::closed_form() {
  // DESIGN §1: min over alpha, c of sum_{x in J} q(x) (log q(x) - c - sum_v alpha_v d_v(x))^2.
  // With weights summing to one, eliminating c centres the problem:
  //   (sum q d d^T - mu mu^T) alpha = sum q log q d - mu sum q log q,  mu = sum q d.
  // Only the tokens of J in U (stored by some atom) have d != 0; the rest add nothing but
  // their share of sum q log q, which is -H(q_hat) over all of J.  So the support rows over
  // U weighted by q_hat restricted to U give the whole system.
  const Index n = size();
  if (n == 0) return VectorXd();
  const std::size_t nU = ulist_.size();
  // zU_ is scratch here (eval overwrites it before reading; f over U, which the Hessian reads, is kept).
  for (std::size_t p = 0; p < nU; ++p) zU_[p] = qU_[p] > 0 ? qU_[p] * std::log(std::max(qU_[p], kLogFloor)) : 0.0;
  MatrixXd& G = nw_.H;
  VectorXd& mu = nw_.b;
  rows_.weighted_gram(qU_.data(), G, &mu);
  VectorXd b = VectorXd::Zero(n);
  rows_.scatter(zU_.data(), b);
  G.noalias() -= mu * mu.transpose();
  b -= mu * neg_h_;
  // G(i, i) is the q-weighted variance of atom i's deviations over the observed tokens.  A row
  // flat there to float32 rounding (a uniform row: deviations of 1e-8) leaves alpha_i
  // undetermined, and solving for it divides rounding by rounding (-1.8e285 for a uniform row
  // and a two-token target).  The minimum-norm answer gives such atoms 0; the others are
  // solved without them.  1e-12 is a weighted spread of 1e-6 in log space, about 16 float32 ulps.
  constexpr double kFlat = 1e-12;
  std::vector<Index> keep;
  for (Index i = 0; i < n; ++i)
    if (G(i, i) > kFlat) keep.push_back(i);
  const auto m = static_cast<Index>(keep.size());
  VectorXd x = VectorXd::Zero(n);
  if (m == n) {
    if (!try_solve_spd(G, b, 1e-10, x)) x = VectorXd::Zero(n);
  } else if (m > 0) {
    MatrixXd Gk(m, m);
    VectorXd bk(m), xk;
    for (Index r = 0; r < m; ++r) {
      bk(r) = b(keep[static_cast<std::size_t>(r)]);
      for (Index c = 0; c < m; ++c) Gk(r, c) = G(keep[static_cast<std::size_t>(r)], keep[static_cast<std::size_t>(c)]);
    }
    if (try_solve_spd(Gk, bk, 1e-10, xk))
      for (Index r = 0; r < m; ++r) x(keep[static_cast<std::size_t>(r)]) = xk(r);
  }
  return x;
}

void LogitModel::set_alpha(VectorXd alpha, bool project) {
  alpha_ = std::move(alpha);
  const double n = alpha_.norm();
  if (project && n > bound_) alpha_ *= bound_ / n;
}

double LogitModel::eval(const VectorXd& a, VectorXd* g, MatrixXd* H) {
  const Index nU = static_cast<Index>(ulist_.size());
  rows_.gather(a, 0.0, zU_.data());
  const Eigen::Map<const Eigen::ArrayXd> e(eU_.data(), nU);
  const MaxDot md = max_dot(zU_.data(), qU_.data(), static_cast<std::size_t>(nU));
  const double zmax = std::max(0.0, md.max);  // 0 when U is empty (max -inf)
  const double qz = md.dot;
  // The softmax over U is most of an evaluation's cost: vectorised for the CPU at hand.
  const double esum = exp_shifted_sum(zU_.data(), zmax, eU_.data(), static_cast<std::size_t>(nU));
  const double zs = static_cast<double>(c_.n_base - nU) * std::exp(-zmax) + esum;
  zmax_ = zmax;
  zs_ = zs;
  const double value = -qz + zmax + std::log(zs);
  memo_.set(a, value);
  if (g || H) {
    Eigen::Map<Eigen::ArrayXd>(fU_.data(), nU) = e * (1.0 / zs);  // a multiply: a division costs 4-8x more
    if (H) {
      hessian_at_last_eval(*H, &m_);
    } else {
      m_.setZero(size());
      rows_.scatter(fU_.data(), m_);
    }
    if (g) *g = m_ - eq_;
  }
  return value;
}

void LogitModel::hessian_at_last_eval(MatrixXd& H, VectorXd* m) const {
  // H = sum_x f(x) d(x) d(x)^T - m m^T with m = sum_x f(x) d(x) (d(x): the slots' deviations at x).
  VectorXd& mv = m ? *m : nw_.b;
  rows_.weighted_gram(fU_.data(), H, &mv);
  H.noalias() -= mv * mv.transpose();
}

Index LogitModel::newton(Index max_iter, double tol, bool& converged) {
  converged = true;
  const Index n = size();
  if (n == 0) return 0;
  {
    const double nrm = alpha_.norm();
    if (nrm > bound_) alpha_ *= bound_ / nrm;
  }
  // Scratch kept with the model: a batch reuses it from one target to the next.
  VectorXd &g = nw_.g, &step = nw_.step, &trial = nw_.trial, &gt = nw_.gt;
  MatrixXd& H = nw_.H;
  auto newton_step = [&](VectorXd& st) {
    newton_direction(H, g, st);
    if ((alpha_ + st).norm() > bound_) st = ball_step(H, g, alpha_, bound_) - alpha_;
    return -g.dot(st);  // the Newton decrement
  };
  double F = eval(alpha_, &g, &H);
  for (Index it = 0; it < max_iter; ++it) {
    const double dec = newton_step(step);
    if (!(dec > tol * std::max(1.0, std::abs(F)))) return it;
    // The full step is taken almost always near the optimum, so it is evaluated with its
    // gradient; its Hessian is built from the same evaluation only if another step follows.
    trial = alpha_ + step;
    const double Ft = eval(trial, &gt, nullptr);
    if (Ft <= F - 1e-4 * dec) {
      alpha_.swap(trial);
      F = Ft;
      g.swap(gt);
      // Convergence is tested first with the previous Hessian (near the optimum they agree
      // to first order, and the test has a wide margin against the 1e-6 objective bar).
      if (!(newton_step(step) > tol * std::max(1.0, std::abs(F)))) return it + 1;
      hessian_at_last_eval(H, nullptr);
      continue;
    }
    // Backtracking.  The objective is convex along the step, so the secant root of its
    // slope, -dec at t = 0 and gt . step at t = 1, is a good first trial (from the closed-form
    // start the full step often overshoots several-fold); halving after that.  Trials are
    // evaluated with their gradient, so the accepted one needs only its Hessian.
    const double slope1 = gt.dot(step);
    double t = slope1 > 0 && std::isfinite(slope1) ? std::clamp(dec / (dec + slope1), 1e-3, 0.9) : 0.5;
    bool moved = false;
    while (t > 1e-12) {
      trial = alpha_ + t * step;
      const double Fv = eval(trial, &gt, nullptr);
      if (Fv <= F - 1e-4 * t * dec) {
        moved = true;
        F = Fv;
        break;
      }
      t *= 0.5;
    }
    if (!moved) return it + 1;  // no representable decrease left: converged to rounding
    alpha_.swap(trial);
    g.swap(gt);
    hessian_at_last_eval(H, nullptr);
  }
  converged = !(newton_step(step) > tol * std::max(1.0, std::abs(F)));
  return max_iter;
}

double LogitModel::line_gain(Index atom, double tmax, double& t_out) {
  // phi(t) = -t E_q[d_c] + log Z(t): only the atom's stored columns change, so
  // Z(t) = rest + sum over them of e(x) exp(t d_c(x)), rest being the mass of the others.
  thread_local std::vector<double> ee, dd;
  thread_local std::vector<std::int32_t> in_u;
  ee.clear();
  dd.clear();
  in_u.clear();
  double mq = 0.0, stored = 0.0;
  const double e0 = std::exp(-zmax_);
  for (Index j = c_.ip[atom]; j < c_.ip[atom + 1]; ++j) {
    const StateIndex x = c_.ix[j];
    const double d = c_.d_of(j, atom);
    const std::int32_t p = w_.pos[static_cast<std::size_t>(x)];
    ee.push_back(p >= 0 ? eU_[static_cast<std::size_t>(p)] : e0);
    stored += ee.back();
    if (p >= 0) in_u.push_back(p);
    dd.push_back(d);
    mq += w_.q[static_cast<std::size_t>(x)] * d;
  }
  double rest = zs_ - stored;
  if (!(rest > 0.5 * zs_)) {
    // Most of the mass is on the atom's columns (a row storing nearly every token of a
    // small vocabulary): the difference would cancel, and a rounding error of 1e-16 Z
    // made phi look unbounded below (a spurious gain of hundreds at t = -bound).
    // Sum the other columns instead: U minus the atom's columns, and the unstored ones.
    const std::size_t nU = ulist_.size();
    thread_local std::vector<std::uint8_t> mark;
    mark.assign(nU, 0);
    for (std::int32_t p : in_u) mark[static_cast<std::size_t>(p)] = 1;
    const Index n_new = static_cast<Index>(ee.size() - in_u.size());  // the atom's columns outside U
    rest = static_cast<double>(c_.n_base - static_cast<Index>(nU) - n_new) * e0;
    for (std::size_t p = 0; p < nU; ++p)
      if (!mark[p]) rest += eU_[p];
  }
  auto phi = [&](double t, double* d1, double* d2) {
    double zs = rest, s1 = 0.0, s2 = 0.0;
    for (std::size_t i = 0; i < ee.size(); ++i) {
      const double w = ee[i] * std::exp(t * dd[i]);
      zs += w;
      s1 += w * dd[i];
      s2 += w * dd[i] * dd[i];
    }
    zs = std::max(zs, 1e-300);
    if (d1) *d1 = -mq + s1 / zs;
    if (d2) *d2 = s2 / zs - (s1 / zs) * (s1 / zs);
    return -t * mq + std::log(zs);
  };
  const double t = minimise_1d([&](double tt, double& d1, double& d2) { phi(tt, &d1, &d2); }, -tmax, tmax);
  const double val = phi(t, nullptr, nullptr);
  t_out = t;
  return std::log(zs_) - val;
}

void LogitModel::candidate_moments(Index c, double f0, double& g, double& h) const {
  // Gradient and curvature of the objective along e_c at the last eval: E_f[d_c] - E_q[d_c]
  // and Var_f[d_c], over c's stored columns (an unstored column has d_c = 0).
  double mf = 0.0, mf2 = 0.0, mq = 0.0;
  for (Index j = c_.ip[c]; j < c_.ip[c + 1]; ++j) {
    const StateIndex x = c_.ix[j];
    const double d = c_.d_of(j, c);
    const std::int32_t p = w_.pos[static_cast<std::size_t>(x)];
    const double f = p >= 0 ? eU_[static_cast<std::size_t>(p)] / zs_ : f0;
    mf += f * d;
    mf2 += f * d * d;
    mq += w_.q[static_cast<std::size_t>(x)] * d;
  }
  g = mf - mq;
  h = mf2 - mf * mf;
}

void LogitModel::cache_pool(const std::vector<Index>& pool) {
  cpool_ = pool;
  cptr_.assign(pool.size() + 1, 0);
  cw_.clear();
  cd_.clear();
  cmq_.assign(pool.size(), 0.0);
  wlist_.clear();
  for (std::size_t i = 0; i < pool.size(); ++i) {
    const Index c = pool[i];
    double mq = 0.0;
    for (Index j = c_.ip[c]; j < c_.ip[c + 1]; ++j) {
      const StateIndex x = c_.ix[j];
      std::int32_t& w = w_.wpos[static_cast<std::size_t>(x)];
      if (w < 0) {
        w = static_cast<std::int32_t>(wlist_.size());
        wlist_.push_back(x);
      }
      const double d = c_.d_of(j, c);
      cw_.push_back(w);
      cd_.push_back(d);
      mq += w_.q[static_cast<std::size_t>(x)] * d;
    }
    cmq_[i] = mq;
    cptr_[i + 1] = static_cast<Index>(cw_.size());
  }
  for (StateIndex x : wlist_) w_.wpos[static_cast<std::size_t>(x)] = -1;
  fW_.resize(wlist_.size());
  pool_cached_ = true;
}

Pick LogitModel::best_addition(const std::vector<Index>& pool, const std::vector<std::uint8_t>& taken) {
  if (!pool_cached_ || cpool_ != pool) cache_pool(pool);
  eval(alpha_, nullptr, nullptr);
  const double a2 = alpha_.squaredNorm();
  const double tmax = std::sqrt(std::max(0.0, bound_ * bound_ - a2));
  const double rank_tmax = std::max(tmax, 0.25 * bound_);
  const double f0 = std::exp(-zmax_) / zs_;
  for (std::size_t w = 0; w < wlist_.size(); ++w) {
    const std::int32_t p = w_.pos[static_cast<std::size_t>(wlist_[w])];
    fW_[w] = p >= 0 ? eU_[static_cast<std::size_t>(p)] / zs_ : f0;
  }
  Shortlist sl;
  for (std::size_t i = 0; i < pool.size(); ++i) {
    if (taken[i]) continue;
    // candidate_moments() over the cache: the same sums in the same order.
    double mf = 0.0, mf2 = 0.0;
    for (Index k = cptr_[i]; k < cptr_[i + 1]; ++k) {
      const double f = fW_[static_cast<std::size_t>(cw_[static_cast<std::size_t>(k)])];
      const double d = cd_[static_cast<std::size_t>(k)];
      mf += f * d;
      mf2 += f * d * d;
    }
    const double g = mf - cmq_[i], h = mf2 - mf * mf;
    if (!(h > 1e-300)) continue;
    const double t = std::clamp(-g / h, -rank_tmax, rank_tmax);
    sl.offer(-(g * t + 0.5 * h * t * t), static_cast<Index>(i));
  }
  Pick best;
  for (int k = 0; k < sl.n; ++k) {
    const Index i = sl.best[static_cast<std::size_t>(k)].second;
    double t = 0.0;
    const double gain =
        tmax > 0 ? line_gain(pool[static_cast<std::size_t>(i)], tmax, t) : sl.best[static_cast<std::size_t>(k)].first;
    if (gain > best.gain || (gain == best.gain && i < best.index)) best = {i, t, gain};
  }
  return best;
}

void LogitModel::add(Index atom, double t) {
  atoms_.push_back(atom);
  alpha_.conservativeResize(static_cast<Index>(atoms_.size()));
  alpha_(static_cast<Index>(atoms_.size()) - 1) = t;
  rebuild();
}

void LogitModel::remove(Index slot) {
  erase_slot(atoms_, alpha_, slot);
  rebuild();
}

Index LogitModel::cheapest_removal() {
  VectorXd g;
  MatrixXd H;
  eval(alpha_, &g, &H);
  return cheapest_slot(alpha_, H);
}

std::vector<Index> LogitModel::rescreen(const std::vector<Index>& wide, Index C) {
  eval(alpha_, nullptr, nullptr);
  const double f0 = std::exp(-zmax_) / zs_;
  for (Index v : atoms_) w_.mark[static_cast<std::size_t>(v)] = 1;
  std::vector<std::pair<double, Index>> scored;
  scored.reserve(wide.size());
  for (Index c : wide) {
    if (w_.mark[static_cast<std::size_t>(c)]) continue;
    double g, h;
    candidate_moments(c, f0, g, h);
    scored.emplace_back(h > 1e-300 ? -g * g / h : 0.0, c);
  }
  for (Index v : atoms_) w_.mark[static_cast<std::size_t>(v)] = 0;
  std::vector<Index> pool(atoms_);
  const std::size_t keep =
      std::min<std::size_t>(scored.size(), static_cast<std::size_t>(std::max<Index>(C - size(), 0)));
  std::partial_sort(scored.begin(), scored.begin() + static_cast<std::ptrdiff_t>(keep), scored.end());
  for (std::size_t i = 0; i < keep; ++i) pool.push_back(scored[i].second);
  return pool;
}

// ============================================================================ mixture
void MixtureModel::load(const StateIndex* ids, const double* q, Index nq) {
  ids_ = ids;
  nq_ = nq;
  double total = 0.0;
  for (Index i = 0; i < nq; ++i) total += q[i];
  qJ_.resize(static_cast<std::size_t>(nq));
  for (Index i = 0; i < nq; ++i) {
    qJ_[static_cast<std::size_t>(i)] = q[i] / total;
    w_.pos[static_cast<std::size_t>(ids[i])] = static_cast<std::int32_t>(i);
    w_.set_bit(ids[i]);
  }
  qsum_ = Eigen::Map<const Eigen::ArrayXd>(qJ_.data(), nq).sum();
  neg_h_ = dot_log(qJ_.data(), qJ_.data(), static_cast<std::size_t>(nq), 1e-300);  // a zero weight contributes 0
  // Selection-only buffers, written in full before they are read (fill_fJ, best_addition).
  fJ_.resize(static_cast<std::size_t>(nq));
  rbuf_.resize(static_cast<std::size_t>(nq));
  pool_data_ = nullptr;
  pool_size_ = 0;
  atoms_.clear();
  alpha_.resize(0);
  rebuild();
}

void MixtureModel::cache_pool(const std::vector<Index>& pool) {
  hptr_.assign(pool.size() + 1, 0);
  hpos_.clear();
  hval_.clear();
  for (std::size_t i = 0; i < pool.size(); ++i) {
    const Index c = pool[i];
    const double u = c_.u[static_cast<std::size_t>(c)];
    for (Index j = c_.ip[c]; j < c_.ip[c + 1]; ++j) {
      const std::int32_t p = w_.pos_if_set(c_.ix[j]);
      if (p < 0) continue;
      hpos_.push_back(p);
      hval_.push_back(static_cast<double>(c_.px[j]) - u);
    }
    hptr_[i + 1] = static_cast<Index>(hpos_.size());
  }
  pool_data_ = pool.data();
  pool_size_ = pool.size();
}

void MixtureModel::unload() {
  pool_data_ = nullptr;
  pool_size_ = 0;
  for (Index i = 0; i < nq_; ++i) {
    w_.pos[static_cast<std::size_t>(ids_[i])] = -1;
    w_.clear_bit(ids_[i]);
  }
  atoms_.clear();
  alpha_.resize(0);
}

void MixtureModel::set_support(std::vector<Index> atoms, VectorXd alpha, bool project) {
  atoms_ = std::move(atoms);
  if (!project) {
    alpha_ = std::move(alpha);
    rebuild();
    return;
  }
  alpha_ = alpha.cwiseMax(0.0);
  double mass = 0.0;
  for (std::size_t i = 0; i < atoms_.size(); ++i)
    mass += alpha_(static_cast<Index>(i)) * c_.total[static_cast<std::size_t>(atoms_[i])];
  if (!(mass > 0) || !std::isfinite(mass)) {
    alpha_ = VectorXd::Constant(static_cast<Index>(atoms_.size()),
                                atoms_.empty() ? 0.0 : 1.0 / static_cast<double>(atoms_.size()));
  } else {
    alpha_ /= mass;
  }
  rebuild();
}

void MixtureModel::rebuild() {
  memo_.valid = false;
  prefetch_rows(atoms_.begin(), atoms_.end(), c_.ip, c_.ix, c_.px);
  rows_.build(
      atoms_, nq_, c_.ip, [&](Index j) { return w_.pos[static_cast<std::size_t>(c_.ix[j])]; },
      [&](Index j, Index v) { return static_cast<double>(c_.px[j]) - c_.u[static_cast<std::size_t>(v)]; }, true,
      &covered_);
  const std::size_t nc = covered_.size();
  qc_.resize(nc + 1);  // one landing slot for the writes past the last covered position (below)
  fc_.resize(nc);
  w1c_.resize(nc);
  w2c_.resize(nc);
  // Branch-free (whether a token is covered is a coin flip to the predictor); adding 0.0
  // for a covered one leaves the sum exactly what the branchy loop gave.
  double q_unc = 0.0;
  for (std::size_t c = 0, p = 0; p < static_cast<std::size_t>(nq_); ++p) {
    const bool cov = c < nc && static_cast<std::size_t>(covered_[c]) == p;
    qc_[c] = qJ_[p];
    q_unc += cov ? 0.0 : qJ_[p];
    c += cov;
  }
  qc_.resize(nc);
  q_unc_ = q_unc;
  const Index n = size();
  uS_.resize(n);
  tS_.resize(n);
  for (Index i = 0; i < n; ++i) {
    const std::size_t v = static_cast<std::size_t>(atoms_[static_cast<std::size_t>(i)]);
    uS_(i) = c_.u[v];
    tS_(i) = c_.total[v];
  }
}

double MixtureModel::eval(const VectorXd& a, VectorXd* g, MatrixXd* H, bool with_value) {
  const Index n = size();
  const double tau = a.dot(uS_), mass = a.dot(tS_);
  const Index nc = static_cast<Index>(covered_.size());
  rows_.gather(a, tau, fc_.data());
  const double ft = std::max(tau, kLogFloor);
  ft_ = ft;
  const bool grad = g || H;
  const MixtureTerms t = mixture_terms(qc_.data(), fc_.data(), static_cast<std::size_t>(nc), with_value,
                                       grad ? w1c_.data() : nullptr, grad ? w2c_.data() : nullptr);
  const double value = with_value ? mass - t.qlogf - q_unc_ * std::log(ft) : NAN;
  if (with_value) memo_.set(a, value);
  if (grad) {
    W1_ = q_unc_ / ft + t.w1;
    W2_ = q_unc_ / (ft * ft) + t.w2;
  }
  if (g) {
    s1_.setZero(n);
    rows_.scatter(w1c_.data(), s1_);
    *g = tS_ - uS_ * W1_ - s1_;
  }
  if (H) hessian_at_last_eval(*H);
  return value;
}

void MixtureModel::hessian_at_last_eval(MatrixXd& H) const {
  // f_p = tau + m_p . a with m_p = p(x_p|.) - u: H = sum_p w2_p (u + m_p)(u + m_p)^T
  // over J, where an uncovered position has m_p = 0 and weight q / tau^2.
  VectorXd& b = nw_.b;
  rows_.weighted_gram(w2c_.data(), H, &b);
  H.noalias() += W2_ * uS_ * uS_.transpose();
  H.noalias() += uS_ * b.transpose();
  H.noalias() += b * uS_.transpose();
}

void MixtureModel::fill_fJ() {
  std::fill(fJ_.begin(), fJ_.end(), ft_);
  for (std::size_t c = 0; c < covered_.size(); ++c) fJ_[static_cast<std::size_t>(covered_[c])] = fc_[c];
}

bool MixtureModel::converged_with(const VectorXd& g, const MatrixXd& H, double G, double tol) const {
  const ProjectedStep d = projected_step(alpha_, g, H, nw_.step2, nw_.bind2);
  return !(d.dec_free + d.dec_bound > tol * std::max(1.0, std::abs(G)));
}

Index MixtureModel::newton(Index max_iter, double tol, bool& converged) {
  converged = true;
  const Index n = size();
  if (n == 0) return 0;
  VectorXd &g = nw_.g, &step = nw_.step, &trial = nw_.trial, &gt = nw_.gt;
  MatrixXd& H = nw_.H;
  Index it = 0;
  converged = false;
  double G = eval(alpha_, &g, &H);
  std::vector<std::uint8_t>& bind = nw_.bind;
  for (; it < max_iter; ++it) {
    const ProjectedStep d = projected_step(alpha_, g, H, step, bind);
    const double dec_free = d.dec_free, dec_bound = d.dec_bound;
    if (!(dec_free + dec_bound > tol * std::max(1.0, std::abs(G)))) {
      converged = true;
      break;
    }
    // Armijo along the projection arc (Bertsekas 1982): predicted decrease of the free
    // step plus the first-order decrease of the variables pushed to the bound.  The
    // full step is evaluated with its gradient (the next iteration's).
    double t = 1.0;
    bool ok = false;
    while (t > 1e-14) {
      trial = (alpha_ + t * step).cwiseMax(0.0);
      double pred = 0.0;
      for (Index i = 0; i < n; ++i) pred += bind[static_cast<std::size_t>(i)] ? g(i) * (alpha_(i) - trial(i)) : 0.0;
      pred += t * dec_free;
      const bool full = t == 1.0;
      const double Gt = full ? eval(trial, &gt, nullptr) : eval(trial, nullptr, nullptr);
      if (Gt <= G - 1e-4 * pred) {
        ok = true;
        alpha_.swap(trial);
        G = Gt;
        if (full) {
          // The Hessian at the new point is needed only if this is not the last step:
          // test convergence first with the previous one (near the optimum they agree
          // to first order, and the test has a factor 1e4 of slack against the 1e-6
          // objective bar), then build it from the state eval() left.
          g.swap(gt);
          if (converged_with(g, H, G, tol)) {
            converged = true;
            break;
          }
          hessian_at_last_eval(H);
        } else {
          G = eval(alpha_, &g, &H);
        }
        break;
      }
      t *= 0.5;
    }
    if (!ok || converged) {
      converged = true;  // converged at the step just taken, or no representable decrease left
      ++it;
      break;
    }
  }
  double mass = 0.0;
  for (Index i = 0; i < n; ++i)
    mass += alpha_(i) * c_.total[static_cast<std::size_t>(atoms_[static_cast<std::size_t>(i)])];
  if (mass > 0) alpha_ /= mass;
  return it;
}

void MixtureModel::em(Index steps) {
  VectorXd g;
  for (Index it = 0; it < steps && size() > 0; ++it) {
    eval(alpha_, &g, nullptr, false);
    // g_i = total_i - sum_x q(x) p(x|v_i) / f(x): the EM update is alpha_i *= (total_i - g_i) / total_i.
    double mass = 0.0;
    for (Index i = 0; i < size(); ++i) {
      const double tot = c_.total[static_cast<std::size_t>(atoms_[static_cast<std::size_t>(i)])];
      alpha_(i) *= std::max(0.0, (tot - g(i)) / std::max(tot, 1e-300));
      mass += alpha_(i) * tot;
    }
    if (!(mass > 0) || !std::isfinite(mass)) break;
    alpha_ /= mass;
  }
}

double MixtureModel::line_value(Index atom, double t) const {
  // G((1 - t) alpha + t e_c), with rbuf_ holding r_c over J (set by the caller).
  double mass = 0.0;
  for (Index i = 0; i < size(); ++i)
    mass += alpha_(i) * c_.total[static_cast<std::size_t>(atoms_[static_cast<std::size_t>(i)])];
  double v = (1.0 - t) * mass + t * c_.total[static_cast<std::size_t>(atom)];
  for (std::size_t p = 0; p < static_cast<std::size_t>(nq_); ++p)
    v -= qJ_[p] * std::log(std::max((1.0 - t) * fJ_[p] + t * rbuf_[p], kLogFloor));
  return v;
}

Pick MixtureModel::best_addition(const std::vector<Index>& pool, const std::vector<std::uint8_t>& taken) {
  Pick best;
  if (pool.data() != pool_data_ || pool.size() != pool_size_) cache_pool(pool);
  if (size() == 0) {
    const double base = empty_value();
    for (std::size_t i = 0; i < pool.size(); ++i) {
      if (taken[i]) continue;
      const Index c = pool[i];
      const double u = c_.u[static_cast<std::size_t>(c)];
      double hit_q = 0.0, hit_log = 0.0;
      for (Index h = hptr_[i]; h < hptr_[i + 1]; ++h) {
        const double q = qJ_[static_cast<std::size_t>(hpos_[static_cast<std::size_t>(h)])];
        hit_q += q;
        hit_log += q * std::log(std::max(hval_[static_cast<std::size_t>(h)] + u, kLogFloor));
      }
      const double value =
          -((qsum_ - hit_q) * c_.logu[static_cast<std::size_t>(c)] + hit_log) + c_.total[static_cast<std::size_t>(c)];
      const double gain = base - value;
      if (gain > best.gain) best = {static_cast<Index>(i), 1.0, gain};
    }
    return best;
  }
  const double G0 = eval(alpha_, nullptr, nullptr);
  fill_fJ();
  double mass = 0.0;
  for (Index i = 0; i < size(); ++i)
    mass += alpha_(i) * c_.total[static_cast<std::size_t>(atoms_[static_cast<std::size_t>(i)])];
  // Screen every candidate by a lower bound on its exact gain along (1 - t) alpha + t e_c
  // that reads only its hits on J: a token the candidate does not store keeps at
  // least (1 - t) f.  Unlike a second-order estimate it stays faithful when the
  // candidate explains tokens that f gives almost no mass (the gain is then large
  // but the curvature at t = 0 is huge).
  Shortlist sl;
  for (std::size_t i = 0; i < pool.size(); ++i) {
    if (taken[i]) continue;
    const Index c = pool[i];
    const double u = c_.u[static_cast<std::size_t>(c)];
    const double lin = c_.total[static_cast<std::size_t>(c)] - mass;
    double q_hit = 0.0, d0 = -lin;
    for (Index h = hptr_[i]; h < hptr_[i + 1]; ++h) {
      const std::size_t p = static_cast<std::size_t>(hpos_[static_cast<std::size_t>(h)]);
      q_hit += qJ_[p];
      d0 += qJ_[p] * ((hval_[static_cast<std::size_t>(h)] + u) / fJ_[p] - 1.0);
    }
    const double q0 = qsum_ - q_hit;
    if (!(d0 - q0 > 0)) continue;  // the bound's slope at t = 0: no gain from this candidate
    auto derivs = [&](double t, double& d1, double& d2) {  // of minus the bound
      d1 = lin + q0 / (1.0 - t);
      d2 = q0 / ((1.0 - t) * (1.0 - t));
      for (Index h = hptr_[i]; h < hptr_[i + 1]; ++h) {
        const std::size_t p = static_cast<std::size_t>(hpos_[static_cast<std::size_t>(h)]);
        const double rho = (hval_[static_cast<std::size_t>(h)] + u) / fJ_[p];
        const double den = 1.0 - t + t * rho;
        d1 -= qJ_[p] * (rho - 1.0) / den;
        d2 += qJ_[p] * (rho - 1.0) * (rho - 1.0) / (den * den);
      }
    };
    const double t = minimise_1d(derivs, 0.0, 1.0 - 1e-9);
    double bound = q0 * std::log1p(-t) - t * lin;
    for (Index h = hptr_[i]; h < hptr_[i + 1]; ++h) {
      const std::size_t p = static_cast<std::size_t>(hpos_[static_cast<std::size_t>(h)]);
      const double rho = (hval_[static_cast<std::size_t>(h)] + u) / fJ_[p];
      bound += qJ_[p] * std::log(1.0 - t + t * rho);
    }
    sl.offer(bound, static_cast<Index>(i));
  }
  for (int k = 0; k < sl.n; ++k) {
    const Index i = sl.best[static_cast<std::size_t>(k)].second;
    const Index c = pool[static_cast<std::size_t>(i)];
    const double u = c_.u[static_cast<std::size_t>(c)];
    std::fill(rbuf_.begin(), rbuf_.end(), u);
    for (Index h = hptr_[static_cast<std::size_t>(i)]; h < hptr_[static_cast<std::size_t>(i) + 1]; ++h)
      rbuf_[static_cast<std::size_t>(hpos_[static_cast<std::size_t>(h)])] = hval_[static_cast<std::size_t>(h)] + u;
    // Convex in t on [0, 1]: safeguarded Newton from t = 0.
    auto derivs = [&](double t, double& d1, double& d2) {
      d1 = c_.total[static_cast<std::size_t>(c)] - mass;
      d2 = 0.0;
      for (std::size_t p = 0; p < static_cast<std::size_t>(nq_); ++p) {
        const double h = std::max((1.0 - t) * fJ_[p] + t * rbuf_[p], kLogFloor);
        const double r = (rbuf_[p] - fJ_[p]) / h;
        d1 -= qJ_[p] * r;
        d2 += qJ_[p] * r * r;
      }
    };
    const double t = minimise_1d(derivs, 0.0, 1.0);
    const double val = line_value(c, t);
    const double gain = G0 - val;
    if (gain > best.gain || (gain == best.gain && i < best.index)) best = {i, t, gain};
  }
  return best;
}

void MixtureModel::add(Index atom, double t) {
  if (atoms_.empty()) t = 1.0;
  alpha_ *= (1.0 - t);
  atoms_.push_back(atom);
  alpha_.conservativeResize(static_cast<Index>(atoms_.size()));
  alpha_(static_cast<Index>(atoms_.size()) - 1) = t;
  rebuild();
}

void MixtureModel::remove(Index slot) {
  erase_slot(atoms_, alpha_, slot);
  set_support(std::move(atoms_), std::move(alpha_));
}

Index MixtureModel::cheapest_removal() {
  VectorXd g;
  MatrixXd H;
  eval(alpha_, &g, &H);
  return cheapest_slot(alpha_, H);
}

VectorXd MixtureModel::gradient_kl() {
  VectorXd g;
  eval(alpha_, &g, nullptr);
  for (Index i = 0; i < size(); ++i) g(i) -= c_.total[static_cast<std::size_t>(atoms_[static_cast<std::size_t>(i)])];
  return g;
}

}  // namespace markovmem::detail
