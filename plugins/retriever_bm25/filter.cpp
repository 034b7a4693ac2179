// Filter expression -> SQL fragment. User text only ever reaches SQLite as bound parameters;
// the fragment is assembled from fixed templates.
#include "filter.hpp"

#include <cctype>
#include <charconv>
#include <cmath>

#include "loom/abi.h"
#include "loom_plugin_util.hpp"

namespace loomp::bm25 {
namespace {

class Parser {
 public:
  explicit Parser(const std::string& s) : s_(s) {}

  CompiledFilter parse() {
    CompiledFilter out;
    skip_ws();
    if (i_ == s_.size()) {
      out.sql.push_back('1');  // (not = "1": GCC 12 -O3 warns falsely, PR 105329)
      return out;
    }
    for (;;) {
      clause(out);
      skip_ws();
      if (i_ == s_.size()) break;
      if (s_.compare(i_, 2, "&&") != 0) unsupported_here("expected '&&' between comparisons (only conjunctions are supported)");
      i_ += 2;
      out.sql += " AND ";
    }
    return out;
  }

 private:
  [[noreturn]] void unsupported_here(const std::string& what) {
    unsupported("bm25: unsupported filter syntax at offset " + std::to_string(i_) + " in '" + s_ + "': " + what);
  }
  void skip_ws() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  static bool ident_start(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_'; }
  static bool ident_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

  std::string field() {
    skip_ws();
    std::string f;
    for (;;) {
      if (i_ >= s_.size() || !ident_start(s_[i_])) unsupported_here("expected a field name");
      while (i_ < s_.size() && ident_char(s_[i_])) f += s_[i_++];
      if (i_ < s_.size() && s_[i_] == '.') {
        f += s_[i_++];
        continue;
      }
      return f;
    }
  }
  std::string op() {
    skip_ws();
    for (const char* o : {"==", "!=", "<=", ">=", "<", ">"}) {
      const std::string os(o);
      if (s_.compare(i_, os.size(), os) == 0) {
        i_ += os.size();
        return os;
      }
    }
    unsupported_here("expected one of == != < <= > >=");
  }
  std::string string_literal() {
    ++i_;  // opening quote
    std::string v;
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\') {
        if (i_ + 1 >= s_.size() || (s_[i_ + 1] != '"' && s_[i_ + 1] != '\\'))
          unsupported_here("only \\\" and \\\\ escapes are supported in strings");
        ++i_;
      }
      v += s_[i_++];
    }
    if (i_ >= s_.size()) unsupported_here("unterminated string");
    ++i_;  // closing quote
    return v;
  }
  double number() {
    const size_t start = i_;
    if (i_ < s_.size() && (s_[i_] == '-' || s_[i_] == '+')) ++i_;
    while (i_ < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[i_])) || s_[i_] == '.' || s_[i_] == 'e' ||
                              s_[i_] == 'E' || ((s_[i_] == '-' || s_[i_] == '+') && (s_[i_ - 1] == 'e' || s_[i_ - 1] == 'E'))))
      ++i_;
    const char* b = s_.data() + start + (s_[start] == '+' ? 1 : 0);
    double v = 0;
    const auto [p, ec] = std::from_chars(b, s_.data() + i_, v);
    if (ec != std::errc() || p != s_.data() + i_ || !std::isfinite(v)) {
      i_ = start;
      unsupported_here("expected a string in double quotes or a finite number");
    }
    return v;
  }

  void clause(CompiledFilter& out) {
    const std::string path = "$." + field();
    const std::string o = op();
    skip_ws();
    if (i_ < s_.size() && s_[i_] == '"') {
      if (o != "==" && o != "!=") unsupported_here("strings compare only with == and !=");
      const std::string v = string_literal();
      const std::string eq = "coalesce((json_type(metadata, ?) = 'text' AND json_extract(metadata, ?) = ?), 0)";
      out.sql += o == "==" ? eq : "NOT " + eq;
      out.binds.insert(out.binds.end(), {path, path, v});
      return;
    }
    const double v = number();
    const std::string cmp = o == "!=" ? "=" : o == "==" ? "=" : o;
    const std::string frag = "coalesce((json_type(metadata, ?) IN ('integer', 'real') AND json_extract(metadata, ?) " +
                             cmp + " ?), 0)";
    out.sql += o == "!=" ? "NOT " + frag : frag;
    out.binds.insert(out.binds.end(), {path, path, v});
  }

  const std::string& s_;
  size_t i_ = 0;
};

}  // namespace

CompiledFilter compile_filter(const std::string& filter) { return Parser(filter).parse(); }

}  // namespace loomp::bm25
