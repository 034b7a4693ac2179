// One sampler instance's masking over shared TokenTables: its StepCache and walk scratch, the
// masks of the states it has seen, and writing a mask into a row of logits.
//
// Everything is sized when the Masker is made and then reused, never freed or reallocated per
// token: when the StepCache or the mask slots fill up they are reset in O(1), and the next few
// masks are computed afresh. So no token pays for a cache growing or being dropped.
#ifndef LOOM_PLUGINS_GRAMMAR_MASKER_HPP
#define LOOM_PLUGINS_GRAMMAR_MASKER_HPP

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "step_cache.hpp"
#include "token_tables.hpp"
#include "trie_walk.hpp"

namespace loomp::grammar {

class Masker {
 public:
  explicit Masker(std::shared_ptr<const TokenTables> tables);
  Masker(const Masker&) = delete;
  Masker& operator=(const Masker&) = delete;

  // The allowed-token bitset of s (TokenTables::mask), kept for the next time s comes back.
  // Valid until the next call. Throws GrammarError when the matcher's limits are hit.
  std::span<const uint64_t> mask(const State& s, MaskStats* stats = nullptr);
  // Sets logits[i] = -INFINITY for every i in [0, n) that the mask of s refuses; ids at or past
  // the vocabulary's size are always refused. The same as write(mask(s), logits, n).
  void apply(const State& s, float* logits, size_t n) { write(mask(s), logits, n); }
  // Writes a mask (from mask()) into a row of logits, as apply() does.
  void write(std::span<const uint64_t> mask, float* logits, size_t n) const;
  // The same for a sequence that has ended: only end tokens keep their logits.
  void apply_ended(float* logits, size_t n) const;

  const TokenTables& tables() const { return *tables_; }
  size_t resets() const { return resets_; }  // how often the StepCache filled up

 private:
  uint64_t* slot(size_t i) { return blocks_[i / kPerBlock].get() + (i % kPerBlock) * words_; }
  static constexpr size_t kPerBlock = 16;

  std::shared_ptr<const TokenTables> tables_;
  size_t words_;
  StepCache cache_;
  TrieWalk walk_;
  std::vector<uint64_t> slot_of_;  // by StepCache state id: epoch << 32 | mask slot
  uint64_t epoch_ = 1;             // slot_of_ entries of another epoch are stale
  size_t used_ = 0;                // mask slots handed out in this epoch
  std::vector<std::unique_ptr<uint64_t[]>> blocks_;  // kPerBlock masks each
  size_t resets_ = 0;
};

}  // namespace loomp::grammar

#endif
