// libFuzzer target for libloom-grammar's front ends. The first byte selects: even -> the bytes
// after it are GBNF text; odd -> they are a JSON schema, compiled to GBNF and parsed. A grammar
// that parses is then run by the matcher over a few fixed strings and over the input itself,
// and its start state masked over a small vocabulary trie.
// Any input must end in a grammar or a GrammarError, never a crash, a hang or another exception.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "gbnf.hpp"

using namespace loomp::grammar;

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
      (void)s.key();
    }
    State s = start;
    (void)m.advance(s, std::string_view(text).substr(0, 256));
    // The trie walk over a small fixed vocabulary, from the start state.
    static const TokenIndex idx({"a", "{", "}", "\"", " ", "1", "ab", "\xC3", "\xA9", "\xC3\xA9", "null", "\\u", ""},
                                {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0}, {12});
    std::vector<uint64_t> mask;
    idx.mask(m, start, mask);
  } catch (const GrammarError &) {
  }
  return 0;
}
