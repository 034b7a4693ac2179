// Process-wide caches, so that sampler instances on the same grammar and model share the work:
// compiled grammars by the hash of their text (GBNF, or a JSON schema), vocabulary tries by
// their content, and the token tables of each (grammar, vocabulary) pair.
#ifndef LOOM_PLUGINS_GRAMMAR_SHARED_CACHE_HPP
#define LOOM_PLUGINS_GRAMMAR_SHARED_CACHE_HPP

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gbnf.hpp"
#include "token_index.hpp"
#include "token_tables.hpp"

namespace loomp::grammar {

struct Compiled {
  Grammar g;
  Matcher m;
  explicit Compiled(Grammar gr) : g(std::move(gr)), m(g) {}
  Compiled(const Compiled&) = delete;
  Compiled& operator=(const Compiled&) = delete;
};

// The grammar of GBNF text (schema == false) or of a JSON schema. Throws GrammarError.
std::shared_ptr<const Compiled> compiled(const std::string& text, bool schema);
// The trie of a vocabulary (see TokenIndex's constructor for the arguments).
std::shared_ptr<const TokenIndex> vocabulary(std::vector<std::string> texts, std::vector<char> has_text,
                                             std::vector<int32_t> ends);
// The token tables of a grammar over a vocabulary, built on first use (tens of milliseconds
// for a JSON schema over a 128k vocabulary).
std::shared_ptr<const TokenTables> tables(const std::shared_ptr<const Compiled>& c,
                                          const std::shared_ptr<const TokenIndex>& vocab);

}  // namespace loomp::grammar

#endif
