// Shared vocabulary of the markovmem core: index and value types, the tail
// convention's constants, the exception types the bindings translate, and the
// OpenMP helpers every parallel loop uses.
#pragma once

#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>

namespace markovmem {

/// Row pointers, sizes and state ids in APIs (signed 64-bit).
using Index = std::int64_t;
/// Stored column indices (the explicit sparse storage index type).
using StateIndex = std::int32_t;
/// Stored probabilities.
using Prob = float;

/// Mass used in place of an exact zero wherever a log is taken (DESIGN §1).
inline constexpr double kLogFloor = 1e-12;
/// Default tolerance on row sums: a row may sum to at most 1 + kRowSumTolerance.
inline constexpr double kRowSumTolerance = 1e-5;
/// Largest number of states: column indices are int32.
inline constexpr Index kMaxStates = 2147483647;

/// A matrix breaks a Markov invariant. Carries the first offending row (-1 when
/// the problem is not tied to one row). Maps to markovmem.InvariantError (a ValueError).
class InvariantViolation : public std::invalid_argument {
 public:
  InvariantViolation(Index row, const std::string& what) : std::invalid_argument(what), row_(row) {}
  Index row() const noexcept { return row_; }

 private:
  Index row_;
};

/// A file could not be read or written. Carries errno (0 when not from the OS),
/// the reason without the path, and the path. Maps to OSError(errno, reason, path),
/// which Python turns into FileNotFoundError, PermissionError, ... by errno.
class IoError : public std::runtime_error {
 public:
  IoError(int err, const std::string& path, const std::string& reason)
      : std::runtime_error(reason + " ('" + path + "')"), errno_(err), path_(path), reason_(reason) {}
  int error_number() const noexcept { return errno_; }
  const std::string& path() const noexcept { return path_; }
  const std::string& reason() const noexcept { return reason_; }

 private:
  int errno_;
  std::string path_;
  std::string reason_;
};

namespace detail {

/// Largest thread count a call may ask for: 4 x the processors available to the
/// process (at least 4).  Per-thread workspaces are sized by the thread count, and
/// OpenMP aborts or crashes when it cannot start the threads it was asked for.
int max_threads() noexcept;

/// Number of threads for a parallel region: n_threads <= 0 means the OpenMP default;
/// never more than max_threads().  The Python API refuses a larger n_threads with a
/// ValueError; the clamp here keeps any other caller memory-safe, and lets this stay
/// noexcept (it is evaluated in num_threads clauses).
int resolve_threads(int n_threads) noexcept;

/// Keeps the first exception thrown inside an OpenMP region so it can be
/// rethrown after the join (nothing may propagate out of the region itself).
class ExceptionCollector {
 public:
  /// Runs f; false if it threw (the first exception of all runs is kept).
  template <class F>
  bool run(F&& f) noexcept {
    try {
      f();
      return true;
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!first_) first_ = std::current_exception();
      return false;
    }
  }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::mutex mutex_;
  std::exception_ptr first_;
};

}  // namespace detail
}  // namespace markovmem
