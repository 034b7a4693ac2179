// Which stack entries the grammar fixes below a character element.
//
// A parse stack is topped by a character element e; below e lies the entry that continues the
// rule that referenced e's rule, and so on. When e's rule is referenced from one place only,
// that entry is always the same, and the grammar fixes it; following such rules outwards gives
// a chain of entries every stack topped by e ends with. What a token does within the chain is
// then known without the rest of the stack (token_tables.hpp precomputes it).
#ifndef LOOM_PLUGINS_GRAMMAR_ELEMENT_FRAMES_HPP
#define LOOM_PLUGINS_GRAMMAR_ELEMENT_FRAMES_HPP

#include <vector>

#include "gbnf.hpp"

namespace loomp::grammar {

struct ElementFrame {
  Stack chain;          // bottom first, chain.back() == e; empty: e is never on top of a stack
  bool closed = false;  // nothing lies below chain: every stack topped by e is exactly chain
};

// One entry per element index (elements of rules unreachable from root, and those that are not
// character elements, get an empty chain).
std::vector<ElementFrame> element_frames(const Grammar& g);

}  // namespace loomp::grammar

#endif
