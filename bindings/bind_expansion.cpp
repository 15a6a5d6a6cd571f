// Binding of expand() and verify_expansion(); certificates cross as dicts.
#include <pybind11/stl.h>

#include <limits>
#include <optional>

#include "buffers.hpp"
#include "markovmem/expansion.hpp"

namespace markovmem::bindings {

namespace {
py::dict to_dict(const ExpansionCertificate& c) {
  py::dict d;
  d["n_old"] = c.n_old;
  d["n_new"] = c.n_new;
  d["n_base"] = c.n_base;
  d["same_n_base"] = c.same_n_base;
  d["old_block_identical"] = c.old_block_identical;
  d["max_abs_diff_old"] = c.max_abs_diff_old;
  d["leaked_mass_to_new"] = c.leaked_mass_to_new;
  d["new_to_new_mass"] = c.new_to_new_mass;
  d["max_row_sum_error"] = c.max_row_sum_error;
  d["fingerprint_before"] = c.fingerprint_before;
  d["fingerprint_after_old"] = c.fingerprint_after_old;
  d["fingerprint_after"] = c.fingerprint_after;
  d["after_valid"] = c.after_valid;
  d["after_violation"] = c.after_violation;
  d["open"] = c.open;
  d["max_leak"] = c.max_leak;
  d["mean_leak"] = c.mean_leak;
  d["worst_leak_row"] = c.worst_leak_row;
  d["forgetting_max_nats"] = c.forgetting_max_nats;
  d["forgetting_mean_nats"] = c.forgetting_mean_nats;
  d["leak_bound"] = c.leak_bound;
  d["ok"] = c.ok;
  return d;
}
}  // namespace

void bind_expansion(py::module_& m) {
  m.def(
      "expand",
      [](const TransitionMatrix& P, const carray<Index>& indptr, const carray<StateIndex>& indices,
         const carray<Prob>& data, double tol, int n_threads, const std::optional<carray<Index>>& in_indptr,
         const std::optional<carray<StateIndex>>& in_indices, const std::optional<carray<Prob>>& in_data,
         double max_leak) {
        const CsrArg<Prob> a = csr_arg(indptr, indices, &data, "new_rows ");
        const CsrView rows{a.n_rows, a.indptr, a.indices, a.data};
        std::optional<CsrView> incoming;
        if (in_indptr || in_indices || in_data) {
          if (!(in_indptr && in_indices && in_data))
            throw std::invalid_argument("incoming needs indptr, indices and data together");
          const CsrArg<Prob> b = csr_arg(*in_indptr, *in_indices, &*in_data, "incoming ", P.n_states());
          incoming = CsrView{b.n_rows, b.indptr, b.indices, b.data};
        }
        std::optional<Expansion> e;
        {
          py::gil_scoped_release release;  // reads buffers alive in the caller and the immutable P
          e.emplace(expand(P, rows, tol, n_threads, incoming ? &*incoming : nullptr, max_leak));
        }
        return py::make_tuple(std::move(e->matrix), to_dict(e->certificate));
      },
      py::arg("P"), py::arg("indptr").noconvert(), py::arg("indices").noconvert(), py::arg("data").noconvert(),
      py::arg("tol"), py::arg("n_threads"), py::arg("incoming_indptr").noconvert() = py::none(),
      py::arg("incoming_indices").noconvert() = py::none(), py::arg("incoming_data").noconvert() = py::none(),
      py::arg("max_leak") = std::numeric_limits<double>::infinity(),
      "(Q, certificate dict) for P grown by the given rows (open with incoming).");
  m.def(
      "verify_expansion",
      [](const TransitionMatrix& before, const TransitionMatrix& after, double tol, int n_threads, double max_leak) {
        ExpansionCertificate c;
        {
          py::gil_scoped_release release;  // both matrices are immutable
          c = verify_expansion(before, after, tol, n_threads, max_leak);
        }
        return to_dict(c);
      },
      py::arg("before"), py::arg("after"), py::arg("tol"), py::arg("n_threads"),
      py::arg("max_leak") = std::numeric_limits<double>::infinity(),
      "Certificate dict recomputed from the two matrices.");
}

}  // namespace markovmem::bindings
