#include "bpe_tokenizer.hpp"
#include "json_guard.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <optional>
#include <unordered_set>
#include <queue>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom/core/error.hpp"

namespace loom {

namespace {

using json = nlohmann::json;

constexpr std::uintmax_t max_file_bytes = 64u << 20;
// Bounds on the work one regex search may do, so that hostile patterns or inputs fail with an
// error instead of hanging: backtracking steps, and heap for backtracking (KiB).
constexpr uint32_t regex_match_limit = 50'000'000;
constexpr uint32_t regex_heap_limit_kib = 256u << 10;

// GPT-2's pre-tokenizer pattern (the ByteLevel pre-tokenizer's use_regex).
constexpr const char *gpt2_pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Length of the valid UTF-8 sequence at s[i], or 0 when it is not one; `consumed` is set to the
// length of the maximal subpart to replace when invalid (at least 1).
size_t utf8_sequence(std::string_view s, size_t i, size_t &consumed) {
  auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char b0 = byte(i);
  consumed = 1;
  if (b0 < 0x80) return 1;
  size_t need = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (size_t k = 1; k <= need; ++k) {
    if (i + k >= s.size()) return 0;
    unsigned char b = byte(i + k);
    unsigned char l = k == 1 ? lo : static_cast<unsigned char>(0x80);
    unsigned char h = k == 1 ? hi : static_cast<unsigned char>(0xBF);
    if (b < l || b > h) return 0;
    consumed = k + 1;
  }
  return need + 1;
}

bool valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    size_t consumed = 0;
    size_t n = utf8_sequence(s, i, consumed);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes U+FFFD.
std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t consumed = 0;
    size_t n = utf8_sequence(s, i, consumed);
    if (n == 0) {
      out += "\xEF\xBF\xBD";
      i += consumed;
    } else {
      out.append(s.substr(i, n));
      i += n;
    }
  }
  return out;
}

// Unicode NFC (canonical decomposition, then canonical composition) of valid UTF-8 `s` through
// utf8proc, as `tokenizers`' NFC normalizer. ASCII text is returned unchanged without a copy
// through utf8proc.
std::string nfc(const std::string &s, const std::string &where) {
  bool ascii = true;
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) {
      ascii = false;
      break;
    }
  if (ascii) return s;
  utf8proc_uint8_t *out = nullptr;
  utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t *>(s.data()),
                                    static_cast<utf8proc_ssize_t>(s.size()), &out,
                                    static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) {
    std::free(out);
    throw runtime_error(where + ": NFC normalization failed: " + utf8proc_errmsg(n));
  }
  std::string result(reinterpret_cast<const char *>(out), static_cast<size_t>(n));
  std::free(out);
  return result;
}

// The code point of the (valid) UTF-8 sequence at s[i] of length n.
uint32_t code_point(std::string_view s, size_t i, size_t n) {
  auto b = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[i + k])); };
  if (n == 1) return b(0);
  if (n == 2) return ((b(0) & 0x1Fu) << 6) | (b(1) & 0x3Fu);
  if (n == 3) return ((b(0) & 0x0Fu) << 12) | ((b(1) & 0x3Fu) << 6) | (b(2) & 0x3Fu);
  return ((b(0) & 0x07u) << 18) | ((b(1) & 0x3Fu) << 12) | ((b(2) & 0x3Fu) << 6) | (b(3) & 0x3Fu);
}

std::string encode_utf8(uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0u | (cp >> 6));
    out += static_cast<char>(0x80u | (cp & 0x3Fu));
  } else {
    out += static_cast<char>(0xE0u | (cp >> 12));
    out += static_cast<char>(0x80u | ((cp >> 6) & 0x3Fu));
    out += static_cast<char>(0x80u | (cp & 0x3Fu));
  }
  return out;
}

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to 256 + n.
struct ByteTable {
  std::array<std::string, 256> byte_to_char;
  std::unordered_map<uint32_t, unsigned char> char_to_byte;
  ByteTable() {
    uint32_t n = 0;
    for (uint32_t b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      uint32_t cp = printable ? b : 256 + n++;
      byte_to_char[b] = encode_utf8(cp);
      char_to_byte[cp] = static_cast<unsigned char>(b);
    }
  }
};

