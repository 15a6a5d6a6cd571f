// safetensors writer/reader for TransitionMatrix, with a small strict JSON
// parser for the header (no external dependency) and POSIX mmap.
#include "markovmem/io.hpp"

#include "markovmem/buffer.hpp"
#include "markovmem/hash.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <sstream>
#include <unordered_set>

namespace markovmem {
namespace {

static_assert(sizeof(Index) == 8 && sizeof(StateIndex) == 4 && sizeof(Prob) == 4 && sizeof(double) == 8);

bool little_endian() {
  const std::uint16_t one = 1;
  unsigned char b;
  std::memcpy(&b, &one, 1);
  return b == 1;
}

// Header bytes beyond this are refused (the safetensors reference uses 100 MB).
constexpr std::uint64_t kMaxHeader = 100ull << 20;
// Entries (object members and array elements, over the whole header) beyond this are
// refused: a matrix file has 36 plus one per user metadata key.
constexpr std::size_t kMaxHeaderEntries = 65536;
// User metadata entries save() accepts (what load() reads back, with room to spare).
constexpr std::size_t kMaxUserMetadata = kMaxHeaderEntries - 64;
// Nesting beyond this is refused (a matrix file nests 3 levels).
constexpr int kMaxHeaderDepth = 8;

[[noreturn]] void os_fail(const std::string& path, const std::string& what) {
  const int err = errno;
  throw IoError(err, path, what + ": " + std::strerror(err));
}

bool valid_utf8(const std::string& s);

// `s` with every byte of an invalid UTF-8 sequence written as \xNN: messages become Python
// str, and a path or key from a file need not be UTF-8.
std::string printable(const std::string& s) {
  if (valid_utf8(s)) return s;
  std::string out;
  for (unsigned char c : s) {
    if (c < 0x80) {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    }
  }
  return out;
}

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
  throw std::invalid_argument(printable("file '" + path + "' is not a valid markovmem matrix: " + what));
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out;
}

// ---- strict JSON subset: objects, arrays, strings, non-negative integers ----
struct Json {
  enum Kind { kObject, kArray, kString, kInteger, kOther } kind = kOther;
  std::string str;
  std::uint64_t integer = 0;
  std::vector<std::pair<std::string, Json>> object;
  std::vector<Json> array;
  const Json* get(const std::string& key) const {
    for (const auto& kv : object)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
};

class JsonParser {
 public:
  JsonParser(const char* p, std::size_t n) : p_(p), end_(p + n) {}
  Json parse_document() {
    Json v = value(0);
    ws();
    if (p_ != end_) fail("trailing characters after the JSON header");
    return v;
  }
  std::string error;

