#include "regex_gbnf.hpp"

#include <cctype>
#include <cstdio>
#include <initializer_list>
#include <stdexcept>
#include <string_view>

namespace loom::server {

namespace {

// A character inside a GBNF class.
std::string class_char(unsigned char c) {
  if (c == ']' || c == '\\' || c == '-' || c == '^' || c == '[') return std::string("\\") + static_cast<char>(c);
  if (c < 0x20 || c == 0x7f) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "\\x%02X", c);
    return buf;
  }
  return std::string(1, static_cast<char>(c));
}

// Concatenation by appends (GCC 12 warns falsely, -Wrestrict, about "literal" + std::string).
std::string cat(std::initializer_list<std::string_view> parts) {
  std::string out;
  for (std::string_view part : parts) out.append(part);
  return out;
}

constexpr const char *kDigit = "0-9", *kWord = "a-zA-Z0-9_", *kSpace = " \\t\\n\\r\\x0C\\x0B";

class Converter {
 public:
  explicit Converter(const std::string &re) : re_(re) {}

  std::string convert() {
    if (at('^')) ++p_;
    std::string body = alternation();
    if (p_ < re_.size() && re_[p_] == '$' && p_ + 1 == re_.size()) ++p_;
    if (p_ < re_.size()) fail(re_[p_] == ')' ? "unbalanced ')'" : re_[p_] == '$' ? "'$' before the end" : "unexpected character");
    return cat({"root ::= ", body, "\n"});
  }

 private:
  const std::string &re_;
  size_t p_ = 0;
  int depth_ = 0;

  [[noreturn]] void fail(const std::string &why) const {
    throw std::invalid_argument("at offset " + std::to_string(p_) + ": " + why);
  }
  bool at(char c) const { return p_ < re_.size() && re_[p_] == c; }

  std::string alternation() {
    std::string out = sequence();
    bool several = false;
    while (at('|')) {
      ++p_;
      out += " | " + sequence();
      several = true;
    }
    return several ? cat({"( ", out, " )"}) : out;
  }

  std::string sequence() {
    std::string out;
    while (p_ < re_.size() && !at('|') && !at(')')) {
      if (at('$') && p_ + 1 == re_.size()) break; // the end anchor, taken by convert()
      std::string item = atom();
      item = quantified(item);
      if (!out.empty()) out += ' ';
      out += item;
    }
    return out.empty() ? "\"\"" : out;
  }

  std::string quantified(const std::string &item) {
    if (p_ >= re_.size()) return item;
    std::string q;
    const char c = re_[p_];
    if (c == '*' || c == '+' || c == '?') {
      q = std::string(1, c);
      ++p_;
    } else if (c == '{') {
      const size_t close = re_.find('}', p_);
      if (close == std::string::npos) fail("unclosed '{'");
      const std::string inside = re_.substr(p_ + 1, close - p_ - 1);
      const size_t comma = inside.find(',');
      const auto number = [&](const std::string &s) {
        if (s.empty() || s.size() > 4 || s.find_first_not_of("0123456789") != std::string::npos) fail(cat({"bad repetition '{", inside, "}'"}));
        return std::stoi(s);
      };
      const int lo = number(comma == std::string::npos ? inside : inside.substr(0, comma));
      if (lo > 1000) fail(cat({"repetition {", inside, "} repeats more than 1000 times"}));
      if (comma == std::string::npos) q = cat({"{", std::to_string(lo), "}"});
      else if (comma + 1 == inside.size()) q = cat({"{", std::to_string(lo), ",}"});
      else {
        const int hi = number(inside.substr(comma + 1));
        if (hi > 1000) fail(cat({"repetition {", inside, "} repeats more than 1000 times"}));
        if (hi < lo) fail(cat({"repetition {", inside, "} has its bounds the wrong way round"}));
        q = cat({"{", std::to_string(lo), ",", std::to_string(hi), "}"});
      }
      p_ = close + 1;
    } else {
      return item;
    }
    if (at('?')) ++p_; // lazy: the same strings
    else if (at('+')) fail("possessive quantifiers are not supported");
    if (p_ < re_.size() && (at('*') || at('+') || at('{'))) fail("a quantifier after a quantifier");
    return cat({"( ", item, " )", q});
  }