const ByteTable &byte_table() {
  static const ByteTable table;
  return table;
}

struct CodeDeleter {
  void operator()(pcre2_code *c) const { pcre2_code_free(c); }
};
struct MatchContextDeleter {
  void operator()(pcre2_match_context *c) const { pcre2_match_context_free(c); }
};
struct MatchDataDeleter {
  void operator()(pcre2_match_data *d) const { pcre2_match_data_free(d); }
};

std::string pcre2_message(int code) {
  std::array<PCRE2_UCHAR, 256> buf{};
  int n = pcre2_get_error_message(code, buf.data(), buf.size());
  if (n < 0) return "PCRE2 error " + std::to_string(code);
  return std::string(reinterpret_cast<const char *>(buf.data()), static_cast<size_t>(n));
}

// A compiled pattern (UTF, Unicode properties for \s \w \d and POSIX classes) with bounded
// matching. Immutable once built; matching allocates its own match data.
class Regex {
 public:
  Regex(const std::string &pattern, const std::string &where) : where_(where) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    code_.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                              &error, &offset, nullptr));
    if (!code_)
      throw runtime_error(where + ": cannot compile the regex at offset " + std::to_string(offset) + ": " +
                          pcre2_message(error));
    context_.reset(pcre2_match_context_create(nullptr));
    if (!context_) throw runtime_error(where + ": out of memory");
    pcre2_set_match_limit(context_.get(), regex_match_limit);
    pcre2_set_heap_limit(context_.get(), regex_heap_limit_kib);
  }

  // [start, end) of each non-empty match, left to right, non-overlapping. `subject` is valid
  // UTF-8.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view subject) const {
    std::vector<std::pair<size_t, size_t>> out;
    std::unique_ptr<pcre2_match_data, MatchDataDeleter> md(pcre2_match_data_create_from_pattern(code_.get(), nullptr));
    if (!md) throw runtime_error(where_ + ": out of memory");
    auto sp = reinterpret_cast<PCRE2_SPTR>(subject.data());
    size_t offset = 0;
    uint32_t options = 0;
    while (offset <= subject.size()) {
      int rc = pcre2_match(code_.get(), sp, subject.size(), offset, options, md.get(), context_.get());
      options = PCRE2_NO_UTF_CHECK; // checked on the first call
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) throw runtime_error(where_ + ": regex match failed: " + pcre2_message(rc));
      const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md.get());
      size_t start = ov[0], end = ov[1];
      if (end <= start) { // an empty match: skip one character
        if (start >= subject.size()) break;
        size_t consumed = 0;
        size_t n = utf8_sequence(subject, start, consumed);
        offset = start + (n == 0 ? 1 : n);
        continue;
      }
      out.emplace_back(start, end);
      offset = end;
    }
    return out;
  }

 private:
  std::string where_;
  std::unique_ptr<pcre2_code, CodeDeleter> code_;
  std::unique_ptr<pcre2_match_context, MatchContextDeleter> context_;
};

// Appends the pieces of `s` split "Isolated" at `matches`: the gaps and the matches, empty
// pieces dropped.
void split_isolated(const std::string &s, const std::vector<std::pair<size_t, size_t>> &matches,
                    std::vector<std::string> &out) {
  size_t prev = 0;
  for (auto [start, end] : matches) {
    if (start > prev) out.push_back(s.substr(prev, start - prev));
    out.push_back(s.substr(start, end - start));
    prev = end;
  }
  if (prev < s.size()) out.push_back(s.substr(prev));
}

struct Step {
  enum class Kind { byte_level, split_regex, split_string } kind = Kind::byte_level;
  bool add_prefix_space = false;
  std::shared_ptr<const Regex> regex; // byte_level with use_regex, split_regex
  std::string literal;                // split_string
};

struct AddedToken {
  std::string content;
  int32_t id = 0;
};

