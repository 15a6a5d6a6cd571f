// Binding of the sparse dictionary fit: fit_alpha, fit_on_support,
// closed_form_alpha, fit_objective and predict_rows.  CSR inputs arrive as
// (indptr, indices, data) arrays; results go back as capsule-owned arrays.
#include <optional>

#include "buffers.hpp"
#include "markovmem/fit.hpp"

namespace markovmem::bindings {

namespace {

TargetsView targets_view(const carray<Index>& indptr, const carray<StateIndex>& indices, const carray<double>& data) {
  const CsrArg<double> a = csr_arg(indptr, indices, &data, "targets ", -1, true);
  return TargetsView{a.n_rows, a.indptr, a.indices, a.data};
}

SupportView support_view(const carray<Index>& indptr, const carray<StateIndex>& indices, const py::object& values) {
  std::optional<carray<double>> v;
  if (!values.is_none()) {
    // No converting cast: the core keeps a pointer into the caller's own array.
    if (!carray<double>::check_(values)) throw py::type_error("support values must be a C-contiguous float64 array");
    v = values.cast<carray<double>>();
  }
  const CsrArg<double> a = csr_arg<double>(indptr, indices, v ? &*v : nullptr, "support ", -1, true);
  return SupportView{a.n_rows, a.indptr, a.indices, a.data};
}

py::tuple to_py(AlphaResult&& r) {
  return py::make_tuple(to_numpy(std::move(r.indptr)), to_numpy(std::move(r.indices)), to_numpy(std::move(r.alpha)),
                        to_numpy(std::move(r.kl)), to_numpy(std::move(r.n_iter)), to_numpy(std::move(r.converged)),
                        to_numpy(std::move(r.n_candidates)));
}

// The FitControl behind a Python argument (None = no control).  The caller keeps the
// object alive for the call, which is what lets the core use it without the GIL.
FitControl* control_of(const py::object& control) { return control.is_none() ? nullptr : control.cast<FitControl*>(); }

Link to_link(int link) {
  if (link != 0 && link != 1) throw std::invalid_argument("link must be 0 (logit) or 1 (mixture)");
  return static_cast<Link>(link);
}

}  // namespace

void bind_fit(py::module_& m) {
  py::class_<FitControl>(m, "FitControl",
                         "Progress and cancellation of a running fit, shared with another Python thread.")
      .def(py::init<>())
      .def_property_readonly(
          "done", [](const FitControl& c) { return c.done.load(std::memory_order_relaxed); }, "Rows finished so far.")
      .def(
          "cancel", [](FitControl& c) { c.cancel.store(true); },
          "Skip the rows not yet started; the fit then raises FitCancelled.");
  py::register_exception<FitCancelled>(m, "FitCancelled", PyExc_RuntimeError);
  m.def(
      "fit_alpha",
      [](const TransitionMatrix& P, const carray<Index>& t_indptr, const carray<StateIndex>& t_indices,
         const carray<double>& t_data, int link, Index s, double bound, Index n_candidates, double oversize,
         Index swap_passes, Index max_iter, double tol, int n_threads, std::uint64_t seed,
         const carray<StateIndex>& allowed, bool cv_bound, Index row_offset, const py::object& control) {
        if (row_offset < 0) throw std::invalid_argument("row_offset must be >= 0");
        const TargetsView t = targets_view(t_indptr, t_indices, t_data);
        FitOptions o;
        o.link = to_link(link);
        o.s = s;
        o.bound = bound;
        o.n_candidates = n_candidates;
        o.oversize = oversize;
        o.swap_passes = swap_passes;
        o.max_iter = max_iter;
        o.tol = tol;
        o.n_threads = n_threads;
        o.seed = seed;
        o.allowed = allowed.shape(0) > 0 ? ptr_1d(allowed, "candidates") : nullptr;
        o.n_allowed = allowed.shape(0);
        o.cv_bound = cv_bound;
        o.row_offset = row_offset;
        o.control = control_of(control);
        AlphaResult r;
        {
          py::gil_scoped_release release;  // reads numpy buffers kept alive by the caller and the immutable P
          r = fit_alpha(P, t, o);
        }
        return to_py(std::move(r));
      },
      py::arg("P"), py::arg("indptr").noconvert(), py::arg("indices").noconvert(), py::arg("data").noconvert(),
      py::arg("link"), py::arg("s"), py::arg("bound"), py::arg("n_candidates"), py::arg("oversize"),
      py::arg("swap_passes"), py::arg("max_iter"), py::arg("tol"), py::arg("n_threads"), py::arg("seed"),
      py::arg("allowed").noconvert(), py::arg("cv_bound"), py::arg("row_offset"), py::arg("control") = py::none(),
      "Sparse KL fit with support selection (CSR parts and per-row figures).");
  m.def(
      "fit_on_support",
      [](const TransitionMatrix& P, const carray<Index>& t_indptr, const carray<StateIndex>& t_indices,
         const carray<double>& t_data, const carray<Index>& s_indptr, const carray<StateIndex>& s_indices,
         const py::object& s_values, int link, double bound, Index max_iter, double tol, int n_threads,
         const py::object& control) {
        const TargetsView t = targets_view(t_indptr, t_indices, t_data);
        const SupportView sv = support_view(s_indptr, s_indices, s_values);
        FitOptions o;
        o.link = to_link(link);
        o.bound = bound;
        o.max_iter = max_iter;
        o.tol = tol;
        o.n_threads = n_threads;
        o.control = control_of(control);
        AlphaResult r;
        {
          py::gil_scoped_release release;  // reads numpy buffers kept alive by the caller and the immutable P
          r = fit_on_support(P, t, sv, o);
        }
        return to_py(std::move(r));
      },
      py::arg("P"), py::arg("indptr").noconvert(), py::arg("indices").noconvert(), py::arg("data").noconvert(),
      py::arg("support_indptr").noconvert(), py::arg("support_indices").noconvert(), py::arg("support_values"),
      py::arg("link"), py::arg("bound"), py::arg("max_iter"), py::arg("tol"), py::arg("n_threads"),
      py::arg("control") = py::none(), "KL fit on a fixed support per row.");
  m.def(
      "closed_form_alpha",
      [](const TransitionMatrix& P, const carray<Index>& t_indptr, const carray<StateIndex>& t_indices,
         const carray<double>& t_data, const carray<Index>& s_indptr, const carray<StateIndex>& s_indices,
         int n_threads) {
        const TargetsView t = targets_view(t_indptr, t_indices, t_data);
        const SupportView sv = support_view(s_indptr, s_indices, py::none());
        AlphaResult r;
        {
          py::gil_scoped_release release;  // reads numpy buffers kept alive by the caller and the immutable P
          r = closed_form_alpha(P, t, sv, n_threads);
        }
        return to_py(std::move(r));
      },
      py::arg("P"), py::arg("indptr").noconvert(), py::arg("indices").noconvert(), py::arg("data").noconvert(),
      py::arg("support_indptr").noconvert(), py::arg("support_indices").noconvert(), py::arg("n_threads"),
      "Weighted least squares in centred log space on a support.");
  m.def(
      "fit_objective",
      [](const TransitionMatrix& P, const carray<Index>& t_indptr, const carray<StateIndex>& t_indices,
         const carray<double>& t_data, const carray<Index>& a_indptr, const carray<StateIndex>& a_indices,
         const carray<double>& a_values, int link, int n_threads) {
        const TargetsView t = targets_view(t_indptr, t_indices, t_data);
        const SupportView sv = support_view(a_indptr, a_indices, a_values);
        const Link l = to_link(link);
        std::vector<double> kl, grad;
        {
          py::gil_scoped_release release;  // reads numpy buffers kept alive by the caller and the immutable P
          fit_objective(P, t, sv, l, kl, grad, n_threads);
        }
        return py::make_tuple(to_numpy(std::move(kl)), to_numpy(std::move(grad)));
      },
      py::arg("P"), py::arg("indptr").noconvert(), py::arg("indices").noconvert(), py::arg("data").noconvert(),
      py::arg("alpha_indptr").noconvert(), py::arg("alpha_indices").noconvert(), py::arg("alpha_values").noconvert(),
      py::arg("link"), py::arg("n_threads"), "(KL per row, gradient per alpha entry).");
  m.def(
      "predict_rows",
      [](const TransitionMatrix& P, const carray<Index>& a_indptr, const carray<StateIndex>& a_indices,
         const carray<double>& a_values, int link, int n_threads) {
        const SupportView sv = support_view(a_indptr, a_indices, a_values);
        const Link l = to_link(link);
        PredictedRows r;
        {
          py::gil_scoped_release release;  // reads numpy buffers kept alive by the caller and the immutable P
          r = predict_rows(P, sv, l, n_threads);
        }
        return py::make_tuple(to_numpy(std::move(r.indptr)), to_numpy(std::move(r.indices)),
                              to_numpy(std::move(r.data)));
      },
      py::arg("P"), py::arg("alpha_indptr").noconvert(), py::arg("alpha_indices").noconvert(),
      py::arg("alpha_values").noconvert(), py::arg("link"), py::arg("n_threads"),
      "Rows of f(alpha) over base states (CSR parts; the rest is tail).");
  m.def("release_fit_workspaces", &release_fit_workspaces,
        "Free the per-thread scratch the fit functions keep between calls.");
  m.def("fit_workspaces_state", &fit_workspaces_state,
        "(workspaces kept between fit calls, whether all are clean): for tests.");
}

}  // namespace markovmem::bindings
