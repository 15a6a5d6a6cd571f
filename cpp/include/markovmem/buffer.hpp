// Buffer<T>: the owned storage of a matrix array.  Either adopts a std::vector
// or is a raw, uninitialised, huge-page-friendly allocation that is filled once
// (no zero pass before a copy).  Also parallel memcpy / memcmp over big arrays.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "markovmem/common.hpp"

namespace markovmem::detail {

/// Allocates `bytes` uninitialised bytes; 2 MiB aligned and advised for
/// transparent huge pages when large (fewer page faults on first touch).
void* allocate_large(std::size_t bytes);
/// memcpy split over up to n_threads threads (pieces of at least 8 MiB).
void parallel_copy(void* dst, const void* src, std::size_t bytes, int n_threads);
/// memcmp == 0, split like parallel_copy.
bool parallel_equal(const void* a, const void* b, std::size_t bytes, int n_threads);

template <class T>
class Buffer {
 public:
  Buffer() = default;
  /// Adopts the vector's heap storage (no copy).
  explicit Buffer(std::vector<T>&& v) : vec_(std::move(v)), ptr_(vec_.data()), size_(vec_.size()) {}
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    vec_ = std::move(o.vec_);
    raw_ = std::move(o.raw_);
    ptr_ = raw_ ? raw_.get() : vec_.data();
    size_ = o.size_;
    o.ptr_ = nullptr;
    o.size_ = 0;
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  /// n elements, contents unspecified until written.  T must be trivially copyable.
  static Buffer uninitialized(std::size_t n) {
    Buffer b;
    b.raw_.reset(static_cast<T*>(allocate_large(n * sizeof(T) + (n == 0 ? sizeof(T) : 0))));
    b.ptr_ = b.raw_.get();
    b.size_ = n;
    return b;
  }
  /// A copy of n elements at src (copied in parallel), followed by `spare` uninitialised elements.
  static Buffer copy_of(const T* src, std::size_t n, std::size_t spare, int n_threads) {
    Buffer b = uninitialized(n + spare);
    parallel_copy(b.ptr_, src, n * sizeof(T), n_threads);
    return b;
  }

  T* data() noexcept { return ptr_; }
  const T* data() const noexcept { return ptr_; }
  std::size_t size() const noexcept { return size_; }
  T& operator[](std::size_t i) noexcept { return ptr_[i]; }

 private:
  struct Free {
    void operator()(T* p) const noexcept { std::free(p); }
  };
  std::vector<T> vec_;
  std::unique_ptr<T, Free> raw_;
  T* ptr_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace markovmem::detail
