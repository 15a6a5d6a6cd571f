// Binding of the safetensors file format: save, load, read_metadata.
#include <pybind11/stl.h>

#include <optional>

#include "buffers.hpp"
#include "markovmem/io.hpp"

namespace markovmem::bindings {

void bind_io(py::module_& m) {
  m.def("save", &save, py::arg("P"), py::arg("path"), py::arg("metadata"), py::call_guard<py::gil_scoped_release>(),
        "Atomic save to a safetensors file.");
  m.def(
      "load",
      [](const std::string& path, bool use_mmap, bool verify, int n_threads) {
        std::optional<Loaded> l;
        {
          py::gil_scoped_release release;  // file work only; no Python objects touched
          l.emplace(load(path, use_mmap, verify, n_threads));
        }
        return py::make_tuple(std::move(l->matrix), l->metadata, l->metadata_verified);
      },
      py::arg("path"), py::arg("mmap"), py::arg("verify"), py::arg("n_threads"),
      "(matrix, metadata pairs, metadata verified) read from a file.");
  m.def("read_metadata", &read_metadata, py::arg("path"), py::call_guard<py::gil_scoped_release>(),
        "Metadata pairs of a file.");
}

}  // namespace markovmem::bindings
