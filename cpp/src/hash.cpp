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

void ArrayHashes::append_prefix(std::vector<std::uint64_t>& out) const {
  const std::size_t whole = prefix_bytes / kHashChunk;
  out.insert(out.end(), chunks.begin(), chunks.begin() + static_cast<std::ptrdiff_t>(whole));
  if (prefix_bytes % kHashChunk != 0) out.push_back(partial);
}

void ArrayHashes::append_full(std::vector<std::uint64_t>& out) const {
  out.insert(out.end(), chunks.begin(), chunks.end());
}

void process_chunks(ArrayHashes& h, void* dst, const void* src, std::size_t prefix_bytes, std::size_t full_bytes,
                    std::size_t ready_bytes, std::size_t first_chunk, std::size_t last_chunk, PrefixMode mode,
                    int n_threads) {
  if (h.chunks.size() != n_chunks(full_bytes)) {
    h.chunks.assign(n_chunks(full_bytes), 0);
    h.full_bytes = full_bytes;
    h.prefix_bytes = prefix_bytes;
    h.prefix_equal = true;
  }
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  const long long c0 = static_cast<long long>(first_chunk), c1 = static_cast<long long>(last_chunk);
  int differ = 0;
#pragma omp parallel for schedule(static) num_threads(detail::resolve_threads(n_threads)) \
    reduction(| : differ) if (c1 - c0 > 1)
  for (long long c = c0; c < c1; ++c) {
    const std::size_t a = static_cast<std::size_t>(c) * kHashChunk;
    const std::size_t len = std::min(kHashChunk, full_bytes - a);
    if (a < prefix_bytes && mode != PrefixMode::kHashOnly) {
      const std::size_t plen = std::min(len, prefix_bytes - a);
      if (mode == PrefixMode::kCopyAndCompare) std::memcpy(d + a, s + a, plen);
      differ |= std::memcmp(d + a, s + a, plen) != 0;
    }
    if (a + len <= ready_bytes) h.chunks[static_cast<std::size_t>(c)] = xxh64(d + a, len, 0);
    // The prefix's last, incomplete chunk (it may end exactly where the array ends).
    if (prefix_bytes % kHashChunk != 0 && a == prefix_bytes / kHashChunk * kHashChunk && prefix_bytes <= ready_bytes)
      h.partial = xxh64(d + a, prefix_bytes - a, 0);
  }
  if (differ) h.prefix_equal = false;
}

std::string fingerprint_from_parts(std::int64_t n_rows, std::int64_t n_base, std::int64_t nnz,
                                   const std::vector<std::uint64_t>& chunk_hashes) {
  // Header: format tag and sizes, then the arrays' chunk hashes in a fixed order.
  char header[48] = "markovmem-transition-matrix-v1";
  const std::int64_t sizes[3] = {n_rows, n_base, nnz};
  static_assert(sizeof(sizes) == 24);
  std::memcpy(header + 24, sizes, sizeof(sizes));
  std::vector<std::uint64_t> parts{xxh64(header, sizeof(header))};
  parts.insert(parts.end(), chunk_hashes.begin(), chunk_hashes.end());
  return to_hex(xxh64(parts.data(), parts.size() * sizeof(std::uint64_t)));
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
