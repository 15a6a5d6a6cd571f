// Thread-count resolution shared by every parallel loop of the core.
#include "markovmem/common.hpp"

#ifdef MARKOVMEM_HAVE_OPENMP
#include <omp.h>
#endif

namespace markovmem::detail {

int resolve_threads(int n_threads) noexcept {
#ifdef MARKOVMEM_HAVE_OPENMP
  return n_threads > 0 ? n_threads : omp_get_max_threads();
#else
  (void)n_threads;
  return 1;
#endif
}

}  // namespace markovmem::detail
