// KvBlockManager: block tables, the prefix cache and its LRU (see kv_blocks.hpp for the contract).
#include "loom/core/kv_blocks.hpp"

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

#include "loom/core/error.hpp"

namespace loom {

namespace {

std::string seq_name(int64_t seq) { return "kv blocks: sequence " + std::to_string(seq); }

int64_t blocks_for(int64_t n_tokens, int32_t block_size) { return (n_tokens + block_size - 1) / block_size; }

} // namespace

size_t KvBlockManager::CacheKeyHash::operator()(const CacheKey &k) const {
  // FNV-1a over the parent and the tokens; equality still compares them all.
  uint64_t h = (1469598103934665603ull ^ k.parent) * 1099511628211ull ^ k.domain;
  for (int32_t t : k.tokens) {
    h ^= uint64_t(uint32_t(t));
    h *= 1099511628211ull;
  }
  return size_t(h ^ (h >> 29));
}

KvBlockManager::KvBlockManager(KvBlockOptions options)
    : block_size_(options.block_size), prefix_caching_(options.prefix_caching) {
  if (options.n_blocks < 1 || options.n_blocks > std::numeric_limits<int32_t>::max())
    throw runtime_error("kv blocks: n_blocks must be in [1, 2^31), got " + std::to_string(options.n_blocks));
  if (options.block_size < 1)
    throw runtime_error("kv blocks: block_size must be at least 1, got " + std::to_string(options.block_size));
  blocks_.resize(size_t(options.n_blocks));
  free_.reserve(blocks_.size());
  for (int64_t b = options.n_blocks - 1; b >= 0; --b) free_.push_back(int32_t(b));
}

KvBlockManager::Sequence &KvBlockManager::sequence(int64_t seq, const char *what) {
  return const_cast<Sequence &>(std::as_const(*this).sequence(seq, what));
}

const KvBlockManager::Sequence &KvBlockManager::sequence(int64_t seq, const char *what) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw runtime_error(seq_name(seq) + " is not live (" + what + ")");
  return it->second;
}

int32_t KvBlockManager::allocate() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else {
    // Callers check free_blocks() first, so the LRU is not empty here.
    b = lru_.front();
    lru_.pop_front();
    blocks_[size_t(b)].in_lru = false;
    uncache(b);
    ++stats_.evictions;
  }
  Block &blk = blocks_[size_t(b)];
  blk.refs = 1;
  blk.node = 0; // its old identity dies here: nothing cached under it is reachable any more
  blk.key.tokens.clear();
  return b;
}

void KvBlockManager::uncache(int32_t block) {
  Block &blk = blocks_[size_t(block)];
  if (!blk.cached) return;
  cache_.erase(blk.key);
  blk.cached = false;
}

void KvBlockManager::unref(int32_t block) {
  Block &blk = blocks_[size_t(block)];
  if (--blk.refs > 0) return;
  if (blk.cached) {
    lru_.push_back(block);
    blk.lru_pos = std::prev(lru_.end());
    blk.in_lru = true;
  } else {
    blk.node = 0;
    blk.key.tokens.clear();
    free_.push_back(block);
  }
}

int64_t KvBlockManager::begin(int64_t seq, const std::vector<int32_t> &tokens, uint64_t domain) {
  if (live(seq)) throw runtime_error(seq_name(seq) + " is already live (begin)");
  Sequence s;
  s.domain = domain;
  if (prefix_caching_) {
    CacheKey key{domain, 0, {}};
    const size_t bs = size_t(block_size_);
    for (size_t at = 0; at + bs <= tokens.size(); at += bs) {
      key.tokens.assign(tokens.begin() + std::ptrdiff_t(at), tokens.begin() + std::ptrdiff_t(at + bs));
      auto it = cache_.find(key);
      if (it == cache_.end()) break;
      const int32_t b = it->second;
      Block &blk = blocks_[size_t(b)];
      if (blk.refs++ == 0 && blk.in_lru) {
        lru_.erase(blk.lru_pos);
        blk.in_lru = false;
      }
      s.table.push_back(b);
      s.nodes.push_back(blk.node);
      key.parent = blk.node;
    }
  }
  const int64_t hit = int64_t(s.table.size()) * block_size_;
  s.computed = std::max<int64_t>(0, std::min(hit, int64_t(tokens.size()) - 1));
  s.queried = int64_t(tokens.size());
  s.hit = s.computed;
  stats_.queried_tokens += s.queried;
  stats_.hit_tokens += s.hit;
  const int64_t result = s.computed;
  seqs_.emplace(seq, std::move(s));
  return result;
}

int64_t KvBlockManager::copies_needed(const Sequence &s, int64_t first_block, int64_t end_block) const {
  int64_t n = 0;
  for (int64_t i = std::max(first_block, s.dropped); i < end_block; ++i)
    if (blocks_[size_t(s.table[size_t(i)])].refs > 1) ++n;
  return n;
}

int64_t KvBlockManager::blocks_needed(int64_t seq, int64_t n_tokens) const {
  const Sequence &s = sequence(seq, "blocks_needed");
  return blocks_needed(seq, n_tokens, std::min(s.computed, std::max<int64_t>(n_tokens, 0)));
}

int64_t KvBlockManager::blocks_needed(int64_t seq, int64_t n_tokens, int64_t written_from) const {
  const Sequence &s = sequence(seq, "blocks_needed");
  if (written_from < 0 || written_from > n_tokens)
    throw runtime_error(seq_name(seq) + ": written_from " + std::to_string(written_from) + " outside [0, " +
                        std::to_string(n_tokens) + "] (blocks_needed)");
  const int64_t have = int64_t(s.table.size());
  const int64_t want = blocks_for(n_tokens, block_size_);
  return std::max<int64_t>(0, want - have) + copies_needed(s, written_from / block_size_, std::min(want, have));
}

