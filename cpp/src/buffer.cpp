// Large uninitialised allocations and parallel memcpy/memcmp for Buffer<T>.
#include "markovmem/buffer.hpp"

#include <algorithm>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace markovmem::detail {

namespace {
constexpr std::size_t kHugePage = std::size_t{2} << 20;
constexpr std::size_t kMinPiece = std::size_t{8} << 20;

int pieces_for(std::size_t bytes, int n_threads) {
  const int nt = resolve_threads(n_threads);
  return static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(nt, bytes / kMinPiece)));
}
}  // namespace

void* allocate_large(std::size_t bytes) {
  void* p = nullptr;
  if (bytes >= 2 * kHugePage) {
    const std::size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    if (posix_memalign(&p, kHugePage, rounded) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // advisory: failure only costs page faults
#endif
  } else {
    p = std::malloc(std::max<std::size_t>(bytes, 1));
    if (!p) throw std::bad_alloc();
  }
  return p;
}

void parallel_copy(void* dst, const void* src, std::size_t bytes, int n_threads) {
  const int n = pieces_for(bytes, n_threads);
  const std::size_t piece = (bytes + static_cast<std::size_t>(n) - 1) / static_cast<std::size_t>(n);
#pragma omp parallel for schedule(static) num_threads(n) if (n > 1)
  for (int i = 0; i < n; ++i) {
    const std::size_t a = static_cast<std::size_t>(i) * piece;
    if (a < bytes)
      std::memcpy(static_cast<char*>(dst) + a, static_cast<const char*>(src) + a, std::min(piece, bytes - a));
  }
}

bool parallel_equal(const void* a, const void* b, std::size_t bytes, int n_threads) {
  if (a == b || bytes == 0) return true;
  const int n = pieces_for(bytes, n_threads);
  const std::size_t piece = (bytes + static_cast<std::size_t>(n) - 1) / static_cast<std::size_t>(n);
  int differ = 0;
#pragma omp parallel for schedule(static) num_threads(n) reduction(| : differ) if (n > 1)
  for (int i = 0; i < n; ++i) {
    const std::size_t s = static_cast<std::size_t>(i) * piece;
    if (s < bytes)
      differ |= std::memcmp(static_cast<const char*>(a) + s, static_cast<const char*>(b) + s,
                            std::min(piece, bytes - s)) != 0;
  }
  return differ == 0;
}

}  // namespace markovmem::detail
