// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
// counter-based generator Loom's samplers use: a row's random numbers are a pure function of
// (key, counter), so CPU and CUDA samplers that follow the same convention draw the same
// numbers. Matches Random123's philox4x32_10 known-answer vectors (see tests/builtin).
//
// Loom's convention (shared with any CUDA sampler):
//   key     = { lo32(rng_key), hi32(rng_key) }
//   counter = { lo32(rng_counter), hi32(rng_counter), 0, 0 }
//   uniform = (out[0] >> 8) * 2^-24, a float in [0, 1) with 24 random bits (exact in float32).
#ifndef LOOM_PLUGINS_SAMPLERS_PHILOX_HPP
#define LOOM_PLUGINS_SAMPLERS_PHILOX_HPP

#include <array>
#include <cstdint>

namespace loomp::philox {

using Counter = std::array<uint32_t, 4>;
using Key = std::array<uint32_t, 2>;

inline constexpr uint32_t kMul0 = 0xD2511F53u;
inline constexpr uint32_t kMul1 = 0xCD9E8D57u;
inline constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
inline constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1

inline constexpr void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Ten rounds; the key is bumped by the Weyl constants between rounds.
inline constexpr Counter philox4x32_10(Counter c, Key k) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0 = 0, lo0 = 0, hi1 = 0, lo1 = 0;
    mulhilo(kMul0, c[0], hi0, lo0);
    mulhilo(kMul1, c[2], hi1, lo1);
    c = Counter{hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0};
    k[0] += kWeyl0;
    k[1] += kWeyl1;
  }
  return c;
}

// The uniform float in [0, 1) for one (key, counter) pair under Loom's convention above.
inline constexpr float uniform01(uint64_t key, uint64_t counter) {
  const Counter out = philox4x32_10(
      Counter{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u},
      Key{static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32)});
  return static_cast<float>(out[0] >> 8) * (1.0f / 16777216.0f);
}

}  // namespace loomp::philox

#endif
