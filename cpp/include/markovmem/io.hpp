// The on-disk format: a safetensors file (8-byte little-endian header length,
// JSON header, raw little-endian arrays) holding indptr (I64), tail (F64),
// indices (I32) and data (F32), with format version, sizes and fingerprint in
// __metadata__, and four more arrays per open block (version 2).  Saves are atomic; loads check structure before any
// use.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "markovmem/transition_matrix.hpp"

namespace markovmem {

/// Format name and version written to and required in __metadata__.
inline constexpr const char* kFormatName = "markovmem.TransitionMatrix";
inline constexpr const char* kFormatVersion = "1";
/// Version of files whose matrix carries open blocks (tensors open.<k>.indptr, .leak,
/// .indices, .data; sizes under __metadata__ open_blocks).  Closed matrices stay version 1.
inline constexpr const char* kFormatVersionOpen = "2";
/// __metadata__ key listing the open blocks of a version-2 file: "n_rows,m,nnz;..." oldest first.
inline constexpr const char* kOpenBlocksKey = "open_blocks";

using Metadata = std::vector<std::pair<std::string, std::string>>;

/// Writes P to `path` atomically: a temporary file in the same directory is
/// written, flushed to disk and renamed over `path`, so an error or crash
/// mid-save leaves an existing file untouched.  Temporary files of earlier saves
/// to `path` whose writer process is gone are removed first.  `extra` entries are
/// added to __metadata__ (keys must not start with "markovmem." or collide with
/// ours), followed by the metadata fingerprint.  Throws IoError on any OS failure.
void save(const TransitionMatrix& P, const std::string& path, const Metadata& extra = {});

/// __metadata__ key of the metadata fingerprint that save() writes: metadata_fingerprint()
/// of every other __metadata__ entry.  Files written before it existed do not have it.
inline constexpr const char* kMetadataFingerprintKey = "markovmem.metadata_fingerprint";

/// Stable hash (16 hex digits, XXH64) of a set of metadata entries, whatever their order,
/// leaving out an entry under kMetadataFingerprintKey.  Keys must be unique.
std::string metadata_fingerprint(const Metadata& entries);

/// Result of load(): the matrix (viewing the mapping or an owned buffer) and all metadata.
struct Loaded {
  TransitionMatrix matrix;
  Metadata metadata;
  /// verify checked the metadata against its stored fingerprint (false without verify,
  /// or for a file written before the metadata fingerprint existed).
  bool metadata_verified = false;
};

/// Reads a file written by save().  With use_mmap, data and tail view a read-only
/// private mapping (no copy) and indptr and indices are read into owned memory, so a
/// file rewritten in place can change values but no address; otherwise the whole
/// file is read into memory.  `path` must be a regular file (a FIFO is refused, not
/// waited on).  Every
/// size, offset, dtype and alignment is checked, then the CSR structure
/// (check_rows), so no file can make later calls read out of bounds.  With
/// verify, values and tails are checked too and the stored fingerprint must match, and
/// so must the metadata fingerprint when the file has one.
/// Throws IoError (OS errors), std::invalid_argument (malformed or corrupt file).
/// Truncating a mapped file makes the OS deliver SIGBUS on a read past its new end.
Loaded load(const std::string& path, bool use_mmap, bool verify, int n_threads = 0);

/// Reads only the JSON header's metadata (cheap; for `markovmem inspect`).
Metadata read_metadata(const std::string& path);

}  // namespace markovmem
