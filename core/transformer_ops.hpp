// Private to core: the per-row operations of the supported architectures, shared by the
// reference forward pass (ReferenceModel), the CPU backend (CpuBackend) and the trainer's forward
// pass (DecoderTrainer, through grad_ops.hpp), so all compute exactly the same numbers (the
// backend's linears are its own blocked kernels). Templated on the scalar for the trainer's
// double-precision checks; in float32 with float accumulation, in transformers' order.
// Shapes in comments; all pointers are to contiguous row-major arrays.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <vector>

namespace loom::ops {

// y[n, out] = x[n, in] W[out, in]^T (+ b[out] when b is not null). Each dot product keeps eight
// partial sums in a fixed order (vector lanes; one running sum would serialise on the add's
// latency).
template <class T>
void linear(const T *x, int64_t n, const T *W, int64_t out, int64_t in, const T *b, T *y) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t o = 0; o < out; ++o) {
      const T *w = W + o * in, *xr = x + r * in;
      T acc[8] = {};
      int64_t i = 0;
      for (; i + 8 <= in; i += 8)
        for (int k = 0; k < 8; ++k) acc[k] += xr[i + k] * w[i + k];
      for (; i < in; ++i) acc[0] += xr[i] * w[i];
      const T sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      y[r * out + o] = sum + (b ? b[o] : T(0));
    }
}

// y[H] = x * r * w with r = 1 / sqrt(mean(x^2) + eps); returns r (the trainer's backward uses it).
template <class T>
T rms_norm(const T *x, const T *w, int64_t H, double eps, T *y) {
  T ss = 0;
  for (int64_t i = 0; i < H; ++i) ss += x[i] * x[i];
  const T inv = T(1) / std::sqrt(ss / static_cast<T>(H) + static_cast<T>(eps));
  for (int64_t i = 0; i < H; ++i) y[i] = w[i] * (x[i] * inv);
  return inv;
}

// y[H] = (x - mean) * r * w + b with r = 1 / sqrt(var + eps); returns r and, when mean_out is
// not null, writes the mean (for the trainer's backward).
template <class T>
T layer_norm(const T *x, const T *w, const T *b, int64_t H, double eps, T *y, T *mean_out = nullptr) {
  T mean = 0, var = 0;
  for (int64_t i = 0; i < H; ++i) mean += x[i];
  mean /= static_cast<T>(H);
  for (int64_t i = 0; i < H; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= static_cast<T>(H);
  const T inv = T(1) / std::sqrt(var + static_cast<T>(eps));
  for (int64_t i = 0; i < H; ++i) y[i] = (x[i] - mean) * inv * w[i] + b[i];
  if (mean_out) *mean_out = mean;
  return inv;
}

// Rotary embedding at position `pos` on v[heads, D], rotate-half layout (pairs (i, i + D/2));
// `inverse` rotates by the opposite angle (the rotation's backward). In float the angle is
// computed in float32, as transformers does, to share its rounding; in double in double.
template <class T>
void rope(T *v, int64_t heads, int64_t D, int64_t pos, const std::vector<double> &inv_freq, bool inverse = false) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const T angle = static_cast<T>(pos) * static_cast<T>(inv_freq[static_cast<size_t>(i)]);
    const T c = std::cos(angle), s = inverse ? -std::sin(angle) : std::sin(angle);
    for (int64_t h = 0; h < heads; ++h) {
      T *r = v + h * D;
      const T a = r[i], b = r[i + half];
      r[i] = a * c - b * s;
      r[i + half] = b * c + a * s;
    }
  }
}

// The (cos, sin) of every rotary angle for positions [0, positions): [positions, D/2, 2] float32,
// each angle rounded to float32 first as rope<float> computes it (transformers' rounding), for
// kernels that read the table instead of computing the angles.
inline std::vector<float> rope_cos_sin_table(const std::vector<double> &inv_freq, int64_t positions, int64_t D) {
  const int64_t half = D / 2;
  std::vector<float> table(static_cast<size_t>(positions * half * 2));
  for (int64_t p = 0; p < positions; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(p) * static_cast<float>(inv_freq[static_cast<size_t>(i)]);
      table[static_cast<size_t>((p * half + i) * 2)] = std::cos(angle);
      table[static_cast<size_t>((p * half + i) * 2 + 1)] = std::sin(angle);
    }
  return table;
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

template <class T>
T silu(T x) {
  return x / (T(1) + std::exp(-x));
}

// GPT-2's tanh approximation of GELU.
template <class T>
T gelu_new(T x) {
  const T c = std::sqrt(T(2) / std::numbers::pi_v<T>);
  return T(0.5) * x * (T(1) + std::tanh(c * (x + T(0.044715) * x * x * x)));
}

} // namespace loom::ops
