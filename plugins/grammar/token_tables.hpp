// Per-element token tables: what a grammar does with each token, decided once per grammar and
// vocabulary, so that masking a state is mostly ORing precomputed sets (XGrammar's split of the
// vocabulary into context-independent and context-dependent tokens, on Loom's pushdown stacks).
//
// For each character element e, a walk of the vocabulary trie from e's fixed chain alone
// (element_frames.hpp) decides every token whose bytes stay within the chain: `accepted` are
// those it consumes. Where the chain can end with bytes of a token left, only those remaining
// bytes depend on the rest of the stack; a mask walks them from the real stack below the chain.
// Small such subtrees are merged into one trie of remainders per element (tokens `a",`, `b",`
// ... share the remainder `,`), large ones (all tokens after a space) stay trie nodes.
// A state inside a UTF-8 sequence is masked per stack from `pending` tables: the tokens that
// can follow start with continuation bytes, and once the code point is complete the chain is
// in the same state whatever the code point was, so what follows is precomputed per trie node
// reached by one to three continuation bytes.
// A state's mask is the union over its stacks, plus the end tokens when it can complete.
// Counted repetitions (x{m,n} of a rule x) clone x per copy (Grammar::copies), so each copy's
// elements have chains through the rest of the repetition and tables of their own; copies
// whose counts of copies still required and allowed agree up to the length of all but the
// longest few tokens accept the same such tokens, and share one table (a string of maxLength
// 1000 builds that many tables per element of `char`, not 1000); a mask that used a shared
// table checks those few longest tokens by a walk.
#ifndef LOOM_PLUGINS_GRAMMAR_TOKEN_TABLES_HPP
#define LOOM_PLUGINS_GRAMMAR_TOKEN_TABLES_HPP

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "byte_trie.hpp"
#include "element_frames.hpp"
#include "gbnf.hpp"
#include "step_cache.hpp"
#include "token_index.hpp"
#include "trie_walk.hpp"

namespace loomp::grammar {

// Counts of one mask computation, for tests and the benchmark.
struct MaskStats {
  size_t cached = 0;    // masks a Masker had already computed
  size_t tabled = 0;    // stacks answered from their element's table
  size_t fallback = 0;  // stacks (or states) walked from the trie's root instead
  size_t resumes = 0;   // walks from the stack below a chain
};

class TokenTables {
 public:
  struct BuildStats {
    size_t elements = 0;    // tables built
    size_t dense = 0;       // of which hold their accepted tokens as a bitset
    size_t remainders = 0;  // tokens in remainder tries, all tables
    size_t big_resumes = 0; // large subtrees left as trie nodes, all tables
    size_t pending = 0;     // tables with pending (inside UTF-8) parts
    size_t failed = 0;      // elements left to walks at mask time (Matcher's limits hit)
    size_t shared = 0;      // elements of repetition copies served by a twin's table (Grammar::copies)
    size_t long_tokens = 0; // tokens too long for shared tables, checked per mask where one serves
    size_t bytes = 0;       // memory of the tables
  };

  // `m` must outlive the tables. A grammar the matcher's limits refuse throws nothing here:
  // such elements are walked at mask time instead, where the error surfaces as before.
  TokenTables(const Matcher& m, std::shared_ptr<const TokenIndex> vocab);

  const TokenIndex& vocab() const { return *vocab_; }
  const Matcher& matcher() const { return *m_; }
  const BuildStats& build_stats() const { return stats_; }
  size_t words() const { return (vocab_->size() + 63) / 64; }

  // Writes the allowed-token bitset of `state` (an id of `cache`, a StepCache on the same
  // matcher) into out[0, words()): bit i is set exactly when Matcher::accepts(state, text(i))
  // for a token with text, or when i is an end token and the state can complete.
  void mask(StepCache& cache, TrieWalk& walk, uint32_t state, uint64_t* out, MaskStats* stats = nullptr) const;

 private:
  // A vocabulary trie node reached from the root by one to three continuation bytes.
  struct Cont {
    uint32_t node;
    uint32_t bits;  // the low 6 bits of those bytes, first byte highest
    uint32_t depth;
    uint32_t first_value, n_values;  // the node's tokens, copied here so a mask reads conts_ in order
  };
  using Bytes = std::array<uint64_t, 4>;  // a set of byte values
  struct Table {
    bool built = false;
    std::vector<uint64_t> dense;    // the accepted tokens as a bitset when there are many,
    std::vector<int32_t> sparse;    // else as a list
    ByteTrie rest;                  // remainders of tokens leaving the chain, values: token ids
    std::vector<uint32_t> big;      // trie nodes where the chain ends above many tokens
    // Inside a UTF-8 sequence, once its code point completes at conts_[i]: the tokens below
    // that node the chain accepts, pend_ids[pend_first[i] .. pend_first[i + 1]), and the trie
    // nodes at or below it where the chain ends, as (i, node) sorted by i. Empty for an element
    // that matches only ASCII. Flat arrays: a mask reads them in order.
    std::vector<uint32_t> pend_first;
    std::vector<int32_t> pend_ids;
    std::vector<std::pair<uint32_t, uint32_t>> pend_resumes;
  };

  // Points the elements of repetition copies at their twins' tables (Grammar::copies).
  void share_copies();
  // Where a shared table served a stack of `state`: its verdicts on the long tokens replaced by
  // a walk of them from the state.
  void mask_long(StepCache& cache, TrieWalk& walk, uint32_t state, uint64_t* out) const;
  void build(StepCache& cache, TrieWalk& walk, uint32_t e);
  void build_pending(StepCache& cache, TrieWalk& walk, uint32_t e, uint32_t chain_node, Table& t);
  // The stack's part of a mask inside a UTF-8 sequence (cp, need, len: the pending sequence).
  void mask_pending(StepCache& cache, TrieWalk& walk, uint32_t node, uint32_t below, uint32_t cp, uint32_t need,
                    uint32_t len, uint64_t* out, MaskStats& st) const;
  // Marks what the stack `below` accepts of the tokens leaving e's chain.
  void resume(StepCache& cache, TrieWalk& walk, const Table& t, uint32_t below, uint64_t* out, MaskStats& st) const;
  // The bytes a state at a code-point boundary accepts first: those its tops' classes allow.
  Bytes first_bytes(StepCache& cache, uint32_t state) const;

  const Matcher* m_;
  std::shared_ptr<const TokenIndex> vocab_;
  std::vector<ElementFrame> frames_;
  std::vector<Cont> conts_;    // by depth
  std::vector<Table> tables_;  // by element index (built for the elements table_of_ maps to themselves)
  std::vector<uint32_t> table_of_;  // by element index: whose table serves it
  std::vector<uint64_t> short_;     // tokens shared tables are exact for (empty: none shared)
  ByteTrie long_;                   // the others, with text (values: token ids)
  std::vector<Bytes> first_;   // by element index: the bytes a stack topped by it accepts first
  BuildStats stats_;
};

}  // namespace loomp::grammar

#endif
