// Binding of the fused softmax + top-k kernel (markovmem.softmax_topk).
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "buffers.hpp"
#include "markovmem/topk.hpp"

namespace markovmem::bindings {

void bind_topk(py::module_& m) {
  m.def(
      "softmax_topk",
      // Rows may be strided (e.g. the first n_base columns of wider logits);
      // entries within a row must be contiguous.
      [](const py::array_t<float>& logits, Index k, int n_threads) {
        if (logits.ndim() != 2)
          throw std::invalid_argument("logits must be 2-D (rows, vocab); got " + std::to_string(logits.ndim()) +
                                      " dimensions");
        const Index n_rows = logits.shape(0), n_cols = logits.shape(1);
        if (n_cols < 1) throw std::invalid_argument("logits has no columns; expected at least one");
        if (k < 1 || k > n_cols)
          throw std::invalid_argument("k is " + std::to_string(k) + "; expected 1 <= k <= " + std::to_string(n_cols));
        const Index item = static_cast<Index>(sizeof(float));
        const Index s0 = logits.strides(0), s1 = logits.strides(1);
        if (n_rows > 0 && ((n_cols > 1 && s1 != item) || (n_rows > 1 && (s0 < n_cols * item || s0 % item != 0))))
          throw std::invalid_argument("logits rows must be contiguous, non-overlapping and ascending in memory");
        const Index row_stride = n_rows > 1 ? s0 / item : n_cols;
        const float* lp = logits.data();
        std::vector<std::int32_t> idx(static_cast<std::size_t>(n_rows * k));
        std::vector<float> prob(static_cast<std::size_t>(n_rows * k));
        {
          py::gil_scoped_release release;  // reads `logits` (alive in the caller), writes the vectors
          softmax_topk(lp, n_rows, n_cols, row_stride, k, idx.data(), prob.data(), n_threads);
        }
        py::array ai = to_numpy(std::move(idx));
        py::array ap = to_numpy(std::move(prob));
        return py::make_tuple(ai.reshape({n_rows, k}), ap.reshape({n_rows, k}));
      },
      py::arg("logits").noconvert(), py::arg("k"), py::arg("n_threads"),
      "Row-wise softmax + top-k of (B, V) float32 logits: (indices int32 (B, k), probs float32 (B, k)).");
}

}  // namespace markovmem::bindings
