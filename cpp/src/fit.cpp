// fit_alpha and friends: input checks, the per-call context (tails, log-rows,
// CSC for screening), candidate screening, the greedy selection driver (forward,
// prune, swap, final refit) run in parallel over targets, the closed form,
// the objective and the prediction f(alpha).
#include "markovmem/fit.hpp"

#include <algorithm>
#include <bitset>
#include <cmath>
#include <iterator>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

#include "fit_model.hpp"

#ifdef MARKOVMEM_HAVE_OPENMP
#include <omp.h>
#endif

namespace markovmem {

using detail::FitContext;
using detail::LogitModel;
using detail::MixtureModel;
using detail::Pick;
using detail::VectorXd;
using detail::Workspace;

namespace detail {

namespace {
constexpr double kGridStep = 0.05;  // background scales c = 0, 0.05, ..., 6 for the logit screen
constexpr int kGridSize = 121;
}  // namespace

namespace {

std::shared_ptr<const RowConstants> make_row_constants(const TransitionMatrix& P, int nt) {
  auto rc = std::make_shared<RowConstants>();
  const Index n_states = P.n_states(), n_base = P.n_base();
  const Index* ip = P.indptr();
  const Prob* px = P.data();
  const double* tail = P.tail();
  const std::size_t n = static_cast<std::size_t>(n_states);
  rc->u.resize(n);
  rc->logu.resize(n);
  rc->total.resize(n);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (Index v = 0; v < n_states; ++v) {
    const Index k = ip[v + 1] - ip[v];
    const Index free = n_base - k;
    double stored = 0.0;
    for (Index j = ip[v]; j < ip[v + 1]; ++j) stored += px[j];
    const std::size_t sv = static_cast<std::size_t>(v);
    rc->u[sv] = free > 0 ? tail[v] / static_cast<double>(free) : 0.0;
    rc->logu[sv] = std::log(std::max(rc->u[sv], kLogFloor));
    rc->total[sv] = stored + (free > 0 ? tail[v] : 0.0);
  }
  return rc;
}

std::shared_ptr<const LogDeviations> make_log_deviations(const TransitionMatrix& P, const RowConstants& rc, int nt) {
  auto ld = std::make_shared<LogDeviations>();
  const Index* ip = P.indptr();
  const Prob* px = P.data();
  ld->dev.resize(static_cast<std::size_t>(P.nnz()));
#pragma omp parallel for schedule(static) num_threads(nt)
  for (Index v = 0; v < P.n_states(); ++v)
    for (Index j = ip[v]; j < ip[v + 1]; ++j)
      ld->dev[static_cast<std::size_t>(j)] =
          std::log(std::max<double>(px[j], kLogFloor)) - rc.logu[static_cast<std::size_t>(v)];
  return ld;
}

std::shared_ptr<const ScreenIndex> make_screen(const TransitionMatrix& P, Link link, const RowConstants& rc,
                                               const std::vector<double>& dev, const StateIndex* allowed,
                                               Index n_allowed, int nt) {
  auto si = std::make_shared<ScreenIndex>();
  ScreenIndex& S = *si;
  const Index n_states = P.n_states(), n_base = P.n_base();
  const Index* ip = P.indptr();
  const StateIndex* ix = P.indices();
  const Prob* px = P.data();
  const std::size_t n = static_cast<std::size_t>(n_states);
  S.eligible.assign(n, allowed ? 0 : 1);
  for (Index i = 0; i < n_allowed; ++i) S.eligible[static_cast<std::size_t>(allowed[i])] = 1;
  Index n_elig = 0;
  for (std::uint8_t e : S.eligible) n_elig += e;
  // CSC over base columns of the eligible rows, built by fixed row chunks (each with
  // its own column counters) so the result is the same for any thread count:
  // rows ascend within a column.
  const bool logit = link == Link::kLogit;
  const Index nchunk = std::max<Index>(1, std::min<Index>(16, n_states / 4096));
  const std::size_t nb = static_cast<std::size_t>(n_base);
  std::vector<Index> cnt(static_cast<std::size_t>(nchunk) * nb, 0);
  auto chunk_begin = [&](Index ch) { return ch * n_states / nchunk; };
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (Index ch = 0; ch < nchunk; ++ch) {
    Index* cc = cnt.data() + static_cast<std::size_t>(ch) * nb;
    for (Index v = chunk_begin(ch); v < chunk_begin(ch + 1); ++v)
      if (S.eligible[static_cast<std::size_t>(v)])
        for (Index j = ip[v]; j < ip[v + 1]; ++j) ++cc[ix[j]];
  }
  S.cptr.assign(nb + 1, 0);
  Index total_entries = 0;
  for (std::size_t x = 0; x < nb; ++x) {
    S.cptr[x] = total_entries;
    for (Index ch = 0; ch < nchunk; ++ch) {
      Index& c = cnt[static_cast<std::size_t>(ch) * nb + x];
      const Index here = c;
      c = total_entries;
      total_entries += here;
    }
  }
  S.cptr[nb] = total_entries;
  S.crow.resize(static_cast<std::size_t>(total_entries));
  S.cval.resize(static_cast<std::size_t>(total_entries));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (Index ch = 0; ch < nchunk; ++ch) {
    Index* next = cnt.data() + static_cast<std::size_t>(ch) * nb;
    for (Index v = chunk_begin(ch); v < chunk_begin(ch + 1); ++v) {
      const std::size_t sv = static_cast<std::size_t>(v);
      if (!S.eligible[sv]) continue;
      for (Index j = ip[v]; j < ip[v + 1]; ++j) {
        const std::size_t k = static_cast<std::size_t>(next[ix[j]]++);
        S.crow[k] = static_cast<StateIndex>(v);
        S.cval[k] =
            static_cast<float>(logit ? dev[static_cast<std::size_t>(j)] : static_cast<double>(px[j]) - rc.u[sv]);
      }
    }
  }
  // The background rows, column by column (sums in a fixed order).
  std::vector<double>& colsum = logit ? S.dbar : S.pbar;
  colsum.assign(nb, 0.0);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (Index x = 0; x < n_base; ++x) {
    double acc = 0.0;
    for (Index k = S.cptr[static_cast<std::size_t>(x)]; k < S.cptr[static_cast<std::size_t>(x) + 1]; ++k)
      acc += S.cval[static_cast<std::size_t>(k)];
    colsum[static_cast<std::size_t>(x)] = acc;
  }
  double usum = 0.0;
  for (Index v = 0; v < n_states; ++v)
    if (S.eligible[static_cast<std::size_t>(v)]) usum += rc.u[static_cast<std::size_t>(v)];
  S.heavy_len = std::max<Index>(256, n_elig / 8);
  const double inv = n_elig > 0 ? 1.0 / static_cast<double>(n_elig) : 0.0;
  if (!logit) {
    for (double& p : S.pbar) p = std::max((p + usum) * inv, kLogFloor);
    return si;
  }
  for (double& d : S.dbar) d *= inv;
  const double dmax = S.dbar.empty() ? 0.0 : *std::max_element(S.dbar.begin(), S.dbar.end());
  S.grid_c.resize(kGridSize);
  S.grid_logz.resize(kGridSize);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int i = 0; i < kGridSize; ++i) {
    const double c = kGridStep * i;
    double zs = 0.0;
    for (double d : S.dbar) zs += std::exp(c * (d - dmax));
    S.grid_c[static_cast<std::size_t>(i)] = c;
    S.grid_logz[static_cast<std::size_t>(i)] = c * dmax + std::log(zs);
  }
  S.grid_ebg.resize(kGridSize);
  S.grid_once = std::make_unique<std::once_flag[]>(kGridSize);
  return si;
}

// Fetches (or builds and stores) a derived entry of P with its concrete type.
template <class T, class Make>
std::shared_ptr<const T> cached(const TransitionMatrix& P, const std::string& key, Make make) {
  return std::static_pointer_cast<const T>(P.derived(key, [&]() -> std::shared_ptr<const void> { return make(); }));
}

}  // namespace

const ScreenIndex& FitContext::empty_screen() {
  static const ScreenIndex empty;
  return empty;
}

FitContext::FitContext(const TransitionMatrix& P_, Link link_, Dev with_dev, bool with_screening,
                       const StateIndex* allowed, Index n_allowed, int n_threads)
    : P(P_),
      link(link_),
      n_states(P_.n_states()),
      n_base(P_.n_base()),
      ip(P_.indptr()),
      ix(P_.indices()),
      px(P_.data()),
      rows_(cached<RowConstants>(P_, "fit.row_constants",
                                 [&] { return make_row_constants(P_, resolve_threads(n_threads)); })),
      devs_(link_ != Link::kLogit || with_dev == Dev::kNo ? std::make_shared<const LogDeviations>()
            : with_dev == Dev::kYes
                ? cached<LogDeviations>(P_, "fit.log_deviations",
                                        [&] { return make_log_deviations(P_, *rows_, resolve_threads(n_threads)); })
                : std::static_pointer_cast<const LogDeviations>(P_.find_derived("fit.log_deviations"))),
      screen_(!with_screening ? nullptr
              : allowed ? make_screen(P_, link_, *rows_, devs_->dev, allowed, n_allowed, resolve_threads(n_threads))
                        : cached<ScreenIndex>(P_, link_ == Link::kLogit ? "fit.screen.logit" : "fit.screen.mixture",
                                              [&] {
                                                return make_screen(P_, link_, *rows_, devs_->dev, nullptr, 0,
                                                                   resolve_threads(n_threads));
                                              })),
      u(rows_->u),
      logu(rows_->logu),
      total(rows_->total),
      dev(devs_ ? devs_->dev : empty_screen().dbar),  // dbar of the empty screen: an empty vector
      scr(screen_ ? *screen_ : empty_screen()) {}

const std::vector<double>& FitContext::background_mean(std::size_t i) const {
  std::call_once(scr.grid_once[i], [&] {
    std::vector<double> fbg(static_cast<std::size_t>(n_base));
    for (Index x = 0; x < n_base; ++x)
      fbg[static_cast<std::size_t>(x)] =
          std::exp(scr.grid_c[i] * scr.dbar[static_cast<std::size_t>(x)] - scr.grid_logz[i]);
    std::vector<double> e(static_cast<std::size_t>(n_states), 0.0);
    for (Index v = 0; v < n_states; ++v) {
      if (!scr.eligible[static_cast<std::size_t>(v)]) continue;
      double s = 0.0;
      for (Index j = ip[v]; j < ip[v + 1]; ++j) s += fbg[static_cast<std::size_t>(ix[j])] * d_of(j, v);
      e[static_cast<std::size_t>(v)] = s;
    }
    scr.grid_ebg[i] = std::move(e);
  });
  return scr.grid_ebg[i];
}

}  // namespace detail

