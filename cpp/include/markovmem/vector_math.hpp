// The exp / log loops of the fit's inner solvers, vectorised for the widest instruction
// set the CPU has (chosen at run time, so one build serves every x86-64 machine; the
// portable Eigen loops elsewhere).  Public so that the bindings can test each level.
#pragma once

#include <cstddef>
#include <string>

#include "markovmem/common.hpp"

namespace markovmem {

/// e[i] = exp(z[i] - shift) for i < n; returns the sum of e.
double exp_shifted_sum(const double* z, double shift, double* e, std::size_t n);

/// max_i z[i] (-inf when n = 0) and sum_i q[i] z[i].
struct MaxDot {
  double max = 0.0, dot = 0.0;
};
MaxDot max_dot(const double* z, const double* q, std::size_t n);

/// sum_i q[i] log max(x[i], floor); floor must be a positive normal number (>= 2.3e-308).
double dot_log(const double* q, const double* x, std::size_t n, double floor = kLogFloor);

/// The mixture link's per-position terms: f is clamped at kLogFloor in place; with `value`,
/// qlogf = sum q log f; with w1 (and w2) given, w1 = q / f, w2 = w1 / f and their sums.
struct MixtureTerms {
  double qlogf = 0.0, w1 = 0.0, w2 = 0.0;
};
MixtureTerms mixture_terms(const double* q, double* f, std::size_t n, bool value, double* w1, double* w2);

/// The instruction set the loops above use: "avx512", "avx2" or "generic".
std::string simd_level();
/// Selects the instruction set ("auto": the widest the CPU supports).  For tests and
/// benchmarks; throws std::invalid_argument for an unknown name or one the CPU lacks.
/// Not to be called while a fit runs.
void set_simd_level(const std::string& name);

}  // namespace markovmem
