// Binding of TransitionMatrix: constructors, zero-copy array views and queries.
#include <pybind11/stl.h>

#include <optional>

#include "buffers.hpp"
#include "markovmem/counting.hpp"
#include "markovmem/transition_matrix.hpp"

namespace markovmem::bindings {

namespace {

CsrView csr_view(const carray<Index>& indptr, const carray<StateIndex>& indices, const carray<Prob>& data,
                 Index n_rows) {
  const CsrArg<Prob> a = csr_arg(indptr, indices, &data, "", n_rows);
  return CsrView{a.n_rows, a.indptr, a.indices, a.data};
}

template <class IndexT>
TransitionMatrix topk(Index n_states, Index n_base, const carray<IndexT>& indices, const carray<Prob>& probs,
                      double tol, int n_threads) {
  if (indices.ndim() != 2 || probs.ndim() != 2 || indices.shape(0) != probs.shape(0) ||
      indices.shape(1) != probs.shape(1))
    throw std::invalid_argument("indices and probs must both have shape (n_states, k)");
  if (indices.shape(0) != n_states)
    throw std::invalid_argument("indices has " + std::to_string(indices.shape(0)) +
                                " rows; expected n_states = " + std::to_string(n_states));
  const IndexT* ip = indices.data();
  const Prob* pp = probs.data();
  const Index k = indices.shape(1);
  // The GIL is released: the core only reads the two arrays, which the caller keeps alive.
  py::gil_scoped_release release;
  return TransitionMatrix::from_topk<IndexT>(n_states, n_base, k, ip, pp, tol, n_threads);
}

}  // namespace

void bind_matrix(py::module_& m) {
  m.def("max_threads", &detail::max_threads, "Largest n_threads a call may use (4 x the processors).");
  py::class_<TransitionMatrix>(m, "TransitionMatrix")
      .def_static(
          "copy_csr",
          [](Index n_states, Index n_base, const carray<Index>& indptr, const carray<StateIndex>& indices,
             const carray<Prob>& data, double tol, int n_threads, const std::optional<carray<double>>& tail) {
            check_sizes(n_states, n_base);
            const CsrView v = csr_view(indptr, indices, data, n_states);
            const double* tp = tail ? ptr_1d(*tail, "tail", n_states) : nullptr;
            py::gil_scoped_release release;  // reads numpy buffers kept alive by the caller
            return TransitionMatrix::copy_csr(n_states, n_base, v, tol, n_threads, tp);
          },
          py::arg("n_states"), py::arg("n_base"), py::arg("indptr").noconvert(), py::arg("indices").noconvert(),
          py::arg("data").noconvert(), py::arg("tol"), py::arg("n_threads"), py::arg("tail").noconvert() = py::none(),
          "Owning matrix copied from CSR arrays (checked).")
      .def_static("from_topk", &topk<std::int64_t>, py::arg("n_states"), py::arg("n_base"),
                  py::arg("indices").noconvert(), py::arg("probs").noconvert(), py::arg("tol"), py::arg("n_threads"),
                  "Matrix from (n_states, k) int64 indices and float32 probs.")
      .def_static("from_topk", &topk<std::int32_t>, py::arg("n_states"), py::arg("n_base"),
                  py::arg("indices").noconvert(), py::arg("probs").noconvert(), py::arg("tol"), py::arg("n_threads"),
                  "Matrix from (n_states, k) int32 indices and float32 probs.")
      .def_static(
          "count_transitions",
          [](const carray<std::int32_t>& tokens, const carray<Index>& offsets, Index n_states, Index top_k,
             double smoothing, int n_threads) {
            const std::int32_t* tp = ptr_1d(tokens, "tokens");
            const Index* op = ptr_1d(offsets, "offsets");
            if (offsets.shape(0) < 1) throw std::invalid_argument("offsets must have at least one entry");
            const Index n_tok = tokens.shape(0), n_seq = offsets.shape(0) - 1;
            CountOptions opts{top_k, smoothing, n_threads};
            py::gil_scoped_release release;  // reads numpy buffers kept alive by the caller
            return count_transitions(tp, n_tok, op, n_seq, n_states, opts);
          },
          py::arg("tokens").noconvert(), py::arg("offsets").noconvert(), py::arg("n_states"), py::arg("top_k"),
          py::arg("smoothing"), py::arg("n_threads"), "Bigram counts to a matrix.")
      .def_property_readonly("n_states", &TransitionMatrix::n_states)
      .def_property_readonly("n_base", &TransitionMatrix::n_base)
      .def_property_readonly("nnz", &TransitionMatrix::nnz)
      .def_property_readonly("storage_bytes", &TransitionMatrix::storage_bytes)
      .def_property_readonly(
          "indptr",
          [](const py::object& self) {
            const auto& P = self.cast<const TransitionMatrix&>();
            return readonly_view(P.indptr(), P.n_states() + 1, self);
          },
          "Row pointers (read-only view).")
      .def_property_readonly(
          "indices",
          [](const py::object& self) {
            const auto& P = self.cast<const TransitionMatrix&>();
            return readonly_view(P.indices(), P.nnz(), self);
          },
          "Column indices (read-only view).")
      .def_property_readonly(
          "data",
          [](const py::object& self) {
            const auto& P = self.cast<const TransitionMatrix&>();
            return readonly_view(P.data(), P.nnz(), self);
          },
          "Probabilities (read-only view).")
      .def_property_readonly(
          "tail",
          [](const py::object& self) {
            const auto& P = self.cast<const TransitionMatrix&>();
            return readonly_view(P.tail(), P.n_states(), self);
          },
          "Tail masses (read-only view).")
      .def_property_readonly(
          "open_blocks",
          [](const py::object& self) {
            const auto& P = self.cast<const TransitionMatrix&>();
            py::list out;
            for (const OpenBlock& b : P.open_blocks())
              out.append(py::make_tuple(b.n_rows, b.m, readonly_view(b.indptr, b.n_rows + 1, self),
                                        readonly_view(b.indices, b.nnz(), self), readonly_view(b.data, b.nnz(), self),
                                        readonly_view(b.leak, b.n_rows, self)));
            return out;
          },
          "Old->new blocks as (n_rows, m, indptr, indices, data, leak) with read-only views.")
      .def(
          "with_open_blocks",
          [](const TransitionMatrix& P, const py::list& blocks, double tol) {
            std::vector<OpenBlock> built;
            for (std::size_t k = 0; k < blocks.size(); ++k) {
              const auto t = blocks[k].cast<py::tuple>();
              if (t.size() != 6)
                throw std::invalid_argument("an open block is (n_rows, m, indptr, indices, data, leak)");
              const auto n_rows = t[0].cast<Index>(), m = t[1].cast<Index>();
              const auto indptr = t[2].cast<carray<Index>>();
              const auto indices = t[3].cast<carray<StateIndex>>();
              const auto data = t[4].cast<carray<Prob>>();
              const auto leak = t[5].cast<carray<double>>();
              const std::string label = "open block " + std::to_string(k);
              const Index* ip = ptr_1d(indptr, (label + " indptr").c_str());
              const StateIndex* cp = ptr_1d(indices, (label + " indices").c_str());
              const Prob* dp = ptr_1d(data, (label + " data").c_str(), indices.shape(0));
              const double* lp = ptr_1d(leak, (label + " leak").c_str(), n_rows < 0 ? 0 : n_rows);
              built.push_back(OpenBlock::build(n_rows, m, std::vector<Index>(ip, ip + indptr.shape(0)),
                                               std::vector<StateIndex>(cp, cp + indices.shape(0)),
                                               std::vector<Prob>(dp, dp + data.shape(0)), lp, tol, label));
            }
            return P.with_open_blocks(std::move(built));
          },
          py::arg("blocks"), py::arg("tol"), "The same stored rows carrying the given open blocks (checked).")
      .def(
          "total_leak", [](const TransitionMatrix& P) { return to_numpy(P.total_leak()); },
          "Per-row mass moved to added states by the open blocks.")
      .def("prob", &TransitionMatrix::prob, py::arg("v"), py::arg("x"), "p(x | v).")
      .def("log_prob", &TransitionMatrix::log_prob, py::arg("v"), py::arg("x"), "log p(x | v).")
      .def(
          "prob_many",
          [](const TransitionMatrix& P, const carray<Index>& v, const carray<Index>& x, bool log, int n_threads) {
            const Index* vp = ptr_1d(v, "v");
            const Index* xp = ptr_1d(x, "x", v.shape(0));
            std::vector<double> out(static_cast<std::size_t>(v.shape(0)));
            {
              py::gil_scoped_release release;  // reads v, x (alive in the caller), writes `out`
              P.prob_many(vp, xp, v.shape(0), out.data(), log, n_threads);
            }
            return to_numpy(std::move(out));
          },
          py::arg("v").noconvert(), py::arg("x").noconvert(), py::arg("log"), py::arg("n_threads"),
          "Vectorised p(x | v) or log p(x | v).")
      .def(
          "step",
          [](const TransitionMatrix& P, const carray<double>& dist, int n_threads) {
            const double* d = ptr_1d(dist, "distribution", P.n_states());
            std::vector<double> out;
            {
              py::gil_scoped_release release;  // reads `dist`, alive in the caller
              out = P.step(d, n_threads);
            }
            return to_numpy(std::move(out));
          },
          py::arg("distribution").noconvert(), py::arg("n_threads"), "One step of the chain.")
      .def(
          "stationary",
          [](const TransitionMatrix& P, double tol, Index max_iter, int n_threads) {
            TransitionMatrix::Stationary s;
            {
              py::gil_scoped_release release;  // core-only work
              s = P.stationary(tol, max_iter, n_threads);
            }
            return py::make_tuple(to_numpy(std::move(s.distribution)), s.n_iter, s.residual, s.converged);
          },
          py::arg("tol"), py::arg("max_iter"), py::arg("n_threads"), "(pi, n_iter, residual, converged).")
      .def(
          "log_likelihood",
          [](const TransitionMatrix& P, const carray<std::int32_t>& tokens, const carray<Index>& offsets,
             int n_threads) {
            const std::int32_t* tp = ptr_1d(tokens, "tokens");
            const Index* op = ptr_1d(offsets, "offsets");
            if (offsets.shape(0) < 1) throw std::invalid_argument("offsets must have at least one entry");
            std::vector<double> out;
            {
              py::gil_scoped_release release;  // reads buffers alive in the caller
              out = P.log_likelihood(tp, tokens.shape(0), op, offsets.shape(0) - 1, n_threads);
            }
            return to_numpy(std::move(out));
          },
          py::arg("tokens").noconvert(), py::arg("offsets").noconvert(), py::arg("n_threads"),
          "Log-likelihood per sequence.")
      .def(
          "sample",
          [](const TransitionMatrix& P, Index start, Index length, std::uint64_t seed) {
            std::vector<std::int32_t> path;
            {
              py::gil_scoped_release release;  // core-only work
              path = P.sample(start, length, seed);
            }
            return to_numpy(std::move(path));
          },
          py::arg("start"), py::arg("length"), py::arg("seed"), "A sampled path.")
      .def("fingerprint", &TransitionMatrix::fingerprint, py::arg("n_rows") = -1,
           py::call_guard<py::gil_scoped_release>(), "Stable content hash (hex).")
      .def("clear_derived", &TransitionMatrix::clear_derived, py::call_guard<py::gil_scoped_release>(),
           "Forget the cached derived data (fit index, row constants).")
      .def("derived_keys", &TransitionMatrix::derived_keys, "Keys of the cached derived data.")
      .def(
          "find_violation",
          [](const TransitionMatrix& P, double tol, int n_threads) -> py::object {
            std::optional<Violation> v;
            {
              py::gil_scoped_release release;  // core-only work
              v = P.find_violation(tol, n_threads);
            }
            if (!v) return py::none();
            return py::make_tuple(v->row, v->reason);
          },
          py::arg("tol"), py::arg("n_threads"), "None or (row, reason).");
}

}  // namespace markovmem::bindings
