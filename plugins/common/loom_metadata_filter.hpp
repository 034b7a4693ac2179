// Metadata filters of retriever.h (loom_query.filter), parsed once for every retriever: bm25
// compiles the clauses to SQL, dense evaluates them on each document's metadata.
//
// Grammar (anything else is LOOM_ERR_UNSUPPORTED, never silently ignored):
//   filter  := clause ("&&" clause)*          (empty or blank: no filter)
//   clause  := field ("==" | "!=") string
//            | field ("==" | "!=" | "<" | "<=" | ">" | ">=") number
//   field   := [A-Za-z_][A-Za-z0-9_]* ("." [A-Za-z_][A-Za-z0-9_]*)*   (a path in the metadata)
//   string  := '"' chars with \" and \\ escapes '"'
//   number  := decimal with optional sign, fraction and exponent
// Semantics: a clause on a missing field is false for ==, <, <=, >, >= and true for != (!= is
// exactly the negation of ==); numeric clauses match only JSON numbers, string clauses only
// JSON strings.
//
// Header-only, for the builtin retrievers (needs nlohmann-json). Thread-safety: the parser
// is reentrant; a parsed filter is an immutable value.
#ifndef LOOM_PLUGINS_COMMON_METADATA_FILTER_HPP
#define LOOM_PLUGINS_COMMON_METADATA_FILTER_HPP

#include <cctype>
#include <charconv>
#include <cmath>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom_plugin_util.hpp"

namespace loomp::filter {

enum class Op { eq, ne, lt, le, gt, ge };

struct Clause {
  std::vector<std::string> path;             // "a.b" -> {"a", "b"}
  Op op = Op::eq;
  std::variant<std::string, double> value;   // strings only with eq/ne
};

namespace detail {

class Parser {
 public:
  Parser(const std::string& s, const std::string& who) : s_(s), who_(who) {}

  std::vector<Clause> parse() {
    std::vector<Clause> out;
    skip_ws();
    if (i_ == s_.size()) return out;
    for (;;) {
      out.push_back(clause());
      skip_ws();
      if (i_ == s_.size()) return out;
      if (s_.compare(i_, 2, "&&") != 0) unsupported_here("expected '&&' between comparisons (only conjunctions are supported)");
      i_ += 2;
    }
  }

 private:
  [[noreturn]] void unsupported_here(const std::string& what) {
    unsupported(who_ + ": unsupported filter syntax at offset " + std::to_string(i_) + " in '" + s_ + "': " + what);
  }
  void skip_ws() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  static bool ident_start(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_'; }
  static bool ident_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

  std::vector<std::string> field() {
    skip_ws();
    std::vector<std::string> parts;
    for (;;) {
      if (i_ >= s_.size() || !ident_start(s_[i_])) unsupported_here("expected a field name");
      std::string part;
      while (i_ < s_.size() && ident_char(s_[i_])) part += s_[i_++];
      parts.push_back(std::move(part));
      if (i_ < s_.size() && s_[i_] == '.') {
        ++i_;
        continue;
      }
      return parts;
    }
  }
  Op op() {
    skip_ws();
    static const std::pair<const char*, Op> kOps[] = {{"==", Op::eq}, {"!=", Op::ne}, {"<=", Op::le},
                                                      {">=", Op::ge}, {"<", Op::lt},  {">", Op::gt}};
    for (const auto& [text, o] : kOps) {
      const std::string t(text);
      if (s_.compare(i_, t.size(), t) == 0) {
        i_ += t.size();
        return o;
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
    const char* b = s_.data() + start + (start < s_.size() && s_[start] == '+' ? 1 : 0);
    double v = 0;
    const auto [p, ec] = std::from_chars(b, s_.data() + i_, v);
    if (ec != std::errc() || p != s_.data() + i_ || !std::isfinite(v)) {
      i_ = start;
      unsupported_here("expected a string in double quotes or a finite number");
    }
    return v;
  }
  Clause clause() {
    Clause c;
    c.path = field();
    c.op = op();
    skip_ws();
    if (i_ < s_.size() && s_[i_] == '"') {
      if (c.op != Op::eq && c.op != Op::ne) unsupported_here("strings compare only with == and !=");
      c.value = string_literal();
    } else {
      c.value = number();
    }
    return c;
  }

  const std::string& s_;
  const std::string& who_;
  size_t i_ = 0;
};

}  // namespace detail

// Throws loomp::Fail(LOOM_ERR_UNSUPPORTED) naming `who` (the component), the offset and what
// was expected.
inline std::vector<Clause> parse(const std::string& filter, const std::string& who) {
  return detail::Parser(filter, who).parse();
}

// Whether `metadata` (a JSON object, or null for a document without metadata) satisfies every
// clause.
inline bool matches(const std::vector<Clause>& clauses, const nlohmann::json& metadata) {
  for (const Clause& c : clauses) {
    const nlohmann::json* v = &metadata;
    for (const auto& part : c.path) {
      if (!v->is_object()) {
        v = nullptr;
        break;
      }
      const auto it = v->find(part);
      if (it == v->end()) {
        v = nullptr;
        break;
      }
      v = &*it;
    }
    bool equal_or_cmp = false;  // the clause's relation, as == / < ... (before != negates ==)
    if (const auto* s = std::get_if<std::string>(&c.value)) {
      equal_or_cmp = v != nullptr && v->is_string() && v->get_ref<const std::string&>() == *s;
    } else if (v != nullptr && v->is_number()) {
      const double x = v->get<double>(), y = std::get<double>(c.value);
      switch (c.op) {
        case Op::eq: case Op::ne: equal_or_cmp = x == y; break;
        case Op::lt: equal_or_cmp = x < y; break;
        case Op::le: equal_or_cmp = x <= y; break;
        case Op::gt: equal_or_cmp = x > y; break;
        case Op::ge: equal_or_cmp = x >= y; break;
      }
    }
    if ((c.op == Op::ne) == equal_or_cmp) return false;
  }
  return true;
}

}  // namespace loomp::filter

#endif
