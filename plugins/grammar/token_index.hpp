// The vocabulary: token texts, and a byte trie over them (values: token ids), so that a mask
// walks prefixes shared by many tokens once and stops below the first byte a grammar refuses.
#ifndef LOOM_PLUGINS_GRAMMAR_TOKEN_INDEX_HPP
#define LOOM_PLUGINS_GRAMMAR_TOKEN_INDEX_HPP

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "byte_trie.hpp"

namespace loomp::grammar {

class TokenIndex {
 public:
  // texts[i]: the bytes of token i; has_text[i] == 0: token i is never allowed (no text, or
  // empty text); ends: the end-of-generation ids, allowed exactly when the state can complete
  // (they are left out of the trie).
  TokenIndex(std::vector<std::string> texts, std::vector<char> has_text, std::vector<int32_t> ends);

  size_t size() const { return texts_.size(); }
  const std::string& text(int32_t id) const { return texts_[static_cast<size_t>(id)]; }
  bool has_text(int32_t id) const { return has_[static_cast<size_t>(id)] != 0; }
  bool is_end(int32_t id) const;
  const std::vector<int32_t>& ends() const { return ends_; }  // sorted, unique
  const ByteTrie& trie() const { return trie_; }
  // Same texts, flags and end ids (what a cache of vocabularies compares).
  bool same(const std::vector<std::string>& texts, const std::vector<char>& has_text,
            const std::vector<int32_t>& ends) const;

 private:
  std::vector<std::string> texts_;
  std::vector<char> has_;
  std::vector<int32_t> ends_;
  ByteTrie trie_;
};

}  // namespace loomp::grammar

#endif
