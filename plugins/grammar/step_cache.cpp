// StepCache: Matcher's byte step over hash-consed stacks, memoized. See step_cache.hpp.
#include "step_cache.hpp"

#include <algorithm>
#include <string>

namespace loomp::grammar {

namespace {

uint64_t node_key(uint32_t parent, uint32_t elem) { return (uint64_t{parent} << 32) | elem; }

uint64_t state_key(uint32_t set, uint32_t cp, uint8_t need, uint8_t len) {
  return (uint64_t{set} << 32) | (uint64_t{need} << 30) | (uint64_t{len} << 28) | cp;
}

uint64_t hash_nodes(const uint32_t* v, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ n;
  for (size_t i = 0; i < n; ++i) {
    h = (h ^ v[i]) * 0xFF51AFD7ED558CCDull;
    h ^= h >> 29;
  }
  return h;
}

// Makes room for n elements and touches it: reserve() alone leaves the pages to be faulted in
// one at a time by later masks, which costs tens of microseconds each on some virtual machines.
template <class V>
void prefault(V& v, size_t n) {
  const size_t used = v.size();
  if (n > used) v.resize(n);
  v.resize(used);
}

}  // namespace

StepCache::StepCache(const Matcher& m) : m_(&m), g_(&m.grammar()) { clear(); }

void StepCache::reserve(size_t states, size_t nodes) {
  prefault(states_, states);
  state_ids_.reserve(states);
  prefault(sets_, 2 * states);
  set_ids_.reserve(2 * states);
  prefault(set_nodes_, 16 * states);
  prefault(nodes_, nodes);
  node_ids_.reserve(nodes);
  prefault(exp_nodes_, 2 * nodes);
  while (rows_.size() * kBlock < states * 256) rows_.push_back(std::make_unique<uint32_t[]>(kBlock));
}

void StepCache::clear() {
  nodes_.assign(1, Node{UINT32_MAX, kEmpty, 0});
  node_ids_.clear();
  exp_nodes_.clear();
  sets_.clear();
  set_nodes_.clear();
  set_ids_.clear();
  states_.clear();
  state_ids_.clear();
  rows_used_ = 0;
  // State 0 is the dead state, with set 0 (no stacks); every byte leads back to it.
  intern_set({});
  states_.push_back(St{0, 0, 0, 0, 0, new_row(256)});
  std::fill_n(rows_[0].get(), 256, kDead);
}

size_t StepCache::new_row(size_t size) {
  if ((rows_used_ & (kBlock - 1)) + size > kBlock) rows_used_ = (rows_used_ | (kBlock - 1)) + 1;  // no straddling
  const size_t row = rows_used_;
  rows_used_ += size;
  if (rows_.size() * kBlock < rows_used_) rows_.push_back(std::make_unique<uint32_t[]>(kBlock));
  std::fill_n(rows_[row >> kBlockBits].get() + (row & (kBlock - 1)), size, kUnknown);
  return row;
}

[[noreturn]] void StepCache::too_many_stacks() const {
  throw GrammarError("grammar: more than " + std::to_string(m_->limits().max_stacks) +
                     " live parse stacks (the grammar is too ambiguous)");
}

uint32_t StepCache::push(uint32_t parent, uint32_t elem) {
  const uint64_t key = node_key(parent, elem);
  const uint32_t found =
      node_ids_.find(key, [&](uint32_t id) { return nodes_[id].parent == parent && nodes_[id].elem == elem; });
  if (found != IdTable::kNone) return found;
  const auto id = static_cast<uint32_t>(nodes_.size());
  nodes_.push_back(Node{elem, parent, nodes_[parent].depth + 1});
  node_ids_.insert(id, key, [&](uint32_t n) { return node_key(nodes_[n].parent, nodes_[n].elem); });
  return id;
}

// Matcher::expand on a node: resolve rule references at the top until every stack is topped by
// a character element (or is empty), once per node.
void StepCache::expand(uint32_t node) {
  if (nodes_[node].exp_first != kUnknown) return;
  const Limits& lim = m_->limits();
  work_.assign(1, node);
  out_.clear();
  while (!work_.empty()) {
    const uint32_t cur = work_.back();
    work_.pop_back();
    if (cur == kEmpty) {
      out_.push_back(cur);
      continue;
    }
    if (nodes_[cur].depth > lim.max_stack_depth)
      throw GrammarError("grammar: parse stack deeper than " + std::to_string(lim.max_stack_depth));
    const uint32_t top = nodes_[cur].elem;
    const Elem& e = g_->elems[top];
    if (e.kind == Elem::CHARS) {
      out_.push_back(cur);
      continue;
    }
    uint32_t base = nodes_[cur].parent;
    if (g_->elems[top + 1].kind != Elem::END) base = push(base, top + 1);
    for (uint32_t a : g_->alts[e.ref]) work_.push_back(g_->elems[a].kind != Elem::END ? push(base, a) : base);
    if (out_.size() + work_.size() > 4 * lim.max_stacks) too_many_stacks();
  }
  std::sort(out_.begin(), out_.end());
  out_.erase(std::unique(out_.begin(), out_.end()), out_.end());
  nodes_[node].exp_first = static_cast<uint32_t>(exp_nodes_.size());
  nodes_[node].exp_count = static_cast<uint32_t>(out_.size());
  exp_nodes_.insert(exp_nodes_.end(), out_.begin(), out_.end());
}

uint32_t StepCache::intern_set(const std::vector<uint32_t>& v) {
  const uint64_t h = hash_nodes(v.data(), v.size());
  const uint32_t found = set_ids_.find(h, [&](uint32_t id) {
    const Set& s = sets_[id];
    return s.hash == h && s.count == v.size() && std::equal(v.begin(), v.end(), set_nodes_.begin() + s.first);
  });
  if (found != IdTable::kNone) return found;
  const auto id = static_cast<uint32_t>(sets_.size());
  sets_.push_back(Set{static_cast<uint32_t>(set_nodes_.size()), static_cast<uint32_t>(v.size()), h});
  set_nodes_.insert(set_nodes_.end(), v.begin(), v.end());
  set_ids_.insert(id, h, [&](uint32_t i) { return sets_[i].hash; });
  return id;
}

uint32_t StepCache::intern_state(uint32_t set, uint32_t cp, uint8_t need, uint8_t len) {
  if (sets_[set].count == 0) return kDead;
  const uint64_t key = state_key(set, cp, need, len);
  const uint32_t found = state_ids_.find(key, [&](uint32_t id) {
    const St& s = states_[id];
    return s.set == set && s.cp == cp && s.need == need && s.len == len;
  });
  if (found != IdTable::kNone) return found;
  const auto id = static_cast<uint32_t>(states_.size());
  // Sets are sorted, so the empty stack (node 0) comes first when present.
  const bool empty_stack = set_nodes_[sets_[set].first] == kEmpty;
  states_.push_back(St{set, cp, need, len, static_cast<uint8_t>(need == 0 && empty_stack), new_row(need == 0 ? 256 : 64)});
  state_ids_.insert(id, key, [&](uint32_t i) {
    const St& s = states_[i];
    return state_key(s.set, s.cp, s.need, s.len);
  });
  return id;
}

uint32_t StepCache::intern(const State& s) {
  if (s.dead()) return kDead;
  tmp_.clear();
  for (const Stack& st : s.stacks) {
    uint32_t n = kEmpty;
    for (uint32_t e : st) n = push(n, e);
    tmp_.push_back(n);
  }
  std::sort(tmp_.begin(), tmp_.end());
  tmp_.erase(std::unique(tmp_.begin(), tmp_.end()), tmp_.end());
  return intern_state(intern_set(tmp_), s.partial_cp, s.partial_need, s.partial_len);
}

uint32_t StepCache::single(uint32_t node) {
  tmp_.assign(1, node);
  return intern_state(intern_set(tmp_), 0, 0, 0);
}

uint32_t StepCache::resume(uint32_t node) {
  expand(node);
  const Node& n = nodes_[node];
  tmp_.assign(exp_nodes_.begin() + n.exp_first, exp_nodes_.begin() + n.exp_first + n.exp_count);
  return intern_state(intern_set(tmp_), 0, 0, 0);
}

// Matcher::advance_cp: every stack whose top matches cp pops it, pushes the next element of
// its alternative and expands. Most steps a mask tries are refused, so nothing is allocated or
// interned unless some stack matches.
uint32_t StepCache::after_cp(uint32_t set, uint32_t cp) {
  const Limits& lim = m_->limits();
  const Set s = sets_[set];
  tmp_.clear();
  for (uint32_t i = 0; i < s.count; ++i) {
    const uint32_t node = set_nodes_[s.first + i];
    if (node == kEmpty) continue;
    const uint32_t top = nodes_[node].elem;
    if (!g_->matches(g_->elems[top], cp)) continue;
    const uint32_t below = nodes_[node].parent;
    const uint32_t popped = g_->elems[top + 1].kind != Elem::END ? push(below, top + 1) : below;
    expand(popped);
    const Node& p = nodes_[popped];
    tmp_.insert(tmp_.end(), exp_nodes_.begin() + p.exp_first, exp_nodes_.begin() + p.exp_first + p.exp_count);
    if (tmp_.size() > 4 * lim.max_stacks) too_many_stacks();
  }
  if (tmp_.empty()) return kDead;
  std::sort(tmp_.begin(), tmp_.end());
  tmp_.erase(std::unique(tmp_.begin(), tmp_.end()), tmp_.end());
  if (tmp_.size() > lim.max_stacks) too_many_stacks();
  return intern_state(intern_set(tmp_), 0, 0, 0);
}

bool StepCache::partial_ok(uint32_t set, uint32_t cp, uint8_t need, uint8_t len) const {
  const Set& s = sets_[set];
  for (uint32_t i = 0; i < s.count; ++i) {
    const uint32_t node = set_nodes_[s.first + i];
    if (node != kEmpty && g_->may_match_pending(g_->elems[nodes_[node].elem], cp, need, len)) return true;
  }
  return false;
}

// Matcher::advance_byte on interned states.
uint32_t StepCache::compute(uint32_t state, uint8_t b, size_t slot) {
  const St s = states_[state];
  uint32_t r = kDead;
  if (s.need == 0) {
    if (b < 0x80) {
      r = after_cp(s.set, b);
    } else {
      const uint8_t need = utf8_need(b);
      const uint32_t cp = b & (0x3Fu >> need);
      if (need != 0 && partial_ok(s.set, cp, need, 1)) r = intern_state(s.set, cp, need, 1);
    }
  } else {
    const uint32_t cp = (s.cp << 6) | (b & 0x3Fu);
    const auto need = static_cast<uint8_t>(s.need - 1);
    const auto len = static_cast<uint8_t>(s.len + 1);
    if (need == 0) {
      if (utf8_valid(cp, len)) r = after_cp(s.set, cp);
    } else if (partial_ok(s.set, cp, need, len)) {
      r = intern_state(s.set, cp, need, len);
    }
  }
  rows_[slot >> kBlockBits][slot & (kBlock - 1)] = r;
  return r;
}

}  // namespace loomp::grammar
