// markovmem._core: creates the module, the exception types and their
// translation, and calls each bind_<area>(); nothing else.
#include <pybind11/pybind11.h>

#include "markovmem/common.hpp"

namespace py = pybind11;

namespace markovmem::bindings {
void bind_matrix(py::module_& m);
void bind_expansion(py::module_& m);
void bind_io(py::module_& m);
void bind_fit(py::module_& m);
void bind_topk(py::module_& m);
void bind_vector_math(py::module_& m);
}  // namespace markovmem::bindings

PYBIND11_MODULE(_core, m) {
  m.doc() = "markovmem C++ core (private; use the markovmem package)";
#ifdef MARKOVMEM_VERSION
  m.attr("__version__") = MARKOVMEM_VERSION;
#endif
#ifdef MARKOVMEM_HAVE_OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif

  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> invariant_error;
  invariant_error.call_once_and_store_result([&]() {
    py::object type = py::reinterpret_steal<py::object>(
        PyErr_NewExceptionWithDoc("markovmem.InvariantError",
                                  "A Markov invariant is broken; .row names the first offending row "
                                  "(None when no single row is at fault).",
                                  PyExc_ValueError, nullptr));
    return type;
  });
  m.attr("InvariantError") = invariant_error.get_stored();

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const markovmem::InvariantViolation& e) {
      py::object type = invariant_error.get_stored();
      py::object inst = type(py::str(e.what()));
      inst.attr("row") = e.row() >= 0 ? py::object(py::int_(e.row())) : py::object(py::none());
      PyErr_SetObject(type.ptr(), inst.ptr());
    } catch (const markovmem::IoError& e) {
      // A path need not be UTF-8: decoded as os.fsdecode does, so OSError.filename round-trips
      // through os.fsencode (pybind11's str conversion would raise UnicodeDecodeError instead).
      const auto fs_str = [](const std::string& s) {
        return py::reinterpret_steal<py::object>(
            PyUnicode_DecodeFSDefaultAndSize(s.data(), static_cast<Py_ssize_t>(s.size())));
      };
      py::object exc = e.error_number() != 0 ? py::reinterpret_borrow<py::object>(PyExc_OSError)(
                                                   e.error_number(), e.reason(), fs_str(e.path()))
                                             : py::reinterpret_borrow<py::object>(PyExc_OSError)(fs_str(e.what()));
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    }
  });

  markovmem::bindings::bind_matrix(m);
  markovmem::bindings::bind_expansion(m);
  markovmem::bindings::bind_io(m);
  markovmem::bindings::bind_fit(m);
  markovmem::bindings::bind_topk(m);
  markovmem::bindings::bind_vector_math(m);
}
