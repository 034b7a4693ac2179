// Matcher states as small integers, with Matcher::advance_byte memoized per (state, byte): a
// DFA built lazily over the states that masks visit, so that walking the vocabulary trie costs
// one table lookup per node once its states are known.
//
// Why not Matcher itself: it copies whole stacks on every byte. Here stacks are shared suffix
// trees (hash-consed nodes, each an element on top of a parent node), a node's expansion is
// computed once, and a state is an interned sorted set of nodes plus the pending bytes of a
// UTF-8 sequence. Semantics and limits are Matcher's; tests compare the two.
#ifndef LOOM_PLUGINS_GRAMMAR_STEP_CACHE_HPP
#define LOOM_PLUGINS_GRAMMAR_STEP_CACHE_HPP

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "gbnf.hpp"
#include "id_table.hpp"

namespace loomp::grammar {

class StepCache {
 public:
  static constexpr uint32_t kDead = 0;   // the state id of a dead state
  static constexpr uint32_t kEmpty = 0;  // the node id of the empty stack

  // `m` must outlive the cache.
  explicit StepCache(const Matcher& m);
  // Room for this many states and stack nodes without reallocating, so that a Masker that
  // keeps within them never pays for growing its tables in the middle of a mask.
  void reserve(size_t states, size_t nodes);

  // Ids stay valid until clear(). Any call below may throw GrammarError (Matcher's limits).
  uint32_t intern(const State& s);
  uint32_t step(uint32_t state, uint8_t b) {
    const St& s = states_[state];
    size_t slot;
    if (s.need == 0) {
      slot = s.row + b;
    } else {
      if ((b & 0xC0) != 0x80) return kDead;  // only a continuation byte may follow a lead byte
      slot = s.row + (b & 0x3Fu);
    }
    const uint32_t n = rows_[slot >> kBlockBits][slot & (kBlock - 1)];
    return n != kUnknown ? n : compute(state, b, slot);
  }
  // The node of `elem` pushed on `parent` (kEmpty for the empty stack).
  uint32_t push(uint32_t parent, uint32_t elem);
  uint32_t elem(uint32_t node) const { return nodes_[node].elem; }
  uint32_t parent(uint32_t node) const { return nodes_[node].parent; }
  // The state of the single stack `node` (topped by a character element) at a code-point boundary.
  uint32_t single(uint32_t node);
  // The state where a parse resumes once the frames above `node` have ended: the stack `node`
  // with its top expanded, as Matcher does after popping.
  uint32_t resume(uint32_t node);

  bool complete(uint32_t state) const { return states_[state].complete != 0; }  // State::can_complete
  bool partial(uint32_t state) const { return states_[state].need != 0; }
  // The pending UTF-8 sequence of a state, as State's partial_* fields.
  struct Utf8 {
    uint32_t cp;
    uint8_t need, len;
  };
  Utf8 utf8(uint32_t state) const { return {states_[state].cp, states_[state].need, states_[state].len}; }
  // The stacks of a state, sorted node ids. Copy before calling anything that adds states.
  std::span<const uint32_t> stacks(uint32_t state) const {
    const Set& s = sets_[states_[state].set];
    return {set_nodes_.data() + s.first, s.count};
  }

  size_t states() const { return states_.size(); }
  size_t nodes() const { return nodes_.size(); }
  // Forgets every state and node; ids given out before are invalid afterwards.
  void clear();

 private:
  static constexpr uint32_t kUnknown = UINT32_MAX;
  // Transition rows live in fixed blocks, so that adding states never moves the others.
  static constexpr size_t kBlockBits = 16;
  static constexpr size_t kBlock = size_t{1} << kBlockBits;
  struct Node {
    uint32_t elem, parent, depth;
    uint32_t exp_first = kUnknown, exp_count = 0;  // its expansion in exp_nodes_, once computed
  };
  struct Set {
    uint32_t first, count;
    uint64_t hash;
  };
  struct St {
    uint32_t set;
    uint32_t cp;       // pending UTF-8 sequence, as State's partial_* fields
    uint8_t need, len;
    uint8_t complete;
    size_t row;        // transitions in rows_: 256 at a code-point boundary, else 64 (by the low 6 bits)
  };

  uint32_t compute(uint32_t state, uint8_t b, size_t slot);
  uint32_t after_cp(uint32_t set, uint32_t cp);
  bool partial_ok(uint32_t set, uint32_t cp, uint8_t need, uint8_t len) const;
  void expand(uint32_t node);
  uint32_t intern_set(const std::vector<uint32_t>& sorted_nodes);
  uint32_t intern_state(uint32_t set, uint32_t cp, uint8_t need, uint8_t len);
  size_t new_row(size_t size);
  [[noreturn]] void too_many_stacks() const;

  const Matcher* m_;
  const Grammar* g_;
  std::vector<Node> nodes_;
  IdTable node_ids_;  // by (parent, elem)
  std::vector<uint32_t> exp_nodes_;
  std::vector<Set> sets_;
  std::vector<uint32_t> set_nodes_;
  IdTable set_ids_;  // by content
  std::vector<St> states_;
  IdTable state_ids_;  // by (set, cp, need, len)
  std::vector<std::unique_ptr<uint32_t[]>> rows_;
  size_t rows_used_ = 0;
  std::vector<uint32_t> work_, out_, tmp_;
};

}  // namespace loomp::grammar

#endif