namespace {

std::string row_msg(Index r) { return "targets row " + std::to_string(r); }

void check_options(const FitOptions& o, bool selection) {
  if (selection && o.s <= 0) throw std::invalid_argument("s is " + std::to_string(o.s) + "; expected >= 1");
  if (!(o.bound > 0)) {
    std::ostringstream os;
    os << "bound is " << o.bound << "; expected > 0";
    throw std::invalid_argument(os.str());
  }
  if (!(o.tol >= 0)) throw std::invalid_argument("tol must be >= 0 and not NaN");
  if (o.max_iter < 1) throw std::invalid_argument("max_iter is " + std::to_string(o.max_iter) + "; expected >= 1");
  if (o.n_candidates < 0) throw std::invalid_argument("n_candidates must be >= 0");
  if (!(o.oversize >= 0)) throw std::invalid_argument("oversize must be >= 0");
  if (o.swap_passes < 0) throw std::invalid_argument("swap_passes must be >= 0");
  if (o.link != Link::kLogit && o.link != Link::kMixture) throw std::invalid_argument("unknown link");
}

void check_support(const TransitionMatrix& P, const SupportView& s, Index n_rows, bool need_values) {
  if (s.n_rows != n_rows)
    throw std::invalid_argument("support has " + std::to_string(s.n_rows) + " rows; expected " +
                                std::to_string(n_rows) + " (one per target)");
  if (s.indptr[0] != 0) throw std::invalid_argument("support indptr[0] must be 0");
  if (need_values && !s.values) throw std::invalid_argument("alpha values are required");
  for (Index r = 0; r < n_rows; ++r) {
    if (s.indptr[r + 1] < s.indptr[r]) throw std::invalid_argument("support indptr must be non-decreasing");
    std::vector<StateIndex> ids(s.indices + s.indptr[r], s.indices + s.indptr[r + 1]);
    for (StateIndex v : ids)
      if (v < 0 || v >= P.n_states())
        throw std::out_of_range("support row " + std::to_string(r) + " holds state " + std::to_string(v) +
                                ", outside [0, n_states = " + std::to_string(P.n_states()) + ")");
    std::sort(ids.begin(), ids.end());
    if (std::adjacent_find(ids.begin(), ids.end()) != ids.end())
      throw std::invalid_argument("support row " + std::to_string(r) + " lists a state twice");
    if (s.values)
      for (Index k = s.indptr[r]; k < s.indptr[r + 1]; ++k)
        if (!std::isfinite(s.values[k]))
          throw std::invalid_argument("support row " + std::to_string(r) + " has a non-finite value");
  }
}

struct RowOut {
  std::vector<std::pair<StateIndex, double>> entries;
  double kl = 0.0;
  std::int64_t n_iter = 0;
  bool converged = false;
  Index n_candidates = 0;
};

AlphaResult assemble(std::vector<RowOut>& rows) {
  AlphaResult res;
  const std::size_t m = rows.size();
  res.indptr.assign(m + 1, 0);
  for (std::size_t r = 0; r < m; ++r) res.indptr[r + 1] = res.indptr[r] + static_cast<Index>(rows[r].entries.size());
  res.indices.reserve(static_cast<std::size_t>(res.indptr[m]));
  res.alpha.reserve(static_cast<std::size_t>(res.indptr[m]));
  res.kl.resize(m);
  res.n_iter.resize(m);
  res.converged.resize(m);
  res.n_candidates.resize(m);
  for (std::size_t r = 0; r < m; ++r) {
    std::sort(rows[r].entries.begin(), rows[r].entries.end());
    for (const auto& [v, a] : rows[r].entries) {
      res.indices.push_back(v);
      res.alpha.push_back(a);
    }
    res.kl[r] = rows[r].kl;
    res.n_iter[r] = rows[r].n_iter;
    res.converged[r] = rows[r].converged ? 1 : 0;
    res.n_candidates[r] = rows[r].n_candidates;
  }
  return res;
}

constexpr Index kEmSteps = 3;  // mixture, fixed support: EM steps before projected Newton
constexpr Index kWide = 32;  // logit: rows kept by the screen per pool slot, rescored at each round

std::uint64_t splitmix64(std::uint64_t& x) {
  std::uint64_t z = (x += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Candidate pool of one target: Gustavson's row-by-row sparse product of q_hat
// with the CSC of P (only rows storing an observed token are touched), each touched
// row scored by minus the gradient at a background model; the best `C` are kept,
// best first, ties by state id.  The logit link keeps kWide * C (its rounds
// rescore that longer list at each fit) and, when `plain` is given and the fitted
// background scale is not 0, also fills it with the list scored against the
// uniform background (scale 0: the gradient at alpha = 0, the plain greedy start).
std::vector<Index> screen(const FitContext& c, Workspace& w, const StateIndex* ids, const double* counts, Index nq,
                          Index C, bool with_heavy = false, std::vector<Index>* plain = nullptr) {
  double total = 0.0;
  for (Index i = 0; i < nq; ++i) total += counts[i];
  const bool logit = c.link == Link::kLogit;
  double W = 0.0, mdbar = 0.0;
  w.touched.clear();
  for (Index i = 0; i < nq; ++i) {
    const std::size_t x = static_cast<std::size_t>(ids[i]);
    const double q = counts[i] / total;
    const double wt = logit ? q : q / c.scr.pbar[x];
    if (logit)
      mdbar += q * c.scr.dbar[x];
    else
      W += wt;
    // Mixture: columns stored by a large share of the rows (the most frequent
    // tokens) add nearly the same to every score and dominate the cost of the
    // product, so they are left out of the screen (never out of the objective)
    // unless too few rows remain.  The logit screen needs them: its background
    // model is fitted on exactly those tokens (measured: recall drops without them).
    if (!with_heavy && !logit && c.scr.cptr[x + 1] - c.scr.cptr[x] > c.scr.heavy_len) continue;
    for (Index k = c.scr.cptr[x]; k < c.scr.cptr[x + 1]; ++k) {
      const std::size_t v = static_cast<std::size_t>(c.scr.crow[static_cast<std::size_t>(k)]);
      if (!w.mark[v]) {
        w.mark[v] = 1;
        w.touched.push_back(static_cast<Index>(v));
      }
      w.acc[v] += wt * c.scr.cval[static_cast<std::size_t>(k)];
    }
  }
  if (!with_heavy && static_cast<Index>(w.touched.size()) < C) {
    for (Index v : w.touched) {
      w.acc[static_cast<std::size_t>(v)] = 0.0;
      w.mark[static_cast<std::size_t>(v)] = 0;
    }
    return screen(c, w, ids, counts, nq, C, true, plain);
  }
  const std::vector<double>* ebg = nullptr;
  const std::vector<double>* ebg0 = nullptr;
  if (plain) plain->clear();
  if (logit) {
    // Background softmax(c dbar) with the scale c that fits q_hat best (the "scale-aware start").
    std::size_t best = 0;
    double best_val = INFINITY;
    for (std::size_t i = 0; i < c.scr.grid_c.size(); ++i) {
      const double val = -c.scr.grid_c[i] * mdbar + c.scr.grid_logz[i];
      if (val < best_val) {
        best_val = val;
        best = i;
      }
    }
    ebg = &c.background_mean(best);
    if (plain && best != 0) ebg0 = &c.background_mean(0);
  }
  std::vector<std::pair<double, Index>> scored, scored0;
  scored.reserve(w.touched.size());
  if (ebg0) scored0.reserve(w.touched.size());
  for (Index v : w.touched) {
    const std::size_t sv = static_cast<std::size_t>(v);
    const double score = logit ? w.acc[sv] - (*ebg)[sv] : c.u[sv] * W + w.acc[sv];
    scored.emplace_back(-score, v);
    if (ebg0) scored0.emplace_back((*ebg0)[sv] - w.acc[sv], v);
    w.acc[sv] = 0.0;
    w.mark[sv] = 0;
  }
  const std::size_t keep = std::min<std::size_t>(scored.size(), static_cast<std::size_t>(logit ? kWide * C : C));
  auto best_of = [keep](std::vector<std::pair<double, Index>>& sc) {
    std::partial_sort(sc.begin(), sc.begin() + static_cast<std::ptrdiff_t>(keep), sc.end());
    std::vector<Index> pool(keep);
    for (std::size_t i = 0; i < keep; ++i) pool[i] = sc[i].second;
    return pool;
  };
  if (ebg0) *plain = best_of(scored0);
  return best_of(scored);
}

// Greedy selection for one target: forward by gain with a refit after each
// addition, pruning back to s, swap pass; for the logit link the pool is then
// rescreened at the fit (gradient and curvature of every touched row) and the
// rounds repeat while the pool changes; final refit.
template <class Model>
void select_one(Model& model, const std::vector<Index>& wide, const FitOptions& o, Index row, Index C, RowOut& out) {
  constexpr bool kLogit = std::is_same_v<Model, LogitModel>;
  constexpr Index kRounds = kLogit ? 3 : 1;
  // Refits during selection only rank supports: a loose tolerance and few steps suffice.
  const double light_tol = std::max(o.tol, 1e-6);
  constexpr Index kLightIter = 8;
  bool conv = false;
  std::int64_t iters = 0;
  std::vector<Index> pool(wide.begin(), wide.begin() + std::min<Index>(C, static_cast<Index>(wide.size())));
  const Index s_eff = std::min<Index>(o.s, static_cast<Index>(pool.size()));
  const double over = o.oversize > 0 ? o.oversize : (model.is_mixture() ? 1.0 : 2.0);
  std::uint64_t rng = o.seed ^ (0xD1B54A32D192ED03ULL * static_cast<std::uint64_t>(o.row_offset + row + 1));
  for (Index round = 0; round < kRounds; ++round) {
    std::vector<Index> before_round(model.atoms());
    std::sort(before_round.begin(), before_round.end());
    const Index n_fwd =
        std::min<Index>(static_cast<Index>(pool.size()),
                        std::max<Index>(s_eff, static_cast<Index>(std::ceil(over * static_cast<double>(o.s)))));
    std::vector<std::uint8_t> taken(pool.size(), 0);
    std::vector<Index> slot_pool;  // pool index of each support slot
    for (Index v : model.atoms()) {
      const Index i = static_cast<Index>(std::find(pool.begin(), pool.end(), v) - pool.begin());
      taken[static_cast<std::size_t>(i)] = 1;
      slot_pool.push_back(i);
    }
    while (model.size() < n_fwd) {
      const Pick p = model.best_addition(pool, taken);
      // The first mixture atom may explain q_hat worse than the uniform row and is still needed.
      if (p.index < 0 || (model.size() > 0 && !(p.gain > 0))) break;
      model.add(pool[static_cast<std::size_t>(p.index)], p.t);
      taken[static_cast<std::size_t>(p.index)] = 1;
      slot_pool.push_back(p.index);
      iters += model.newton(kLightIter, light_tol, conv);
    }
    while (model.size() > s_eff) {
      const Index i = model.cheapest_removal();
      taken[static_cast<std::size_t>(slot_pool[static_cast<std::size_t>(i)])] = 0;
      slot_pool.erase(slot_pool.begin() + i);
      model.remove(i);
      iters += model.newton(kLightIter, light_tol, conv);
    }
    for (Index pass = 0; pass < o.swap_passes && model.size() > 0; ++pass) {
      bool improved = false;
      std::vector<Index> order(model.atoms());
      for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[splitmix64(rng) % i]);
      for (Index atom : order) {
        const auto it = std::find(model.atoms().begin(), model.atoms().end(), atom);
        if (it == model.atoms().end()) continue;
        const Index slot = static_cast<Index>(it - model.atoms().begin());
        const std::vector<Index> saved_atoms = model.atoms();
        const VectorXd saved_alpha = model.alpha();
        const std::vector<Index> saved_slot_pool = slot_pool;
        const double before = model.value();
        const Index removed_pool = slot_pool[static_cast<std::size_t>(slot)];
        model.remove(slot);
        slot_pool.erase(slot_pool.begin() + slot);
        taken[static_cast<std::size_t>(removed_pool)] = 0;
        iters += model.newton(kLightIter, light_tol, conv);
        const Pick p = model.best_addition(pool, taken);
        bool accept = false;
        if (p.index >= 0 && p.index != removed_pool) {
          model.add(pool[static_cast<std::size_t>(p.index)], p.t);
          iters += model.newton(kLightIter, light_tol, conv);
          accept = model.value() < before - 1e-12 * std::max(1.0, std::abs(before));
          if (accept) {
            taken[static_cast<std::size_t>(p.index)] = 1;
            slot_pool.push_back(p.index);
            improved = true;
          }
        }
        if (!accept) {
          model.set_support(saved_atoms, saved_alpha);
          slot_pool = saved_slot_pool;
          taken[static_cast<std::size_t>(removed_pool)] = 1;
        }
      }
      if (!improved) break;
    }
    if constexpr (kLogit) {
      std::vector<Index> after_round(model.atoms());
      std::sort(after_round.begin(), after_round.end());
      if (round + 1 < kRounds && model.size() > 0 && after_round != before_round) {
        pool = model.rescreen(wide, C);
        continue;
      }
    }
    break;
  }
  iters += model.newton(o.max_iter, o.tol, conv);
  out.n_iter = iters;
  out.converged = conv;
}

template <class Model>
double model_kl(Model& model, Index n_base) {
  if (model.size() == 0) return model.neg_entropy() + std::log(static_cast<double>(n_base));
  return model.kl();
}

template <class Model>
void emit(Model& model, Index n_base, RowOut& out, bool drop_zeros) {
  out.kl = model_kl(model, n_base);
  out.entries.clear();
  for (Index i = 0; i < model.size(); ++i) {
    const double a = model.alpha()(i);
    if (drop_zeros && a == 0.0) continue;
    out.entries.emplace_back(static_cast<StateIndex>(model.atoms()[static_cast<std::size_t>(i)]), a);
  }
}

// Workspaces kept between calls.  A workspace is O(n_base + n_states) (25 bytes per
// state: 3.2 MB at T = 131k); allocating and zeroing one per thread per call, with the page
// faults of fresh memory, made a 1-target fixed-support call take 2.5-2.9 ms instead of
// 0.24-0.28 ms (200 logit targets: 5-11% of the call, 1,000 mixture targets: 1-4%).  Every
// target leaves its workspace clean (Workspace::clean), so one that served a call without
// an exception is returned here and the next call takes it as it is.
class WorkspacePool {
 public:
  static WorkspacePool& get() {
    static WorkspacePool pool;
    return pool;
  }
  /// A workspace sized for (n_base, n_states): a kept one when there is one (ensure() resizes
  /// its per-state part after an expansion).  Kept ones sized for another n_base are freed:
  /// the caller has moved to another vocabulary.
  std::unique_ptr<Workspace> take(Index n_base, Index n_states) {
    std::unique_ptr<Workspace> w;
    std::vector<std::unique_ptr<Workspace>> drop;  // freed after the lock is released
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto other = std::stable_partition(free_.begin(), free_.end(), [&](const std::unique_ptr<Workspace>& x) {
        return static_cast<Index>(x->pos.size()) == n_base;
      });
      drop.assign(std::make_move_iterator(other), std::make_move_iterator(free_.end()));
      free_.erase(other, free_.end());
      if (!free_.empty()) {
        w = std::move(free_.back());
        free_.pop_back();
      }
    }
    if (!w) w = std::make_unique<Workspace>();
    w->ensure(n_base, n_states);
    return w;
  }
  /// Keeps a clean workspace for the next call (up to kMax; the rest are freed).
  void give(std::unique_ptr<Workspace> w) {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.size() < kMax) free_.push_back(std::move(w));
  }
  void clear() {
    std::vector<std::unique_ptr<Workspace>> drop;
    std::lock_guard<std::mutex> lock(mu_);
    drop.swap(free_);
  }
  /// (workspaces kept, all of them clean)
  std::pair<std::size_t, bool> state() {
    std::lock_guard<std::mutex> lock(mu_);
    bool ok = true;
    for (const auto& w : free_) ok = ok && w->clean();
    return {free_.size(), ok};
  }