// Added tokens grouped by first byte, longest first: leftmost-longest matching.
struct AddedSet {
  std::array<std::vector<AddedToken>, 256> by_first;
  bool empty = true;
  void add(AddedToken t) {
    auto &v = by_first[static_cast<unsigned char>(t.content[0])];
    auto pos = v.begin();
    while (pos != v.end() && pos->content.size() >= t.content.size()) ++pos;
    v.insert(pos, std::move(t));
    empty = false;
  }
};

struct Segment {
  std::string text;
  int32_t id = -1; // an added token's id, or -1 for text still to tokenize
};

void split_added(const AddedSet &set, std::vector<Segment> &segments) {
  if (set.empty) return;
  std::vector<Segment> out;
  for (auto &seg : segments) {
    if (seg.id >= 0) {
      out.push_back(std::move(seg));
      continue;
    }
    const std::string &s = seg.text;
    size_t prev = 0;
    for (size_t i = 0; i < s.size();) {
      const AddedToken *hit = nullptr;
      for (const auto &t : set.by_first[static_cast<unsigned char>(s[i])])
        if (s.compare(i, t.content.size(), t.content) == 0) {
          hit = &t;
          break;
        }
      if (!hit) {
        ++i;
        continue;
      }
      if (i > prev) out.push_back({s.substr(prev, i - prev), -1});
      out.push_back({hit->content, hit->id});
      i += hit->content.size();
      prev = i;
    }
    if (prev < s.size()) out.push_back({s.substr(prev), -1});
  }
  segments = std::move(out);
}

class BpeTokenizer final : public Tokenizer {
 public:
  explicit BpeTokenizer(const std::filesystem::path &file) : path_(file.string()) { load(file); }
  BpeTokenizer(std::string_view json_text, std::string name) : path_(std::move(name)) { load_text(json_text); }

  // add_bos applies the post-processor's template for a single sequence (Llama 3's
  // "<|begin_of_text|> $A"), as transformers' tokenizer(text) does.
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override {
    if (!valid_utf8(text)) throw runtime_error(path_ + ": cannot encode: the text is not valid UTF-8");
    std::vector<Segment> segments{{std::string(text), -1}};
    // As `tokenizers`: added tokens with normalized=false are matched on the raw text, the rest of
    // the text is normalized piece by piece, then the other added tokens are matched on that.
    split_added(added_raw_, segments);
    if (nfc_)
      for (auto &seg : segments)
        if (seg.id < 0) seg.text = nfc(seg.text, path_);
    split_added(added_normalized_, segments);
    std::vector<int32_t> ids;
    std::vector<std::string> pieces, next;
    for (const auto &seg : segments) {
      if (seg.id >= 0) {
        ids.push_back(seg.id);
        continue;
      }
      pieces.assign(1, seg.text);
      for (const auto &step : steps_) {
        next.clear();
        for (auto &p : pieces) apply(step, p, next);
        pieces.swap(next);
      }
      for (const auto &p : pieces) bpe(p, ids);
    }
    if (add_bos && (!template_prefix_.empty() || !template_suffix_.empty())) {
      ids.insert(ids.begin(), template_prefix_.begin(), template_prefix_.end());
      ids.insert(ids.end(), template_suffix_.begin(), template_suffix_.end());
    }
    return ids;
  }

  std::optional<int32_t> token_id(std::string_view token) const override {
    for (const auto &[id, text] : id_to_token_)
      if (text == token && vocab_.find(std::string(token)) == vocab_.end()) return id; // an added token
    if (auto it = vocab_.find(std::string(token)); it != vocab_.end()) return it->second;
    return std::nullopt;
  }

  std::string decode(const std::vector<int32_t> &ids) const override { return utf8_lossy(raw_bytes(ids)); }

  // Special added tokens (<|im_start|>, <|endoftext|>) spell no text: they are control, not content.
  std::string token_bytes(int32_t id) const override { return special_ids_.count(id) ? std::string() : raw_bytes({id}); }