 private:
  [[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }
  void ws() {
    while (p_ != end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\r' || *p_ == '\t')) ++p_;
  }
  char peek() {
    ws();
    if (p_ == end_) fail("JSON header ends early");
    return *p_;
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("JSON header: expected '") + c + "'");
    ++p_;
  }
  // Every object member and array element counts as one entry.  With the cap on
  // entries, the parsed tree takes at most about kMaxHeaderEntries x 200 bytes plus the
  // header's own bytes, whatever the header holds.
  void count_entry() {
    if (++entries_ > kMaxHeaderEntries)
      fail("JSON header holds more than " + std::to_string(kMaxHeaderEntries) + " entries");
  }
  Json value(int depth) {
    if (depth > kMaxHeaderDepth) fail("JSON header nests deeper than " + std::to_string(kMaxHeaderDepth) + " levels");
    const char c = peek();
    if (c == '{') return object(depth);
    if (c == '[') return array(depth);
    if (c == '"') {
      Json j;
      j.kind = Json::kString;
      j.str = string();
      return j;
    }
    if (c >= '0' && c <= '9') return integer();
    fail("JSON header: unsupported value (only objects, arrays, strings and integers)");
  }
  Json object(int depth) {
    Json j;
    j.kind = Json::kObject;
    expect('{');
    if (peek() == '}') {
      ++p_;
      return j;
    }
    // Duplicate keys are found through a hash set: a linear scan per key made a header of
    // 160k keys take 30 s to parse.
    std::unordered_set<std::string> keys;
    for (;;) {
      if (peek() != '"') fail("JSON header: expected a string key");
      std::string key = string();
      expect(':');
      if (!keys.insert(key).second) fail("JSON header: duplicate key '" + key + "'");
      count_entry();
      j.object.emplace_back(std::move(key), value(depth + 1));
      const char c = peek();
      ++p_;
      if (c == '}') return j;
      if (c != ',') fail("JSON header: expected ',' or '}'");
    }
  }
  Json array(int depth) {
    Json j;
    j.kind = Json::kArray;
    expect('[');
    if (peek() == ']') {
      ++p_;
      return j;
    }
    for (;;) {
      count_entry();
      j.array.push_back(value(depth + 1));
      const char c = peek();
      ++p_;
      if (c == ']') return j;
      if (c != ',') fail("JSON header: expected ',' or ']'");
    }
  }
  Json integer() {
    Json j;
    j.kind = Json::kInteger;
    std::uint64_t v = 0;
    while (p_ != end_ && *p_ >= '0' && *p_ <= '9') {
      const std::uint64_t d = static_cast<std::uint64_t>(*p_ - '0');
      if (v > (std::numeric_limits<std::uint64_t>::max() - d) / 10) fail("JSON header: integer overflows");
      v = v * 10 + d;
      ++p_;
    }
    if (p_ != end_ && (*p_ == '.' || *p_ == 'e' || *p_ == 'E')) fail("JSON header: non-integer number");
    j.integer = v;
    return j;
  }
  std::string string() {
    expect('"');
    std::string out;
    for (;;) {
      // Plain characters are appended a run at a time (one character at a time, a 99 MiB
      // metadata value took 2.3 s to parse).
      const char* run = p_;
      while (run != end_ && *run != '"' && *run != '\\' && static_cast<unsigned char>(*run) >= 0x20) ++run;
      out.append(p_, run);
      p_ = run;
      if (p_ == end_) fail("JSON header: unterminated string");
      const char c = *p_++;
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("JSON header: control character in a string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (p_ == end_) fail("JSON header: unterminated escape");
      const char e = *p_++;
      switch (e) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          if (end_ - p_ < 4) fail("JSON header: short \\u escape");
          unsigned code = 0;
          for (int i = 0; i < 4; ++i) {
            const char h = *p_++;
            code <<= 4;
            if (h >= '0' && h <= '9')
              code |= static_cast<unsigned>(h - '0');
            else if (h >= 'a' && h <= 'f')
              code |= static_cast<unsigned>(h - 'a' + 10);
            else if (h >= 'A' && h <= 'F')
              code |= static_cast<unsigned>(h - 'A' + 10);
            else
              fail("JSON header: bad \\u escape");
          }
          // Encode the code unit as UTF-8 (surrogate pairs are kept as two units; metadata only).
          if (code < 0x80) {
            out += static_cast<char>(code);
          } else if (code < 0x800) {
            out += static_cast<char>(0xC0 | (code >> 6));
            out += static_cast<char>(0x80 | (code & 0x3F));
          } else {
            out += static_cast<char>(0xE0 | (code >> 12));
            out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (code & 0x3F));
          }
          break;
        }
        default:
          fail("JSON header: bad escape");
      }
    }
  }
  const char* p_;
  const char* end_;
  std::size_t entries_ = 0;
};

struct TensorSpec {
  const char* name;
  const char* dtype;
  std::size_t itemsize;
};
constexpr TensorSpec kTensors[4] = {
    {"indptr", "I64", 8}, {"tail", "F64", 8}, {"indices", "I32", 4}, {"data", "F32", 4}};

// Keeps a file's bytes alive: either a private read-only mapping or an owned buffer.
// With a mapping, the structure (indptr, indices) is read into owned memory.
struct FileBytes {
  void* map = nullptr;
  std::size_t map_size = 0;
  std::vector<std::uint64_t> buffer;  // 8-byte aligned storage when not mapped
  const unsigned char* bytes = nullptr;
  std::size_t size = 0;
  detail::Buffer<Index> indptr;        // when mapped
  detail::Buffer<StateIndex> indices;  // when mapped
  ~FileBytes() {
    if (map) munmap(map, map_size);
  }
};

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  int release() {
    int f = fd_;
    fd_ = -1;
    return f;
  }