 private:
  static constexpr std::size_t kMax = 64;
  std::mutex mu_;
  std::vector<std::unique_ptr<Workspace>> free_;
};

// Runs body(ws, local, r) for every row r in parallel.  Each thread takes a Workspace from
// the pool and makes a `local` with make_local(ws) once (models whose buffers then serve
// all its rows).  Rows are handed out `chunk` at a time, in order within a chunk, so a
// body can prefetch the data of row r + 1.  Results must not depend on which thread runs
// a row.  With a control, each finished row is counted and a cancel skips the rows not
// yet started.  A workspace whose thread saw an exception (it may be mid-target) is freed,
// not returned to the pool.
template <class MakeLocal, class Body>
void parallel_rows_with(Index m, int n_threads, const FitContext& ctx, Index chunk, FitControl* control,
                        MakeLocal make_local, Body body) {
  detail::ExceptionCollector errors;
  const int nt = detail::resolve_threads(n_threads);
  (void)nt;  // unused without OpenMP
  (void)chunk;
#pragma omp parallel num_threads(nt)
  {
    std::unique_ptr<Workspace> wp;
    bool ok = errors.run([&] { wp = WorkspacePool::get().take(ctx.n_base, ctx.n_states); });
    if (!ok) wp = std::make_unique<Workspace>();  // never used: its rows fail below
    {
      Workspace& ws = *wp;
      auto local = make_local(ws);
#pragma omp for schedule(dynamic, chunk)
      for (Index r = 0; r < m; ++r) {
        if (control && control->cancel.load(std::memory_order_relaxed)) continue;
        ok = ok && errors.run([&] { body(ws, local, r); });
        if (control) control->done.fetch_add(1, std::memory_order_relaxed);
      }
    }
    if (ok) WorkspacePool::get().give(std::move(wp));
  }
  if (control && control->cancel.load()) {
    throw FitCancelled("fit cancelled after " + std::to_string(control->done.load()) + " of " + std::to_string(m) +
                       " rows");
  }
  errors.rethrow();
}

