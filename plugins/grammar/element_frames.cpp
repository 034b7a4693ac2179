// element_frames: for each rule, the entries that can lie right below its frames, found by a
// fixpoint over the references; a rule with a single possibility extends its elements' chains.
#include "element_frames.hpp"

#include <algorithm>
#include <cstdint>

namespace loomp::grammar {
namespace {

// What can lie right below a frame of a rule: nothing known yet, one element, the bottom of
// the stack (the rule ends the sentence), or several possibilities.
constexpr uint32_t kUnknown = UINT32_MAX;
constexpr uint32_t kBottom = UINT32_MAX - 1;
constexpr uint32_t kMany = UINT32_MAX - 2;

uint32_t join(uint32_t a, uint32_t b) {
  if (a == kUnknown) return b;
  if (b == kUnknown || a == b) return a;
  return kMany;
}

// Long enough for any real nesting; a cut chain is still correct, only less precomputed.
constexpr size_t kMaxChain = 64;

}  // namespace

std::vector<ElementFrame> element_frames(const Grammar& g) {
  const size_t n_rules = g.alts.size();
  std::vector<uint32_t> rule_of(g.elems.size(), kUnknown);
  for (uint32_t r = 0; r < n_rules; ++r)
    for (uint32_t a : g.alts[r])
      for (uint32_t i = a;; ++i) {
        rule_of[i] = r;
        if (g.elems[i].kind == Elem::END) break;
      }

  std::vector<char> reachable(n_rules, 0);
  std::vector<uint32_t> work{g.root};
  reachable[g.root] = 1;
  while (!work.empty()) {
    const uint32_t r = work.back();
    work.pop_back();
    for (uint32_t a : g.alts[r])
      for (uint32_t i = a; g.elems[i].kind != Elem::END; ++i)
        if (g.elems[i].kind == Elem::REF && !reachable[g.elems[i].ref]) {
          reachable[g.elems[i].ref] = 1;
          work.push_back(g.elems[i].ref);
        }
  }

  // A reference followed by more of its alternative leaves that next element below the
  // referenced rule's frames (Matcher::expand pushes it); a reference that ends its alternative
  // leaves whatever lies below the referencing rule's own frames.
  std::vector<uint32_t> below(n_rules, kUnknown);
  std::vector<std::vector<uint32_t>> tail_refs(n_rules);  // rule -> rules it references last
  below[g.root] = kBottom;
  for (uint32_t r = 0; r < n_rules; ++r) {
    if (!reachable[r]) continue;
    for (uint32_t a : g.alts[r])
      for (uint32_t i = a; g.elems[i].kind != Elem::END; ++i) {
        if (g.elems[i].kind != Elem::REF) continue;
        const uint32_t t = g.elems[i].ref;
        if (g.elems[i + 1].kind != Elem::END) below[t] = join(below[t], i + 1);
        else tail_refs[r].push_back(t);
      }
  }
  for (uint32_t r = 0; r < n_rules; ++r)
    if (below[r] != kUnknown) work.push_back(r);
  while (!work.empty()) {  // each rule's value only rises (unknown -> one/bottom -> many)
    const uint32_t r = work.back();
    work.pop_back();
    for (uint32_t t : tail_refs[r]) {
      const uint32_t v = join(below[t], below[r]);
      if (v != below[t]) {
        below[t] = v;
        work.push_back(t);
      }
    }
  }

  std::vector<ElementFrame> frames(g.elems.size());
  for (uint32_t e = 0; e < g.elems.size(); ++e) {
    if (g.elems[e].kind != Elem::CHARS || !reachable[rule_of[e]]) continue;
    ElementFrame& f = frames[e];
    f.chain.push_back(e);
    for (uint32_t r = rule_of[e]; f.chain.size() < kMaxChain;) {
      const uint32_t b = below[r];
      if (b == kBottom) f.closed = true;
      if (b >= kMany) break;
      f.chain.push_back(b);
      r = rule_of[b];
    }
    std::reverse(f.chain.begin(), f.chain.end());
  }
  return frames;
}

}  // namespace loomp::grammar
