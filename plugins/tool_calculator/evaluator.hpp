// A safe arithmetic evaluator for the calculator tool: recursive descent over a fixed grammar,
// no dynamic code, bounded input length and bounded nesting so hostile input cannot crash the
// process (stack overflow) or run long.
//
//   expr    := term (("+" | "-") term)*
//   term    := unary (("*" | "/" | "%") unary)*
//   unary   := ("-" | "+") unary | power
//   power   := primary ("^" unary)?           right-associative: 2^3^2 = 2^9; -2^2 = -4
//   primary := number | constant | function "(" args ")" | "(" expr ")"
//   functions: sqrt abs ln log10 exp sin cos tan floor ceil (one argument), min max (two)
//   constants: pi e
#ifndef LOOM_PLUGINS_CALCULATOR_EVALUATOR_HPP
#define LOOM_PLUGINS_CALCULATOR_EVALUATOR_HPP

#include <cstddef>
#include <stdexcept>
#include <string>
#include <string_view>

namespace loomp::calc {

inline constexpr std::size_t kMaxInputLength = 4096;
inline constexpr int kMaxDepth = 64;

// The expression is wrong (syntax, division by zero, non-finite result, unknown name): the
// message is for the model that wrote it.
class EvalError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Evaluates `expr`; throws EvalError.
double evaluate(std::string_view expr);

// Shortest decimal text that reads back as the same double ("0.1", "4", "1e+21").
std::string format_number(double v);

}  // namespace loomp::calc

#endif
