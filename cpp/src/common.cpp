// Thread-count resolution shared by every parallel loop of the core.
#include "markovmem/common.hpp"

#include <algorithm>

#ifdef MARKOVMEM_HAVE_OPENMP
#include <omp.h>
#endif

namespace markovmem::detail {

int max_threads() noexcept {
#ifdef MARKOVMEM_HAVE_OPENMP
  return 4 * std::max(1, omp_get_num_procs());
#else
  return 4;
#endif
}

int resolve_threads(int n_threads) noexcept {
#ifdef MARKOVMEM_HAVE_OPENMP
  return std::min(n_threads > 0 ? n_threads : omp_get_max_threads(), max_threads());
#else
  (void)n_threads;
  return 1;
#endif
}

}  // namespace markovmem::detail
