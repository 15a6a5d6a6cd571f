// Run-time choice of the vector loops: AVX-512 or AVX2 versions (GCC on x86-64, compiled
// for those instruction sets inside target regions, so the rest of the library and Eigen
// stay baseline x86-64 and the build needs no -march flag) or the portable Eigen loops.
// Intrinsics-free GCC vector extensions keep one source for both widths; nothing from a
// header is instantiated inside a target region, so no inline function is compiled twice
// with different instruction sets (which the linker could merge into the wrong one).
#include "markovmem/vector_math.hpp"

#include <Eigen/Dense>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "markovmem/common.hpp"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MARKOVMEM_SIMD_X86 1
#endif

namespace markovmem {

namespace detail::generic {

double exp_shifted_sum(const double* z, double shift, double* e, std::size_t n) {
  const Eigen::Index m = static_cast<Eigen::Index>(n);
  Eigen::Map<Eigen::ArrayXd> ea(e, m);
  ea = (Eigen::Map<const Eigen::ArrayXd>(z, m) - shift).exp();
  return ea.sum();
}

MaxDot max_dot(const double* z, const double* q, std::size_t n) {
  const Eigen::Index m = static_cast<Eigen::Index>(n);
  const Eigen::Map<const Eigen::ArrayXd> za(z, m);
  return {n ? za.maxCoeff() : -INFINITY, (za * Eigen::Map<const Eigen::ArrayXd>(q, m)).sum()};
}

double dot_log(const double* q, const double* x, std::size_t n, double floor) {
  const Eigen::Index m = static_cast<Eigen::Index>(n);
  return (Eigen::Map<const Eigen::ArrayXd>(q, m) * Eigen::Map<const Eigen::ArrayXd>(x, m).max(floor).log()).sum();
}

MixtureTerms mixture_terms(const double* q, double* f, std::size_t n, bool value, double* w1, double* w2) {
  const Eigen::Index m = static_cast<Eigen::Index>(n);
  const Eigen::Map<const Eigen::ArrayXd> qa(q, m);
  Eigen::Map<Eigen::ArrayXd> fa(f, m);
  fa = fa.max(kLogFloor);
  MixtureTerms t;
  if (value) t.qlogf = (qa * fa.log()).sum();
  if (w1) {
    Eigen::Map<Eigen::ArrayXd> u(w1, m), v(w2, m);
    u = qa / fa;
    v = u / fa;
    t.w1 = u.sum();
    t.w2 = v.sum();
  }
  return t;
}

}  // namespace detail::generic

#ifdef MARKOVMEM_SIMD_X86
#pragma GCC push_options
#pragma GCC target("avx2")
namespace detail::avx2 {
typedef double V __attribute__((vector_size(32)));
#include "vector_math_kernels.inc"
}  // namespace detail::avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace detail::avx512 {
typedef double V __attribute__((vector_size(64)));
#include "vector_math_kernels.inc"
}  // namespace detail::avx512
#pragma GCC pop_options
#endif

namespace {

struct Kernels {
  const char* name;
  bool (*cpu_has)();
  double (*exp_shifted_sum)(const double*, double, double*, std::size_t);
  MaxDot (*max_dot)(const double*, const double*, std::size_t);
  double (*dot_log)(const double*, const double*, std::size_t, double);
  MixtureTerms (*mixture_terms)(const double*, double*, std::size_t, bool, double*, double*);
};

// The levels this build has, widest first (libgcc's CPU checks include the OS's support
// for the wider registers, XGETBV).
constexpr Kernels kLevels[] = {
#ifdef MARKOVMEM_SIMD_X86
    {"avx512", [] { return __builtin_cpu_supports("avx512f") != 0; }, detail::avx512::exp_shifted_sum,
     detail::avx512::max_dot, detail::avx512::dot_log, detail::avx512::mixture_terms},
    {"avx2", [] { return __builtin_cpu_supports("avx2") != 0; }, detail::avx2::exp_shifted_sum, detail::avx2::max_dot,
     detail::avx2::dot_log, detail::avx2::mixture_terms},
#endif
    {"generic", [] { return true; }, detail::generic::exp_shifted_sum, detail::generic::max_dot,
     detail::generic::dot_log, detail::generic::mixture_terms},
};

const Kernels* best() {
  for (const Kernels& k : kLevels)
    if (k.cpu_has()) return &k;
  return nullptr;  // unreachable: generic is always there
}

std::atomic<const Kernels*>& active() {
  static std::atomic<const Kernels*> k{best()};
  return k;
}

const Kernels& kernels() { return *active().load(std::memory_order_relaxed); }

}  // namespace

double exp_shifted_sum(const double* z, double shift, double* e, std::size_t n) {
  return kernels().exp_shifted_sum(z, shift, e, n);
}

MaxDot max_dot(const double* z, const double* q, std::size_t n) { return kernels().max_dot(z, q, n); }

double dot_log(const double* q, const double* x, std::size_t n, double floor) {
  return kernels().dot_log(q, x, n, floor);
}

MixtureTerms mixture_terms(const double* q, double* f, std::size_t n, bool value, double* w1, double* w2) {
  return kernels().mixture_terms(q, f, n, value, w1, w2);
}

std::string simd_level() { return kernels().name; }

void set_simd_level(const std::string& name) {
  if (name == "auto") {
    active().store(best());
    return;
  }
  if (name != "avx512" && name != "avx2" && name != "generic")
    throw std::invalid_argument("unknown instruction set '" + name +
                                "'; expected 'auto', 'avx512', 'avx2' or 'generic'");
  for (const Kernels& k : kLevels)
    if (name == k.name && k.cpu_has()) {
      active().store(&k);
      return;
    }
  throw std::invalid_argument("instruction set '" + name + "' is not available on this CPU or build");
}

}  // namespace markovmem
