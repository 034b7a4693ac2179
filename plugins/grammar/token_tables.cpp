// TokenTables: building the per-element tables and masking a state with them.
#include "token_tables.hpp"

#include <algorithm>
#include <functional>
#include <map>
#include <string_view>

namespace loomp::grammar {
namespace {

// The build's StepCache is cleared between elements past this many states (about 1 KiB each).
constexpr size_t kBuildStates = 1 << 16;
// At most this many of the longest tokens are checked per mask where a table is shared by
// repetition copies (TokenTables::share_copies), instead of counting in the tables' bound.
constexpr size_t kLongTokens = 64;
// A chain that ends above more tokens than this keeps the trie node instead of remainders:
// after a space, say, the rest of half the vocabulary would be copied for little gain, as the
// stack below refuses most of it at its first byte.
constexpr size_t kSmallResume = 64;

void set_bit(uint64_t* out, int32_t id) {
  out[static_cast<size_t>(id) >> 6] |= uint64_t{1} << (id & 63);
}

void mark_values(const ByteTrie& t, uint32_t first, uint32_t n, uint64_t* out) {
  for (uint32_t k = 0; k < n; ++k) set_bit(out, t.value(first + k));
}

void mark(const ByteTrie& t, uint32_t n, uint64_t* out) {
  mark_values(t, t.node(n).first_value, t.node(n).n_values, out);
}

// The values strictly below `node`, stopping once there are more than `cap`.
void values_below(const ByteTrie& t, uint32_t node, size_t cap, std::vector<int32_t>& out) {
  std::vector<uint32_t> todo{node};
  while (!todo.empty() && out.size() <= cap) {
    const ByteTrie::Node& n = t.node(todo.back());
    const bool top = todo.back() == node;
    todo.pop_back();
    if (!top)
      for (uint32_t k = 0; k < n.n_values; ++k) out.push_back(t.value(n.first_value + k));
    for (uint32_t k = 0; k < n.n_edges; ++k) todo.push_back(t.edge(n.first_edge + k).child);
  }
}

}  // namespace

TokenTables::TokenTables(const Matcher& m, std::shared_ptr<const TokenIndex> vocab)
    : m_(&m), vocab_(std::move(vocab)), frames_(element_frames(m.grammar())), tables_(frames_.size()) {
  const ByteTrie& trie = vocab_->trie();
  std::vector<Cont> level{Cont{ByteTrie::kRoot, 0, 0, 0, 0}};
  for (uint32_t depth = 1; depth <= 3; ++depth) {
    std::vector<Cont> next;
    for (const Cont& c : level) {
      const ByteTrie::Node& n = trie.node(c.node);
      for (uint32_t k = 0; k < n.n_edges; ++k) {
        const ByteTrie::Edge& e = trie.edge(n.first_edge + k);
        const ByteTrie::Node& child = trie.node(e.child);
        if ((e.byte & 0xC0) == 0x80)
          next.push_back(Cont{e.child, (c.bits << 6) | (e.byte & 0x3Fu), depth, child.first_value, child.n_values});
      }
    }
    conts_.insert(conts_.end(), next.begin(), next.end());
    level = std::move(next);
  }
  const Grammar& g = m.grammar();
  first_.assign(g.elems.size(), Bytes{});
  for (uint32_t e = 0; e < g.elems.size(); ++e) {
    if (g.elems[e].kind != Elem::CHARS) continue;
    for (uint32_t b = 0; b < 256; ++b) {
      const uint8_t need = utf8_need(static_cast<uint8_t>(b));
      const bool ok = b < 0x80 ? g.matches(g.elems[e], b)
                               : need != 0 && g.may_match_pending(g.elems[e], b & (0x3Fu >> need), need, 1);
      if (ok) first_[e][b >> 6] |= uint64_t{1} << (b & 63);
    }
  }
  share_copies();
  StepCache cache(m);
  TrieWalk walk;
  for (uint32_t e = 0; e < frames_.size(); ++e) {
    if (frames_[e].chain.empty() || table_of_[e] != e) continue;
    if (cache.states() > kBuildStates) cache.clear();
    try {
      build(cache, walk, e);
    } catch (const GrammarError&) {
      tables_[e] = Table{};
      ++stats_.failed;
    }
  }
}

void TokenTables::share_copies() {
  const Grammar& g = m_->grammar();
  table_of_.resize(g.elems.size());
  for (uint32_t e = 0; e < table_of_.size(); ++e) table_of_[e] = e;
  // A token of at most `shortish` bytes, each copy of x taking at least one, never sees how
  // many copies are still required or allowed past `cap`: copies of one repetition of the same
  // kind whose counts agree up to it accept the same such tokens, each element as its twin in
  // the other. The few longer tokens (runs of spaces, ...) are checked per mask instead
  // (mask_long), so that their length does not multiply the tables.
  std::vector<size_t> lengths;
  for (size_t i = 0; i < vocab_->size(); ++i)
    if (vocab_->has_text(static_cast<int32_t>(i))) lengths.push_back(vocab_->text(static_cast<int32_t>(i)).size());
  const size_t n_long = std::min<size_t>(kLongTokens, std::max<size_t>(1, lengths.size() / 16));
  size_t shortish = 0;  // at most n_long tokens are longer
  if (lengths.size() > n_long) {
    std::nth_element(lengths.begin(), lengths.begin() + static_cast<std::ptrdiff_t>(n_long), lengths.end(),
                     std::greater<>());
    shortish = lengths[n_long];
  }
  const uint64_t cap = uint64_t{shortish} + 1;
  std::map<std::array<uint64_t, 4>, size_t> first;  // (family, kind, min, max) -> the copy whose tables serve
  std::vector<char> serves(table_of_.size(), 0);
  for (size_t i = 0; i < g.copies.size(); ++i) {
    const Grammar::Copy& c = g.copies[i];
    const std::array<uint64_t, 4> key{c.family, c.kind, std::min<uint64_t>(c.min_after, cap),
                                      std::min<uint64_t>(c.max_after, cap)};
    const auto [at, added] = first.emplace(key, i);
    const Grammar::Copy& twin = g.copies[at->second];
    if (added || twin.elems.size() != c.elems.size()) continue;
    for (size_t k = 0; k < c.elems.size(); ++k) {
      const uint32_t e = c.elems[k], t = twin.elems[k];
      if (table_of_[e] != e || serves[e] || table_of_[t] != t) continue;  // (an element of two copies)
      table_of_[e] = t;
      serves[t] = 1;
      ++stats_.shared;
    }
  }
  if (stats_.shared == 0) return;
  short_.assign(words(), 0);
  std::vector<std::string_view> keys;
  std::vector<int32_t> ids;
  for (size_t i = 0; i < vocab_->size(); ++i) {
    const auto id = static_cast<int32_t>(i);
    if (!vocab_->has_text(id) || vocab_->is_end(id)) continue;
    if (vocab_->text(id).size() <= shortish) {
      set_bit(short_.data(), id);
    } else {
      keys.emplace_back(vocab_->text(id));
      ids.push_back(id);
    }
  }
  long_ = ByteTrie(keys, ids);
  stats_.long_tokens = ids.size();
}

void TokenTables::mask_long(StepCache& cache, TrieWalk& walk, uint32_t state, uint64_t* out) const {
  for (size_t w = 0; w < short_.size(); ++w) out[w] &= short_[w];
  const Bytes first = first_bytes(cache, state);
  walk.run(long_, cache, ByteTrie::kRoot, state, [&](uint32_t n, uint32_t, uint32_t) { mark(long_, n, out); },
           cache.partial(state) ? nullptr : first.data());
}

void TokenTables::build(StepCache& cache, TrieWalk& walk, uint32_t e) {
  const ElementFrame& f = frames_[e];
  const ByteTrie& trie = vocab_->trie();
  uint32_t node = StepCache::kEmpty;
  for (uint32_t x : f.chain) node = cache.push(node, x);
  Table t;
  std::vector<int32_t> accepted;
  std::vector<std::pair<uint32_t, uint32_t>> ends;  // (trie node, depth) where the chain can end
  walk.run(trie, cache, ByteTrie::kRoot, cache.single(node), [&](uint32_t n, uint32_t s, uint32_t depth) {
    const ByteTrie::Node& tn = trie.node(n);
    for (uint32_t k = 0; k < tn.n_values; ++k) accepted.push_back(trie.value(tn.first_value + k));
    // A complete chain state: some path has left the chain here, and what follows depends on
    // the stack below it (nothing, when the chain is closed).
    if (!f.closed && tn.n_edges != 0 && cache.complete(s)) ends.emplace_back(n, depth);
  });
  if (accepted.size() > 2 * words()) {  // a list would take more memory than the bitset
    t.dense.assign(words(), 0);
    for (int32_t id : accepted) set_bit(t.dense.data(), id);
    ++stats_.dense;
  } else {
    t.sparse = std::move(accepted);
  }
  std::vector<std::string_view> keys;
  std::vector<int32_t> ids, below;
  for (auto [n, depth] : ends) {
    below.clear();
    values_below(trie, n, kSmallResume, below);
    if (below.size() > kSmallResume) {
      t.big.push_back(n);
      continue;
    }
    for (int32_t id : below) {
      keys.push_back(std::string_view(vocab_->text(id)).substr(depth));
      ids.push_back(id);
    }
  }
  t.rest = ByteTrie(keys, ids);
  if (m_->grammar().intersects(m_->grammar().elems[e], 0x80, 0x10FFFF)) build_pending(cache, walk, e, node, t);
  t.built = true;
  ++stats_.elements;
  stats_.remainders += ids.size();
  stats_.big_resumes += t.big.size();
  stats_.bytes += t.dense.size() * 8 + t.sparse.size() * 4 + t.rest.bytes() + t.big.size() * 4;
  tables_[e] = std::move(t);
}

void TokenTables::build_pending(StepCache& cache, TrieWalk& walk, uint32_t e, uint32_t chain_node, Table& t) {
  const Grammar& g = m_->grammar();
  const ByteTrie& trie = vocab_->trie();
  const bool closed = frames_[e].closed;
  // The chain once e has matched a code point, whichever: e popped, the rest of its
  // alternative pushed and expanded (Matcher::advance_cp on the chain).
  const uint32_t below = cache.parent(chain_node);
  const uint32_t post = cache.resume(g.elems[e + 1].kind != Elem::END ? cache.push(below, e + 1) : below);
  for (uint32_t i = 0; i < conts_.size(); ++i) {
    t.pend_first.push_back(static_cast<uint32_t>(t.pend_ids.size()));
    auto at = [&](uint32_t n, uint32_t s) {
      if (!closed && trie.node(n).n_edges != 0 && cache.complete(s)) t.pend_resumes.emplace_back(i, n);
    };
    at(conts_[i].node, post);
    walk.run(trie, cache, conts_[i].node, post, [&](uint32_t n, uint32_t s, uint32_t) {
      const ByteTrie::Node& tn = trie.node(n);
      for (uint32_t k = 0; k < tn.n_values; ++k) t.pend_ids.push_back(trie.value(tn.first_value + k));
      at(n, s);
    });
  }
  t.pend_first.push_back(static_cast<uint32_t>(t.pend_ids.size()));
  stats_.bytes += t.pend_first.size() * 4 + t.pend_ids.size() * 4 + t.pend_resumes.size() * 8;
  ++stats_.pending;
}

TokenTables::Bytes TokenTables::first_bytes(StepCache& cache, uint32_t state) const {
  Bytes b{};
  for (uint32_t node : cache.stacks(state))
    if (node != StepCache::kEmpty)
      for (size_t w = 0; w < 4; ++w) b[w] |= first_[cache.elem(node)][w];
  return b;
}

void TokenTables::resume(StepCache& cache, TrieWalk& walk, const Table& t, uint32_t below, uint64_t* out,
                         MaskStats& st) const {
  if (below == StepCache::kEmpty || (t.rest.node(ByteTrie::kRoot).n_edges == 0 && t.big.empty())) return;
  const uint32_t ctx = cache.resume(below);
  const Bytes first = first_bytes(cache, ctx);
  ++st.resumes;
  walk.run(t.rest, cache, ByteTrie::kRoot, ctx, [&](uint32_t n, uint32_t, uint32_t) { mark(t.rest, n, out); },
           first.data());
  const ByteTrie& trie = vocab_->trie();
  for (uint32_t r : t.big)
    walk.run(trie, cache, r, ctx, [&](uint32_t n, uint32_t, uint32_t) { mark(trie, n, out); }, first.data());
}

void TokenTables::mask_pending(StepCache& cache, TrieWalk& walk, uint32_t node, uint32_t below, uint32_t cp,
                               uint32_t need, uint32_t len, uint64_t* out, MaskStats& st) const {
  const Grammar& g = m_->grammar();
  const ByteTrie& trie = vocab_->trie();
  const Elem& e = g.elems[cache.elem(node)];
  const Table& t = tables_[table_of_[cache.elem(node)]];
  if (t.pend_first.empty()) return;  // e matches only ASCII: no end of the sequence can match it
  ++st.tabled;
  uint32_t ctx = StepCache::kDead;
  auto resumes = t.pend_resumes.begin();
  for (uint32_t i = 0; i < conts_.size() && conts_[i].depth <= need; ++i) {
    const Cont& c = conts_[i];
    if (c.depth < need) {  // a token of continuation bytes only, the sequence still pending after it
      if (c.n_values != 0 && g.may_match_pending(e, (cp << (6 * c.depth)) | c.bits,
                                                  static_cast<uint8_t>(need - c.depth),
                                                  static_cast<uint8_t>(len + c.depth)))
        mark_values(trie, c.first_value, c.n_values, out);
      continue;
    }
    const uint32_t full = (cp << (6 * need)) | c.bits;
    if (!utf8_valid(full, len + need) || !g.matches(e, full)) continue;
    mark_values(trie, c.first_value, c.n_values, out);
    for (uint32_t k = t.pend_first[i]; k < t.pend_first[i + 1]; ++k) set_bit(out, t.pend_ids[k]);
    while (resumes != t.pend_resumes.end() && resumes->first < i) ++resumes;
    for (; resumes != t.pend_resumes.end() && resumes->first == i; ++resumes) {
      if (below == StepCache::kEmpty) continue;
      if (ctx == StepCache::kDead) ctx = cache.resume(below);
      ++st.resumes;
      walk.run(trie, cache, resumes->second, ctx, [&](uint32_t n, uint32_t, uint32_t) { mark(trie, n, out); });
    }
  }
}

void TokenTables::mask(StepCache& cache, TrieWalk& walk, uint32_t state, uint64_t* out, MaskStats* stats) const {
  MaskStats local;
  MaskStats& st = stats != nullptr ? *stats : local;
  std::fill_n(out, words(), 0);
  if (state == StepCache::kDead) return;
  const ByteTrie& trie = vocab_->trie();
  auto walk_from_root = [&](uint32_t s) {
    ++st.fallback;
    walk.run(trie, cache, ByteTrie::kRoot, s, [&](uint32_t n, uint32_t, uint32_t) { mark(trie, n, out); });
  };
  // Each stack with the table of its top, and the stack below the top's chain (element_frames
  // guarantees the chain for every state the matcher reaches; a stack without it is walked).
  struct Top {
    uint32_t node, below;
    bool fits;
  };
  std::vector<Top> tops;
  bool all_fit = true, shared = false;
  for (uint32_t node : cache.stacks(state)) {
    if (node == StepCache::kEmpty) continue;
    const uint32_t e = cache.elem(node);
    shared = shared || table_of_[e] != e;
    const Stack& chain = frames_[e].chain;
    bool fits = tables_[table_of_[e]].built;
    uint32_t below = node;
    for (size_t i = chain.size(); fits && i-- > 0; below = cache.parent(below))
      fits = below != StepCache::kEmpty && cache.elem(below) == chain[i];
    if (fits && frames_[e].closed && below != StepCache::kEmpty) fits = false;
    tops.push_back(Top{node, below, fits});
    all_fit = all_fit && fits;
  }
  if (cache.partial(state)) {  // cannot complete either, so no end tokens
    if (!all_fit) return walk_from_root(state);
    const StepCache::Utf8 u = cache.utf8(state);
    for (const Top& t : tops) mask_pending(cache, walk, t.node, t.below, u.cp, u.need, u.len, out, st);
    if (shared) mask_long(cache, walk, state, out);
    return;
  }
  for (const Top& t : tops) {
    if (!t.fits) {
      walk_from_root(cache.single(t.node));
      continue;
    }
    ++st.tabled;
    const Table& table = tables_[table_of_[cache.elem(t.node)]];
    if (!table.dense.empty()) {
      for (size_t w = 0; w < table.dense.size(); ++w) out[w] |= table.dense[w];
    } else {
      for (int32_t id : table.sparse) set_bit(out, id);
    }
    resume(cache, walk, table, t.below, out, st);
  }
  if (shared) mask_long(cache, walk, state, out);
  if (cache.complete(state))
    for (int32_t id : vocab_->ends())
      if (id >= 0 && static_cast<size_t>(id) < vocab_->size()) set_bit(out, id);
}

}  // namespace loomp::grammar
