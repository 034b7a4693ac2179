// Masker: cached masks and writing them into logits.
#include "masker.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

namespace loomp::grammar {
namespace {

// One instance's memory, all of it taken (and touched) at construction: a StepCache of kStates
// states (about 1 KiB of transitions each) and kNodes stack nodes, and kMasks masks
// (vocabulary / 8 bytes each: 2 MiB for a 128k vocabulary); about 4 MiB in all. Small on
// purpose: a mask computed afresh costs tens of microseconds, so a larger cache saves little,
// while every instance pays for its memory when created.
constexpr size_t kStates = 2048;
constexpr size_t kNodes = size_t{1} << 15;
constexpr size_t kMasks = 128;

// kLanes[b][j]: all ones where bit j of b is set (token allowed), else zero. Writing a mixed
// 64-token word is then 8 selects of 8 lanes each, which compile to vector instructions,
// instead of one store per refused token.
constexpr auto kLanes = [] {
  std::array<std::array<uint32_t, 8>, 256> t{};
  for (size_t b = 0; b < 256; ++b)
    for (size_t j = 0; j < 8; ++j) t[b][j] = ((b >> j) & 1) != 0 ? 0xFFFFFFFFu : 0;
  return t;
}();
constexpr uint32_t kMinusInf = 0xFF800000u;  // -INFINITY's bits

bool at_most_two(uint64_t x) {
  x &= x - 1;
  return (x & (x - 1)) == 0;
}

// logits[j] = -INFINITY where bit j of `allowed` is clear, for j < 64.
void refuse_word(float* logits, uint64_t allowed) {
  for (size_t k = 0; k < 8; ++k, allowed >>= 8) {
    const auto& lane = kLanes[allowed & 0xFF];
    uint32_t x[8];
    std::memcpy(x, logits + 8 * k, sizeof x);
    for (size_t j = 0; j < 8; ++j) x[j] = (x[j] & lane[j]) | (kMinusInf & ~lane[j]);
    std::memcpy(logits + 8 * k, x, sizeof x);
  }
}

}  // namespace

Masker::Masker(std::shared_ptr<const TokenTables> tables)
    : tables_(std::move(tables)), words_(tables_->words()), cache_(tables_->matcher()) {
  // Some headroom past the limits, for the states one mask adds after the last check.
  cache_.reserve(kStates + 1024, kNodes + 8192);
  slot_of_.assign(kStates + 1024, 0);
  for (size_t i = 0; i < kMasks; i += kPerBlock) blocks_.push_back(std::make_unique<uint64_t[]>(kPerBlock * words_));
}

std::span<const uint64_t> Masker::mask(const State& s, MaskStats* stats) {
  if (cache_.states() >= kStates || cache_.nodes() >= kNodes) {
    cache_.clear();  // the state ids the masks are found by go with it
    ++epoch_;
    used_ = 0;
    ++resets_;
  }
  const uint32_t id = cache_.intern(s);
  if (id >= slot_of_.size()) slot_of_.resize(size_t{id} + 1, 0);
  if ((slot_of_[id] >> 32) == epoch_) {
    if (stats != nullptr) ++stats->cached;
    return {slot(slot_of_[id] & 0xFFFFFFFFu), words_};
  }
  if (used_ == kMasks) {  // forget every mask; their slots are reused from the first
    ++epoch_;
    used_ = 0;
  }
  uint64_t* out = slot(used_);
  tables_->mask(cache_, walk_, id, out, stats);  // may throw: the slot is not taken then
  if (id >= slot_of_.size()) slot_of_.resize(size_t{id} + 1, 0);
  slot_of_[id] = (epoch_ << 32) | used_++;
  return {out, words_};
}

void Masker::write(std::span<const uint64_t> m, float* logits, size_t n) const {
  const size_t known = std::min(n, tables_->vocab().size());
  const size_t full_words = known / 64;
  // One strategy per mask, so that the branches below stay predictable, chosen from every 8th
  // word (the choice changes the speed, never the result): a narrow mask (most words refuse
  // every token) fills words; a dense one (inside a string almost every token goes) stores
  // -INFINITY per refused token; otherwise a word is written 8 lanes at a time.
  size_t refusing = 0, allowing = 0, sampled = 0;
  for (size_t w = 0; w < full_words; w += 8, ++sampled) {
    refusing += m[w] == 0;
    allowing += m[w] == ~uint64_t{0};
  }
  const bool narrow = 4 * refusing > sampled, dense = !narrow && 8 * allowing > sampled;
  for (size_t w = 0; w < full_words; ++w) {
    float* x = logits + 64 * w;
    const uint64_t allowed = m[w];
    if (allowed == ~uint64_t{0}) continue;
    if (allowed == 0) {
      std::fill_n(x, 64, -INFINITY);
    } else if (narrow && at_most_two(allowed)) {  // fill the word, then put back the one or two kept
      const size_t a = allowed != 0 ? static_cast<size_t>(__builtin_ctzll(allowed)) : 0;
      const size_t b = static_cast<size_t>(63 - __builtin_clzll(allowed | 1));
      const float xa = x[a], xb = x[b];
      std::fill_n(x, 64, -INFINITY);
      if (allowed != 0) {
        x[a] = xa;
        x[b] = xb;
      }
    } else if (dense) {
      uint64_t refused = ~allowed;
      int k = 0;
      do {
        x[__builtin_ctzll(refused)] = -INFINITY;
        refused &= refused - 1;
      } while (refused != 0 && ++k < 16);
      if (refused != 0) refuse_word(x, allowed);  // rewrites those sixteen, harmlessly
    } else {
      refuse_word(x, allowed);
    }
  }
  if (full_words * 64 < known)  // the last, partial word
    for (uint64_t refused = ~m[full_words] & ((uint64_t{1} << (known % 64)) - 1); refused != 0; refused &= refused - 1)
      logits[64 * full_words + static_cast<size_t>(__builtin_ctzll(refused))] = -INFINITY;
  std::fill(logits + known, logits + n, -INFINITY);
}

void Masker::apply_ended(float* logits, size_t n) const {
  const TokenIndex& v = tables_->vocab();
  const size_t known = std::min(n, v.size());
  std::vector<std::pair<size_t, float>> kept;
  for (int32_t id : v.ends())
    if (id >= 0 && static_cast<size_t>(id) < known) kept.emplace_back(static_cast<size_t>(id), logits[id]);
  std::fill(logits, logits + n, -INFINITY);
  for (auto [i, x] : kept) logits[i] = x;
}

}  // namespace loomp::grammar