template <class Body>
void parallel_rows(Index m, int n_threads, const FitContext& ctx, Body body, FitControl* control = nullptr) {
  parallel_rows_with(
      m, n_threads, ctx, 1, control, [](Workspace&) { return 0; }, [&](Workspace& ws, int, Index r) { body(ws, r); });
}

// One model of each link per thread, reused across the rows of a fixed-support call.
struct ThreadModels {
  LogitModel logit;
  MixtureModel mixture;
  ThreadModels(const FitContext& ctx, Workspace& ws, double bound) : logit(ctx, ws, bound, false), mixture(ctx, ws) {}
};

// Rows per scheduling chunk of the fixed-support calls (each row prefetches the next, which
// helps only within a chunk): up to 16, but at least 16 chunks per thread so that a small
// batch still spreads over every thread (10 rows in one chunk ran on one thread).
Index fixed_chunk(Index m, int n_threads) {
  const Index nt = std::max<Index>(1, detail::resolve_threads(n_threads));
  return std::clamp<Index>(m / (16 * nt), 1, 16);
}

// Prefetches what fitting `targets` row r on support row r will read first: the
// support rows' stored entries (the cache misses of building the support structure)
// and the workspace slots of the target's tokens.
void prefetch_row(const FitContext& ctx, const Workspace& ws, const TargetsView& targets, const SupportView& support,
                  Index r) {
#if defined(__GNUC__) || defined(__clang__)
  if (r >= targets.n_rows) return;
  const StateIndex* sb = support.indices + support.indptr[r];
  const StateIndex* se = support.indices + support.indptr[r + 1];
  if (ctx.link == Link::kLogit && !ctx.dev.empty())
    detail::prefetch_rows(sb, se, ctx.ip, ctx.ix, ctx.dev.data());
  else
    detail::prefetch_rows(sb, se, ctx.ip, ctx.ix, ctx.px);
  for (Index k = targets.indptr[r]; k < targets.indptr[r + 1]; ++k) {
    const std::size_t x = static_cast<std::size_t>(targets.indices[k]);
    __builtin_prefetch(ws.pos.data() + x, 1);
  }
#else
  (void)ctx, (void)ws, (void)targets, (void)support, (void)r;
#endif
}

