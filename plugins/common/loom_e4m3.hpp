// FP8 E4M3 ("e4m3fn": OCP 8-bit floating point, the variant without infinities) encode and
// decode, for C++ and CUDA code alike (host and device): plugins that store values as fp8 (the
// sdpa and flash KV caches) and their tests share one definition, so a CPU and a GPU path store
// identical bytes.
//
// A code is s eeee mmm: sign, exponent with bias 7, three mantissa bits.
//   exponent 1..15: (-1)^s * (1 + m/8) * 2^(e - 7)   (e = 15, m = 7 is NaN: no infinities)
//   exponent 0:     (-1)^s * (m/8) * 2^-6            (subnormals; m = 0 is +-0)
// The largest finite value is 0x7E = 1.75 * 2^8 = 448, the smallest subnormal 2^-9.
//
// Encoding rounds to the nearest code, ties to the even code (last mantissa bit 0), and
// saturates: magnitudes at or above 448 become +-448, never NaN, because callers scale their
// values into range first and a clamped outlier is better than a poisoned one. A NaN input
// encodes to NaN (0x7F with its sign).
#ifndef LOOM_PLUGINS_COMMON_E4M3_HPP
#define LOOM_PLUGINS_COMMON_E4M3_HPP

#include <math.h>
#include <string.h>

#include <cstdint>

#if defined(__CUDACC__)
#define LOOM_HOST_DEVICE __host__ __device__
#else
#define LOOM_HOST_DEVICE
#endif

namespace loomp::e4m3 {

constexpr float kMax = 448.0f;

// x rounded to an integer, ties to even, whatever the FPU rounding mode. |x| < 2^22, so the
// fraction x - floor(x) is exact.
LOOM_HOST_DEVICE inline float round_half_even(float x) {
  const float f = floorf(x);
  const float frac = x - f;
  if (frac > 0.5f) return f + 1.0f;
  if (frac < 0.5f) return f;
  return fmodf(f, 2.0f) == 0.0f ? f : f + 1.0f;
}

// The sign bit of x (set for -0.0 and for a NaN with its sign bit set, too).
LOOM_HOST_DEVICE inline bool sign_bit(float x) { return signbit(x) != 0; }

LOOM_HOST_DEVICE inline float decode(uint8_t code) {
  const int e = (code >> 3) & 0xF, m = code & 0x7;
  const float sign = (code & 0x80) != 0 ? -1.0f : 1.0f;
  if (e == 0xF && m == 0x7) return NAN;
  // Subnormal m * 2^-9; normal (8 + m) * 2^(e - 10): both products of small integers and powers
  // of two, so exact.
  if (e == 0) return sign * ldexpf(static_cast<float>(m), -9);
  return sign * ldexpf(static_cast<float>(8 + m), e - 10);
}

LOOM_HOST_DEVICE inline uint8_t encode(float x) {
  const uint8_t sign = sign_bit(x) ? 0x80 : 0x00;
  if (x != x) return static_cast<uint8_t>(sign | 0x7F);
  const float a = fabsf(x);
  if (a >= kMax) return static_cast<uint8_t>(sign | 0x7E);
  if (a == 0.0f) return sign;  // frexpf(0) gives no binade
  // The binade of a: a = f * 2^ex with f in [0.5, 1), so a in [2^(ex-1), 2^ex). Below 2^-6 the
  // spacing stays that of the subnormals, 2^-9.
  int ex = 0;
  frexpf(a, &ex);
  const int e = ex - 1 < -6 ? -6 : ex - 1;
  // a in units of the spacing 2^(e-3); scaling by a power of two is exact, the rounding is the
  // only inexact step. q counts units from 0, so q in [0, 16] for normals: a carry into the
  // next binade (q = 16) lands on the right code because codes are monotonic in q.
  const float q = round_half_even(ldexpf(a, 3 - e));
  const int units = static_cast<int>(q);
  int code = 0;
  if (e == -6 && units < 8) {
    code = units;  // subnormal (or zero)
  } else {
    // units in [8, 16]: normal with mantissa units - 8, exponent field e + 7; units = 16 is the
    // next exponent's mantissa 0, which (e + 7) * 8 + units also gives.
    code = (e + 7) * 8 + (units - 8);
  }
  if (code > 0x7E) code = 0x7E;  // a just below 448 cannot round past it, but stay NaN-free
  return static_cast<uint8_t>(sign | code);
}

// encode() by integer arithmetic on the float's bits (no frexpf/ldexpf; about ten times faster on
// the host), for bulk encoding such as quantizing a model's weights at load: the same code for
// every input (e4m3_test compares the two over a stride of all 2^32 bit patterns and every
// midpoint). Normals round their 23-bit mantissa to 3 bits, ties to even, by adding half a unit
// less one plus the kept last bit; below 2^-6 the value in units of 2^-9 (an exact scaling)
// rounds like encode's.
LOOM_HOST_DEVICE inline uint8_t encode_bits(float x) {
  uint32_t b = 0;
  memcpy(&b, &x, sizeof(b));
  const uint8_t sign = static_cast<uint8_t>((b >> 24) & 0x80u);
  const uint32_t a = b & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint8_t>(sign | 0x7F);  // NaN
  if (a >= 0x43E00000u) return static_cast<uint8_t>(sign | 0x7E);  // 448 and up saturate
  if (a < 0x3C800000u) {                                           // below 2^-6: subnormal codes
    float f = 0.0f;
    memcpy(&f, &a, sizeof(f));
    return static_cast<uint8_t>(sign | static_cast<int>(round_half_even(f * 512.0f)));  // 8 is 2^-6's code
  }
  const uint32_t r = (a + 0x7FFFFu + ((a >> 20) & 1u)) & 0xFFF00000u;
  // Exponent field: the float's (bias 127) rebased to bias 7; a carry into it is already in r.
  const uint32_t code = ((((r >> 23) - 120u) << 3) | ((r >> 20) & 7u));
  return static_cast<uint8_t>(sign | (code > 0x7Eu ? 0x7Eu : code));
}

// Two codes (bits 0-7 and 8-15 of `pair`; higher bits ignored) as the bits of two IEEE binary16
// halves (the first code's in bits 0-15) whose values are the codes' values times 2^-8: the 7
// magnitude bits go into the half's exponent and mantissa fields (4 exponent bits of bias 7 read
// with bias 15, the 3 mantissa bits as the top of 10), subnormals included, all exact, and the
// sign bit into the half's. Shifts and masks only, so a GPU decodes at full rate (flash's decode
// kernel; the scale it multiplies by afterwards takes the 2^8 back). The NaN codes (0x7F, 0xFF)
// read as +-480 * 2^-8, not NaN.
LOOM_HOST_DEVICE inline uint32_t decode2_half_bits_scaled(uint32_t pair) {
  const uint32_t x = ((pair & 0xFFu) << 8) | ((pair & 0xFF00u) << 16);  // each code in a half's high byte
  return ((x >> 1) & 0x3F803F80u) | (x & 0x80008000u);
}

}  // namespace loomp::e4m3

#endif