  std::string atom() {
    const char c = re_[p_];
    if (c == '(') {
      ++p_;
      if (at('?')) {
        if (p_ + 1 < re_.size() && re_[p_ + 1] == ':') p_ += 2;
        else fail("lookarounds and named groups are not supported");
      }
      if (++depth_ > 64) fail("groups nested more than 64 deep");
      std::string inner = alternation();
      --depth_;
      if (!at(')')) fail("unclosed '('");
      ++p_;
      return cat({"( ", inner, " )"});
    }
    if (c == '[') return char_class();
    if (c == '.') {
      ++p_;
      return "[^\\n]";
    }
    if (c == '*' || c == '+' || c == '?' || c == '{') fail("a quantifier with nothing to repeat");
    if (c == '^' || c == '$') fail("anchors are supported only at the very ends");
    if (c == '\\') return escape(false);
    // One UTF-8 character, as a literal.
    size_t n = 1;
    const auto b = static_cast<unsigned char>(c);
    if (b >= 0xF0) n = 4;
    else if (b >= 0xE0) n = 3;
    else if (b >= 0xC0) n = 2;
    if (p_ + n > re_.size()) fail("a UTF-8 character cut short");
    const std::string ch = re_.substr(p_, n);
    p_ += n;
    return gbnf_literal(ch);
  }

  // An escape at p_ ('\\'): a GBNF item (outside a class) or the class contents (inside one).
  std::string escape(bool in_class) {
    ++p_;
    if (p_ >= re_.size()) fail("a '\\' at the end");
    const char e = re_[p_++];
    const auto set = [&](const char *chars, bool negated) -> std::string {
      if (in_class) {
        if (negated) fail("\\D, \\W and \\S are not supported inside a class");
        return chars;
      }
      return cat({negated ? "[^" : "[", chars, "]"});
    };
    switch (e) {
      case 'd': return set(kDigit, false);
      case 'D': return set(kDigit, true);
      case 'w': return set(kWord, false);
      case 'W': return set(kWord, true);
      case 's': return set(kSpace, false);
      case 'S': return set(kSpace, true);
      case 'b': case 'B': case 'A': case 'Z': case 'z': case 'G': fail(std::string("'\\") + e + "' is not supported");
      default: break;
    }
    if (e >= '1' && e <= '9') fail("backreferences are not supported");
    char literal = e;
    if (e == 'n') literal = '\n';
    else if (e == 't') literal = '\t';
    else if (e == 'r') literal = '\r';
    else if (e == 'f') literal = '\f';
    else if (e == 'v') literal = '\v';
    else if (e == '0') literal = '\0';
    else if (std::isalnum(static_cast<unsigned char>(e))) fail(std::string("unknown escape '\\") + e + "'");
    return in_class ? class_char(static_cast<unsigned char>(literal)) : gbnf_literal(std::string(1, literal));
  }

  std::string char_class() {
    ++p_; // '['
    std::string out = "[";
    if (at('^')) {
      out += '^';
      ++p_;
    }
    bool first = true;
    // What the previous item was: a range may start only at a single character, and a '-' after
    // a set (\d, \w, \s) or a range's end is refused or literal as Python's re has it.
    enum class Prev { none, single, set, range_end } prev = Prev::none;
    bool in_range = false; // a '-' of a range was just written
    while (p_ < re_.size() && (first || !at(']'))) {
      first = false;
      if (at('\\')) {
        const bool set = p_ + 1 < re_.size() && std::string_view("dwsDWS").find(re_[p_ + 1]) != std::string_view::npos;
        if (set && in_range) fail("a range cannot end at \\d, \\w or \\s");
        out += escape(true);
        prev = set ? Prev::set : in_range ? Prev::range_end : Prev::single;
        in_range = false;
        continue;
      }
      if (at('[') && p_ + 1 < re_.size() && re_[p_ + 1] == ':') fail("POSIX classes ([:alpha:]) are not supported");
      const auto c = static_cast<unsigned char>(re_[p_]);
      const bool dash_inside = c == '-' && !in_range && p_ + 1 < re_.size() && re_[p_ + 1] != ']';
      if (dash_inside && prev == Prev::single) {
        out += '-'; // a range
        ++p_;
        in_range = true;
        continue;
      }
      if (dash_inside && prev == Prev::set) fail("a range cannot start at \\d, \\w or \\s");
      prev = in_range ? Prev::range_end : Prev::single;
      in_range = false;
      if (c >= 0x80) { // a UTF-8 character, as is
        size_t n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
        if (p_ + n > re_.size()) fail("a UTF-8 character cut short");
        out += re_.substr(p_, n);
        p_ += n;
        continue;
      }
      out += class_char(c);
      ++p_;
    }
    if (!at(']')) fail("unclosed '['");
    ++p_;
    return out + "]";
  }
};

} // namespace

std::string gbnf_literal(const std::string &s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string regex_to_gbnf(const std::string &regex) {
  if (regex.empty()) throw std::invalid_argument("the expression is empty");
  if (regex.size() > 4096) throw std::invalid_argument("the expression is longer than 4096 characters");
  return Converter(regex).convert();
}

} // namespace loom::server
