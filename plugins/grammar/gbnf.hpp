// GBNF grammars (llama.cpp's dialect), a pushdown matcher over UTF-8, and the JSON-schema ->
// GBNF compiler. Plain C++ with no plugin-API dependency so tests and fuzzers link it directly.
//
// Dialect: rules `name ::= alternatives`, one per line (newlines are allowed after `::=`, after
// `|` and anywhere inside parentheses); names [A-Za-z0-9_-]+; "literals" and [character classes]
// ([^...] negated, ranges a-z) with escapes \n \r \t \\ \" \' \[ \] \- \^ \xHH \uHHHH \UHHHHHHHH;
// `.` (any code point); ( grouping ); postfix * + ? {m} {m,} {m,n}; `#` comments to end of line;
// `root` is the start rule. Left recursion (direct or through nullable prefixes) is refused with
// an error naming the rule; rewrite it as repetition.
#ifndef LOOM_PLUGINS_GRAMMAR_GBNF_HPP
#define LOOM_PLUGINS_GRAMMAR_GBNF_HPP

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace loomp::grammar {

// Parse/compile failure; what() is the full message ("grammar:3:14: expected '::='").
struct GrammarError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Limits {
  size_t max_text = 1u << 20;        // bytes of grammar or schema text
  size_t max_elements = 1u << 20;    // grammar elements after expanding repetitions
  size_t max_rules = 1u << 16;
  int max_nesting = 64;              // ( ) nesting in GBNF; object/array nesting in schemas
  uint32_t max_repeat = 1000;        // m and n of {m,n}
  size_t max_stacks = 4096;          // live matcher stacks
  size_t max_stack_depth = 4096;     // pushdown depth of one stack
};

struct Elem {
  enum Kind : uint8_t { END, CHARS, REF };
  Kind kind = END;
  bool negated = false;
  uint32_t ref = 0;     // REF: rule index
  uint32_t rfirst = 0;  // CHARS: ranges[rfirst, rfirst + rcount)
  uint32_t rcount = 0;
};

struct Grammar {
  std::vector<std::string> names;             // rule index -> name
  std::vector<std::vector<uint32_t>> alts;    // rule index -> start element of each alternative
  std::vector<Elem> elems;                    // alternatives, each closed by an END element
  std::vector<std::pair<uint32_t, uint32_t>> ranges;  // inclusive code-point ranges
  uint32_t root = 0;

  // Counted repetitions of a rule (x{m,n}, x+, x{m,}; x a rule or a parenthesized group): each
  // copy of x is a clone of x's rule and of the rules only x's rule uses, so that every copy is
  // referenced from one place and its elements' chains (element_frames.hpp) reach past the
  // repetition. Listed only for x that never matches the empty string: then copies of one
  // repetition whose counts of copies still required and allowed after them agree up to the
  // longest token accept the same tokens, and share their tables (token_tables.hpp).
  struct Copy {
    enum Kind : uint8_t { REQUIRED, OPTIONAL, STAR };  // x{m,n}: m required, n - m optional; x{m,}: one star
    uint32_t family = 0;   // which repetition
    Kind kind = REQUIRED;
    uint32_t min_after = 0, max_after = 0;  // copies still required / allowed after this one (UINT32_MAX: any)
    std::vector<uint32_t> elems;            // its elements, in the same order in every copy of the family
  };
  std::vector<Copy> copies;

  bool matches(const Elem& e, uint32_t cp) const;
  // True when some code point in [lo, hi] matches e.
  bool intersects(const Elem& e, uint32_t lo, uint32_t hi) const;
  // True when a pending UTF-8 sequence (the bits `cp` of its first `len` bytes, `need` bytes
  // still to come) can still become a code point that matches e. Only valid UTF-8 counts: no
  // overlong form, surrogate or code point past U+10FFFF, so that a token starting a sequence
  // nothing can complete (F0 80, ED A0, F4 90) is refused instead of leading to a dead end.
  bool may_match_pending(const Elem& e, uint32_t cp, uint8_t need, uint8_t len) const;
};

// Parses GBNF text. Throws GrammarError "grammar:LINE:COL: message".
Grammar parse_gbnf(std::string_view text, const Limits& limits = {});

// Compiles a JSON schema (JSON text) to GBNF text. Throws GrammarError "json-schema: ...".
std::string schema_to_gbnf(std::string_view schema_json, const Limits& limits = {});

// ---- UTF-8, as the matchers read it ----
// Continuation bytes a lead byte announces; 0 for a byte that cannot start a sequence.
inline uint8_t utf8_need(uint8_t lead) {
  return lead >= 0xF0 && lead <= 0xF4 ? 3 : lead >= 0xE0 && lead <= 0xEF ? 2 : lead >= 0xC2 && lead <= 0xDF ? 1 : 0;
}
// The smallest code point a sequence of `len` bytes may encode (anything smaller is overlong).
inline uint32_t utf8_min(uint32_t len) { return len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000; }
// Whether cp, decoded from a complete sequence of len bytes, is valid: not overlong, not a
// surrogate, at most U+10FFFF.
inline bool utf8_valid(uint32_t cp, uint32_t len) {
  return cp >= utf8_min(len) && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF);
}

// ---- matcher ----
// The plain reference matcher: a set of explicit stacks, advanced one byte at a time. The masks
// use StepCache (step_cache.hpp), a memoized equivalent that tests compare against this one.
using Stack = std::vector<uint32_t>;  // element indices; back() is the next CHARS to match

// A matcher state: the set of live stacks (sorted, unique; an empty stack = may complete here)
// plus the bytes of an incomplete UTF-8 sequence at the end of the input so far.
struct State {
  std::vector<Stack> stacks;
  uint32_t partial_cp = 0;  // bits decoded so far
  uint8_t partial_need = 0; // continuation bytes still missing (0 = none pending)
  uint8_t partial_len = 0;  // bytes consumed of the pending sequence
  bool dead() const { return stacks.empty(); }
  bool can_complete() const;
};

class Matcher {
 public:
  explicit Matcher(const Grammar& g, const Limits& limits = {});
  State initial() const;
  // Advances by one byte; returns false (and leaves `out` dead) when the byte is not accepted.
  bool advance_byte(const State& in, uint8_t b, State& out) const;
  // Advances by a string; false when not a valid continuation.
  bool advance(State& s, std::string_view bytes) const;
  // Whether `bytes` may follow the state (a prefix of some sentence of the grammar).
  bool accepts(const State& s, std::string_view bytes) const {
    State t = s;
    return advance(t, bytes);
  }
  const Grammar& grammar() const { return *g_; }
  const Limits& limits() const { return lim_; }

 private:
  void expand(Stack s, std::vector<Stack>& out) const;
  void advance_cp(const std::vector<Stack>& in, uint32_t cp, std::vector<Stack>& out) const;
  bool partial_ok(const State& s) const;
  const Grammar* g_;
  Limits lim_;
};

}  // namespace loomp::grammar

#endif