// Loads target row r into `model` with support row r as its atoms; alpha is the
// support's values when it has them, else `fill` in every slot (then set_support's
// projection applies when `project`).  The fixed-support calls all start this way.
template <class Model>
void load_row(Model& model, const TargetsView& targets, const SupportView& support, Index r, double fill,
              bool project = true) {
  const Index a = targets.indptr[r];
  const Index sa = support.indptr[r], sb = support.indptr[r + 1];
  VectorXd alpha(sb - sa);
  if (support.values) {
    for (Index k = sa; k < sb; ++k) alpha(k - sa) = support.values[k];
  } else {
    alpha.setConstant(fill);
  }
  model.load(targets.indices + a, targets.data + a, targets.indptr[r + 1] - a);
  model.set_support(std::vector<Index>(support.indices + sa, support.indices + sb), std::move(alpha), project);
}

// One logit selection on the given counts within the ball ||alpha|| <= radius, from
// the screened lists `pool` (scale-aware background) and, when not empty, `plain`
// (uniform background; the lower objective is kept), with the final refit; fills
// out.  Leaves ws clean.
void fit_logit_row(const FitContext& ctx, Workspace& ws, const StateIndex* ids, const double* cnt, Index nq,
                   const FitOptions& o, Index r, Index C, double radius, const std::vector<Index>& pool,
                   const std::vector<Index>& plain, RowOut& out) {
  out.n_candidates = static_cast<Index>(pool.size());  // the longer list counts
  LogitModel model(ctx, ws, radius);
  model.load(ids, cnt, nq);
  select_one(model, pool, o, r, C, out);
  if (!plain.empty() && plain != pool) {
    // The two starts reach different local optima of the selection (equal objective
    // on average); between two supports found by the same search on the same counts,
    // the lower objective has the lower true KL more often than not
    // (bench/results/logit_vs_greedy.md).
    const std::vector<Index> first_atoms = model.atoms();
    const VectorXd first_alpha = model.alpha();
    const double first_value = model.value();
    const std::int64_t first_iter = out.n_iter;
    const bool first_conv = out.converged;
    model.set_support({}, VectorXd());
    select_one(model, plain, o, r, C, out);
    out.n_iter += first_iter;
    if (!(model.value() < first_value)) {
      model.set_support(first_atoms, first_alpha, false);
      out.converged = first_conv;
    }
  }
  emit(model, ctx.n_base, out, true);
  model.unload();
  if (pool.empty()) out.converged = false;
}

