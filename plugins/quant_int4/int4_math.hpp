// The arithmetic of group-wise 4-bit weights, shared by the `int4` quantizer's quantize,
// linear, dequantize and import paths (plugin-internal; no ABI types).
//
// A weight W [out, in] is cut into groups of `group` consecutive inputs of one output row.
// Each group g of row o has a scale s[o, g] and a zero point z[o, g] in [0, 15]; a value is
// stored as the code q in [0, 15] and read back as (q - z) * s.
//   zero_point (asymmetric, AutoAWQ's default): with lo = min(min, 0) and hi = max(max, 0) (the
//     range holds 0, so z fits), s = (hi - lo) / 15, z = round(-lo / s),
//     q = clamp(round(w / s) + z, 0, 15); error at most s (half a step from rounding, half a
//     step more where z's rounding pushes an extreme past the code range).
//   symmetric: s = max|w| / 7, z = 8, q = clamp(round(w / s), -8, 7) + 8; error at most s / 2.
// Activation-aware scaling (AWQ): the stored codes quantize W diag(a) for a per-input scale a,
// and the product divides the input by a first, so x W~^T = (x / a) (Q(W diag(a)))^T. Inputs
// with large activations get larger a, so their weights lose less to rounding.
// Codes are packed two to a byte along the input: byte j of a row holds input 2j in its low
// nibble and input 2j + 1 in its high nibble.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace loomp::int4q {

struct Int4Weight {
  int64_t out = 0, in = 0, group = 0;
  bool zero_point = true;
  std::vector<uint8_t> packed;    // [out, in / 2]
  std::vector<float> scales;      // [out, in / group]
  std::vector<uint8_t> zeros;     // [out, in / group], each in [0, 15]
  std::vector<float> act_scale;   // [in] (AWQ), or empty

  int64_t groups() const { return in / group; }
  uint8_t code(int64_t o, int64_t i) const {
    const uint8_t b = packed[static_cast<size_t>(o * (in / 2) + i / 2)];
    return (i & 1) ? static_cast<uint8_t>(b >> 4) : static_cast<uint8_t>(b & 15);
  }
};

// A weight of that shape with its codes zero and its scales and zero points sized, to be filled.
Int4Weight sized_weight(int64_t out, int64_t in, int64_t group, bool zero_point);

// Quantizes W [out, in] (row-major float32), scaled by act_scale ([in]) first when it is not
// null (act_scale is then kept in the result). clip ([out, in / group], optional): a group's
// (scaled) values are limited to [-clip, clip] before its range is taken; 0 = no limit.
// in % group == 0 and group even, checked by the caller.
Int4Weight quantize(const float* w, int64_t out, int64_t in, int64_t group, bool zero_point, const float* act_scale,
                    const float* clip = nullptr);

// Row o of W~ (the value the product uses, act_scale divided out) into row[in].
void dequantize_row(const Int4Weight& q, int64_t o, float* row);

// y[n, out] = x[n, in] W~^T (+ bias[out]), in float32 (the rows of W~ unpacked on the fly).
void linear(const Int4Weight& q, const float* x, int64_t n, const float* bias, float* y);

struct AwqChoice {
  double alpha = 0;           // a = mean|x|^alpha, normalised; 0 is plain round-to-nearest
  double error = 0;           // sum over the searched rows of |x (W - W~)^T|^2 at that alpha
  double rtn_error = 0;       // the same at alpha = 0
  std::vector<float> scale;   // a [in]
};

// AWQ's scale search: for alpha in {0, 1/grid, ..., (grid - 1)/grid}, a = mean_n |x[n]|^alpha
// divided by sqrt(max a * min a); keeps the alpha whose quantized product differs least from
// the exact one on the calibration rows x [n, in], measured over at most `rows` output rows
// (evenly spaced) to bound the cost.
AwqChoice awq_search(const float* w, int64_t out, int64_t in, int64_t group, bool zero_point, const float* x,
                     int64_t n, int grid, int64_t rows);

// AWQ's clip search: for each group of each row (scaled by act_scale when not null), the range
// limit among max|w| * (1 - k / (2 steps)), k < steps, whose quantized group gives the least
// squared error on the calibration inputs x [n, in] (divided by act_scale), through the group's
// Gram matrix. Returns clip [out, in / group] for quantize (0 where the full range is best).
std::vector<float> clip_search(const float* w, int64_t out, int64_t in, int64_t group, bool zero_point,
                               const float* act_scale, const float* x, int64_t n, int steps);

}  // namespace loomp::int4q
