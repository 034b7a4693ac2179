#include "loom/core/safetensors.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <string>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

#include "json_duplicates.hpp"
#include "loom/core/error.hpp"

namespace loom {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr uint64_t kMaxOffset = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());

[[noreturn]] void fail(const fs::path &where, const std::string &cause) {
  throw runtime_error(where.string() + ": " + cause);
}

// Untrusted text (names, parser messages) made printable and bounded, so that messages stay on
// one line whatever a file contains: control characters (and, for quoted names, ' and \) become
// \xNN; more than 200 bytes are cut at a UTF-8 boundary and marked "...".
std::string printable(std::string_view s, bool escape_quotes) {
  constexpr size_t kMax = 200;
  std::string out;
  size_t n = std::min(s.size(), kMax);
  while (n > 0 && n < s.size() && (static_cast<unsigned char>(s[n]) & 0xc0) == 0x80) --n;
  for (size_t i = 0; i < n; ++i) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f || (escape_quotes && (c == '\'' || c == '\\'))) {
      static const char hex[] = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > kMax) out += "...";
  return out;
}
std::string quote(std::string_view s) {
  std::string out(1, '\''); // (not "'" + ...: GCC 12 -O3 warns falsely, PR 105329)
  out += printable(s, true);
  out.push_back('\'');
  return out;
}

std::string shape_str(const std::vector<int64_t> &shape) {
  std::string s(1, '[');
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  s += ']';
  return s;
}

std::string range_str(uint64_t b, uint64_t e) {
  std::string s(1, '['); // (appends, not "[" + ...: GCC 12 -O3 warns falsely, PR 105329)
  s += std::to_string(b);
  s += ", ";
  s += std::to_string(e);
  s += ')';
  return s;
}

// Length of the valid UTF-8 sequence at s[i], or 0 when it is not one (strict: no overlong
// forms, no surrogates, nothing above U+10FFFF).
size_t utf8_sequence(std::string_view s, size_t i) {
  auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = b(i);
  if (c < 0x80) return 1;
  size_t len;
  unsigned char lo = 0x80, hi = 0xbf;
  if (c >= 0xc2 && c <= 0xdf) {
    len = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    len = 3;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    len = 4;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
  } else {
    return 0;
  }
  if (s.size() - i < len) return 0;
  if (b(i + 1) < lo || b(i + 1) > hi) return 0;
  for (size_t k = 2; k < len; ++k)
    if (b(i + k) < 0x80 || b(i + k) > 0xbf) return 0;
  return len;
}

// Checks JSON text before any parser sees it: no NUL byte (nlohmann treats NUL as the end of
// input and would ignore what follows), valid UTF-8, and bracket nesting outside strings at most
// `max_depth` deep, so that the parser's work and recursion are bounded.
void prescan_json(std::string_view text, int max_depth, const fs::path &where, const char *what) {
  int depth = 0;
  bool in_string = false;
  size_t i = 0;
  while (i < text.size()) {
    char c = text[i];
    if (c == '\0') fail(where, std::string(what) + " contains a NUL byte at offset " + std::to_string(i));
    size_t len = utf8_sequence(text, i);
    if (len == 0)
      fail(where, std::string(what) + " is not valid UTF-8 (bad byte at offset " + std::to_string(i) + ")");
    if (len > 1) {
      i += len;
      continue;
    }
    if (in_string) {
      if (c == '\\') {
        // Skip the escaped character when it is ASCII; anything else is left to the checks above
        // on the next round (and is invalid JSON anyway).
        if (i + 1 < text.size() && static_cast<unsigned char>(text[i + 1]) < 0x80 && text[i + 1] != '\0') ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth)
        fail(where, std::string(what) + " is nested deeper than " + std::to_string(max_depth) +
                        " levels (at offset " + std::to_string(i) + ")");
    } else if (c == ']' || c == '}') {
      if (depth > 0) --depth; // unbalanced text is the JSON parser's to report
    }
    ++i;
  }
}

// Records why nlohmann rejected a text; used only after a parse has failed.
struct ErrorLocator : json::json_sax_t {
  std::string message;
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t &) override { return true; }
  bool string(string_t &) override { return true; }
  bool binary(binary_t &) override { return true; }
  bool start_object(std::size_t) override { return true; }
  bool key(string_t &) override { return true; }
  bool end_object() override { return true; }
  bool start_array(std::size_t) override { return true; }
  bool end_array() override { return true; }
  bool parse_error(std::size_t, const std::string &, const nlohmann::detail::exception &ex) override {
    std::string_view m = ex.what();
    if (auto p = m.find("] "); p != std::string_view::npos) m.remove_prefix(p + 2);
    message = printable(m, false);
    return false;
  }
};

