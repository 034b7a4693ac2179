// A depth-first walk of a byte trie (the vocabulary, or a table's remainders) driven by a
// StepCache. The walk keeps its stack between runs so that the many short walks of one mask
// allocate nothing, and it is iterative so that a very long token cannot overflow the call stack.
#ifndef LOOM_PLUGINS_GRAMMAR_TRIE_WALK_HPP
#define LOOM_PLUGINS_GRAMMAR_TRIE_WALK_HPP

#include <cstdint>
#include <vector>

#include "step_cache.hpp"
#include "byte_trie.hpp"

namespace loomp::grammar {

class TrieWalk {
 public:
  // Calls visit(child, state_after, depth) for every node below `node` whose bytes, read from
  // `state`, keep it alive (depth: bytes read since `node`); its descendants are visited after it.
  // `first`, when given, is a 256-bit set holding at least the bytes `state` accepts: the other
  // edges below `node` are skipped without a step, which for a state met for the first time
  // would each compute a transition.
  template <class Visit>
  void run(const ByteTrie& t, StepCache& c, uint32_t node, uint32_t state, Visit&& visit,
           const uint64_t* first = nullptr) {
    if (state == StepCache::kDead) return;
    const ByteTrie::Node& n = t.node(node);
    stack_.assign(1, Frame{n.first_edge, n.first_edge + n.n_edges, state});
    while (!stack_.empty()) {
      Frame& f = stack_.back();
      if (f.edge == f.end) {
        stack_.pop_back();
        continue;
      }
      const ByteTrie::Edge& e = t.edge(f.edge++);
      if (first != nullptr && stack_.size() == 1 && !((first[e.byte >> 6] >> (e.byte & 63)) & 1)) continue;
      const uint32_t s = c.step(f.state, e.byte);
      if (s == StepCache::kDead) continue;
      visit(e.child, s, static_cast<uint32_t>(stack_.size()));
      const ByteTrie::Node& child = t.node(e.child);
      if (child.n_edges != 0) stack_.push_back(Frame{child.first_edge, child.first_edge + child.n_edges, s});
    }
  }

 private:
  struct Frame {
    uint32_t edge, end, state;
  };
  std::vector<Frame> stack_;
};

}  // namespace loomp::grammar

#endif