 private:
  int fd_;
};

void read_exact(int fd, void* dst, std::size_t n, std::size_t offset, const std::string& path) {
  auto* p = static_cast<unsigned char*>(dst);
  while (n > 0) {
    const ssize_t got = ::pread(fd, p, std::min<std::size_t>(n, 1u << 30), static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      os_fail(path, "cannot read");
    }
    if (got == 0) corrupt(path, "the file ended early (truncated)");
    p += got;
    n -= static_cast<std::size_t>(got);
    offset += static_cast<std::size_t>(got);
  }
}

void write_all(int fd, const void* src, std::size_t n, const std::string& path) {
  const auto* p = static_cast<const unsigned char*>(src);
  while (n > 0) {
    const ssize_t put = ::write(fd, p, std::min<std::size_t>(n, 1u << 30));
    if (put < 0) {
      if (errno == EINTR) continue;
      os_fail(path, "cannot write");
    }
    p += put;
    n -= static_cast<std::size_t>(put);
  }
}

std::uint64_t header_length(int fd, std::size_t file_size, const std::string& path) {
  if (file_size < 8) corrupt(path, "it has " + std::to_string(file_size) + " bytes, too few for a safetensors header");
  unsigned char len_bytes[8];
  read_exact(fd, len_bytes, 8, 0, path);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n > kMaxHeader || n > file_size - 8)
    corrupt(path, "header length " + std::to_string(n) + " exceeds the file size " + std::to_string(file_size) +
                      " (truncated or not safetensors)");
  return n;
}

