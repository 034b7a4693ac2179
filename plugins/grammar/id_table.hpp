// A hash set of small integer ids whose keys live elsewhere (in the owner's arrays): open
// addressing, at most half full. clear() is O(1) (slots carry an epoch), so a cache that is
// dropped now and then never pays for freeing or wiping its index.
#ifndef LOOM_PLUGINS_GRAMMAR_ID_TABLE_HPP
#define LOOM_PLUGINS_GRAMMAR_ID_TABLE_HPP

#include <cstddef>
#include <cstdint>
#include <vector>

namespace loomp::grammar {

class IdTable {
 public:
  static constexpr uint32_t kNone = UINT32_MAX;

  explicit IdTable(size_t capacity = 512) { reserve(capacity); }

  // The id whose key hashes to h and satisfies same(id), or kNone.
  template <class Same>
  uint32_t find(uint64_t h, Same&& same) const {
    const size_t mask = slots_.size() - 1;
    for (size_t i = spread(h) & mask;; i = (i + 1) & mask) {
      const uint64_t s = slots_[i];
      if ((s >> 32) != epoch_) return kNone;
      if (same(static_cast<uint32_t>(s))) return static_cast<uint32_t>(s);
    }
  }
  // Adds an id not yet present; hash_of(id) rehashes the others when the table grows.
  template <class HashOf>
  void insert(uint32_t id, uint64_t h, HashOf&& hash_of) {
    if ((count_ + 1) * 2 > slots_.size()) {
      std::vector<uint64_t> old;
      old.swap(slots_);
      const uint64_t old_epoch = epoch_;
      slots_.assign(old.size() * 2, 0);
      epoch_ = 1;
      count_ = 0;
      for (uint64_t s : old)
        if ((s >> 32) == old_epoch) place(static_cast<uint32_t>(s), hash_of(static_cast<uint32_t>(s)));
    }
    place(id, h);
  }
  // Room for `n` ids without growing.
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    if (cap > slots_.size()) {
      slots_.assign(cap, 0);
      epoch_ = 1;
      count_ = 0;
    }
  }
  void clear() {
    ++epoch_;
    count_ = 0;
  }

 private:
  static uint64_t spread(uint64_t h) {
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDull;
    return h ^ (h >> 33);
  }
  void place(uint32_t id, uint64_t h) {
    const size_t mask = slots_.size() - 1;
    size_t i = spread(h) & mask;
    while ((slots_[i] >> 32) == epoch_) i = (i + 1) & mask;
    slots_[i] = (epoch_ << 32) | id;
    ++count_;
  }
  std::vector<uint64_t> slots_;  // epoch << 32 | id; a slot of another epoch is free
  uint64_t epoch_ = 1;
  size_t count_ = 0;
};

}  // namespace loomp::grammar

#endif
