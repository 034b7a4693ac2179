#include "toml_guard.hpp"

#include <cstdio>

namespace loom::detail {

bool tomlpp_whitespace_predicate_undefined(char32_t c) {
  // Mirrors the structure of toml++ 3.3.0's generated predicate: a first-level bitmask over
  // 64 blocks of 0x3FA code points, explicit answers for three code points, then a switch that
  // handles blocks 5 and 7 only. Code points of the other blocks that pass the mask reach
  // TOML_UNREACHABLE.
  if (c < 0xA0 || c > 0xFEFF) return false;
  const uint64_t block = (static_cast<uint64_t>(c) - 0xA0u) / 0x3FAu;
  if ((uint64_t{1} << block) & 0x7FFFFFFFFFFFF75Eull) return false;
  if (c == 0xA0 || c == 0x3000 || c == 0xFEFF) return false;
  return block != 5 && block != 7;
}

namespace {

class Scanner {
 public:
  explicit Scanner(std::string_view text) : text_(text) {}

  std::optional<TomlHazard> run() {
    enum class State { normal, comment, basic, literal, ml_basic, ml_literal } state = State::normal;
    while (pos_ < text_.size()) {
      char ch = text_[pos_];
      switch (state) {
      case State::normal:
        if (ch == '#') {
          state = State::comment;
        } else if ((ch == '"' || ch == '\'') && !bare_token_character(pos_ > 0 ? text_[pos_ - 1] : '\n')) {
          // (A quote right after a bare token's character, 5' or abc", opens no string for
          // toml++: it scans a bare value on to the next value terminator, asking its whitespace
          // predicate about every character on the way (found by manifest_fuzz: 5'...U+FE7F in a
          // --set value), so the scan stays outside strings.)
          bool multi = text_.substr(pos_, 3) == std::string_view(ch == '"' ? "\"\"\"" : "'''");
          state = ch == '"' ? (multi ? State::ml_basic : State::basic) : (multi ? State::ml_literal : State::literal);
          if (multi) {
            advance(2);
          }
        } else if (static_cast<unsigned char>(ch) >= 0x80) {
          if (auto h = check_code_point("a non-ASCII character outside a string or comment")) return h;
          continue; // check_code_point advanced past it
        }
        break;
      case State::comment:
        if (ch == '\n') state = State::normal;
        break;
      case State::basic:
        if (ch == '\\') {
          advance(1); // the escaped character
        } else if (ch == '"' || ch == '\n') {
          state = State::normal;
        }
        break;
      case State::literal:
        if (ch == '\'' || ch == '\n') state = State::normal;
        break;
      case State::ml_basic:
        if (ch == '\\') {
          advance(1);
          size_t ws = pos_;
          while (ws < text_.size() && (text_[ws] == ' ' || text_[ws] == '\t' || text_[ws] == '\r' || text_[ws] == '\n')) ++ws;
          while (pos_ < ws) advance(1);
          if (pos_ < text_.size() && static_cast<unsigned char>(text_[pos_]) >= 0x80) {
            if (auto h = check_code_point("a non-ASCII character after a backslash in a multi-line string")) return h;
            continue;
          }
          continue; // the escaped ASCII character is looked at by the next iteration
        } else if (text_.substr(pos_, 3) == "\"\"\"") {
          // Up to two quotes may precede the closing delimiter: consume the whole run.
          while (pos_ < text_.size() && text_[pos_] == '"') advance(1);
          state = State::normal;
          continue;
        }
        break;
      case State::ml_literal:
        if (text_.substr(pos_, 3) == "'''") {
          while (pos_ < text_.size() && text_[pos_] == '\'') advance(1);
          state = State::normal;
          continue;
        }
        break;
      }
      advance(1);
    }
    return std::nullopt;
  }

 private:
  // A character of a bare key or value (not a separator, bracket, whitespace or line start).
  static bool bare_token_character(char c) {
    return std::string_view(" \t\r\n=[]{},.#").find(c) == std::string_view::npos;
  }
  // Decodes the UTF-8 sequence at pos_ and moves past it; malformed sequences are left to
  // toml++'s own (well-defined) UTF-8 errors.
  std::optional<TomlHazard> check_code_point(const char *what) {
    auto byte = [&](size_t i) { return static_cast<unsigned char>(text_[i]); };
    unsigned char lead = byte(pos_);
    size_t len = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    char32_t c = len == 1 ? lead : len == 2 ? (lead & 0x1Fu) : len == 3 ? (lead & 0x0Fu) : (lead & 0x07u);
    bool valid = len > 1 && pos_ + len <= text_.size();
    for (size_t i = 1; valid && i < len; ++i) {
      if ((byte(pos_ + i) & 0xC0u) != 0x80u) valid = false;
      c = (c << 6) | (byte(pos_ + i) & 0x3Fu);
    }
    if (valid && tomlpp_whitespace_predicate_undefined(c)) {
      char code[16];
      std::snprintf(code, sizeof code, "U+%04X", static_cast<unsigned>(c));
      return TomlHazard{line_, column_, std::string(what) + " (" + code + ")"};
    }
    advance(valid ? len : 1);
    return std::nullopt;
  }

  void advance(size_t n) {
    for (size_t i = 0; i < n && pos_ < text_.size(); ++i, ++pos_) {
      unsigned char b = static_cast<unsigned char>(text_[pos_]);
      if (b == '\n') {
        ++line_;
        column_ = 1;
      } else if ((b & 0xC0u) != 0x80u) {
        ++column_; // columns count code points
      }
    }
  }

  std::string_view text_;
  size_t pos_ = 0;
  uint32_t line_ = 1, column_ = 1;
};

} // namespace

std::optional<TomlHazard> find_toml_hazard(std::string_view text) { return Scanner(text).run(); }

} // namespace loom::detail
