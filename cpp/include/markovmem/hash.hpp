// Content hashing: XXH64 (a stable, non-cryptographic 64-bit hash, same value on
// every little-endian machine) and a chunked tree hash so large arrays hash in
// parallel with a result that does not depend on the thread count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace markovmem {

/// XXH64 of `size` bytes (reference algorithm by Yann Collet).  O(size), thread-safe.
std::uint64_t xxh64(const void* data, std::size_t size, std::uint64_t seed = 0) noexcept;

/// Appends XXH64 of each 1 MiB chunk of the buffer to `out` (chunks hashed in
/// parallel with up to n_threads threads).  The appended values depend only on the bytes.
void chunk_hashes(const void* data, std::size_t size, std::vector<std::uint64_t>& out,
                  int n_threads);

/// 16 lower-case hex digits.
std::string to_hex(std::uint64_t value);

}  // namespace markovmem