  // The bytes `ids` stand for: byte-level tokens mapped back through GPT-2's byte table, added
  // tokens as their content; possibly invalid UTF-8 (a character split across tokens).
  std::string raw_bytes(const std::vector<int32_t> &ids) const {
    const auto &table = byte_table();
    std::string bytes;
    for (int32_t id : ids) {
      auto it = id_to_token_.find(id);
      if (it == id_to_token_.end()) continue;
      const std::string &tok = it->second;
      std::string mapped;
      bool all = true;
      for (size_t i = 0; i < tok.size();) {
        size_t consumed = 0;
        size_t n = utf8_sequence(tok, i, consumed);
        if (n == 0) {
          all = false;
          break;
        }
        auto b = table.char_to_byte.find(code_point(tok, i, n));
        if (b == table.char_to_byte.end()) {
          all = false;
          break;
        }
        mapped += static_cast<char>(b->second);
        i += n;
      }
      bytes += all ? mapped : tok;
    }
    return bytes;
  }

  int32_t vocab_size() const override { return vocab_size_; }

 private:
  [[noreturn]] void fail(const std::string &key, const std::string &cause) const {
    throw runtime_error(path_ + ": " + key + ": " + cause);
  }

  const json &require(const json &obj, const char *name, const std::string &key) const {
    auto it = obj.find(name);
    if (it == obj.end()) fail(key, "missing");
    return *it;
  }

  bool get_bool(const json &obj, const char *name, const std::string &key, bool fallback) const {
    auto it = obj.find(name);
    if (it == obj.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) fail(key, "not a boolean");
    return it->get<bool>();
  }