// Parses prescanned JSON text without exceptions, noticing duplicate keys at every level (the
// DOM keeps only one of them).
json parse_json(std::string_view text, const fs::path &where, const char *what, detail::DuplicateKey &dup) {
  json j = json::parse(text.begin(), text.end(), detail::duplicate_key_finder<json>(dup), /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    ErrorLocator loc;
    json::sax_parse(text.begin(), text.end(), &loc);
    fail(where, std::string(what) + " is not valid JSON" + (loc.message.empty() ? "" : ": " + loc.message));
  }
  return j;
}

const char *type_of(const json &v) { return v.type_name(); }

// A non-negative JSON integer below 2^63, or an error naming `what`.
uint64_t read_offset(const json &v, const std::string &what, const fs::path &where, const std::string &prefix) {
  uint64_t u = 0;
  if (v.is_number_unsigned()) {
    u = v.get<uint64_t>();
  } else if (v.is_number_integer()) {
    int64_t i = v.get<int64_t>();
    if (i < 0) fail(where, prefix + what + " is negative (" + std::to_string(i) + ")");
    u = static_cast<uint64_t>(i);
  } else if (v.is_number_float()) {
    fail(where, prefix + what + " is not an integer (" + v.dump() + ")");
  } else {
    fail(where, prefix + what + " is not an integer (it is " + type_of(v) + ")");
  }
  if (u > kMaxOffset) fail(where, prefix + what + " is " + std::to_string(u) + ", above 2^63-1");
  return u;
}

uint64_t read_le64(const std::byte *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint64_t>(p[i]);
  return v;
}

struct DtypeInfo {
  SafetensorsDtype dtype;
  const char *name;
  size_t size;
  uint8_t dl_code; // DLPack's type code; kNoDl where Loom passes no such tensor to plugins
};
constexpr uint8_t kNoDl = 0xff;
constexpr std::array<DtypeInfo, 15> kDtypes{{
    {SafetensorsDtype::F64, "F64", 8, kDLFloat},       {SafetensorsDtype::F32, "F32", 4, kDLFloat},
    {SafetensorsDtype::F16, "F16", 2, kDLFloat},       {SafetensorsDtype::BF16, "BF16", 2, kDLBfloat},
    {SafetensorsDtype::F8_E4M3, "F8_E4M3", 1, kNoDl}, {SafetensorsDtype::F8_E5M2, "F8_E5M2", 1, kNoDl},
    {SafetensorsDtype::I64, "I64", 8, kDLInt},         {SafetensorsDtype::I32, "I32", 4, kDLInt},
    {SafetensorsDtype::I16, "I16", 2, kDLInt},         {SafetensorsDtype::I8, "I8", 1, kDLInt},
    {SafetensorsDtype::U64, "U64", 8, kDLUInt},        {SafetensorsDtype::U32, "U32", 4, kDLUInt},
    {SafetensorsDtype::U16, "U16", 2, kDLUInt},        {SafetensorsDtype::U8, "U8", 1, kDLUInt},
    {SafetensorsDtype::BOOL, "BOOL", 1, kNoDl},
}};

const DtypeInfo &info(SafetensorsDtype d) {
  for (const auto &i : kDtypes)
    if (i.dtype == d) return i;
  return kDtypes[1];
}

