// TokenIndex: the vocabulary trie and the masking walk.
#include <algorithm>
#include <map>

#include "gbnf.hpp"

namespace loomp::grammar {

TokenIndex::TokenIndex(const std::vector<std::string>& texts, const std::vector<char>& has_text,
                       std::vector<int32_t> ends)
    : texts_(texts), has_(has_text), ends_(std::move(ends)) {
  has_.resize(texts_.size(), 0);
  std::sort(ends_.begin(), ends_.end());
  // Build with sorted ids per node: sort token ids by text, then lay the trie out depth-first.
  std::vector<int32_t> ids;
  for (size_t i = 0; i < texts_.size(); ++i)
    if (has_[i] && !texts_[i].empty() && !is_end(static_cast<int32_t>(i))) ids.push_back(static_cast<int32_t>(i));
  std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return texts_[static_cast<size_t>(a)] < texts_[static_cast<size_t>(b)]; });
  // Temporary pointer trie: children as maps; fine for a one-time build.
  struct Tmp {
    std::map<uint8_t, uint32_t> kids;
    std::vector<int32_t> toks;
  };
  std::vector<Tmp> tmp(1);
  for (int32_t id : ids) {
    uint32_t n = 0;
    for (char c : texts_[static_cast<size_t>(id)]) {
      const auto b = static_cast<uint8_t>(c);
      auto it = tmp[n].kids.find(b);
      if (it == tmp[n].kids.end()) {
        tmp.emplace_back();
        const uint32_t k = static_cast<uint32_t>(tmp.size() - 1);
        tmp[n].kids.emplace(b, k);
        n = k;
      } else {
        n = it->second;
      }
    }
    tmp[n].toks.push_back(id);
  }
  nodes_.resize(tmp.size());
  for (size_t i = 0; i < tmp.size(); ++i) {
    nodes_[i].first_edge = static_cast<uint32_t>(edges_.size());
    nodes_[i].n_edges = static_cast<uint32_t>(tmp[i].kids.size());
    for (auto& [b, k] : tmp[i].kids) edges_.emplace_back(b, k);
    nodes_[i].first_tok = static_cast<uint32_t>(toks_.size());
    nodes_[i].n_toks = static_cast<uint32_t>(tmp[i].toks.size());
    for (int32_t t : tmp[i].toks) toks_.push_back(t);
  }
}

bool TokenIndex::is_end(int32_t id) const { return std::binary_search(ends_.begin(), ends_.end(), id); }

// Per parse state seen during one walk: which bytes were tried, which leave the state unchanged
// (inside a JSON string almost every byte does) and which are refused. A child reached by a
// byte that leaves the state unchanged is walked with the same state and memo, so the subtree
// below costs a table lookup per node instead of a matcher step.
struct TokenIndex::LoopMemo {
  uint64_t known[4] = {0, 0, 0, 0};
  uint64_t self[4] = {0, 0, 0, 0};
  uint64_t dead[4] = {0, 0, 0, 0};
};

void TokenIndex::walk(const Matcher& m, uint32_t node, const State& s, LoopMemo& memo,
                      std::vector<uint64_t>& out) const {
  const Node& n = nodes_[node];
  State next;
  for (uint32_t e = 0; e < n.n_edges; ++e) {
    const auto [b, child] = edges_[n.first_edge + e];
    const uint64_t bit = uint64_t{1} << (b & 63);
    const int w = b >> 6;
    bool same = false;
    if (memo.known[w] & bit) {
      if (memo.dead[w] & bit) continue;
      same = (memo.self[w] & bit) != 0;
    }
    if (!same) {
      if (!m.advance_byte(s, b, next)) {
        memo.known[w] |= bit;
        memo.dead[w] |= bit;
        continue;
      }
      if (!(memo.known[w] & bit)) {
        memo.known[w] |= bit;
        if (next.partial_need == s.partial_need && next.partial_len == s.partial_len &&
            next.partial_cp == s.partial_cp && next.stacks == s.stacks) {
          memo.self[w] |= bit;
          same = true;
        }
      }
    }
    const Node& c = nodes_[child];
    for (uint32_t t = 0; t < c.n_toks; ++t) {
      const auto id = static_cast<uint32_t>(toks_[c.first_tok + t]);
      out[id >> 6] |= uint64_t{1} << (id & 63);
    }
    if (c.n_edges == 0) continue;
    if (same) {
      walk(m, child, s, memo, out);
    } else {
      LoopMemo fresh;
      walk(m, child, next, fresh, out);
    }
  }
}

void TokenIndex::mask(const Matcher& m, const State& s, std::vector<uint64_t>& out) const {
  out.assign((texts_.size() + 63) / 64, 0);
  LoopMemo memo;
  if (!s.dead()) walk(m, 0, s, memo, out);
  if (s.can_complete())
    for (int32_t id : ends_)
      if (id >= 0 && static_cast<size_t>(id) < texts_.size())
        out[static_cast<size_t>(id) >> 6] |= uint64_t{1} << (id & 63);
}

}  // namespace loomp::grammar
