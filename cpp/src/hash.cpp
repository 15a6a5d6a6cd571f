// XXH64 (from the public xxHash specification) and the chunked tree hash used by fingerprints.
#include "markovmem/hash.hpp"

#include <algorithm>
#include <cstring>

#include "markovmem/common.hpp"

namespace markovmem {
namespace {

constexpr std::uint64_t kP1 = 11400714785074694791ULL;
constexpr std::uint64_t kP2 = 14029467366897019727ULL;
constexpr std::uint64_t kP3 = 1609587929392839161ULL;
constexpr std::uint64_t kP4 = 9650029242287828579ULL;
constexpr std::uint64_t kP5 = 2870177450012600261ULL;
constexpr std::size_t kChunk = std::size_t{1} << 20;

inline std::uint64_t rotl(std::uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
// memcpy keeps the reads aligned-safe; the format is defined little-endian and
// the library only builds for little-endian hosts (checked in io.cpp).
inline std::uint64_t read64(const unsigned char* p) {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline std::uint32_t read32(const unsigned char* p) {
  std::uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline std::uint64_t round(std::uint64_t acc, std::uint64_t input) {
  acc += input * kP2;
  acc = rotl(acc, 31);
  return acc * kP1;
}
inline std::uint64_t merge_round(std::uint64_t acc, std::uint64_t val) {
  acc ^= round(0, val);
  return acc * kP1 + kP4;
}

}  // namespace

std::uint64_t xxh64(const void* data, std::size_t size, std::uint64_t seed) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
  const unsigned char* end = p + size;
  std::uint64_t h;
  if (size >= 32) {
    std::uint64_t v1 = seed + kP1 + kP2, v2 = seed + kP2, v3 = seed, v4 = seed - kP1;
    const unsigned char* limit = end - 32;
    do {
      v1 = round(v1, read64(p));
      v2 = round(v2, read64(p + 8));
      v3 = round(v3, read64(p + 16));
      v4 = round(v4, read64(p + 24));
      p += 32;
    } while (p <= limit);
    h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
    h = merge_round(h, v1);
    h = merge_round(h, v2);
    h = merge_round(h, v3);
    h = merge_round(h, v4);
  } else {
    h = seed + kP5;
  }
  h += static_cast<std::uint64_t>(size);
  while (p + 8 <= end) {
    h ^= round(0, read64(p));
    h = rotl(h, 27) * kP1 + kP4;
    p += 8;
  }
  if (p + 4 <= end) {
    h ^= static_cast<std::uint64_t>(read32(p)) * kP1;
    h = rotl(h, 23) * kP2 + kP3;
    p += 4;
  }
  while (p < end) {
    h ^= (*p) * kP5;
    h = rotl(h, 11) * kP1;
    ++p;
  }
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return h;
}

void chunk_hashes(const void* data, std::size_t size, std::vector<std::uint64_t>& out,
                  int n_threads) {
  const auto* p = static_cast<const unsigned char*>(data);
  const std::size_t n_chunks = (size + kChunk - 1) / kChunk;
  const std::size_t base = out.size();
  out.resize(base + n_chunks);
  const long long n = static_cast<long long>(n_chunks);
  std::uint64_t* dst = out.data() + base;
#pragma omp parallel for schedule(static) num_threads(detail::resolve_threads(n_threads)) if (n > 1)
  for (long long c = 0; c < n; ++c) {
    const std::size_t start = static_cast<std::size_t>(c) * kChunk;
    const std::size_t len = std::min(kChunk, size - start);
    dst[c] = xxh64(p + start, len, 0);
  }
}

std::string to_hex(std::uint64_t value) {
  static const char* digits = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i) {
    s[static_cast<std::size_t>(i)] = digits[value & 0xF];
    value >>= 4;
  }
  return s;
}

}  // namespace markovmem
