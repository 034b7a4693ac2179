// libFuzzer target for libloom-grammar. The first byte selects: even -> the bytes after it are
// GBNF text; odd -> they are a JSON schema, compiled to GBNF and parsed. A grammar that parses
// is then run by the matcher over a few fixed strings, and walked over a small vocabulary
// (tokens chosen by the input's bytes) with every mask computed by the fast path (token tables,
// step cache) and compared with the per-token reference (Matcher::accepts).
// Any input must end in a grammar or a GrammarError, never a crash, a hang, another exception
// or a mask that differs from the reference.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gbnf.hpp"
#include "masker.hpp"
#include "token_index.hpp"
#include "token_tables.hpp"

using namespace loomp::grammar;

namespace {

const std::shared_ptr<const TokenIndex>& vocab() {
  static const auto v = std::make_shared<const TokenIndex>(
      std::vector<std::string>{"a", "{", "}", "\"", " ", "1", "ab", "\xC3", "\xA9", "\xC3\xA9", "null", "\\u", "",
                               "\xE6\x97", "\xA5", "\xF0\x9F", "\x98\x80", "\"}", "\", \"", "a\"", "\xED\xA0", "<eos>"},
      std::vector<char>{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0}, std::vector<int32_t>{21});
  return v;
}

// The fast mask of s checked against every token on its own (a difference is a bug); returns
// the allowed tokens with text, or nothing where the reference hits the matcher's limits.
std::vector<int32_t> check(Masker& masker, const Matcher& m, const State& s) {
  std::vector<char> slow(vocab()->size());
  try {
    for (size_t i = 0; i < slow.size(); ++i) {
      const auto id = static_cast<int32_t>(i);
      slow[i] = vocab()->is_end(id) ? s.can_complete()
                                    : vocab()->has_text(id) && !vocab()->text(id).empty() && m.accepts(s, vocab()->text(id));
    }
  } catch (const GrammarError&) {
    return {};
  }
  const auto fast = masker.mask(s);
  std::vector<int32_t> allowed;
  for (size_t i = 0; i < slow.size(); ++i) {
    if (((fast[i >> 6] >> (i & 63)) & 1) != static_cast<uint64_t>(slow[i])) __builtin_trap();
    if (slow[i] && !vocab()->is_end(static_cast<int32_t>(i))) allowed.push_back(static_cast<int32_t>(i));
  }
  return allowed;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size == 0) return 0;
  const std::string text(reinterpret_cast<const char *>(data + 1), size - 1);
  Limits lim;
  lim.max_text = 64 * 1024;
  lim.max_elements = 64 * 1024;
  lim.max_stacks = 256;
  lim.max_stack_depth = 512;
  try {
    const std::string gbnf = (data[0] & 1) ? schema_to_gbnf(text, lim) : text;
    Grammar g = parse_gbnf(gbnf, lim);
    Matcher m(g, lim);
    const State start = m.initial();
    (void)start.can_complete();
    for (const char *probe : {"a", "{\"a\": 1}", "[1, \"x\"]", "true", "\xC3\xA9", "\xE6\x97"}) {
      State s = start;
      (void)m.advance(s, probe);
      (void)s.can_complete();
    }
    // A walk of allowed tokens, each chosen by a byte of the input, checking every mask.
    Masker masker(std::make_shared<const TokenTables>(m, vocab()));
    State s = start;
    for (size_t step = 0; step < 24; ++step) {
      const std::vector<int32_t> allowed = check(masker, m, s);
      if (allowed.empty()) break;
      const int32_t t = allowed[data[(step * 7) % size] % allowed.size()];
      if (!m.advance(s, vocab()->text(t))) __builtin_trap();
    }
  } catch (const GrammarError &) {
  }
  return 0;
}