  int32_t get_id(const json &v, const std::string &key) const {
    if (!v.is_number_integer()) fail(key, "not an integer id");
    if (v.is_number_unsigned()) {
      auto u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) fail(key, "id out of range");
      return static_cast<int32_t>(u);
    }
    auto i = v.get<int64_t>();
    if (i < 0 || i > std::numeric_limits<int32_t>::max()) fail(key, "id out of range");
    return static_cast<int32_t>(i);
  }

  void refuse_unless_empty(const json &model, const char *name) const {
    auto it = model.find(name);
    if (it == model.end() || it->is_null()) return;
    if (it->is_string() && it->get<std::string>().empty()) return;
    fail(std::string("model.") + name, "only null or \"\" is supported, got " + it->dump());
  }

  void load(const std::filesystem::path &file) {
    std::error_code ec;
    auto size = std::filesystem::file_size(file, ec);
    if (ec) throw runtime_error(path_ + ": cannot read: " + ec.message());
    if (size > max_file_bytes) throw runtime_error(path_ + ": file is larger than 64 MiB");
    std::ifstream in(file, std::ios::binary);
    if (!in) throw runtime_error(path_ + ": cannot open");
    std::ostringstream buf;
    buf << in.rdbuf();
    load_text(buf.str());
  }

  void load_text(std::string_view text) {
    if (text.size() > max_file_bytes) throw runtime_error(path_ + ": file is larger than 64 MiB");
    // Real tokenizer.json files nest about 6 levels; bounded depth keeps dump() in messages safe.
    if (detail::json_too_deep(text, 64)) throw runtime_error(path_ + ": JSON nested deeper than 64 levels");
    json root = json::parse(text, nullptr, false);
    if (root.is_discarded()) throw runtime_error(path_ + ": not valid JSON");
    if (!root.is_object()) throw runtime_error(path_ + ": not a JSON object");

    load_model(require(root, "model", "model"));
    auto norm = root.find("normalizer");
    if (norm != root.end() && !norm->is_null()) load_normalizer(*norm, "normalizer", 0);
    load_added(root); // after the normalizer: normalized added tokens match their normalized text
    bool byte_level = false;
    auto pre = root.find("pre_tokenizer");
    if (pre == root.end() || pre->is_null()) fail("pre_tokenizer", "missing (a ByteLevel pre-tokenizer is required)");
    load_step(*pre, "pre_tokenizer", byte_level, 0);
    if (!byte_level) fail("pre_tokenizer", "no ByteLevel step (only byte-level BPE is supported)");
    auto dec = root.find("decoder");
    if (dec == root.end() || !dec->is_object() || dec->value("type", json()) != "ByteLevel")
      fail("decoder",
           (dec == root.end() ? std::string("missing") : dec->dump()) + " is not supported (only ByteLevel)");
    auto post = root.find("post_processor");
    if (post != root.end() && !post->is_null()) load_post_processor(*post, "post_processor", 0);
  }

  // NFC, or a Sequence of normalizers (applied in order; NFC is idempotent, so any number of NFC
  // steps is one).
  void load_normalizer(const json &n, const std::string &key, int depth) {
    if (depth > 8) fail(key, "normalizers nested too deeply");
    if (!n.is_object()) fail(key, "not an object");
    const json &type = require(n, "type", key + ".type");
    if (!type.is_string()) fail(key + ".type", "not a string");
    const std::string &t = type.get_ref<const std::string &>();
    if (t == "NFC") {
      nfc_ = true;
    } else if (t == "Sequence") {
      const json &list = require(n, "normalizers", key + ".normalizers");
      if (!list.is_array()) fail(key + ".normalizers", "not an array");
      for (size_t i = 0; i < list.size(); ++i)
        load_normalizer(list[i], key + ".normalizers[" + std::to_string(i) + "]", depth + 1);
    } else {
      fail(key + ".type", "'" + t + "' is not supported (NFC or a Sequence of NFC)");
    }
  }

  // ByteLevel post-processing changes offsets only; TemplateProcessing's `single` template adds
  // special tokens around the sequence; Sequence holds either.
  void load_post_processor(const json &p, const std::string &key, int depth) {
    if (!p.is_object() || !p.contains("type") || !p.at("type").is_string()) fail(key, "expected an object with a type");
    const std::string type = p.at("type").get<std::string>();
    if (type == "ByteLevel") return;
    if (type == "Sequence" && depth < 4) {
      auto it = p.find("processors");
      if (it == p.end() || !it->is_array()) fail(key + ".processors", "expected an array");
      for (size_t i = 0; i < it->size(); ++i) load_post_processor((*it)[i], key + ".processors[" + std::to_string(i) + "]", depth + 1);
      return;
    }
    if (type != "TemplateProcessing") fail(key + ".type", "'" + type + "' is not supported (ByteLevel, TemplateProcessing, Sequence)");
    auto single = p.find("single");
    if (single == p.end() || !single->is_array()) fail(key + ".single", "expected an array");
    bool seen_sequence = false;
    for (const auto &item : *single) {
      if (item.is_object() && item.contains("Sequence")) {
        if (seen_sequence) fail(key + ".single", "holds the sequence twice");
        seen_sequence = true;
        continue;
      }
      if (!item.is_object() || !item.contains("SpecialToken") || !item.at("SpecialToken").is_object() ||
          !item.at("SpecialToken").contains("id") || !item.at("SpecialToken").at("id").is_string())
        fail(key + ".single", "items must be {\"SpecialToken\": {\"id\": ...}} or {\"Sequence\": ...}");
      std::string name = item.at("SpecialToken").at("id").get<std::string>();
      // The id: from special_tokens when listed there, else the vocab or an added token.
      int32_t id = -1;
      if (auto sp = p.find("special_tokens"); sp != p.end() && sp->is_object() && sp->contains(name)) {
        const json &ids = sp->at(name).value("ids", json());
        if (!ids.is_array() || ids.size() != 1 || !ids[0].is_number_integer()) fail(key + ".special_tokens." + name, "expected one id");
        id = ids[0].get<int32_t>();
      } else if (auto v = vocab_.find(name); v != vocab_.end()) {
        id = v->second;
      }
      if (id < 0 || id_to_token_.count(id) == 0) fail(key + ".single", "special token " + name + " has no valid id");
      (seen_sequence ? template_suffix_ : template_prefix_).push_back(id);
    }
    if (!seen_sequence) fail(key + ".single", "has no Sequence item");
  }

  void load_model(const json &model) {
    if (!model.is_object()) fail("model", "not an object");
    const json &type = require(model, "type", "model.type");
    if (!type.is_string()) fail("model.type", "not a string");
    if (type.get<std::string>() != "BPE")
      throw runtime_error(path_ + ": model.type '" + type.get<std::string>() + "' is not supported");
    if (get_bool(model, "byte_fallback", "model.byte_fallback", false))
      fail("model.byte_fallback", "only false is supported");
    auto dropout = model.find("dropout");
    if (dropout != model.end() && !dropout->is_null()) fail("model.dropout", "only null is supported");
    refuse_unless_empty(model, "continuing_subword_prefix");
    refuse_unless_empty(model, "end_of_word_suffix");
    ignore_merges_ = get_bool(model, "ignore_merges", "model.ignore_merges", false);
    fuse_unk_ = get_bool(model, "fuse_unk", "model.fuse_unk", false);

    const json &vocab = require(model, "vocab", "model.vocab");
    if (!vocab.is_object()) fail("model.vocab", "not an object");
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      std::string key = "model.vocab[" + json(it.key()).dump() + "]";
      if (it.key().empty()) fail(key, "empty token");
      int32_t id = get_id(it.value(), key);
      auto [pos, fresh] = id_to_token_.emplace(id, it.key());
      if (!fresh) fail(key, "id " + std::to_string(id) + " is also used by " + json(pos->second).dump());
      vocab_.emplace(it.key(), id);
    }
    vocab_size_ = static_cast<int32_t>(vocab_.size());

    auto unk = model.find("unk_token");
    if (unk != model.end() && !unk->is_null()) {
      if (!unk->is_string()) fail("model.unk_token", "not a string");
      auto found = vocab_.find(unk->get<std::string>());
      if (found == vocab_.end()) fail("model.unk_token", json(unk->get<std::string>()).dump() + " is not in the vocab");
      unk_id_ = found->second;
    }

    const json &merges = require(model, "merges", "model.merges");
    if (!merges.is_array()) fail("model.merges", "not an array");
    for (size_t i = 0; i < merges.size(); ++i) {
      std::string key = "model.merges[" + std::to_string(i) + "]";
      const json &m = merges[i];
      std::string a, b;
      if (m.is_string()) {
        const auto &s = m.get_ref<const std::string &>();
        auto sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          fail(key, "not two tokens separated by one space");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        a = m[0].get<std::string>();
        b = m[1].get<std::string>();
      } else {
        fail(key, "not a \"a b\" string or a [\"a\", \"b\"] pair");
      }
      auto ia = vocab_.find(a), ib = vocab_.find(b), iab = vocab_.find(a + b);
      if (ia == vocab_.end()) fail(key, json(a).dump() + " is not in the vocab");
      if (ib == vocab_.end()) fail(key, json(b).dump() + " is not in the vocab");
      if (iab == vocab_.end()) fail(key, "the merged token " + json(a + b).dump() + " is not in the vocab");
      if (i > std::numeric_limits<uint32_t>::max()) fail(key, "too many merges");
      merges_[pair_key(ia->second, ib->second)] = {static_cast<uint32_t>(i), iab->second};
    }
  }

  void load_added(const json &root) {
    auto added = root.find("added_tokens");
    if (added == root.end() || added->is_null()) return;
    if (!added->is_array()) fail("added_tokens", "not an array");
    for (size_t i = 0; i < added->size(); ++i) {
      std::string key = "added_tokens[" + std::to_string(i) + "]";
      const json &t = (*added)[i];
      if (!t.is_object()) fail(key, "not an object");
      int32_t id = get_id(require(t, "id", key + ".id"), key + ".id");
      const json &content = require(t, "content", key + ".content");
      if (!content.is_string() || content.get<std::string>().empty()) fail(key + ".content", "not a non-empty string");
      const std::string &text = content.get_ref<const std::string &>();
      if (!valid_utf8(text)) fail(key + ".content", "not valid UTF-8");
      for (const char *flag : {"lstrip", "rstrip", "single_word"})
        if (get_bool(t, flag, key + "." + flag, false)) fail(key + "." + flag, "only false is supported");
      bool normalized = get_bool(t, "normalized", key + ".normalized", true);
      if (get_bool(t, "special", key + ".special", false)) special_ids_.insert(id);
      if (!vocab_.count(text)) ++vocab_size_;
      id_to_token_[id] = text;
      if (normalized)
        added_normalized_.add({nfc_ ? nfc(text, path_) : text, id});
      else
        added_raw_.add({text, id});
    }
  }

  void load_step(const json &p, const std::string &key, bool &byte_level, int depth) {
    if (depth > 8) fail(key, "pre-tokenizers nested too deeply");
    if (!p.is_object()) fail(key, "not an object");
    const json &type = require(p, "type", key + ".type");
    if (!type.is_string()) fail(key + ".type", "not a string");
    const std::string &t = type.get_ref<const std::string &>();
    if (t == "Sequence") {
      const json &list = require(p, "pretokenizers", key + ".pretokenizers");
      if (!list.is_array()) fail(key + ".pretokenizers", "not an array");
      for (size_t i = 0; i < list.size(); ++i)
        load_step(list[i], key + ".pretokenizers[" + std::to_string(i) + "]", byte_level, depth + 1);
    } else if (t == "ByteLevel") {
      Step s;
      s.kind = Step::Kind::byte_level;
      s.add_prefix_space = get_bool(p, "add_prefix_space", key + ".add_prefix_space", true);
      if (get_bool(p, "use_regex", key + ".use_regex", true))
        s.regex = std::make_shared<Regex>(gpt2_pattern, path_ + ": " + key);
      steps_.push_back(std::move(s));
      byte_level = true;
    } else if (t == "Split") {
      Step s;
      const json &pattern = require(p, "pattern", key + ".pattern");
      if (!pattern.is_object() || pattern.size() != 1)
        fail(key + ".pattern", "not {\"Regex\": ...} or {\"String\": ...}");
      if (pattern.contains("Regex") && pattern["Regex"].is_string()) {
        s.kind = Step::Kind::split_regex;
        s.regex = std::make_shared<Regex>(pattern["Regex"].get<std::string>(), path_ + ": " + key + ".pattern.Regex");
      } else if (pattern.contains("String") && pattern["String"].is_string() &&
                 !pattern["String"].get<std::string>().empty()) {
        s.kind = Step::Kind::split_string;
        s.literal = pattern["String"].get<std::string>();
      } else {
        fail(key + ".pattern", "not {\"Regex\": pattern} or {\"String\": non-empty string}");
      }
      const json &behavior = require(p, "behavior", key + ".behavior");
      if (behavior != "Isolated") fail(key + ".behavior", behavior.dump() + " is not supported (only \"Isolated\")");
      if (get_bool(p, "invert", key + ".invert", false)) fail(key + ".invert", "only false is supported");
      steps_.push_back(std::move(s));
    } else {
      fail(key + ".type", "'" + t + "' is not supported (ByteLevel, Split or Sequence)");
    }
  }

  void apply(const Step &step, std::string &piece, std::vector<std::string> &out) const {
    if (step.kind == Step::Kind::split_string) {
      std::vector<std::pair<size_t, size_t>> matches;
      for (size_t pos = piece.find(step.literal); pos != std::string::npos;
           pos = piece.find(step.literal, pos + step.literal.size()))
        matches.emplace_back(pos, pos + step.literal.size());
      split_isolated(piece, matches, out);
      return;
    }
    if (step.kind == Step::Kind::split_regex) {
      split_isolated(piece, step.regex->find_all(piece), out);
      return;
    }
    // ByteLevel: the optional prefix space, GPT-2's split, then each byte to its character.
    if (step.add_prefix_space && (piece.empty() || piece[0] != ' ')) piece.insert(0, 1, ' ');
    size_t first = out.size();
    if (step.regex)
      split_isolated(piece, step.regex->find_all(piece), out);
    else if (!piece.empty())
      out.push_back(piece);
    const auto &table = byte_table();
    for (size_t i = first; i < out.size(); ++i) {
      std::string mapped;
      mapped.reserve(out[i].size() * 2);
      for (char c : out[i]) mapped += table.byte_to_char[static_cast<unsigned char>(c)];
      out[i] = std::move(mapped);
    }
  }

  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  // The BPE model on one pre-token, as `tokenizers`' Word::merge_all (no dropout).
  void bpe(const std::string &word, std::vector<int32_t> &ids) const {
    if (word.empty()) return;
    if (ignore_merges_) {
      auto it = vocab_.find(word);
      if (it != vocab_.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    struct Symbol {
      int32_t id;
      ptrdiff_t prev, next;
      size_t len;
    };
    std::vector<Symbol> symbols;
    bool last_unk = false;
    for (size_t i = 0; i < word.size();) {
      size_t consumed = 0;
      size_t n = utf8_sequence(word, i, consumed);
      if (n == 0) n = 1; // cannot happen: pieces are valid UTF-8
      auto it = vocab_.find(word.substr(i, n));
      if (it != vocab_.end()) {
        symbols.push_back({it->second, 0, 0, n});
        last_unk = false;
      } else if (unk_id_) {
        if (fuse_unk_ && last_unk) {
          symbols.back().len += n;
        } else {
          symbols.push_back({*unk_id_, 0, 0, n});
        }
        last_unk = true;
      } else {
        throw runtime_error(path_ + ": cannot encode: the symbol " + json(word.substr(i, n)).dump() +
                            " is not in the vocab and the model has no unk_token");
      }
      i += n;
    }
    for (size_t i = 0; i < symbols.size(); ++i) {
      symbols[i].prev = static_cast<ptrdiff_t>(i) - 1;
      symbols[i].next = i + 1 < symbols.size() ? static_cast<ptrdiff_t>(i + 1) : -1;
    }
    struct Merge {
      size_t pos;
      uint32_t rank;
      int32_t new_id;
      bool operator<(const Merge &o) const { // priority_queue pops the largest: lowest rank, then leftmost
        return rank != o.rank ? rank > o.rank : pos > o.pos;
      }
    };
    std::priority_queue<Merge> queue;
    auto push = [&](size_t pos) {
      const Symbol &s = symbols[pos];
      if (s.next < 0) return;
      auto it = merges_.find(pair_key(s.id, symbols[static_cast<size_t>(s.next)].id));
      if (it != merges_.end()) queue.push({pos, it->second.first, it->second.second});
    };
    for (size_t i = 0; i + 1 < symbols.size(); ++i) push(i);
    while (!queue.empty()) {
      Merge top = queue.top();
      queue.pop();
      Symbol &s = symbols[top.pos];
      if (s.len == 0 || s.next < 0) continue;
      auto next_pos = static_cast<size_t>(s.next);
      Symbol &right = symbols[next_pos];
      auto it = merges_.find(pair_key(s.id, right.id));
      if (it == merges_.end() || it->second.second != top.new_id) continue;
      s.id = top.new_id;
      s.len += right.len;
      s.next = right.next;
      right.len = 0;
      if (s.next >= 0) symbols[static_cast<size_t>(s.next)].prev = static_cast<ptrdiff_t>(top.pos);
      if (s.prev >= 0) push(static_cast<size_t>(s.prev));
      push(top.pos);
    }
    for (ptrdiff_t i = 0; i >= 0; i = symbols[static_cast<size_t>(i)].next)
      ids.push_back(symbols[static_cast<size_t>(i)].id);
  }

  std::string path_;
  std::vector<int32_t> template_prefix_, template_suffix_; // the post-processor's single template
  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<int32_t, std::string> id_to_token_; // the vocab, then added tokens
  std::unordered_set<int32_t> special_ids_;              // added tokens marked "special"
  std::unordered_map<uint64_t, std::pair<uint32_t, int32_t>> merges_; // pair -> (rank, merged id)
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  AddedSet added_raw_;        // normalized=false: matched first, on the raw text
  AddedSet added_normalized_; // then these, on the normalized text
  bool nfc_ = false;          // the normalizer: NFC, or none
  std::vector<Step> steps_;
  int32_t vocab_size_ = 0;
};

} // namespace

std::unique_ptr<Tokenizer> make_bpe_tokenizer(const std::filesystem::path &file) {
  return std::make_unique<BpeTokenizer>(file);
}

std::unique_ptr<Tokenizer> make_bpe_tokenizer_from_json(std::string_view json_text, const std::string &name) {
  return std::make_unique<BpeTokenizer>(json_text, name);
}

} // namespace loom