// log f(x) of the logit fit `fit` at each of the tokens `ids` (sorted), given as
// held-out counts: the normaliser comes from the objective on them (objective =
// -sum q z + log Z), the logits z by a binary search of each atom's stored columns.
std::vector<double> heldout_log_f(const FitContext& ctx, Workspace& ws, const std::vector<StateIndex>& ids,
                                  const std::vector<double>& cnt, const RowOut& fit) {
  const std::size_t n = ids.size();
  std::vector<double> z(n, 0.0);
  for (const auto& [v, a] : fit.entries)
    for (Index j = ctx.ip[v]; j < ctx.ip[v + 1]; ++j) {
      const auto it = std::lower_bound(ids.begin(), ids.end(), ctx.ix[j]);
      if (it != ids.end() && *it == ctx.ix[j]) z[static_cast<std::size_t>(it - ids.begin())] += a * ctx.d_of(j, v);
    }
  LogitModel model(ctx, ws, INFINITY);
  model.load(ids.data(), cnt.data(), static_cast<Index>(n));
  std::vector<Index> atoms;
  VectorXd alpha(static_cast<Index>(fit.entries.size()));
  for (const auto& [v, a] : fit.entries) {
    alpha(static_cast<Index>(atoms.size())) = a;
    atoms.push_back(v);
  }
  model.set_support(std::move(atoms), std::move(alpha), false);
  const double value = model.size() == 0 ? model.empty_value() : model.value();
  model.unload();
  double total = 0.0, qz = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    total += cnt[i];
    qz += cnt[i] * z[i];
  }
  const double log_z = value + qz / total;
  for (double& x : z) x -= log_z;
  return z;
}

// Splits counts into two folds as if each observed sample were sent to either fold
// by a fair coin (binomial thinning; the fractional part of a non-integer weight is
// halved).  Deterministic for (seed, row).
void split_counts(const StateIndex* ids, const double* cnt, Index nq, std::uint64_t rng,
                  std::vector<StateIndex> fold_ids[2], std::vector<double> fold_cnt[2]) {
  for (int f = 0; f < 2; ++f) {
    fold_ids[f].clear();
    fold_cnt[f].clear();
  }
  for (Index i = 0; i < nq; ++i) {
    const double c = cnt[i];
    const double whole = std::floor(c);
    double heads = 0.0;
    if (whole > static_cast<double>(1 << 20)) {
      heads = std::floor(0.5 * whole);  // the binomial's relative spread is below 0.1% here
    } else {
      std::int64_t n = static_cast<std::int64_t>(whole);
      for (; n >= 64; n -= 64) heads += static_cast<double>(std::bitset<64>(splitmix64(rng)).count());
      if (n > 0) heads += static_cast<double>(std::bitset<64>(splitmix64(rng) & ((std::uint64_t{1} << n) - 1)).count());
    }
    const double half_frac = 0.5 * (c - whole);
    const double part[2] = {heads + half_frac, whole - heads + half_frac};
    for (int f = 0; f < 2; ++f)
      if (part[f] > 0) {
        fold_ids[f].push_back(ids[i]);
        fold_cnt[f].push_back(part[f]);
      }
  }
}

// Logit link: choice of the ball radius by two-fold cross-validation.  `out` holds
// the fit within o.bound, of norm rho; the radii o.bound, rho / 2 and rho / 4 are
// each used to fit one fold (selection included) and scored by the objective on the
// other fold, summed over both ways.  When a smaller radius scores better, the row is
// refitted on all counts within it, from `pool` (the screen of all counts, already
// computed by the caller).  Why: with many candidate rows and few samples the
// search finds atoms that explain single observations of rare tokens with a large
// coefficient (the fitted norm grows to 3-4x the planted one at s = 16), which lowers
// KL(q_hat || f) and raises the true KL; held-out counts do not reward that.
void cross_validate_radius(const FitContext& ctx, Workspace& ws, const StateIndex* ids, const double* cnt, Index nq,
                           const FitOptions& o, Index r, Index C, const std::vector<Index>& pool, RowOut& out) {
  double rho = 0.0;
  for (const auto& e : out.entries) rho += e.second * e.second;
  rho = std::sqrt(rho);
  if (!(rho > 0)) return;
  std::uint64_t rng = o.seed ^ (0x8CB92BA72F3D8DD7ULL * static_cast<std::uint64_t>(o.row_offset + r + 1));
  std::vector<StateIndex> fold_ids[2];
  std::vector<double> fold_cnt[2];
  split_counts(ids, cnt, nq, rng, fold_ids, fold_cnt);
  if (fold_ids[0].empty() || fold_ids[1].empty()) return;
  const double radii[3] = {o.bound, 0.5 * rho, 0.25 * rho};
  // Held-out log-likelihood gain of each smaller radius over `bound`, in nats summed
  // over the held-out samples of both folds, and its variance over those samples.
  double gain[3] = {0.0, 0.0, 0.0}, var[3] = {0.0, 0.0, 0.0};
  std::int64_t iters = 0;
  RowOut part;
  const std::vector<Index> none;
  for (int f = 0; f < 2; ++f) {
    const Index nf = static_cast<Index>(fold_ids[f].size());
    const std::vector<StateIndex>& hid = fold_ids[1 - f];
    const std::vector<double>& hcnt = fold_cnt[1 - f];
    // Fold fits use the first start only: the second would double the cost of the
    // cross-validation for a small change of the scores.
    const std::vector<Index> pool = screen(ctx, ws, fold_ids[f].data(), fold_cnt[f].data(), nf, C);
    std::vector<double> log_f0;
    for (int j = 0; j < 3; ++j) {
      fit_logit_row(ctx, ws, fold_ids[f].data(), fold_cnt[f].data(), nf, o, r, C, radii[j], pool, none, part);
      iters += part.n_iter;
      std::vector<double> log_f = heldout_log_f(ctx, ws, hid, hcnt, part);
      if (j == 0) {
        log_f0 = std::move(log_f);
        continue;
      }
      double n = 0.0, s1 = 0.0, s2 = 0.0;
      for (std::size_t i = 0; i < hid.size(); ++i) {
        const double d = log_f[i] - log_f0[i];
        n += hcnt[i];
        s1 += hcnt[i] * d;
        s2 += hcnt[i] * d * d;
      }
      gain[j] += s1;
      var[j] += n > 0 ? s2 - s1 * s1 / n : 0.0;  // n times the per-sample variance
    }
  }
  // A smaller radius replaces `bound` only when its held-out gain exceeds three standard
  // errors: each fold holds half the samples, so the folds' fits are noisier than the
  // fit on all counts and the comparison leans towards small radii (measured: without
  // this margin the radius shrank wrongly where half the planted rows are recoverable,
  // T = 1024, s = 8; with two standard errors it still did in 11 of 30 targets).
  int best = 0;
  for (int j = 1; j < 3; ++j)
    if (gain[j] > 3.0 * std::sqrt(std::max(var[j], 0.0)) && gain[j] > gain[best]) best = j;
  if (best > 0) {
    const Index n_cand = out.n_candidates;
    // One start only: the second one costs a full selection and gained nothing measurable
    // in the noise-dominated targets where a smaller radius wins.
    fit_logit_row(ctx, ws, ids, cnt, nq, o, r, C, radii[best], pool, none, out);
    out.n_candidates = n_cand;
  }
  out.n_iter += iters;
}

}  // namespace