// Parses one tensor entry of the header.
SafetensorsTensor read_tensor(const std::string &name, const json &entry, uint64_t data_size,
                              const fs::path &where) {
  const std::string prefix = "tensor " + quote(name) + ": ";
  if (!entry.is_object()) fail(where, prefix + "entry is not an object (it is " + type_of(entry) + ")");
  for (const auto &[k, v] : entry.items()) {
    (void)v;
    if (k != "dtype" && k != "shape" && k != "data_offsets")
      fail(where, prefix + "unknown key " + quote(k) + " (expected dtype, shape, data_offsets)");
  }
  for (const char *k : {"dtype", "shape", "data_offsets"})
    if (!entry.contains(k)) fail(where, prefix + "missing \"" + k + "\"");

  SafetensorsTensor t;
  t.name = name;

  const json &dt = entry["dtype"];
  if (!dt.is_string()) fail(where, prefix + "dtype is not a string (it is " + type_of(dt) + ")");
  auto parsed = parse_dtype(dt.get_ref<const std::string &>());
  if (!parsed) fail(where, prefix + "unknown dtype " + quote(dt.get_ref<const std::string &>()));
  t.dtype = *parsed;

  const json &shape = entry["shape"];
  if (!shape.is_array()) fail(where, prefix + "shape is not an array (it is " + type_of(shape) + ")");
  if (shape.size() > SafetensorsFile::kMaxDims)
    fail(where, prefix + "shape has " + std::to_string(shape.size()) + " dims, more than " +
                    std::to_string(SafetensorsFile::kMaxDims));
  uint64_t numel = 1;
  bool overflow = false;
  for (size_t i = 0; i < shape.size(); ++i) {
    uint64_t d = read_offset(shape[i], "shape[" + std::to_string(i) + "]", where, prefix);
    t.shape.push_back(static_cast<int64_t>(d));
    if (__builtin_mul_overflow(numel, d, &numel)) overflow = true;
  }
  // A zero dim makes the product 0 however large the others are; any overflow along the way
  // still means the shape cannot describe bytes in a file.
  if (overflow)
    fail(where, prefix + "shape " + shape_str(t.shape) + " has an element count that overflows 64 bits");
  t.numel = numel;
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(t.dtype)), &nbytes))
    fail(where, prefix + "shape " + shape_str(t.shape) + " of " + dtype_name(t.dtype) +
                    " has a byte size that overflows 64 bits");
  t.nbytes = nbytes;

  const json &off = entry["data_offsets"];
  if (!off.is_array()) fail(where, prefix + "data_offsets is not an array (it is " + type_of(off) + ")");
  if (off.size() != 2)
    fail(where, prefix + "data_offsets has " + std::to_string(off.size()) + " elements, not 2");
  t.begin = read_offset(off[0], "data_offsets[0]", where, prefix);
  t.end = read_offset(off[1], "data_offsets[1]", where, prefix);
  if (t.begin > t.end)
    fail(where, prefix + "data_offsets " + range_str(t.begin, t.end) + " begin after they end");
  if (t.end > data_size)
    fail(where, prefix + "data_offsets " + range_str(t.begin, t.end) + " run past the end of the " +
                    std::to_string(data_size) + "-byte data buffer");
  if (t.end - t.begin != nbytes)
    fail(where, prefix + "data_offsets " + range_str(t.begin, t.end) + " hold " +
                    std::to_string(t.end - t.begin) + " bytes but shape " + shape_str(t.shape) + " of " +
                    dtype_name(t.dtype) + " needs " + std::to_string(nbytes));
  return t;
}

bool plain_file_name(const std::string &s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos &&
         s.find('\\') == std::string::npos;
}

} // namespace

