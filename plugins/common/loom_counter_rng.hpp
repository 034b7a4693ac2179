// A tiny counter-based RNG for adapters' initialisation and dropout (lora, bottleneck): every draw is a pure
// function of (seed, stream, index), so results do not depend on call order or threads.
// splitmix64's finaliser is a good 64-bit mixer; quality is ample for init and dropout masks.
#ifndef LOOM_PLUGINS_COMMON_COUNTER_RNG_HPP
#define LOOM_PLUGINS_COMMON_COUNTER_RNG_HPP

#include <cstdint>
#include <string_view>

namespace loomp {

inline constexpr uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// FNV-1a: a stable hash of a module name (std::hash is not stable across builds).
inline constexpr uint64_t fnv1a(std::string_view s) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (char c : s) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001B3ull;
  }
  return h;
}

// Uniform in [0, 1) with 24 bits, for (seed, stream, index).
inline constexpr float uniform01(uint64_t seed, uint64_t stream, uint64_t index) {
  const uint64_t r = mix64(mix64(seed ^ mix64(stream)) + index);
  return static_cast<float>(r >> 40) * (1.0f / 16777216.0f);
}

}  // namespace loomp

#endif
