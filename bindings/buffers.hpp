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
  return py::array_t<T>({static_cast<py::ssize_t>(heap->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        heap->data(), owner);
}

}  // namespace markovmem::bindings
