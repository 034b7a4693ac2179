// Safetensors reader: round trips, crafted bad files (each with its own message), truncation at
// every byte, sharded checkpoints, the memory mapping underneath, and ModelWeights keeping
// tensors in that mapping.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "loom/core/error.hpp"
#include "loom/core/mapped_file.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/core/safetensors_writer.hpp"

namespace fs = std::filesystem;
using loom::SafetensorsDtype;
using loom::SafetensorsFile;
using loom::SafetensorsIndex;

namespace {

using Bytes = std::vector<std::byte>;

// A directory under the system temp dir, removed with everything in it at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("loom-safetensors-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  TempDir(const TempDir &) = delete;
  TempDir &operator=(const TempDir &) = delete;
};

void write_file(const fs::path &p, const Bytes &b) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char *>(b.data()), static_cast<std::streamsize>(b.size()));
  REQUIRE(out.good());
}
void write_text(const fs::path &p, const std::string &s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
  REQUIRE(out.good());
}

void append_le64(Bytes &b, uint64_t v) {
  for (int i = 0; i < 8; ++i) b.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xff));
}

// One tensor for the builder: its bytes are given raw.
struct TensorSpec {
  std::string name; // JSON-escaped already when it needs escaping
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
};

// The bytes of a file: the length field (real length unless overridden), the header text, then
// the data buffer.
Bytes with_header(const std::string &header, const std::vector<uint8_t> &data,
                  std::optional<uint64_t> length_override = std::nullopt) {
  Bytes b;
  append_le64(b, length_override ? *length_override : header.size());
  for (char c : header) b.push_back(static_cast<std::byte>(c));
  for (uint8_t c : data) b.push_back(static_cast<std::byte>(c));
  return b;
}

// The header the reference writer would produce for `tensors` laid out contiguously in the
// given order, padded with spaces to a multiple of 8 bytes.
std::string header_for(const std::vector<TensorSpec> &tensors, const std::map<std::string, std::string> &meta) {
  std::string h = "{";
  bool first = true;
  if (!meta.empty()) {
    h += "\"__metadata__\":{";
    bool mfirst = true;
    for (const auto &[k, v] : meta) {
      if (!mfirst) h += ",";
      mfirst = false;
      h += "\"" + k + "\":\"" + v + "\"";
    }
    h += "}";
    first = false;
  }
  uint64_t offset = 0;
  for (const auto &t : tensors) {
    if (!first) h += ",";
    first = false;
    h += "\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":[";
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (i) h += ',';
      h += std::to_string(t.shape[i]);
    }
    h += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + t.data.size()) + "]}";
    offset += t.data.size();
  }
  h += "}";
  while (h.size() % 8 != 0) h += ' ';
  return h;
}

Bytes build(const std::vector<TensorSpec> &tensors, const std::map<std::string, std::string> &meta = {}) {
  std::vector<uint8_t> data;
  for (const auto &t : tensors) data.insert(data.end(), t.data.begin(), t.data.end());
  return with_header(header_for(tensors, meta), data);
}

