// Recursive-descent evaluator; see evaluator.hpp for the grammar and the limits.
#include "evaluator.hpp"

#include <charconv>
#include <cctype>
#include <cmath>
#include <numbers>

namespace loomp::calc {
namespace {

class Parser {
 public:
  explicit Parser(std::string_view s) : s_(s) {}

  double run() {
    const double v = expr();
    skip_ws();
    if (i_ != s_.size()) error("unexpected '" + std::string(1, s_[i_]) + "'");
    return v;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    throw EvalError(what + " at position " + std::to_string(i_));
  }
  // Every recursive cycle of the grammar passes through expr() or unary(); counting depth
  // there bounds the C++ stack no matter how the input nests.
  struct Depth {
    explicit Depth(Parser& p) : p_(p) {
      if (++p_.depth_ > kMaxDepth) p_.error("expression nested deeper than " + std::to_string(kMaxDepth) + " levels");
    }
    ~Depth() { --p_.depth_; }
    Parser& p_;
  };

  static double finite(double v, const char* what) {
    if (!std::isfinite(v)) throw EvalError(std::string(what) + " gives a non-finite result");
    return v;
  }
  void skip_ws() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool eat(char c) {
    skip_ws();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }

  double expr() {
    Depth d(*this);
    double v = term();
    for (;;) {
      if (eat('+')) v = finite(v + term(), "addition");
      else if (eat('-')) v = finite(v - term(), "subtraction");
      else return v;
    }
  }
  double term() {
    double v = unary();
    for (;;) {
      if (eat('*')) {
        v = finite(v * unary(), "multiplication");
      } else if (eat('/')) {
        const double r = unary();
        if (r == 0.0) error("division by zero");
        v = finite(v / r, "division");
      } else if (eat('%')) {
        const double r = unary();
        if (r == 0.0) error("modulo by zero");
        v = finite(std::fmod(v, r), "modulo");
      } else {
        return v;
      }
    }
  }
  double unary() {
    Depth d(*this);
    if (eat('-')) return -unary();
    if (eat('+')) return unary();
    return power();
  }
  double power() {
    const double base = primary();
    if (eat('^')) return finite(std::pow(base, unary()), "power");
    return base;
  }
  double primary() {
    skip_ws();
    if (i_ >= s_.size()) error("unexpected end of expression");
    const char c = s_[i_];
    if (c == '(') {
      ++i_;
      const double v = expr();
      if (!eat(')')) error("expected ')'");
      return v;
    }
    if (std::isdigit(static_cast<unsigned char>(c)) || c == '.') return number();
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') return name();
    error("unexpected '" + std::string(1, c) + "'");
  }
  double number() {
    const size_t start = i_;
    while (i_ < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[i_])) || s_[i_] == '.')) ++i_;
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      size_t j = i_ + 1;
      if (j < s_.size() && (s_[j] == '+' || s_[j] == '-')) ++j;
      if (j < s_.size() && std::isdigit(static_cast<unsigned char>(s_[j]))) {
        i_ = j;
        while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
      }
    }
    double v = 0;
    const auto [p, ec] = std::from_chars(s_.data() + start, s_.data() + i_, v);
    if (ec != std::errc() || p != s_.data() + i_) {
      i_ = start;
      error("malformed number");
    }
    return finite(v, "number");
  }
  double name() {
    const size_t start = i_;
    while (i_ < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[i_])) || s_[i_] == '_')) ++i_;
    const std::string id(s_.substr(start, i_ - start));
    if (id == "pi") return std::numbers::pi;
    if (id == "e") return std::numbers::e;
    using F1 = double (*)(double);
    static const struct { const char* name; F1 f; } kOne[] = {
        {"sqrt", [](double x) { return std::sqrt(x); }},   {"abs", [](double x) { return std::fabs(x); }},
        {"ln", [](double x) { return std::log(x); }},      {"log10", [](double x) { return std::log10(x); }},
        {"exp", [](double x) { return std::exp(x); }},     {"sin", [](double x) { return std::sin(x); }},
        {"cos", [](double x) { return std::cos(x); }},     {"tan", [](double x) { return std::tan(x); }},
        {"floor", [](double x) { return std::floor(x); }}, {"ceil", [](double x) { return std::ceil(x); }},
    };
    for (const auto& f : kOne)
      if (id == f.name) {
        if (!eat('(')) error("expected '(' after " + id);
        const double x = expr();
        if (!eat(')')) error(id + " takes one argument; expected ')'");
        if ((id == "sqrt" && x < 0) || ((id == "ln" || id == "log10") && x <= 0))
          error(id + " of " + format_number(x) + " is undefined");
        return finite(f.f(x), id.c_str());
      }
    if (id == "min" || id == "max") {
      if (!eat('(')) error("expected '(' after " + id);
      const double a = expr();
      if (!eat(',')) error(id + " takes two arguments; expected ','");
      const double b = expr();
      if (!eat(')')) error(id + " takes two arguments; expected ')'");
      return id == "min" ? std::fmin(a, b) : std::fmax(a, b);
    }
    i_ = start;
    error("unknown identifier '" + id + "'");
  }

  std::string_view s_;
  size_t i_ = 0;
  int depth_ = 0;
};

}  // namespace

double evaluate(std::string_view expr) {
  if (expr.size() > kMaxInputLength)
    throw EvalError("expression longer than " + std::to_string(kMaxInputLength) + " characters");
  return Parser(expr).run();
}

std::string format_number(double v) {
  if (v == 0.0) v = 0.0;  // print -0 as 0
  char buf[64];
  const auto [p, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  if (ec != std::errc()) return "nan";
  return std::string(buf, p);
}

}  // namespace loomp::calc
