// numpy <-> core buffer helpers shared by the bind_*.cpp files: checked
// zero-copy inputs, read-only views that keep their owner alive, and arrays
// that take ownership of a std::vector through a capsule.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "markovmem/common.hpp"

namespace markovmem::bindings {

namespace py = pybind11;

template <class T>
using carray = py::array_t<T, py::array::c_style>;

/// Pointer to a 1-D C-contiguous array, after checking ndim and (if expected >= 0) length.
template <class T>
const T* ptr_1d(const carray<T>& a, const char* name, py::ssize_t expected = -1) {
  if (a.ndim() != 1) {
    std::ostringstream os;
    os << name << " must be 1-D; got " << a.ndim() << " dimensions";
    throw std::invalid_argument(os.str());
  }
  if (expected >= 0 && a.shape(0) != expected) {
    std::ostringstream os;
    os << name << " has length " << a.shape(0) << "; expected " << expected;
    throw std::invalid_argument(os.str());
  }
  return a.data();
}

/// The parts of a CSR argument (indptr, indices, data) as core pointers.
template <class V>
struct CsrArg {
  Index n_rows = 0;
  const Index* indptr = nullptr;
  const StateIndex* indices = nullptr;
  const V* data = nullptr;  ///< null when the argument has no values
};

/// Checks what memory safety needs of a CSR argument and returns its pointers:
/// indptr 1-D with n_rows + 1 entries (n_rows = expected_rows, or len(indptr) - 1
/// and at least one row when expected_rows < 0), indptr[-1] == len(indices), data
/// (when given) as long as indices; with `ordered` also indptr[0] == 0 and
/// non-decreasing (otherwise the core reports those with the offending row).
/// `prefix` starts every message ("targets ", "new_rows ", or "").  O(n_rows) with `ordered`.
template <class V>
CsrArg<V> csr_arg(const carray<Index>& indptr, const carray<StateIndex>& indices, const carray<V>* data,
                  const std::string& prefix, Index expected_rows = -1, bool ordered = false) {
  CsrArg<V> a;
  if (expected_rows < 0) {
    if (indptr.ndim() != 1 || indptr.shape(0) < 2)
      throw std::invalid_argument(prefix + "indptr must be 1-D with at least 2 entries");
    a.n_rows = indptr.shape(0) - 1;
  } else {
    a.n_rows = expected_rows;
  }
  a.indptr = ptr_1d(indptr, (prefix + "indptr").c_str(), a.n_rows + 1);
  a.indices = ptr_1d(indices, (prefix + "indices").c_str());
  if (data) a.data = ptr_1d(*data, (prefix + "data").c_str(), indices.shape(0));
  // Memory safety: the core reads indptr[n_rows] entries of indices and data.
  if (a.indptr[a.n_rows] != indices.shape(0))
    throw std::invalid_argument(prefix + "indptr[-1] = " + std::to_string(a.indptr[a.n_rows]) + " but indices has " +
                                std::to_string(indices.shape(0)) + " entries");
  if (ordered) {
    if (a.indptr[0] != 0) throw std::invalid_argument(prefix + "indptr[0] must be 0");
    for (Index r = 0; r < a.n_rows; ++r)
      if (a.indptr[r + 1] < a.indptr[r]) throw std::invalid_argument(prefix + "indptr must be non-decreasing");
  }
  return a;
}

/// Read-only 1-D view of core memory; `owner` (the Python object holding the
/// core value) becomes the array's base, so the memory outlives the view.
template <class T>
py::array readonly_view(const T* data, py::ssize_t n, py::handle owner) {
  py::array_t<T> a({n}, {static_cast<py::ssize_t>(sizeof(T))}, data, owner);
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return std::move(a);
}

/// Moves a vector to the heap and returns an array owning it (no copy).
template <class T>
py::array to_numpy(std::vector<T>&& v) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(heap->size())}, {static_cast<py::ssize_t>(sizeof(T))}, heap->data(),
                        owner);
}

}  // namespace markovmem::bindings
