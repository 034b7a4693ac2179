// Private to core: the per-row operations of the supported architectures, shared by the
// reference forward pass (ReferenceModel) and the CPU backend (CpuBackend), so both compute
// exactly the same numbers (the backend's linears are its own blocked kernels). Float32 with float accumulation, in transformers' order.
// Shapes in comments; all pointers are to contiguous row-major float32.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <vector>

namespace loom::ops {

// y[n, out] = x[n, in] W[out, in]^T (+ b[out] when b is not null)
inline void linear(const float *x, int64_t n, const float *W, int64_t out, int64_t in, const float *b, float *y) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t o = 0; o < out; ++o) {
      const float *w = W + o * in;
      const float *xr = x + r * in;
      float acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += xr[i] * w[i];
      y[r * out + o] = acc + (b ? b[o] : 0.0f);
    }
}

// y[H] = x / sqrt(mean(x^2) + eps) * w
inline void rms_norm(const float *x, const float *w, int64_t H, double eps, float *y) {
  float ss = 0;
  for (int64_t i = 0; i < H; ++i) ss += x[i] * x[i];
  float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
  for (int64_t i = 0; i < H; ++i) y[i] = w[i] * (x[i] * inv);
}

// y[H] = (x - mean) / sqrt(var + eps) * w + b
inline void layer_norm(const float *x, const float *w, const float *b, int64_t H, double eps, float *y) {
  float mean = 0, var = 0;
  for (int64_t i = 0; i < H; ++i) mean += x[i];
  mean /= static_cast<float>(H);
  for (int64_t i = 0; i < H; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= static_cast<float>(H);
  float inv = 1.0f / std::sqrt(var + static_cast<float>(eps));
  for (int64_t i = 0; i < H; ++i) y[i] = (x[i] - mean) * inv * w[i] + b[i];
}

// Rotary embedding at position `pos` on v[heads, D], rotate-half layout (pairs (i, i + D/2)).
// The angle is computed in float32, as transformers does, to share its rounding.
inline void rope(float *v, int64_t heads, int64_t D, int64_t pos, const std::vector<double> &inv_freq) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    float angle = static_cast<float>(pos) * static_cast<float>(inv_freq[static_cast<size_t>(i)]);
    float c = std::cos(angle), s = std::sin(angle);
    for (int64_t h = 0; h < heads; ++h) {
      float *r = v + h * D;
      float a = r[i], b = r[i + half];
      r[i] = a * c - b * s;
      r[i + half] = b * c + a * s;
    }
  }
}

// bfloat16 <-> float32. A bfloat16 is the top half of a float32, so widening is a shift and is
// exact; narrowing rounds to nearest, ties to even (NaN stays a quiet NaN). Narrowing a value
// that came from bfloat16 is exact; one that came from float16 or float32 is rounded.
inline float bf16_to_float(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }
inline uint16_t float_to_bf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

// GPT-2's tanh approximation of GELU.
inline float gelu_new(float x) {
  const float c = std::sqrt(2.0f / std::numbers::pi_v<float>);
  return 0.5f * x * (1.0f + std::tanh(c * (x + 0.044715f * x * x * x)));
}

} // namespace loom::ops
