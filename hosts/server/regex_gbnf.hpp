// Regular expressions as GBNF grammars (the grammar sampler's dialect, llama.cpp's), for vLLM's
// `guided_regex`: the whole reply must match the expression. Supported: literals and escapes
// (\n \t \r \f \v \. \\ ...), \d \D \w \W \s \S, `.` (any character but a newline), classes
// [a-z_] and [^...] (with \d \w \s inside), groups ( ) and (?: ), alternation, the quantifiers
// * + ? {m} {m,} {m,n} (lazy forms match the same language), and ^ / $ at the very ends. Refused
// with std::invalid_argument naming the position: backreferences, lookarounds, word boundaries,
// anchors elsewhere, unbalanced groups or classes.
//
// Thread-safety: pure functions.
#pragma once

#include <string>

namespace loom::server {

// A GBNF string literal that matches `s` exactly.
std::string gbnf_literal(const std::string &s);
// A grammar whose `root` matches exactly the strings `regex` matches.
std::string regex_to_gbnf(const std::string &regex);

} // namespace loom::server