template <class T> std::vector<uint8_t> raw_bytes(const std::vector<T> &v) {
  std::vector<uint8_t> out(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(out.data(), v.data(), out.size());
  return out;
}

std::vector<uint8_t> zeros(size_t n) { return std::vector<uint8_t>(n, 0); }

// The message of the loom::Error that parsing `bytes` throws, or "" when it parses. Checks the
// in-memory and the file path agree, the category, and that the message is one line naming the
// file.
std::string error_of(const Bytes &bytes) {
  TempDir dir;
  const fs::path file = dir.path / "bad.safetensors";
  write_file(file, bytes);
  std::string from_file, from_memory;
  try {
    SafetensorsFile::open(file);
  } catch (const loom::Error &e) {
    CHECK(e.category() == loom::ErrorCategory::runtime);
    from_file = e.what();
  }
  try {
    SafetensorsFile::parse(std::span<const std::byte>(bytes), file);
  } catch (const loom::Error &e) {
    from_memory = e.what();
  }
  CHECK(from_file == from_memory);
  if (from_file.empty()) return "";
  const std::string prefix = file.string() + ": ";
  CHECK(from_file.rfind(prefix, 0) == 0);
  CHECK(from_file.find('\n') == std::string::npos);
  return from_file.substr(prefix.size());
}

std::string index_error(const fs::path &dir) {
  try {
    SafetensorsIndex::open(dir);
  } catch (const loom::Error &e) {
    CHECK(e.category() == loom::ErrorCategory::runtime);
    CHECK(std::string(e.what()).find('\n') == std::string::npos);
    return e.what();
  }
  return "";
}

// An entry of a crafted header.
std::string entry(const std::string &dtype, const std::string &shape, const std::string &offsets) {
  return "{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

} // namespace

TEST_CASE("dtype names and sizes", "[safetensors]") {
  struct Row {
    SafetensorsDtype d;
    const char *name;
    size_t size;
  };
  const Row rows[] = {
      {SafetensorsDtype::F64, "F64", 8},   {SafetensorsDtype::F32, "F32", 4},
      {SafetensorsDtype::F16, "F16", 2},   {SafetensorsDtype::BF16, "BF16", 2},
      {SafetensorsDtype::F8_E4M3, "F8_E4M3", 1}, {SafetensorsDtype::F8_E5M2, "F8_E5M2", 1},
      {SafetensorsDtype::I64, "I64", 8},   {SafetensorsDtype::I32, "I32", 4},
      {SafetensorsDtype::I16, "I16", 2},   {SafetensorsDtype::I8, "I8", 1},
      {SafetensorsDtype::U64, "U64", 8},   {SafetensorsDtype::U32, "U32", 4},
      {SafetensorsDtype::U16, "U16", 2},   {SafetensorsDtype::U8, "U8", 1},
      {SafetensorsDtype::BOOL, "BOOL", 1},
  };
  for (const auto &r : rows) {
    CHECK(std::string(loom::dtype_name(r.d)) == r.name);
    CHECK(loom::dtype_size(r.d) == r.size);
    CHECK(loom::parse_dtype(r.name) == r.d);
  }
  CHECK_FALSE(loom::parse_dtype("f32").has_value());
  CHECK_FALSE(loom::parse_dtype("F128").has_value());
  CHECK_FALSE(loom::parse_dtype("").has_value());
}

TEST_CASE("a valid multi-tensor file round-trips bit-exact", "[safetensors]") {
  const std::vector<float> f32{1.5f, -0.0f, 3.25e-20f, 1e30f, -7.0f, 0.1f};
  std::vector<float> nan_inf{std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()};
  const std::vector<uint16_t> f16{0x3c00, 0xc000, 0x7bff, 0x0001, 0x8000, 0x7e00}; // 1, -2, max, denorm, -0, nan
  const std::vector<uint16_t> bf16{0x3f80, 0xbfc0, 0x7f80, 0x0001};                 // 1, -1.5, inf, denorm
  const std::vector<int64_t> i64{-1, INT64_MIN, INT64_MAX};
  const std::vector<uint8_t> boolean{1, 0, 1};
  const std::vector<uint8_t> f8{0x38, 0xff};
  // Offsets in file order: z first, so that sorting by offset differs from name order.
  std::vector<TensorSpec> specs{
      {"z.weight", "F32", {2, 3}, raw_bytes(f32)},
      {"a.half", "F16", {6}, raw_bytes(f16)},
      {"empty", "F32", {0, 4}, {}},
      {"m.bf16", "BF16", {2, 2}, raw_bytes(bf16)},
      {"special", "F32", {2}, raw_bytes(nan_inf)},
      {"i", "I64", {3}, raw_bytes(i64)},
      {"flags", "BOOL", {3}, boolean},
      {"scalar", "U8", {}, {42}},
      {"fp8", "F8_E4M3", {1, 2}, f8},
      {"caf\\u00e9", "I8", {1}, {0x80}},
  };
  const Bytes bytes = build(specs, {{"format", "pt"}, {"note", "a \\\"quoted\\\" value"}});

  TempDir dir;
  const fs::path file = dir.path / "model.safetensors";
  write_file(file, bytes);
  const SafetensorsFile st = SafetensorsFile::open(file);
  CHECK(st.path() == file);
  REQUIRE(st.tensors().size() == specs.size());
  CHECK(st.metadata() == std::map<std::string, std::string>{{"format", "pt"}, {"note", "a \"quoted\" value"}});
  CHECK(st.header_size() % 8 == 0);
  CHECK(st.data_buffer().size() == bytes.size() - 8 - st.header_size());

  // Sorted by offset; zero-sized "empty" sits at the offset where "m.bf16" begins, before it.
  std::vector<std::string> order;
  for (const auto &t : st.tensors()) order.push_back(t.name);
  CHECK(order == std::vector<std::string>{"z.weight", "a.half", "empty", "m.bf16", "special", "i", "flags",
                                          "scalar", "fp8", "caf\xc3\xa9"});
  for (size_t i = 1; i < st.tensors().size(); ++i) CHECK(st.tensors()[i - 1].end == st.tensors()[i].begin);

  auto check_bits = [&](const char *name, const std::vector<uint8_t> &expected) {
    const auto *t = st.find(name);
    REQUIRE(t != nullptr);
    REQUIRE(t->nbytes == expected.size());
    CHECK(t->end - t->begin == t->nbytes);
    CHECK(t->data == st.data_buffer().data() + t->begin);
    CHECK(std::memcmp(t->data, expected.data(), expected.size()) == 0);
  };
  check_bits("z.weight", raw_bytes(f32));
  check_bits("a.half", raw_bytes(f16));
  check_bits("m.bf16", raw_bytes(bf16));
  check_bits("special", raw_bytes(nan_inf));
  check_bits("i", raw_bytes(i64));
  check_bits("flags", boolean);
  check_bits("fp8", f8);

  const auto *w = st.find("z.weight");
  CHECK(w->dtype == SafetensorsDtype::F32);
  CHECK(w->shape == std::vector<int64_t>{2, 3});
  CHECK(w->numel == 6);
  std::vector<float> back(6);
  std::memcpy(back.data(), w->data, 24); // data is unaligned in general: copy, never cast
  for (size_t i = 0; i < 6; ++i) CHECK(std::memcmp(&back[i], &f32[i], 4) == 0);

  const auto *h = st.find("a.half");
  CHECK(h->dtype == SafetensorsDtype::F16);
  CHECK(h->numel == 6);
  const auto *b = st.find("m.bf16");
  CHECK(b->dtype == SafetensorsDtype::BF16);
  CHECK(b->shape == std::vector<int64_t>{2, 2});
  const auto *e = st.find("empty");
  CHECK(e->numel == 0);
  CHECK(e->nbytes == 0);
  const auto *s = st.find("scalar");
  CHECK(s->shape.empty());
  CHECK(s->numel == 1);
  CHECK(std::to_integer<int>(*s->data) == 42);
  CHECK(st.find("caf\xc3\xa9") != nullptr);
  CHECK(st.find("missing") == nullptr);
  CHECK(st.find("") == nullptr);

  // The in-memory path gives the same result, and copies share the mapping.
  const auto mem = SafetensorsFile::parse(std::span<const std::byte>(bytes), "mem");
  CHECK(mem.tensors().size() == st.tensors().size());
  CHECK(std::memcmp(mem.find("m.bf16")->data, raw_bytes(bf16).data(), 8) == 0);
  SafetensorsFile copy = st;
  { SafetensorsFile moved = std::move(copy); CHECK(std::memcmp(moved.find("i")->data, raw_bytes(i64).data(), 24) == 0); }
}

TEST_CASE("odd header lengths leave data unaligned but readable", "[safetensors]") {
  const std::vector<float> v{1.0f, 2.0f, 3.0f};
  std::string h = "{\"x\":" + entry("F32", "[3]", "[0,12]") + "}"; // not padded: odd length
  if (h.size() % 2 == 0) h += ' ';
  const Bytes bytes = with_header(h, raw_bytes(v));
  const auto st = SafetensorsFile::parse(std::span<const std::byte>(bytes), "odd");
  const auto *x = st.find("x");
  REQUIRE(x != nullptr);
  CHECK(reinterpret_cast<uintptr_t>(x->data) % 2 == 1);
  float f[3];
  std::memcpy(f, x->data, sizeof f);
  CHECK(f[2] == 3.0f);
}

TEST_CASE("an empty header object with no data is a valid file", "[safetensors]") {
  const auto st0 = SafetensorsFile::parse(std::span<const std::byte>(with_header("{}", {})), "e");
  CHECK(st0.tensors().empty());
  CHECK(st0.metadata().empty());
  CHECK(error_of(with_header("{\"__metadata__\":{}}      ", {})) == "");
}

TEST_CASE("crafted bad files each give their own message", "[safetensors]") {
  const std::string ok = entry("F32", "[2]", "[0,8]");
  struct Case {
    const char *what;
    Bytes bytes;
    std::string message; // the whole message after "path: ", or a prefix ending in "..."
  };
  auto raw = [](const std::string &h, size_t data = 0) { return with_header(h, zeros(data)); };
  const std::vector<Case> cases{
      {"empty file", {}, "file is 0 bytes, shorter than the 8-byte header length"},
      {"5-byte file", Bytes(5, std::byte{1}), "file is 5 bytes, shorter than the 8-byte header length"},
      {"header length 0", with_header("{}", {}, 0), "header length is 0"},
      {"header length past EOF", with_header("{}", {}, 100),
       "header length 100 runs past the end of the file (2 bytes follow the length)"},
      {"header length one past EOF", with_header("{}", {}, 3),
       "header length 3 runs past the end of the file (2 bytes follow the length)"},
      {"header length 2^64-1", with_header("{}", {}, UINT64_MAX),
       "header length 18446744073709551615 exceeds the cap of 100 MiB (104857600 bytes)"},
      {"header length cap + 1", with_header("{}", {}, 104857601),
       "header length 104857601 exceeds the cap of 100 MiB (104857600 bytes)"},
      {"NUL byte after the JSON", raw(std::string("{}\0 {\"x\":1}", 11)), "header contains a NUL byte at offset 2"},
      {"invalid UTF-8 byte", raw("{\"a\xff\":1}"), "header is not valid UTF-8 (bad byte at offset 3)"},
      {"overlong UTF-8 '/'", raw("{\"\xc0\xaf\":1}"), "header is not valid UTF-8 (bad byte at offset 2)"},
      {"UTF-8 surrogate", raw("{\"\xed\xa0\x80\":1}"), "header is not valid UTF-8 (bad byte at offset 2)"},
      {"truncated UTF-8 at the end", raw("{}\xe2\x82"), "header is not valid UTF-8 (bad byte at offset 2)"},
      {"invalid JSON", raw("{\"a\": }"), "header is not valid JSON: ..."},
      {"JSON with trailing garbage", raw("{} x"),
       "header is not valid JSON: parse error at line 1, column 4: syntax error while parsing value - invalid "
       "literal; last read: '{} x'; expected end of input"},
      {"control character in a string", raw("{\"a\":\"\x01\"}"),
       "header is not valid JSON: parse error at line 1, column 7: syntax error while parsing value - invalid "
       "string: control character U+0001 (SOH) must be escaped to \\u0001; last read: '\"<U+0001>'"},
      {"JSON comment", raw("{} // c"), "header is not valid JSON: ..."},
      {"top level array", raw("[1, 2]"), "header is not a JSON object (it is array)"},
      {"top level string", raw("\"x\""), "header is not a JSON object (it is string)"},
      {"10000 '[' in a value", raw("{\"a\": " + std::string(10000, '[')),
       "header is nested deeper than 3 levels (at offset 8)"},
      {"depth 4 inside shape", raw("{\"w\":" + entry("F32", "[[2]]", "[0,8]") + "}", 8),
       "header is nested deeper than 3 levels (at offset 29)"},
      {"brackets inside strings do not count", raw("{\"[[[[{{{\":" + entry("F32", "[2]", "[0,8]") + "}", 8), ""},
      {"__metadata__ not an object", raw("{\"__metadata__\":[\"a\"]}"), "__metadata__ is not an object (it is array)"},
      {"__metadata__ value not a string", raw("{\"__metadata__\":{\"k\":1}}"),
       "__metadata__: value of 'k' is not a string (it is number)"},
      {"entry not an object", raw("{\"w\":5}"), "tensor 'w': entry is not an object (it is number)"},
      {"missing shape", raw("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8), "tensor 'w': missing \"shape\""},
      {"missing dtype", raw("{\"w\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8), "tensor 'w': missing \"dtype\""},
      {"missing data_offsets", raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8),
       "tensor 'w': missing \"data_offsets\""},
      {"extra key", raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"extra\":1}}", 8),
       "tensor 'w': unknown key 'extra' (expected dtype, shape, data_offsets)"},
      {"unknown dtype", raw("{\"w\":" + entry("F128", "[2]", "[0,8]") + "}", 8), "tensor 'w': unknown dtype 'F128'"},
      {"lower-case dtype", raw("{\"w\":" + entry("f32", "[2]", "[0,8]") + "}", 8), "tensor 'w': unknown dtype 'f32'"},
      {"dtype not a string", raw("{\"w\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}", 8),
       "tensor 'w': dtype is not a string (it is number)"},
      {"shape not an array", raw("{\"w\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", 8),
       "tensor 'w': shape is not an array (it is number)"},
      {"9 dims", raw("{\"w\":" + entry("F32", "[1,1,1,1,1,1,1,1,2]", "[0,8]") + "}", 8),
       "tensor 'w': shape has 9 dims, more than 8"},
      {"negative dim", raw("{\"w\":" + entry("F32", "[-1]", "[0,8]") + "}", 8), "tensor 'w': shape[0] is negative (-1)"},
      {"float dim", raw("{\"w\":" + entry("F32", "[2.0]", "[0,8]") + "}", 8),
       "tensor 'w': shape[0] is not an integer (2.0)"},
      {"bool dim", raw("{\"w\":" + entry("F32", "[true]", "[0,8]") + "}", 8),
       "tensor 'w': shape[0] is not an integer (it is boolean)"},
      {"shape product overflow [2^32, 2^32, 16]",
       raw("{\"w\":" + entry("F32", "[4294967296,4294967296,16]", "[0,8]") + "}", 8),
       "tensor 'w': shape [4294967296, 4294967296, 16] has an element count that overflows 64 bits"},
      {"shape product overflow hidden by a later 0",
       raw("{\"w\":" + entry("F32", "[4294967296,4294967296,16,0]", "[0,0]") + "}"),
       "tensor 'w': shape [4294967296, 4294967296, 16, 0] has an element count that overflows 64 bits"},
      {"byte size overflow [2^62] of F32", raw("{\"w\":" + entry("F32", "[4611686018427387904]", "[0,8]") + "}", 8),
       "tensor 'w': shape [4611686018427387904] of F32 has a byte size that overflows 64 bits"},
      {"data_offsets with 3 values", raw("{\"w\":" + entry("F32", "[2]", "[0,8,8]") + "}", 8),
       "tensor 'w': data_offsets has 3 elements, not 2"},
      {"data_offsets not an array", raw("{\"w\":" + entry("F32", "[2]", "8") + "}", 8),
       "tensor 'w': data_offsets is not an array (it is number)"},
      {"negative offset", raw("{\"w\":" + entry("F32", "[2]", "[-8,0]") + "}", 8),
       "tensor 'w': data_offsets[0] is negative (-8)"},
      {"float offset", raw("{\"w\":" + entry("F32", "[2]", "[0,8.0]") + "}", 8),
       "tensor 'w': data_offsets[1] is not an integer (8.0)"},
      {"exponent offset", raw("{\"w\":" + entry("F32", "[2]", "[0,8e0]") + "}", 8),
       "tensor 'w': data_offsets[1] is not an integer (8.0)"},
      {"string offset", raw("{\"w\":" + entry("F32", "[2]", "[\"0\",8]") + "}", 8),
       "tensor 'w': data_offsets[0] is not an integer (it is string)"},
      {"offset 2^63", raw("{\"w\":" + entry("F32", "[2]", "[0,9223372036854775808]") + "}", 8),
       "tensor 'w': data_offsets[1] is 9223372036854775808, above 2^63-1"},
      {"offset 2^64 (parsed as a float)", raw("{\"w\":" + entry("F32", "[2]", "[0,18446744073709551616]") + "}", 8),
       "tensor 'w': data_offsets[1] is not an integer (1.8446744073709552e+19)"},
      {"begin after end", raw("{\"w\":" + entry("F32", "[2]", "[8,0]") + "}", 8),
       "tensor 'w': data_offsets [8, 0) begin after they end"},
      {"end past the data", raw("{\"w\":" + entry("F32", "[4]", "[0,16]") + "}", 8),
       "tensor 'w': data_offsets [0, 16) run past the end of the 8-byte data buffer"},
      {"mismatched byte count", raw("{\"w\":" + entry("F32", "[3]", "[0,8]") + "}", 8),
       "tensor 'w': data_offsets [0, 8) hold 8 bytes but shape [3] of F32 needs 12"},
      {"overlapping ranges", raw("{\"a\":" + ok + ",\"b\":" + entry("F32", "[2]", "[4,12]") + "}", 12),
       "tensor 'b': bytes [4, 12) overlap tensor 'a' at [0, 8)"},
      {"same range twice", raw("{\"a\":" + ok + ",\"b\":" + ok + "}", 8),
       "tensor 'b': bytes [0, 8) overlap tensor 'a' at [0, 8)"},
      {"zero-sized tensor inside another", raw("{\"a\":" + ok + ",\"b\":" + entry("F32", "[0]", "[4,4]") + "}", 8),
       "tensor 'b': bytes [4, 4) overlap tensor 'a' at [0, 8)"},
      {"gap between tensors", raw("{\"a\":" + ok + ",\"b\":" + entry("F32", "[2]", "[12,20]") + "}", 20),
       "tensor 'b': bytes [12, 20) leave a gap of 4 bytes after tensor 'a' at [0, 8) (tensors must cover the data "
       "buffer contiguously)"},
      {"gap at the start", raw("{\"a\":" + entry("F32", "[2]", "[4,12]") + "}", 12),
       "tensor 'a': bytes [4, 12) leave a gap of 4 bytes at the start of the data buffer (tensors must cover the "
       "data buffer contiguously)"},
      {"trailing bytes", raw("{\"a\":" + ok + "}", 12),
       "data buffer has 4 trailing bytes after the last tensor 'a' (tensors must cover the data buffer exactly)"},
      {"data but no tensors", raw("{}", 3),
       "data buffer has 3 trailing bytes after the header (no tensors) (tensors must cover the data buffer exactly)"},
      {"duplicate tensor name", raw("{\"w\":" + ok + ",\"w\":" + entry("F32", "[2]", "[8,16]") + "}", 16),
       "duplicate tensor name 'w'"},
      {"duplicate key inside an entry", raw("{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8),
       "tensor 'w': duplicate key 'dtype'"},
      {"duplicate metadata key", raw("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}"), "__metadata__: duplicate key 'k'"},
      {"duplicate __metadata__", raw("{\"__metadata__\":{},\"__metadata__\":{}}"), "duplicate key '__metadata__'"},
      {"escaped duplicate name", raw("{\"w\":" + ok + ",\"\\u0077\":" + entry("F32", "[2]", "[8,16]") + "}", 16),
       "duplicate tensor name 'w'"},
      {"empty tensor name", raw("{\"\":" + ok + "}", 8), "a tensor has an empty name"},
      {"a long name is cut at a UTF-8 boundary",
       raw("{\"" + std::string(199, 'n') + "\xc3\xa9\":" + entry("X", "[2]", "[0,8]") + "}", 8),
       "tensor '" + std::string(199, 'n') + "...': unknown dtype 'X'"},
      {"control characters in a name stay escaped", raw("{\"a\\nb'\":" + entry("X", "[2]", "[0,8]") + "}", 8),
       "tensor 'a\\x0ab\\x27': unknown dtype 'X'"},
  };
  for (const auto &c : cases) {
    INFO(c.what);
    const std::string got = error_of(c.bytes);
    if (c.message.size() > 3 && c.message.ends_with("...")) {
      const std::string prefix = c.message.substr(0, c.message.size() - 3);
      CHECK(got.rfind(prefix, 0) == 0);
      CHECK(got.size() > prefix.size());
    } else {
      CHECK(got == c.message);
    }
  }
  CHECK(cases.size() >= 60);
}

TEST_CASE("every truncation of a valid file is an error, never a crash", "[safetensors]") {
  const std::vector<float> f32{1, 2, 3, 4};
  const Bytes full = build({{"a", "F32", {2, 2}, raw_bytes(f32)},
                            {"b", "BF16", {1}, {0x80, 0x3f}},
                            {"c", "U8", {3}, {1, 2, 3}}},
                           {{"format", "pt"}});
  REQUIRE(error_of(full) == "");
  const uint64_t header_end = 8 + SafetensorsFile::parse(std::span<const std::byte>(full), "f").header_size();
  TempDir dir;
  const fs::path file = dir.path / "t.safetensors";
  size_t thrown = 0;
  for (size_t len = 0; len < full.size(); ++len) {
    INFO("truncated to " << len << " of " << full.size() << " bytes");
    const Bytes cut(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(len));
    CHECK_THROWS_AS(SafetensorsFile::parse(std::span<const std::byte>(cut), file), loom::Error);
    if (len <= header_end) { // and through the file path, for every byte position of the header
      write_file(file, cut);
      try {
        SafetensorsFile::open(file);
      } catch (const loom::Error &e) {
        ++thrown;
        const std::string m = e.what();
        CHECK(m.rfind(file.string() + ": ", 0) == 0);
        if (len < 8) CHECK(m.find("shorter than the 8-byte header length") != std::string::npos);
        else if (len < header_end) CHECK(m.find("runs past the end of the file") != std::string::npos);
        else CHECK(m.find("run past the end of the") != std::string::npos); // header whole, data gone
      }
    }
  }
  CHECK(thrown == header_end + 1);
}

TEST_CASE("single-byte corruptions of a valid header parse or throw loom::Error", "[safetensors]") {
  const Bytes full = build({{"a", "F32", {2}, zeros(8)}, {"b", "I16", {2, 1}, zeros(4)}}, {{"k", "v"}});
  const uint64_t n = SafetensorsFile::parse(std::span<const std::byte>(full), "f").header_size();
  const unsigned char replacements[] = {0, '"', '\\', '[', ']', '{', '}', ',', ':', '-', '9', '.', 'e', 0x80, 0xff};
  size_t errors = 0, parsed = 0;
  for (size_t pos = 0; pos < 8 + n; ++pos) {
    for (unsigned char r : replacements) {
      Bytes b = full;
      b[pos] = static_cast<std::byte>(r);
      try {
        const auto st = SafetensorsFile::parse(std::span<const std::byte>(b), "c");
        for (const auto &t : st.tensors()) CHECK(t.end <= st.data_buffer().size());
        ++parsed;
      } catch (const loom::Error &) {
        ++errors;
      }
    }
  }
  CHECK(errors > 0);
  CHECK(parsed > 0); // e.g. a digit replaced inside a metadata string
}

// ---------------------------------------------------------------------------------------------
// Sharded checkpoints

namespace {
const char *kShard1 = "model-00001-of-00002.safetensors";
const char *kShard2 = "model-00002-of-00002.safetensors";

std::string index_json(const std::vector<std::pair<std::string, std::string>> &map) {
  std::string s = "{\"metadata\": {\"total_size\": 28, \"format\": \"pt\"}, \"weight_map\": {";
  for (size_t i = 0; i < map.size(); ++i)
    s += (i ? ", \"" : "\"") + map[i].first + "\": \"" + map[i].second + "\"";
  return s + "}}";
}

// Shard 1: a (F32 [2]) and b (F16 [2]); shard 2: c (F32 [3]) and d (U8 [4]).
void write_shards(const fs::path &dir) {
  write_file(dir / kShard1, build({{"a", "F32", {2}, raw_bytes(std::vector<float>{1, 2})},
                                   {"b", "F16", {2}, raw_bytes(std::vector<uint16_t>{0x3c00, 0x4000})}}));
  write_file(dir / kShard2, build({{"c", "F32", {3}, raw_bytes(std::vector<float>{3, 4, 5})},
                                   {"d", "U8", {4}, {9, 8, 7, 6}}}));
}
std::vector<std::pair<std::string, std::string>> good_map() {
  return {{"a", kShard1}, {"b", kShard1}, {"c", kShard2}, {"d", kShard2}};
}
} // namespace

TEST_CASE("a valid two-shard checkpoint opens", "[safetensors][sharded]") {
  TempDir dir;
  write_shards(dir.path);
  write_text(dir.path / SafetensorsIndex::kIndexName, index_json(good_map()));
  for (const auto &idx : {SafetensorsIndex::open(dir.path), SafetensorsIndex::open_model_dir(dir.path)}) {
    CHECK(idx.sharded());
    CHECK(idx.path() == dir.path / SafetensorsIndex::kIndexName);
    CHECK(idx.shards().size() == 2);
    CHECK(idx.weight_map().size() == 4);
    CHECK(idx.metadata().at("total_size") == "28");
    CHECK(idx.metadata().at("format") == "pt");
    const auto *c = idx.find("c");
    REQUIRE(c != nullptr);
    float v[3];
    std::memcpy(v, c->data, sizeof v);
    CHECK(v[2] == 5.0f);
    CHECK(idx.find("a")->dtype == SafetensorsDtype::F32);
    CHECK(idx.find("d")->shape == std::vector<int64_t>{4});
    CHECK(idx.find("zz") == nullptr);
    CHECK(idx.shards().at(kShard2).path() == dir.path / kShard2);
  }
}

TEST_CASE("bad sharded checkpoints are refused with their cause", "[safetensors][sharded]") {
  TempDir dir;
  write_shards(dir.path);
  const fs::path index = dir.path / SafetensorsIndex::kIndexName;
  const std::string p = index.string() + ": ";
  auto with_map = [&](std::vector<std::pair<std::string, std::string>> map) {
    write_text(index, index_json(map));
    return index_error(dir.path);
  };

  SECTION("shard names must be plain file names in the directory") {
    for (const std::string bad : {"../x.safetensors", "/etc/x.safetensors", "sub/x.safetensors", "..", ".", "",
                                  "a\\\\b.safetensors"}) {
      INFO(bad);
      const std::string got = with_map({{"a", kShard1}, {"b", bad}});
      CHECK(got.rfind(p + "weight_map: tensor 'b': shard file name '", 0) == 0);
      CHECK(got.ends_with("' is not a plain file name inside the directory"));
    }
  }
  SECTION("a tensor listed in the wrong shard") {
    CHECK(with_map({{"a", kShard1}, {"b", kShard1}, {"c", kShard1}, {"d", kShard2}}) ==
          p + "tensor 'c' is mapped to shard '" + kShard1 + "' but is in '" + kShard2 + "'");
  }
  SECTION("a tensor that no shard holds") {
    auto map = good_map();
    map.emplace_back("e", kShard2);
    CHECK(with_map(map) == p + "tensor 'e' is mapped to shard '" + kShard2 + "' but no shard holds it");
  }
  SECTION("a tensor in two shards") {
    write_file(dir.path / kShard2, build({{"a", "F32", {2}, zeros(8)}, {"c", "F32", {3}, zeros(12)},
                                          {"d", "U8", {4}, zeros(4)}}));
    CHECK(with_map(good_map()) == p + "tensor 'a' is in two shards: '" + kShard1 + "' and '" + kShard2 + "'");
  }
  SECTION("a shard file is missing") {
    fs::remove(dir.path / kShard2);
    CHECK(with_map(good_map()) == (dir.path / kShard2).string() + ": cannot open: No such file or directory");
  }
  SECTION("a shard holds a tensor the index does not list") {
    CHECK(with_map({{"a", kShard1}, {"b", kShard1}, {"c", kShard2}}) ==
          p + "shard '" + kShard2 + "' holds tensor 'd' that the index does not list");
  }
  SECTION("a broken shard is reported with the shard's path") {
    write_file(dir.path / kShard2, with_header("{}", {}, 0));
    CHECK(with_map(good_map()) == (dir.path / kShard2).string() + ": header length is 0");
  }
  SECTION("index JSON problems") {
    struct Case {
      std::string text, message;
    };
    const std::vector<Case> cases{
        {"{\"weight_map\": {\"a\": \"" + std::string(kShard1) + "\", \"a\": \"" + kShard1 + "\"}}",
         "weight_map lists tensor 'a' twice"},
        {"{\"weight_map\": {}, \"weight_map\": {}}", "duplicate key 'weight_map'"},
        {"{\"weight_map\": {\"a\": \"x\"}, \"extra\": 1}", "unknown key 'extra' (expected metadata, weight_map)"},
        {"{\"metadata\": {}}", "missing \"weight_map\""},
        {"{\"weight_map\": {}}", "weight_map is empty"},
        {"{\"weight_map\": []}", "weight_map is not an object (it is array)"},
        {"{\"metadata\": 3, \"weight_map\": {\"a\": \"x\"}}", "metadata is not an object (it is number)"},
        {"{\"weight_map\": {\"a\": 1}}", "weight_map: tensor 'a': shard is not a string (it is number)"},
        {"{\"weight_map\": {\"\": \"x\"}}", "weight_map: a tensor has an empty name"},
        {"[]", "index is not a JSON object (it is array)"},
        {"{\"weight_map\": ", "index is not valid JSON: ..."},
        {"{\"metadata\": " + std::string(10000, '{'), "index is nested deeper than 8 levels (at offset 20)"},
        {"{\"weight_map\": {\"a\xff\": \"x\"}}", "index is not valid UTF-8 (bad byte at offset 18)"},
    };
    for (const auto &c : cases) {
      INFO(c.text.substr(0, 80));
      write_text(index, c.text);
      const std::string got = index_error(dir.path);
      if (c.message.ends_with("...")) {
        CHECK(got.rfind(p + c.message.substr(0, c.message.size() - 3), 0) == 0);
      } else {
        CHECK(got == p + c.message);
      }
      // parse_index is the same check without files.
      CHECK_THROWS_AS(SafetensorsIndex::parse_index(c.text, "i.json"), loom::Error);
    }
  }
}

TEST_CASE("open_model_dir finds a single file or the index", "[safetensors][sharded]") {
  TempDir dir;
  SECTION("single file") {
    write_file(dir.path / "model.safetensors", build({{"w", "BF16", {2}, {0x80, 0x3f, 0x00, 0x40}}}, {{"format", "pt"}}));
    const auto idx = SafetensorsIndex::open_model_dir(dir.path);
    CHECK_FALSE(idx.sharded());
    CHECK(idx.path() == dir.path / "model.safetensors");
    CHECK(idx.metadata().at("format") == "pt");
    CHECK(idx.weight_map().at("w") == "model.safetensors");
    REQUIRE(idx.find("w") != nullptr);
    CHECK(idx.find("w")->nbytes == 4);
    // The single file wins over an index beside it, as in transformers.
    write_text(dir.path / SafetensorsIndex::kIndexName, "not json");
    CHECK_FALSE(SafetensorsIndex::open_model_dir(dir.path).sharded());
  }
  SECTION("neither file") {
    try {
      SafetensorsIndex::open_model_dir(dir.path);
      FAIL("no error");
    } catch (const loom::Error &e) {
      CHECK(std::string(e.what()) ==
            dir.path.string() + ": no model.safetensors or model.safetensors.index.json in the directory");
    }
  }
  SECTION("not a directory") {
    CHECK_THROWS_WITH(SafetensorsIndex::open_model_dir(dir.path / "nope"),
                      (dir.path / "nope").string() + ": not a directory");
  }
  SECTION("index missing for open()") {
    CHECK(index_error(dir.path) ==
          (dir.path / SafetensorsIndex::kIndexName).string() + ": cannot open: No such file or directory");
  }
}

// ---------------------------------------------------------------------------------------------
// MappedFile

TEST_CASE("MappedFile maps whole files, empty ones included", "[safetensors][mapped_file]") {
  TempDir dir;
  write_text(dir.path / "empty", "");
  const auto empty = loom::MappedFile::open(dir.path / "empty");
  CHECK(empty.size() == 0);
  CHECK(empty.data() == nullptr);
  CHECK(empty.bytes().empty());
  CHECK_THROWS_WITH(SafetensorsFile::open(dir.path / "empty"),
                    (dir.path / "empty").string() + ": file is 0 bytes, shorter than the 8-byte header length");

  write_text(dir.path / "abc", "abc");
  auto m = loom::MappedFile::open(dir.path / "abc");
  REQUIRE(m.size() == 3);
  CHECK(std::memcmp(m.data(), "abc", 3) == 0);
  CHECK(m.path() == dir.path / "abc");
  const std::byte *p = m.data();
  loom::MappedFile moved = std::move(m);
  CHECK(moved.data() == p); // the mapping does not move
  CHECK(m.data() == nullptr);
  CHECK(m.size() == 0);
  loom::MappedFile assigned;
  assigned = std::move(moved);
  CHECK(assigned.size() == 3);
  CHECK(std::to_integer<char>(assigned.data()[2]) == 'c');

  try {
    loom::MappedFile::open(dir.path / "missing");
    FAIL("no error");
  } catch (const loom::Error &e) {
    CHECK(e.category() == loom::ErrorCategory::runtime);
    CHECK(std::string(e.what()) == (dir.path / "missing").string() + ": cannot open: No such file or directory");
  }
  CHECK_THROWS_WITH(loom::MappedFile::open(dir.path), dir.path.string() + ": not a regular file");
}

TEST_CASE("a mapping outlives its file's replacement by rename and its deletion", "[safetensors][mapped_file]") {
  // What mapped_file.hpp promises for model files replaced the safe way: the mapping keeps the
  // old inode, so readers in place see the old bytes and never fault.
  TempDir dir;
  const fs::path file = dir.path / "model.safetensors";
  auto one = [](float a) { return build({{"x", "F32", {3}, raw_bytes(std::vector<float>{a, a + 1, a + 2})}}); };
  write_file(file, one(1.0f));
  const auto first = SafetensorsFile::open(file);
  write_file(dir.path / "new.safetensors", one(7.0f));
  fs::rename(dir.path / "new.safetensors", file);
  float f[3];
  std::memcpy(f, first.find("x")->data, sizeof f);
  CHECK(f[0] == 1.0f);
  CHECK(f[2] == 3.0f);
  std::memcpy(f, SafetensorsFile::open(file).find("x")->data, sizeof f);
  CHECK(f[0] == 7.0f);
  fs::remove(file);
  std::memcpy(f, first.find("x")->data, sizeof f);
  CHECK(f[1] == 2.0f);
  CHECK(first.mapping() != nullptr);
  const Bytes bytes = one(0.0f);
  CHECK(SafetensorsFile::parse(std::span<const std::byte>(bytes), "borrowed").mapping() == nullptr);
}

TEST_CASE("ModelWeights keeps tensors in the checkpoint's mapping and converts them on demand", "[safetensors][model_weights]") {
  const fs::path kjv = fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv"; // stored as BF16
  const auto config = loom::load_model_config(kjv);
  std::shared_ptr<const loom::MappedFile> mapping;
  std::optional<loom::ModelWeights> weights;
  {
    auto checkpoint = SafetensorsIndex::open_model_dir(kjv);
    mapping = checkpoint.shards().begin()->second.mapping();
    weights = loom::ModelWeights::load(config, checkpoint);
  } // the checkpoint is closed: the weights hold the mapping
  CHECK(mapping.use_count() > 1);
  const loom::StoredWeight *embed = weights->stored("model.embed_tokens.weight");
  REQUIRE(embed != nullptr);
  CHECK(embed->dtype == SafetensorsDtype::BF16);
  CHECK(embed->shape == std::vector<int64_t>{config.vocab_size, config.hidden_size});
  CHECK(embed->mapping == mapping);
  CHECK(embed->bytes.size() == static_cast<size_t>(config.vocab_size * config.hidden_size) * 2);
  CHECK(embed->bytes.data() >= mapping->data());
  CHECK(embed->bytes.data() + embed->bytes.size() <= mapping->data() + mapping->size());
  // at() converts once, from any number of threads, to the widened bfloat16 values.
  const loom::HostWeight *seen[4] = {};
  std::vector<std::thread> threads;
  for (auto &p : seen) threads.emplace_back([&p, &weights] { p = &weights->at("model.embed_tokens.weight"); });
  for (auto &t : threads) t.join();
  for (const auto *p : seen) CHECK(p == seen[0]);
  const auto &values = seen[0]->values;
  REQUIRE(values.size() == embed->bytes.size() / 2);
  for (size_t i : {size_t{0}, size_t{1}, values.size() / 2, values.size() - 1}) {
    uint16_t bits;
    std::memcpy(&bits, embed->bytes.data() + 2 * i, 2);
    uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float expected;
    std::memcpy(&expected, &wide, 4);
    CHECK(values[i] == expected);
  }
  // take() moves the float32 values out; the name is gone.
  const size_t before = weights->size();
  auto norm = weights->take("model.norm.weight");
  CHECK(norm.shape == std::vector<int64_t>{config.hidden_size});
  CHECK(norm.values.size() == static_cast<size_t>(config.hidden_size));
  CHECK(weights->size() == before - 1);
  CHECK_FALSE(weights->contains("model.norm.weight"));
  CHECK(weights->stored("model.norm.weight") == nullptr);
  CHECK_THROWS_WITH(weights->take("model.norm.weight"), "weight model.norm.weight is not loaded");
  weights.reset();
  CHECK(mapping.use_count() == 1);

  // Weights made in memory have no stored form.
  std::map<std::string, loom::HostWeight, std::less<>> made;
  made["w"] = loom::HostWeight{{2}, {1.0f, 2.0f}};
  auto in_memory = loom::ModelWeights::from_map(std::move(made));
  CHECK(in_memory.stored("w") == nullptr);
  CHECK(in_memory.at("w").values == std::vector<float>{1.0f, 2.0f});
}

TEST_CASE("write_safetensors writes what open() reads: odd sizes, no gaps, aligned tensors", "[safetensors][writer]") {
  const fs::path path = fs::temp_directory_path() / ("loom_writer_" + std::to_string(::getpid()) + ".safetensors");
  const std::vector<uint8_t> codes = {1, 2, 3};              // 3 bytes: odd
  const std::vector<float> scales = {0.5f, -2.25f, 7.0f};    // 12 bytes
  const std::vector<uint16_t> half = {0x3f80};               // 2 bytes
  const std::vector<int64_t> wide = {-5, 1LL << 40};         // 16 bytes
  auto bytes = [](const auto &v) { return std::as_bytes(std::span(v)); };
  loom::write_safetensors(path,
                          {{"m.codes", loom::SafetensorsDtype::U8, {3}, bytes(codes)},
                           {"m.scales", loom::SafetensorsDtype::F32, {3}, bytes(scales)},
                           {"m.half", loom::SafetensorsDtype::BF16, {1, 1}, bytes(half)},
                           {"m.wide", loom::SafetensorsDtype::I64, {2}, bytes(wide)}},
                          {{"loom.quantization", "{}"}});
  const auto f = loom::SafetensorsFile::open(path);
  REQUIRE(f.tensors().size() == 4);
  CHECK(f.metadata().at("loom.quantization") == "{}");
  auto same = [&](const char *name, const auto &v) {
    const auto *t = f.find(name);
    REQUIRE(t != nullptr);
    CHECK(static_cast<size_t>(t->nbytes) == v.size() * sizeof(v[0]));
    CHECK(std::memcmp(t->data, v.data(), static_cast<size_t>(t->nbytes)) == 0);
    CHECK(reinterpret_cast<uintptr_t>(t->data) % sizeof(v[0]) == 0);
  };
  same("m.codes", codes);
  same("m.scales", scales);
  same("m.half", half);
  same("m.wide", wide);
  CHECK(f.find("m.half")->shape == std::vector<int64_t>{1, 1});
  CHECK_FALSE(fs::exists(path.string() + ".tmp"));
  CHECK_THROWS_WITH(loom::write_safetensors(path, {{"x", loom::SafetensorsDtype::F32, {2}, bytes(codes)}}, {}),
                    Catch::Contains("x: 3 bytes do not match"));
  CHECK_THROWS_WITH(loom::write_safetensors(path, {{"x", loom::SafetensorsDtype::U8, {3}, bytes(codes)},
                                                   {"x", loom::SafetensorsDtype::U8, {3}, bytes(codes)}},
                                            {}),
                    Catch::Contains("repeated"));
  fs::remove(path);
}