void check_targets(const TransitionMatrix& P, const TargetsView& t) {
  if (t.n_rows < 1) throw std::invalid_argument("targets has no rows; expected at least one target");
  if (t.indptr[0] != 0) throw std::invalid_argument("targets indptr[0] must be 0");
  for (Index r = 0; r < t.n_rows; ++r) {
    const Index a = t.indptr[r], b = t.indptr[r + 1];
    if (b < a) throw std::invalid_argument("targets indptr must be non-decreasing");
    double total = 0.0;
    for (Index k = a; k < b; ++k) {
      const StateIndex x = t.indices[k];
      if (x < 0 || x >= P.n_base())
        throw std::out_of_range(row_msg(r) + " has a count on state " + std::to_string(x) +
                                ", outside the base states [0, n_base = " + std::to_string(P.n_base()) + ")");
      if (k > a && x <= t.indices[k - 1])
        throw std::invalid_argument(row_msg(r) + " has unsorted or duplicate column indices");
      const double c = t.data[k];
      if (!std::isfinite(c)) {
        std::ostringstream os;
        os << row_msg(r) << " holds a non-finite value (" << c << ") at state " << x;
        throw std::invalid_argument(os.str());
      }
      if (c < 0) {
        std::ostringstream os;
        os << row_msg(r) << " holds a negative count (" << c << ") at state " << x;
        throw std::invalid_argument(os.str());
      }
      total += c;
    }
    if (!(total > 0))
      throw std::invalid_argument(row_msg(r) + " has no counts; every target needs at least one observed next token");
  }
}

AlphaResult fit_alpha(const TransitionMatrix& P, const TargetsView& targets, const FitOptions& o) {
  check_options(o, true);
  check_targets(P, targets);
  for (Index i = 0; i < o.n_allowed; ++i)
    if (o.allowed[i] < 0 || o.allowed[i] >= P.n_states() || (i > 0 && o.allowed[i] <= o.allowed[i - 1]))
      throw std::invalid_argument("candidates must be sorted, unique state ids in [0, n_states)");
  const FitContext ctx(P, o.link, FitContext::Dev::kYes, true, o.n_allowed > 0 ? o.allowed : nullptr, o.n_allowed,
                       o.n_threads);
  const Index C = o.n_candidates > 0 ? o.n_candidates : std::max<Index>(256, 16 * o.s);
  std::vector<RowOut> rows(static_cast<std::size_t>(targets.n_rows));
  parallel_rows(
      targets.n_rows, o.n_threads, ctx,
      [&](Workspace& ws, Index r) {
        const Index a = targets.indptr[r], nq = targets.indptr[r + 1] - a;
        const StateIndex* ids = targets.indices + a;
        const double* cnt = targets.data + a;
        RowOut& out = rows[static_cast<std::size_t>(r)];
        if (o.link == Link::kLogit) {
          std::vector<Index> plain;
          const std::vector<Index> pool = screen(ctx, ws, ids, cnt, nq, C, false, &plain);
          fit_logit_row(ctx, ws, ids, cnt, nq, o, r, C, o.bound, pool, plain, out);
          if (o.cv_bound) cross_validate_radius(ctx, ws, ids, cnt, nq, o, r, C, pool, out);
          return;
        }
        const std::vector<Index> pool = screen(ctx, ws, ids, cnt, nq, C);
        out.n_candidates = static_cast<Index>(pool.size());
        MixtureModel model(ctx, ws);
        model.load(ids, cnt, nq);
        select_one(model, pool, o, r, C, out);
        emit(model, ctx.n_base, out, true);
        model.unload();
        if (pool.empty()) out.converged = false;
      },
      o.control);
  return assemble(rows);
}

AlphaResult fit_on_support(const TransitionMatrix& P, const TargetsView& targets, const SupportView& support,
                           const FitOptions& o) {
  check_options(o, false);
  check_targets(P, targets);
  check_support(P, support, targets.n_rows, false);
  const FitContext ctx(P, o.link, FitContext::Dev::kIfCached, false, nullptr, 0, o.n_threads);
  std::vector<RowOut> rows(static_cast<std::size_t>(targets.n_rows));
  parallel_rows_with(
      targets.n_rows, o.n_threads, ctx, fixed_chunk(targets.n_rows, o.n_threads), o.control,
      [&](Workspace& ws) { return ThreadModels(ctx, ws, o.bound); },
      [&](Workspace& ws, ThreadModels& models, Index r) {
        prefetch_row(ctx, ws, targets, support, r + 1);
        RowOut& out = rows[static_cast<std::size_t>(r)];
        out.n_candidates = support.indptr[r + 1] - support.indptr[r];
        auto solve = [&](auto& model, bool from_scratch) {
          // Without start values: logit computes its closed form once the support is set;
          // mixture starts from the uniform blend refined by a few EM steps (the log-space
          // closed form, clipped to the simplex, zeroes many true atoms and projected Newton
          // then needs many short steps to revive them).
          load_row(model, targets, support, r, 1.0);
          if constexpr (std::is_same_v<std::decay_t<decltype(model)>, LogitModel>) {
            if (from_scratch) model.set_alpha(model.closed_form());
          } else {
            if (from_scratch) model.em(kEmSteps);
          }
          bool conv = false;
          out.n_iter = model.newton(o.max_iter, o.tol, conv);
          out.converged = conv;
          emit(model, ctx.n_base, out, false);
          model.unload();
        };
        if (o.link == Link::kLogit)
          solve(models.logit, !support.values);
        else
          solve(models.mixture, !support.values);
      });
  return assemble(rows);
}

