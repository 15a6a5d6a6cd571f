// Binding of the vector loops of the fit (for tests and benchmarks): the instruction set
// in use, its selection, and each loop on numpy arrays.
#include "buffers.hpp"
#include "markovmem/vector_math.hpp"

namespace markovmem::bindings {

void bind_vector_math(py::module_& m) {
  m.def("simd_level", &simd_level, "Instruction set of the fit's exp / log loops: 'avx512', 'avx2' or 'generic'.");
  m.def("set_simd_level", &set_simd_level, py::arg("name"),
        "Select the instruction set ('auto', 'avx512', 'avx2', 'generic'); not while a fit runs.");
  m.def(
      "exp_shifted_sum",
      [](const carray<double>& z, double shift) {
        const double* zp = ptr_1d(z, "z");
        std::vector<double> e(static_cast<std::size_t>(z.shape(0)));
        const double s = exp_shifted_sum(zp, shift, e.data(), e.size());
        return py::make_tuple(to_numpy(std::move(e)), s);
      },
      py::arg("z").noconvert(), py::arg("shift"), "(exp(z - shift), its sum).");
  m.def(
      "max_dot",
      [](const carray<double>& z, const carray<double>& q) {
        const double* zp = ptr_1d(z, "z");
        const MaxDot r = max_dot(zp, ptr_1d(q, "q", z.shape(0)), static_cast<std::size_t>(z.shape(0)));
        return py::make_tuple(r.max, r.dot);
      },
      py::arg("z").noconvert(), py::arg("q").noconvert(), "(max z, q . z).");
  m.def(
      "dot_log",
      [](const carray<double>& q, const carray<double>& x, double floor) {
        if (!(floor >= 2.2250738585072014e-308)) throw std::invalid_argument("floor must be a positive normal number");
        const double* qp = ptr_1d(q, "q");
        return dot_log(qp, ptr_1d(x, "x", q.shape(0)), static_cast<std::size_t>(q.shape(0)), floor);
      },
      py::arg("q").noconvert(), py::arg("x").noconvert(), py::arg("floor") = kLogFloor, "sum q log max(x, floor).");
  m.def(
      "mixture_terms",
      [](const carray<double>& q, const carray<double>& f) {
        const std::size_t n = static_cast<std::size_t>(q.shape(0));
        const double* qp = ptr_1d(q, "q");
        const double* fp = ptr_1d(f, "f", q.shape(0));
        std::vector<double> fc(fp, fp + n), w1(n), w2(n);
        const MixtureTerms t = mixture_terms(qp, fc.data(), n, true, w1.data(), w2.data());
        return py::make_tuple(to_numpy(std::move(fc)), to_numpy(std::move(w1)), to_numpy(std::move(w2)), t.qlogf, t.w1,
                              t.w2);
      },
      py::arg("q").noconvert(), py::arg("f").noconvert(),
      "(max(f, 1e-12), q / f, q / f^2, sum q log f, sum q / f, sum q / f^2).");
}

}  // namespace markovmem::bindings