// Strict UTF-8 (no overlongs, no surrogates): metadata becomes Python str.
bool valid_utf8(const std::string& s) {
  std::size_t i = 0;
  const std::size_t n = s.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::size_t len;
    std::uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (std::size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    static const std::uint32_t min_for_len[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_for_len[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

Metadata parse_metadata(const Json& header, const std::string& path) {
  if (header.kind != Json::kObject) corrupt(path, "the JSON header is not an object");
  Metadata meta;
  if (const Json* m = header.get("__metadata__")) {
    if (m->kind != Json::kObject) corrupt(path, "__metadata__ is not an object");
    for (const auto& kv : m->object) {
      if (kv.second.kind != Json::kString) corrupt(path, "__metadata__ value '" + kv.first + "' is not a string");
      if (!valid_utf8(kv.first) || !valid_utf8(kv.second.str))
        corrupt(path, "__metadata__ holds a string that is not valid UTF-8");
      meta.emplace_back(kv.first, kv.second.str);
    }
  }
  return meta;
}

Json parse_header(int fd, std::size_t file_size, const std::string& path, std::uint64_t* n_header) {
  *n_header = header_length(fd, file_size, path);
  std::string text(static_cast<std::size_t>(*n_header), '\0');
  read_exact(fd, text.data(), text.size(), 8, path);
  try {
    JsonParser parser(text.data(), text.size());
    return parser.parse_document();
  } catch (const std::invalid_argument& e) {
    corrupt(path, e.what());
  }
}

// Opens `path` for reading after checking it is a regular file.  O_NONBLOCK keeps the open
// of a FIFO from waiting for a writer forever (it has no effect on a regular file's reads,
// and is cleared anyway once the type is known).
int open_regular(const std::string& path, std::size_t* size) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (fd.get() < 0) os_fail(path, "cannot open");
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) os_fail(path, "cannot stat");
  if (!S_ISREG(st.st_mode)) {
    errno = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
    os_fail(path, S_ISDIR(st.st_mode)    ? "not a regular file (a directory)"
                  : S_ISFIFO(st.st_mode) ? "not a regular file (a FIFO)"
                                         : "not a regular file");
  }
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0) os_fail(path, "cannot set flags");
  *size = static_cast<std::size_t>(st.st_size);
  return fd.release();
}

const std::string* find(const Metadata& meta, const std::string& key) {
  for (const auto& kv : meta)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

Index parse_size(const Metadata& meta, const char* key, const std::string& path) {
  const std::string* v = find(meta, key);
  if (!v) corrupt(path, std::string("__metadata__ has no '") + key + "'");
  if (v->empty() || v->size() > 18 || v->find_first_not_of("0123456789") != std::string::npos)
    corrupt(path, std::string("__metadata__ '") + key + "' is '" + *v + "', not a size");
  return static_cast<Index>(std::stoll(*v));
}

// Sizes of one open block as the header's open_blocks entry gives them ("n_rows,m,nnz").
struct OpenBlockSizes {
  Index n_rows = 0, m = 0, nnz = 0;
};

// The open blocks a file declares: none for version 1; for version 2, the ';'-separated
// "n_rows,m,nnz" list under open_blocks, each size within the matrix's.
std::vector<OpenBlockSizes> parse_open_blocks(const Metadata& meta, const std::string& version, Index n_states,
                                              const std::string& path) {
  const std::string* desc = find(meta, kOpenBlocksKey);
  if (version == kFormatVersion) {
    if (desc) corrupt(path, std::string("format version 1 has no '") + kOpenBlocksKey + "'");
    return {};
  }
  if (!desc || desc->empty()) corrupt(path, std::string("format version 2 needs '") + kOpenBlocksKey + "'");
  std::vector<OpenBlockSizes> out;
  std::size_t start = 0;
  while (start <= desc->size()) {
    const std::size_t stop = std::min(desc->find(';', start), desc->size());
    const std::string item = desc->substr(start, stop - start);
    Index v[3];
    std::size_t pos = 0;
    for (int i = 0; i < 3; ++i) {
      const std::size_t end = i < 2 ? item.find(',', pos) : item.size();
      const std::string num = end == std::string::npos ? std::string() : item.substr(pos, end - pos);
      if (num.empty() || num.size() > 18 || num.find_first_not_of("0123456789") != std::string::npos)
        corrupt(path, std::string("__metadata__ '") + kOpenBlocksKey + "' entry '" + item + "' is not n_rows,m,nnz");
      v[i] = static_cast<Index>(std::stoll(num));
      pos = end + 1;
    }
    if (v[0] > n_states || v[1] < 1 || v[1] > n_states || v[2] > v[0] * v[1])
      corrupt(path, std::string("__metadata__ '") + kOpenBlocksKey + "' entry '" + item +
                        "' does not fit a matrix of " + std::to_string(n_states) + " states");
    out.push_back({v[0], v[1], v[2]});
    if (out.size() > 4096) corrupt(path, std::string("__metadata__ '") + kOpenBlocksKey + "' lists too many blocks");
    start = stop + 1;
  }
  return out;
}

std::atomic<unsigned> g_tmp_counter{0};

// (directory, file name) of a path; the directory is "." for a bare name.
std::pair<std::string, std::string> split_path(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return {".", path};
  return {slash == 0 ? "/" : path.substr(0, slash), path.substr(slash + 1)};
}

// Removes the temporary files that earlier saves to `path` left behind when they were
// killed (each save writes `path`.tmp-<pid>-<n> and renames it).  A temp is removed only
// when its writer is gone: its pid names no live process here (not this one, whose other
// threads may be saving), and no process holds the lock every writer keeps on its temp
// (which covers a writer in another pid namespace).  Best effort: a temp that cannot be
// checked is left.  O(entries in the directory).
void remove_stale_temps(const std::string& path) {
  const auto [dir, name] = split_path(path);
  const std::string prefix = name + ".tmp-";
  DIR* d = ::opendir(dir.c_str());
  if (!d) return;
  const pid_t self = ::getpid();
  while (const dirent* e = ::readdir(d)) {
    const std::string entry = e->d_name;
    if (entry.size() <= prefix.size() || entry.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string rest = entry.substr(prefix.size());  // "<pid>-<n>"
    const std::size_t dash = rest.find('-');
    if (dash == 0 || dash == std::string::npos || dash > 9 || dash + 1 == rest.size() ||
        rest.find_first_not_of("0123456789-") != std::string::npos)
      continue;
    const auto pid = static_cast<pid_t>(std::stol(rest.substr(0, dash)));
    if (pid <= 0 || pid == self) continue;
    if (::kill(pid, 0) == 0 || errno != ESRCH) continue;  // alive, or not ours to signal: maybe writing
    const std::string full = dir + "/" + entry;
    Fd fd(::open(full.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK));
    if (fd.get() < 0 || ::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) continue;
    ::unlink(full.c_str());
  }
  ::closedir(d);
}

}  // namespace

std::string metadata_fingerprint(const Metadata& entries) {
  // Entries sorted by key, so a tool that rewrites the header in another key order keeps it
  // valid; each one as (key length, XXH64 of the key, value length, XXH64 of the value), so
  // a large value is hashed in place, not copied.
  std::vector<std::array<std::uint64_t, 4>> parts;
  parts.reserve(entries.size());
  for (const auto& kv : entries) {
    if (kv.first == kMetadataFingerprintKey) continue;
    parts.push_back({kv.first.size(), xxh64(kv.first.data(), kv.first.size()), kv.second.size(),
                     xxh64(kv.second.data(), kv.second.size())});
  }
  std::sort(parts.begin(), parts.end());
  return to_hex(xxh64(parts.data(), parts.size() * sizeof(parts[0])));
}

void save(const TransitionMatrix& P, const std::string& path, const Metadata& extra) {
  if (!little_endian()) throw std::runtime_error("markovmem files are little-endian; this host is not");
  const Index T = P.n_states(), nnz = P.nnz();
  // The four arrays of the stored rows, then four per open block (open.<k>.*).
  std::vector<std::string> names;
  std::vector<const char*> dtypes;
  std::vector<std::size_t> sizes;
  std::vector<const void*> ptrs;
  std::vector<Index> shapes;
  auto add = [&](std::string name, const TensorSpec& spec, const void* ptr, Index count) {
    names.push_back(std::move(name));
    dtypes.push_back(spec.dtype);
    sizes.push_back(static_cast<std::size_t>(count) * spec.itemsize);
    ptrs.push_back(ptr);
    shapes.push_back(count);
  };
  add(kTensors[0].name, kTensors[0], P.indptr(), T + 1);
  add(kTensors[1].name, kTensors[1], P.tail(), T);
  add(kTensors[2].name, kTensors[2], P.indices(), nnz);
  add(kTensors[3].name, kTensors[3], P.data(), nnz);
  std::string blocks_desc;
  for (std::size_t k = 0; k < P.open_blocks().size(); ++k) {
    const OpenBlock& b = P.open_blocks()[k];
    const std::string pre = "open." + std::to_string(k) + ".";
    add(pre + kTensors[0].name, kTensors[0], b.indptr, b.n_rows + 1);
    add(pre + "leak", kTensors[1], b.leak, b.n_rows);
    add(pre + kTensors[2].name, kTensors[2], b.indices, b.nnz());
    add(pre + kTensors[3].name, kTensors[3], b.data, b.nnz());
    blocks_desc +=
        (k ? ";" : "") + std::to_string(b.n_rows) + "," + std::to_string(b.m) + "," + std::to_string(b.nnz());
  }

  // A closed matrix keeps version 1 (readable by every markovmem); open blocks need version 2,
  // so that a reader that does not know them refuses the file instead of dropping them.
  Metadata meta = {
      {"format", kFormatName},         {"format_version", blocks_desc.empty() ? kFormatVersion : kFormatVersionOpen},
      {"n_states", std::to_string(T)}, {"n_base", std::to_string(P.n_base())},
      {"nnz", std::to_string(nnz)},    {"fingerprint", P.fingerprint()}};
  if (!blocks_desc.empty()) meta.emplace_back(kOpenBlocksKey, blocks_desc);
  const std::size_t n_ours = meta.size();
  if (extra.size() > kMaxUserMetadata)
    throw std::invalid_argument("metadata has " + std::to_string(extra.size()) + " entries; a file holds at most " +
                                std::to_string(kMaxUserMetadata));
  for (const auto& kv : extra) {
    if (!valid_utf8(kv.first) || !valid_utf8(kv.second))
      throw std::invalid_argument(printable("metadata key '" + kv.first + "' or its value is not valid UTF-8"));
    for (std::size_t i = 0; i < n_ours; ++i)
      if (kv.first == meta[i].first) throw std::invalid_argument("metadata key '" + kv.first + "' is reserved");
    if (kv.first == kOpenBlocksKey) throw std::invalid_argument("metadata key '" + kv.first + "' is reserved");
    if (kv.first.rfind("markovmem.", 0) == 0)
      throw std::invalid_argument("metadata key '" + kv.first +
                                  "' is reserved (keys starting with 'markovmem.' are the library's)");
    meta.push_back(kv);
  }
  meta.emplace_back(kMetadataFingerprintKey, metadata_fingerprint(meta));
  std::ostringstream h;
  h << "{\"__metadata__\":{";
  for (std::size_t i = 0; i < meta.size(); ++i)
    h << (i ? ",\"" : "\"") << json_escape(meta[i].first) << "\":\"" << json_escape(meta[i].second) << "\"";
  h << "}";
  std::size_t offset = 0;
  for (std::size_t i = 0; i < names.size(); ++i) {
    h << ",\"" << names[i] << "\":{\"dtype\":\"" << dtypes[i] << "\",\"shape\":[" << shapes[i] << "],\"data_offsets\":["
      << offset << "," << offset + sizes[i] << "]}";
    offset += sizes[i];
  }
  h << "}";
  std::string header = h.str();
  // Pad so the data section starts 8-byte aligned (as safetensors does): mapped arrays stay aligned.
  while ((header.size() + 8) % 8 != 0) header += ' ';
  unsigned char len_bytes[8];
  std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>((n >> (8 * i)) & 0xFF);

  remove_stale_temps(path);
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(g_tmp_counter++);
  Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (fd.get() < 0) os_fail(path, "cannot create a temporary file next to the target");
  // Held until the temp is closed, so remove_stale_temps leaves it alone (advisory; a
  // filesystem without flock only loses that protection).
  (void)::flock(fd.get(), LOCK_EX | LOCK_NB);
  try {
    write_all(fd.get(), len_bytes, 8, path);
    write_all(fd.get(), header.data(), header.size(), path);
    for (std::size_t i = 0; i < names.size(); ++i) write_all(fd.get(), ptrs[i], sizes[i], path);
    if (::fsync(fd.get()) != 0) os_fail(path, "cannot flush");
    if (::close(fd.release()) != 0) os_fail(path, "cannot close");
    if (::rename(tmp.c_str(), path.c_str()) != 0) os_fail(path, "cannot replace");
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable (best effort: some filesystems refuse fsync on directories).
  const std::string dir = split_path(path).first;
  Fd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dfd.get() >= 0) ::fsync(dfd.get());
}

Metadata read_metadata(const std::string& path) {
  std::size_t size = 0;
  Fd fd(open_regular(path, &size));
  std::uint64_t n_header = 0;
  const Json header = parse_header(fd.get(), size, path, &n_header);
  return parse_metadata(header, path);
}

Loaded load(const std::string& path, bool use_mmap, bool verify, int n_threads) {
  if (!little_endian()) throw std::runtime_error("markovmem files are little-endian; this host is not");
  std::size_t size = 0;
  Fd fd(open_regular(path, &size));
  std::uint64_t n_header = 0;
  const Json header = parse_header(fd.get(), size, path, &n_header);
  Metadata meta = parse_metadata(header, path);
  const std::string* format = find(meta, "format");
  if (!format || *format != kFormatName)
    corrupt(path, "__metadata__ 'format' is '" + (format ? *format : std::string("<missing>")) + "'; expected '" +
                      kFormatName + "'");
  const std::string* version = find(meta, "format_version");
  if (!version || (*version != kFormatVersion && *version != kFormatVersionOpen))
    corrupt(path, "format version '" + (version ? *version : std::string("<missing>")) +
                      "' is not supported (this markovmem reads versions " + kFormatVersion + " and " +
                      kFormatVersionOpen + ")");
  const Index T = parse_size(meta, "n_states", path);
  const Index n_base = parse_size(meta, "n_base", path);
  const Index nnz = parse_size(meta, "nnz", path);
  try {
    check_sizes(T, n_base);
  } catch (const std::invalid_argument& e) {
    corrupt(path, e.what());
  }
  const std::size_t data_start = 8 + static_cast<std::size_t>(n_header);
  const std::size_t data_len = size - data_start;
  // File offset of a tensor after checking its dtype, shape (`expected` entries) and bytes.
  auto tensor_begin = [&](const std::string& name, const TensorSpec& spec, Index expected) {
    const Json* t = header.get(name);
    if (!t || t->kind != Json::kObject) corrupt(path, "tensor '" + name + "' is missing");
    const Json* dtype = t->get("dtype");
    if (!dtype || dtype->kind != Json::kString || dtype->str != spec.dtype)
      corrupt(path, "tensor '" + name + "' must have dtype " + spec.dtype);
    const Json* shape = t->get("shape");
    if (!shape || shape->kind != Json::kArray || shape->array.size() != 1 || shape->array[0].kind != Json::kInteger ||
        shape->array[0].integer != static_cast<std::uint64_t>(expected))
      corrupt(path, "tensor '" + name + "' must have shape [" + std::to_string(expected) + "]");
    const Json* offs = t->get("data_offsets");
    if (!offs || offs->kind != Json::kArray || offs->array.size() != 2 || offs->array[0].kind != Json::kInteger ||
        offs->array[1].kind != Json::kInteger)
      corrupt(path, "tensor '" + name + "' has no valid data_offsets");
    const std::uint64_t a = offs->array[0].integer, b = offs->array[1].integer;
    if (a > b || b > data_len || b - a != static_cast<std::uint64_t>(expected) * spec.itemsize)
      corrupt(path, "tensor '" + name + "' data_offsets [" + std::to_string(a) + ", " + std::to_string(b) +
                        "] do not fit its shape within the " + std::to_string(data_len) + " data bytes (truncated?)");
    if ((data_start + a) % spec.itemsize != 0)
      corrupt(path, "tensor '" + name + "' is not aligned to " + std::to_string(spec.itemsize) + " bytes");
    return data_start + static_cast<std::size_t>(a);
  };
  const Index expected[4] = {T + 1, T, nnz, nnz};
  std::size_t begin[4];
  for (int i = 0; i < 4; ++i) begin[i] = tensor_begin(kTensors[i].name, kTensors[i], expected[i]);
  const std::vector<OpenBlockSizes> block_sizes = parse_open_blocks(meta, *version, T, path);

  auto bytes = std::make_shared<FileBytes>();
  bytes->size = size;
  if (use_mmap && size > 0) {
    void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
    if (map == MAP_FAILED) os_fail(path, "cannot map");
    bytes->map = map;
    bytes->map_size = size;
    bytes->bytes = static_cast<const unsigned char*>(map);
  } else {
    bytes->buffer.resize((size + 7) / 8);
    read_exact(fd.get(), bytes->buffer.data(), size, 0, path);
    bytes->bytes = reinterpret_cast<const unsigned char*>(bytes->buffer.data());
  }
  const unsigned char* base = bytes->bytes;
  const Index* indptr = reinterpret_cast<const Index*>(base + begin[0]);
  const StateIndex* indices = reinterpret_cast<const StateIndex*>(base + begin[2]);
  if (bytes->map) {
    // Every address a call computes comes from indptr and indices.  A mapping shows
    // whatever another process later writes into the file, so they are read into owned
    // memory and checked there: a file rewritten in place can then change the values
    // read through the mapping (data, tail) but never make a call leave the arrays.
    // pread, not a copy out of the mapping: a file truncated meanwhile gives an error, not
    // SIGBUS.  Cost at T = 131k, nnz = 33.5M (a 2-core machine shared with other builds):
    // the same 129 MB resident, but private instead of shared with the page cache, and a
    // mapped load of 95-180 ms instead of 57-79 ms (the copy); prob() is unchanged.
    bytes->indptr = detail::Buffer<Index>::uninitialized(static_cast<std::size_t>(T + 1));
    bytes->indices = detail::Buffer<StateIndex>::uninitialized(static_cast<std::size_t>(nnz));
    read_exact(fd.get(), bytes->indptr.data(), static_cast<std::size_t>(T + 1) * sizeof(Index), begin[0], path);
    read_exact(fd.get(), bytes->indices.data(), static_cast<std::size_t>(nnz) * sizeof(StateIndex), begin[2], path);
    indptr = bytes->indptr.data();
    indices = bytes->indices.data();
  }
  try {
    TransitionMatrix m =
        TransitionMatrix::from_buffers(T, n_base, nnz, indptr, indices, reinterpret_cast<const Prob*>(base + begin[3]),
                                       reinterpret_cast<const double*>(base + begin[1]), bytes, verify, n_threads);
    if (!block_sizes.empty()) {
      // Open blocks are small (one row per old state, the leak's entries): read into owned
      // memory whether mapped or not, and always checked in full, values included.
      std::vector<OpenBlock> blocks;
      for (std::size_t k = 0; k < block_sizes.size(); ++k) {
        const OpenBlockSizes& z = block_sizes[k];
        const std::string pre = "open." + std::to_string(k) + ".";
        // Offsets first: they prove the sizes fit in the file before anything is allocated.
        const std::size_t at[4] = {tensor_begin(pre + kTensors[0].name, kTensors[0], z.n_rows + 1),
                                   tensor_begin(pre + "leak", kTensors[1], z.n_rows),
                                   tensor_begin(pre + kTensors[2].name, kTensors[2], z.nnz),
                                   tensor_begin(pre + kTensors[3].name, kTensors[3], z.nnz)};
        std::vector<Index> b_indptr(static_cast<std::size_t>(z.n_rows + 1));
        std::vector<double> b_leak(static_cast<std::size_t>(z.n_rows));
        std::vector<StateIndex> b_indices(static_cast<std::size_t>(z.nnz));
        std::vector<Prob> b_data(static_cast<std::size_t>(z.nnz));
        read_exact(fd.get(), b_indptr.data(), b_indptr.size() * sizeof(Index), at[0], path);
        read_exact(fd.get(), b_leak.data(), b_leak.size() * sizeof(double), at[1], path);
        read_exact(fd.get(), b_indices.data(), b_indices.size() * sizeof(StateIndex), at[2], path);
        read_exact(fd.get(), b_data.data(), b_data.size() * sizeof(Prob), at[3], path);
        blocks.push_back(OpenBlock::build(z.n_rows, z.m, std::move(b_indptr), std::move(b_indices), std::move(b_data),
                                          b_leak.data(), kRowSumTolerance, "open block " + std::to_string(k)));
      }
      try {
        m = m.with_open_blocks(std::move(blocks));
      } catch (const InvariantViolation&) {
        throw;
      } catch (const std::invalid_argument& e) {
        corrupt(path, e.what());
      }
    }
    bool metadata_verified = false;
    if (verify) {
      const std::string* stored = find(meta, "fingerprint");
      const std::string actual = m.fingerprint();
      if (!stored || *stored != actual)
        corrupt(path, "fingerprint " + actual + " does not match the stored " +
                          (stored ? *stored : std::string("<missing>")) + " (the file was modified or corrupted)");
      if (const std::string* stored_meta = find(meta, kMetadataFingerprintKey)) {
        const std::string actual_meta = metadata_fingerprint(meta);
        if (*stored_meta != actual_meta)
          corrupt(path, "metadata fingerprint " + actual_meta + " does not match the stored " + *stored_meta +
                            " (the header's metadata was modified or corrupted)");
        metadata_verified = true;
      }
    }
    return Loaded{std::move(m), std::move(meta), metadata_verified};
  } catch (const InvariantViolation& e) {
    throw InvariantViolation(e.row(), printable("file '" + path + "': " + e.what()));
  }
}

}  // namespace markovmem
