// A stand-in for the KV pool's contents, for the block manager and scheduler tests: each slot of
// each block holds a fingerprint of the whole token prefix whose KV it would hold (the KV at
// position p depends on tokens[0, p]), so a test checks that a sequence's table reads back its
// own prefix at every computed position, whatever was shared, copied, evicted or reused.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "loom/core/kv_blocks.hpp"

namespace loom::test {

// fingerprints[p]: a 64-bit chained hash of tokens[0, p], never 0 (0 marks an unwritten slot).
inline std::vector<uint64_t> prefix_fingerprints(const std::vector<int32_t> &tokens) {
  std::vector<uint64_t> out(tokens.size());
  uint64_t h = 0x9e3779b97f4a7c15ull;
  for (size_t p = 0; p < tokens.size(); ++p) {
    h ^= uint64_t(uint32_t(tokens[p])) + 0x632be59bd9b4e019ull + (h << 6) + (h >> 2);
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 31;
    out[p] = h | 1;
  }
  return out;
}

class KvPoolModel {
 public:
  KvPoolModel(int64_t n_blocks, int32_t block_size)
      : block_size_(block_size), slots_(size_t(n_blocks), std::vector<uint64_t>(size_t(block_size), 0)) {}

  // In list order, as the contract asks.
  void apply(const std::vector<loom::BlockCopy> &copies) {
    for (const loom::BlockCopy &c : copies) slots_[size_t(c.dst)] = slots_[size_t(c.src)];
  }

  // A forward pass writes positions [from, to) of a sequence with `table` and `tokens`.
  void write(const std::vector<int32_t> &table, const std::vector<int32_t> &tokens, int64_t from, int64_t to) {
    const std::vector<uint64_t> f = prefix_fingerprints(tokens);
    for (int64_t p = from; p < to; ++p) slot(table, p) = f[size_t(p)];
  }

  // Empty when positions [0, n) of the sequence hold its own prefix; else the first bad position.
  std::string check(const std::vector<int32_t> &table, const std::vector<int32_t> &tokens, int64_t n) const {
    if (int64_t(table.size()) * block_size_ < n) return "table covers fewer than " + std::to_string(n) + " positions";
    const std::vector<uint64_t> f = prefix_fingerprints(tokens);
    for (int64_t p = 0; p < n; ++p)
      if (slot(table, p) != f[size_t(p)]) return "position " + std::to_string(p) + " holds another prefix";
    return {};
  }

 private:
  uint64_t &slot(const std::vector<int32_t> &table, int64_t p) {
    return slots_[size_t(table[size_t(p / block_size_)])][size_t(p % block_size_)];
  }
  uint64_t slot(const std::vector<int32_t> &table, int64_t p) const {
    return slots_[size_t(table[size_t(p / block_size_)])][size_t(p % block_size_)];
  }

  int32_t block_size_;
  std::vector<std::vector<uint64_t>> slots_;
};

} // namespace loom::test
