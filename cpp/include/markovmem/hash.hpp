// Content hashing: XXH64 (a stable, non-cryptographic 64-bit hash, same value on
// every little-endian machine) and a chunked tree hash so large arrays hash in
// parallel with a result that does not depend on the thread count.  One chunk
// pass can also copy and compare, so expansion reads old bytes only once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace markovmem {

/// XXH64 of `size` bytes (reference algorithm by Yann Collet).  O(size), thread-safe.
std::uint64_t xxh64(const void* data, std::size_t size, std::uint64_t seed = 0) noexcept;

/// Chunk size of the tree hash.
inline constexpr std::size_t kHashChunk = std::size_t{1} << 20;

/// Chunk hashes of one array and of one of its prefixes: `chunks` holds XXH64
/// of each kHashChunk piece of the whole array; the prefix of `prefix_bytes`
/// shares its complete chunks and adds `partial` for its last incomplete one.
struct ArrayHashes {
  std::size_t full_bytes = 0;
  std::size_t prefix_bytes = 0;
  std::vector<std::uint64_t> chunks;
  std::uint64_t partial = 0;  ///< valid when prefix_bytes % kHashChunk != 0
  bool prefix_equal = true;   ///< with compare: the prefix equals the source byte for byte

  void append_prefix(std::vector<std::uint64_t>& out) const;
  void append_full(std::vector<std::uint64_t>& out) const;
};

/// What process_chunks does with the prefix bytes before hashing them.
enum class PrefixMode { kHashOnly, kCompare, kCopyAndCompare };

/// For the chunks [first_chunk, last_chunk) of the array `dst` (full_bytes long):
/// bytes below prefix_bytes are first copied from `src` (kCopyAndCompare, dst
/// writable) and/or compared with `src` (kCompare, kCopyAndCompare), each while
/// the chunk is hot in cache; then every chunk lying wholly below `ready_bytes`
/// (the bytes of dst already written) and the prefix's partial chunk are hashed
/// into `h` (sized on first use).  Parallel over chunks; results do not depend
/// on the thread count.
void process_chunks(ArrayHashes& h, void* dst, const void* src, std::size_t prefix_bytes, std::size_t full_bytes,
                    std::size_t ready_bytes, std::size_t first_chunk, std::size_t last_chunk, PrefixMode mode,
                    int n_threads);

/// Number of chunks of an array of `bytes` bytes.
inline std::size_t n_chunks(std::size_t bytes) { return (bytes + kHashChunk - 1) / kHashChunk; }

/// 16 lower-case hex digits.
std::string to_hex(std::uint64_t value);

/// Fingerprint of a matrix from its header sizes and the chunk hashes of its
/// four arrays (indptr, tail, indices, data), in that order.
std::string fingerprint_from_parts(std::int64_t n_rows, std::int64_t n_base, std::int64_t nnz,
                                   const std::vector<std::uint64_t>& chunk_hashes);

}  // namespace markovmem