AlphaResult closed_form_alpha(const TransitionMatrix& P, const TargetsView& targets, const SupportView& support,
                              int n_threads) {
  check_targets(P, targets);
  check_support(P, support, targets.n_rows, false);
  const FitContext ctx(P, Link::kLogit, FitContext::Dev::kIfCached, false, nullptr, 0, n_threads);
  std::vector<RowOut> rows(static_cast<std::size_t>(targets.n_rows));
  parallel_rows_with(
      targets.n_rows, n_threads, ctx, fixed_chunk(targets.n_rows, n_threads), nullptr,
      [&](Workspace& ws) { return LogitModel(ctx, ws, INFINITY, false); },
      [&](Workspace& ws, LogitModel& model, Index r) {
        prefetch_row(ctx, ws, targets, support, r + 1);
        load_row(model, targets, support, r, 0.0);
        model.set_alpha(model.closed_form());
        RowOut& out = rows[static_cast<std::size_t>(r)];
        out.n_candidates = model.size();
        out.converged = true;
        emit(model, ctx.n_base, out, false);
        model.unload();
      });
  return assemble(rows);
}

void fit_objective(const TransitionMatrix& P, const TargetsView& targets, const SupportView& alpha, Link link,
                   std::vector<double>& kl, std::vector<double>& grad, int n_threads) {
  check_targets(P, targets);
  check_support(P, alpha, targets.n_rows, true);
  const FitContext ctx(P, link, FitContext::Dev::kIfCached, false, nullptr, 0, n_threads);
  kl.assign(static_cast<std::size_t>(targets.n_rows), 0.0);
  grad.assign(static_cast<std::size_t>(alpha.indptr[alpha.n_rows]), 0.0);
  parallel_rows_with(
      targets.n_rows, n_threads, ctx, fixed_chunk(targets.n_rows, n_threads), nullptr,
      [&](Workspace& ws) { return ThreadModels(ctx, ws, INFINITY); },
      [&](Workspace& ws, ThreadModels& models, Index r) {
        prefetch_row(ctx, ws, targets, alpha, r + 1);
        auto evaluate = [&](auto& model) {
          load_row(model, targets, alpha, r, 0.0, false);  // alpha as given: no projection
          kl[static_cast<std::size_t>(r)] = model.kl();
          const VectorXd g = model.gradient_kl();
          for (Index k = alpha.indptr[r]; k < alpha.indptr[r + 1]; ++k)
            grad[static_cast<std::size_t>(k)] = g(k - alpha.indptr[r]);
          model.unload();
        };
        if (link == Link::kLogit)
          evaluate(models.logit);
        else
          evaluate(models.mixture);
      });
}

void release_fit_workspaces() { WorkspacePool::get().clear(); }

std::pair<std::size_t, bool> fit_workspaces_state() { return WorkspacePool::get().state(); }

PredictedRows predict_rows(const TransitionMatrix& P, const SupportView& alpha, Link link, int n_threads) {
  check_support(P, alpha, alpha.n_rows, true);
  const FitContext ctx(P, link, FitContext::Dev::kIfCached, false, nullptr, 0, n_threads);
  const Index m = alpha.n_rows;
  std::vector<std::vector<std::pair<StateIndex, double>>> out(static_cast<std::size_t>(m));
  parallel_rows(m, n_threads, ctx, [&](Workspace& ws, Index r) {
    std::vector<StateIndex> U;
    std::vector<double> val;
    for (Index k = alpha.indptr[r]; k < alpha.indptr[r + 1]; ++k) {
      const Index v = alpha.indices[k];
      const double a = alpha.values[k];
      for (Index j = ctx.ip[v]; j < ctx.ip[v + 1]; ++j) {
        const StateIndex x = ctx.ix[j];
        std::int32_t& p = ws.pos[static_cast<std::size_t>(x)];
        if (p < 0) {
          p = static_cast<std::int32_t>(U.size());
          U.push_back(x);
          val.push_back(0.0);
        }
        val[static_cast<std::size_t>(p)] +=
            a * (link == Link::kLogit ? ctx.d_of(j, v)
                                      : static_cast<double>(ctx.px[j]) - ctx.u[static_cast<std::size_t>(v)]);
      }
    }
    for (StateIndex x : U) ws.pos[static_cast<std::size_t>(x)] = -1;
    const double rest = static_cast<double>(ctx.n_base - static_cast<Index>(U.size()));
    if (link == Link::kLogit) {
      double zmax = 0.0;
      for (double z : val) zmax = std::max(zmax, z);
      double zs = rest * std::exp(-zmax);
      for (double& z : val) {
        z = std::exp(z - zmax);
        zs += z;
      }
      for (double& z : val) z /= zs;
    } else {
      double tau = 0.0;
      for (Index k = alpha.indptr[r]; k < alpha.indptr[r + 1]; ++k)
        tau += alpha.values[k] * ctx.u[static_cast<std::size_t>(alpha.indices[k])];
      for (double& f : val) f = std::max(0.0, f + tau);
    }
    auto& row = out[static_cast<std::size_t>(r)];
    row.reserve(U.size());
    for (std::size_t i = 0; i < U.size(); ++i) row.emplace_back(U[i], val[i]);
    std::sort(row.begin(), row.end());
  });
  PredictedRows res;
  res.indptr.assign(static_cast<std::size_t>(m) + 1, 0);
  for (Index r = 0; r < m; ++r)
    res.indptr[static_cast<std::size_t>(r) + 1] =
        res.indptr[static_cast<std::size_t>(r)] + static_cast<Index>(out[static_cast<std::size_t>(r)].size());
  res.indices.reserve(static_cast<std::size_t>(res.indptr.back()));
  res.data.reserve(static_cast<std::size_t>(res.indptr.back()));
  for (const auto& row : out)
    for (const auto& [x, p] : row) {
      res.indices.push_back(x);
      res.data.push_back(static_cast<Prob>(p));
    }
  return res;
}

}  // namespace markovmem