size_t dtype_size(SafetensorsDtype dtype) noexcept { return info(dtype).size; }
const char *dtype_name(SafetensorsDtype dtype) noexcept { return info(dtype).name; }
std::optional<SafetensorsDtype> parse_dtype(std::string_view name) noexcept {
  for (const auto &i : kDtypes)
    if (name == i.name) return i.dtype;
  return std::nullopt;
}
std::optional<DLDataType> dl_dtype(SafetensorsDtype dtype) noexcept {
  const DtypeInfo &i = info(dtype);
  if (i.dl_code == kNoDl) return std::nullopt;
  return DLDataType{i.dl_code, static_cast<uint8_t>(i.size * 8), 1};
}
std::optional<SafetensorsDtype> safetensors_dtype(const DLDataType &dtype) noexcept {
  for (const auto &i : kDtypes)
    if (i.dl_code != kNoDl && i.dl_code == dtype.code && i.size * 8 == dtype.bits && dtype.lanes == 1) return i.dtype;
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile SafetensorsFile::open(const fs::path &path) {
  return parse(std::make_shared<const MappedFile>(MappedFile::open(path)));
}

SafetensorsFile SafetensorsFile::parse(std::shared_ptr<const MappedFile> file) {
  if (!file) throw runtime_error("SafetensorsFile::parse: no file");
  SafetensorsFile f = parse(file->bytes(), file->path());
  f.mapping_ = std::move(file);
  return f;
}

SafetensorsFile SafetensorsFile::parse(std::span<const std::byte> bytes, const fs::path &name) {
  const uint64_t size = bytes.size();
  if (size < 8)
    fail(name, "file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  const uint64_t n = read_le64(bytes.data());
  if (n == 0) fail(name, "header length is 0");
  if (n > kMaxHeaderBytes)
    fail(name, "header length " + std::to_string(n) + " exceeds the cap of 100 MiB (" +
                   std::to_string(kMaxHeaderBytes) + " bytes)");
  if (n > size - 8)
    fail(name, "header length " + std::to_string(n) + " runs past the end of the file (" +
                   std::to_string(size - 8) + " bytes follow the length)");

  std::string_view text(reinterpret_cast<const char *>(bytes.data()) + 8, static_cast<size_t>(n));
  prescan_json(text, kMaxJsonDepth, name, "header");
  detail::DuplicateKey dup;
  json header = parse_json(text, name, "header", dup);
  if (dup.found) {
    if (dup.parents.empty())
      fail(name, dup.key == "__metadata__" ? "duplicate key '__metadata__'"
                                           : "duplicate tensor name " + quote(dup.key));
    std::string parent = dup.parents.front();
    if (parent == "__metadata__") fail(name, "__metadata__: duplicate key " + quote(dup.key));
    fail(name, "tensor " + quote(parent) + ": duplicate key " + quote(dup.key));
  }
  if (!header.is_object()) fail(name, std::string("header is not a JSON object (it is ") + type_of(header) + ")");

  SafetensorsFile f;
  f.path_ = name;
  f.header_size_ = n;
  f.data_buffer_ = bytes.subspan(static_cast<size_t>(8 + n));
  const uint64_t data_size = f.data_buffer_.size();

  for (const auto &[key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object())
        fail(name, std::string("__metadata__ is not an object (it is ") + type_of(value) + ")");
      for (const auto &[mk, mv] : value.items()) {
        if (!mv.is_string())
          fail(name, "__metadata__: value of " + quote(mk) + " is not a string (it is " + type_of(mv) + ")");
        f.metadata_.emplace(mk, mv.get<std::string>());
      }
      continue;
    }
    if (key.empty()) fail(name, "a tensor has an empty name");
    f.tensors_.push_back(read_tensor(key, value, data_size, name));
  }

  std::sort(f.tensors_.begin(), f.tensors_.end(), [](const SafetensorsTensor &a, const SafetensorsTensor &b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  // The tensors must tile the data buffer: each starts where the previous one ended.
  uint64_t expected = 0;
  const SafetensorsTensor *prev = nullptr;
  for (const auto &t : f.tensors_) {
    if (t.begin < expected)
      fail(name, "tensor " + quote(t.name) + ": bytes " + range_str(t.begin, t.end) + " overlap tensor " +
                     quote(prev->name) + " at " + range_str(prev->begin, prev->end));
    if (t.begin > expected)
      fail(name, "tensor " + quote(t.name) + ": bytes " + range_str(t.begin, t.end) + " leave a gap of " +
                     std::to_string(t.begin - expected) + " bytes " +
                     (prev ? "after tensor " + quote(prev->name) + " at " + range_str(prev->begin, prev->end)
                           : std::string("at the start of the data buffer")) +
                     " (tensors must cover the data buffer contiguously)");
    expected = t.end;
    prev = &t;
  }
  if (expected != data_size)
    fail(name, "data buffer has " + std::to_string(data_size - expected) + " trailing bytes after " +
                   (prev ? "the last tensor " + quote(prev->name) : std::string("the header (no tensors)")) +
                   " (tensors must cover the data buffer exactly)");

  for (size_t i = 0; i < f.tensors_.size(); ++i) {
    auto &t = f.tensors_[i];
    t.data = f.data_buffer_.data() + t.begin; // within [data, data + size] (checked above)
    f.by_name_.emplace(t.name, i);
  }
  return f;
}

const SafetensorsTensor *SafetensorsFile::find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

// ---------------------------------------------------------------------------------------------
// SafetensorsIndex

SafetensorsIndex::Spec SafetensorsIndex::parse_index(std::string_view text, const fs::path &name) {
  prescan_json(text, kMaxIndexJsonDepth, name, "index");
  detail::DuplicateKey dup;
  json j = parse_json(text, name, "index", dup);
  if (dup.found) {
    if (dup.parents.empty()) fail(name, "duplicate key " + quote(dup.key));
    if (dup.parents.size() == 1 && dup.parents[0] == "weight_map")
      fail(name, "weight_map lists tensor " + quote(dup.key) + " twice");
    fail(name, "duplicate key " + quote(dup.key) + " in " + quote(dup.parents.front()));
  }
  if (!j.is_object()) fail(name, std::string("index is not a JSON object (it is ") + type_of(j) + ")");
  Spec spec;
  for (const auto &[k, v] : j.items()) {
    if (k == "metadata") {
      if (!v.is_object()) fail(name, std::string("metadata is not an object (it is ") + type_of(v) + ")");
      for (const auto &[mk, mv] : v.items())
        spec.metadata.emplace(mk, mv.is_string() ? mv.get<std::string>()
                                                 : mv.dump(-1, ' ', false, json::error_handler_t::replace));
    } else if (k == "weight_map") {
      if (!v.is_object()) fail(name, std::string("weight_map is not an object (it is ") + type_of(v) + ")");
      for (const auto &[tk, tv] : v.items()) {
        if (tk.empty()) fail(name, "weight_map: a tensor has an empty name");
        if (!tv.is_string())
          fail(name, "weight_map: tensor " + quote(tk) + ": shard is not a string (it is " + type_of(tv) + ")");
        const auto &shard = tv.get_ref<const std::string &>();
        if (!plain_file_name(shard))
          fail(name, "weight_map: tensor " + quote(tk) + ": shard file name " + quote(shard) +
                         " is not a plain file name inside the directory");
        spec.weight_map.emplace(tk, shard);
      }
    } else {
      fail(name, "unknown key " + quote(k) + " (expected metadata, weight_map)");
    }
  }
  if (!j.contains("weight_map")) fail(name, "missing \"weight_map\"");
  if (spec.weight_map.empty()) fail(name, "weight_map is empty");
  return spec;
}

SafetensorsIndex SafetensorsIndex::open(const fs::path &dir) {
  const fs::path index_path = dir / kIndexName;
  MappedFile file = MappedFile::open(index_path);
  if (file.size() > kMaxIndexBytes)
    fail(index_path, "index is " + std::to_string(file.size()) + " bytes, above the cap of 100 MiB");
  std::string_view text(reinterpret_cast<const char *>(file.data()), static_cast<size_t>(file.size()));

  SafetensorsIndex idx;
  idx.path_ = index_path;
  idx.sharded_ = true;
  idx.spec_ = parse_index(text, index_path);

  for (const auto &[tensor, shard] : idx.spec_.weight_map) {
    (void)tensor;
    if (!idx.shards_.contains(shard)) idx.shards_.emplace(shard, SafetensorsFile::open(dir / shard));
  }

  // Which shard holds each tensor; a tensor in two shards is an error.
  std::map<std::string_view, const std::string *> owner;
  for (const auto &[shard, file_] : idx.shards_) {
    for (const auto &t : file_.tensors()) {
      auto [it, inserted] = owner.emplace(t.name, &shard);
      if (!inserted)
        fail(index_path, "tensor " + quote(t.name) + " is in two shards: " + quote(*it->second) + " and " +
                             quote(shard));
    }
  }
  for (const auto &[tensor, shard] : idx.spec_.weight_map) {
    if (idx.shards_.at(shard).find(tensor) != nullptr) continue;
    auto it = owner.find(tensor);
    if (it != owner.end())
      fail(index_path, "tensor " + quote(tensor) + " is mapped to shard " + quote(shard) + " but is in " +
                           quote(*it->second));
    fail(index_path, "tensor " + quote(tensor) + " is mapped to shard " + quote(shard) +
                         " but no shard holds it");
  }
  for (const auto &[tensor, shard] : owner) {
    if (!idx.spec_.weight_map.contains(tensor))
      fail(index_path, "shard " + quote(*shard) + " holds tensor " + quote(tensor) +
                           " that the index does not list");
  }
  return idx;
}

SafetensorsIndex SafetensorsIndex::open_model_dir(const fs::path &dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) fail(dir, "not a directory");
  const fs::path single = dir / kSingleName;
  if (fs::exists(single, ec)) {
    SafetensorsIndex idx;
    idx.path_ = single;
    idx.sharded_ = false;
    SafetensorsFile f = SafetensorsFile::open(single);
    idx.spec_.metadata = f.metadata();
    for (const auto &t : f.tensors()) idx.spec_.weight_map.emplace(t.name, kSingleName);
    idx.shards_.emplace(kSingleName, std::move(f));
    return idx;
  }
  if (fs::exists(dir / kIndexName, ec)) return open(dir);
  fail(dir, std::string("no ") + kSingleName + " or " + kIndexName + " in the directory");
}

const SafetensorsTensor *SafetensorsIndex::find(std::string_view name) const {
  auto it = spec_.weight_map.find(name);
  if (it == spec_.weight_map.end()) return nullptr;
  auto s = shards_.find(it->second);
  return s == shards_.end() ? nullptr : s->second.find(name);
}

} // namespace loom