bool KvBlockManager::grow(int64_t seq, int64_t n_tokens, int64_t written_from, std::vector<BlockCopy> &copies) {
  const int64_t need = blocks_needed(seq, n_tokens, written_from); // validates seq and the range
  if (need > free_blocks()) return false;
  Sequence &s = sequence(seq, "grow");
  const int64_t want = blocks_for(n_tokens, block_size_);
  const int64_t first = written_from / block_size_;
  const int64_t end = std::min(want, int64_t(s.table.size()));
  if (first < s.dropped && first < end)
    throw runtime_error(seq_name(seq) + ": writes from position " + std::to_string(written_from) +
                        ", in blocks it dropped behind its window (grow)");
  // Blocks from `first` on get new contents: their prefix identities must be earned again.
  if (int64_t(s.nodes.size()) > first) s.nodes.resize(size_t(first));
  for (int64_t i = first; i < end; ++i) {
    int32_t &slot = s.table[size_t(i)];
    Block &blk = blocks_[size_t(slot)];
    if (blk.refs > 1) {
      // Allocate before dropping our reference, so the copy never lands on its own source.
      const int32_t copy = allocate();
      copies.push_back({slot, copy});
      ++stats_.cow_copies;
      unref(slot);
      slot = copy;
    } else {
      // Ours alone: write in place. Its key (and node) stay on the block so computed() can give
      // it the same identity back, keeping cached continuations of it reachable.
      uncache(slot);
    }
  }
  while (int64_t(s.table.size()) < want) s.table.push_back(allocate());
  return true;
}

void KvBlockManager::computed(int64_t seq, const std::vector<int32_t> &tokens, int64_t n_computed) {
  Sequence &s = sequence(seq, "computed");
  if (n_computed < 0 || n_computed > int64_t(tokens.size()) ||
      n_computed > int64_t(s.table.size()) * block_size_)
    throw runtime_error(seq_name(seq) + ": computed " + std::to_string(n_computed) + " positions but it has " +
                        std::to_string(tokens.size()) + " tokens and " + std::to_string(s.table.size()) +
                        " blocks (computed)");
  s.computed = std::max(s.computed, n_computed);
  if (!prefix_caching_) return;
  const size_t bs = size_t(block_size_);
  const size_t full = size_t(n_computed) / bs;
  for (size_t i = s.nodes.size(); i < full; ++i) {
    CacheKey key{s.domain, i == 0 ? 0 : s.nodes[i - 1],
                 std::vector<int32_t>(tokens.begin() + std::ptrdiff_t(i * bs),
                                      tokens.begin() + std::ptrdiff_t((i + 1) * bs))};
    auto it = cache_.find(key);
    if (it != cache_.end()) { // another block caches this prefix; ours stays private
      s.nodes.push_back(blocks_[size_t(it->second)].node);
      continue;
    }
    const int32_t b = s.table[i];
    if (b == kDropped)
      throw runtime_error(seq_name(seq) + ": block " + std::to_string(i) + " was dropped before it was computed (computed)");
    Block &blk = blocks_[size_t(b)];
    if (blk.cached) // cached under another key: the caller's tokens are not what the block holds
      throw runtime_error(seq_name(seq) + ": the tokens of block " + std::to_string(i) +
                          " differ from those it was computed with (computed)");
    if (blk.node == 0 || !(blk.key == key)) {
      blk.node = next_node_++;
      blk.key = key;
    }
    blk.cached = true;
    cache_.emplace(std::move(key), b);
    s.nodes.push_back(blk.node);
  }
}

const std::vector<int32_t> &KvBlockManager::table(int64_t seq) const { return sequence(seq, "table").table; }

void KvBlockManager::fork(int64_t src, int64_t dst) {
  const Sequence &s = sequence(src, "fork source");
  if (live(dst)) throw runtime_error(seq_name(dst) + " is already live (fork from " + std::to_string(src) + ")");
  Sequence d;
  d.table = s.table;
  d.nodes = s.nodes;
  d.computed = s.computed;
  d.dropped = s.dropped;
  d.domain = s.domain;
  for (int32_t b : d.table)
    if (b != kDropped) ++blocks_[size_t(b)].refs;
  seqs_.emplace(dst, std::move(d));
}

void KvBlockManager::release(int64_t seq) {
  Sequence &s = sequence(seq, "release");
  // Tail first, so that in the LRU a sequence's continuation is evicted before its prefix.
  for (auto it = s.table.rbegin(); it != s.table.rend(); ++it)
    if (*it != kDropped) unref(*it);
  seqs_.erase(seq);
}

int64_t KvBlockManager::drop_before(int64_t seq, int64_t position) {
  Sequence &s = sequence(seq, "drop_before");
  // Only computed blocks: a block still to be written is not behind anything yet.
  const int64_t end = std::min<int64_t>(std::min(position, s.computed) / block_size_, int64_t(s.table.size()));
  int64_t n = 0;
  // Front first: in the LRU a dropped prefix goes before the continuation still in use.
  for (; s.dropped < end; ++s.dropped, ++n) {
    int32_t &slot = s.table[size_t(s.dropped)];
    unref(slot);
    slot = kDropped;
  }
  return n;
}

void KvBlockManager::cancel(int64_t seq) {
  const Sequence &s = sequence(seq, "cancel");
  stats_.queried_tokens -= s.queried;
  stats_.hit_tokens -= s.hit;
  release(seq);
}

} // namespace loom
