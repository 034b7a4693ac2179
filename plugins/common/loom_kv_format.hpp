// The quantized KV cache block format that sdpa (its CPU path, sdpa.cpp, and its CUDA kernels,
// sdpa_cuda.cu) and flash (flash_cache_write.cu, flash_decode.cu) share, so that all of them
// store and read identical bytes and one plugin's pool is valid for the other; host and device
// code. (flash's unquantized caches are in the compute dtype, bf16 or f16, laid out like bf16.)
//
// One block of one layer, B = block_size, row r = (which * B + slot) * Hkv + kv_head with
// which = 0 for keys and 1 for values:
//   f32, bf16:  keys [B, Hkv, D] then values [B, Hkv, D] in that element type
//               bytes_per_block = 2 * B * Hkv * D * (4 or 2)
//   int8, fp8:  keys [B, Hkv, D] then values [B, Hkv, D], one byte each, then (from the next
//               multiple of 16 bytes) a float32 scale per row: key scales [B, Hkv] then value
//               scales [B, Hkv]; bytes_per_block is rounded up to a multiple of 16 so that every
//               block's scales stay aligned for float loads on the GPU.
// Quantization is symmetric per (token, kv head) row of D values: scale = absmax / 127 (int8,
// codes in [-127, 127]) or absmax / 448 (fp8 E4M3, loom_e4m3.hpp); a stored code c reads back
// as c * scale. An all-zero row gets scale 0 and reads back as zeros (no division by zero).
#ifndef LOOM_PLUGINS_COMMON_KV_FORMAT_HPP
#define LOOM_PLUGINS_COMMON_KV_FORMAT_HPP

#include <cstdint>
#include <cstring>

#include "loom_e4m3.hpp"

namespace loomp::kvcache {

// DLPack 1.1's kDLFloat8_e4m3fn, the cache_dtype code of an fp8 cache. The system dlpack.h (0.6)
// predates the fp8 codes, so the value is spelled here; a host that knows DLPack 1.1 reads it as
// what it is.
constexpr uint8_t kDLFloat8E4M3fnCode = 10;

enum class KvFormat : int32_t { f32 = 0, bf16 = 1, int8 = 2, fp8 = 3 };

LOOM_HOST_DEVICE inline bool kv_quantized(KvFormat f) { return f == KvFormat::int8 || f == KvFormat::fp8; }
LOOM_HOST_DEVICE inline int64_t kv_elem_bytes(KvFormat f) {
  return f == KvFormat::f32 ? 4 : f == KvFormat::bf16 ? 2 : 1;
}

struct KvGeometry {
  int64_t block_size = 0, n_kv_heads = 0, head_dim = 0;
  KvFormat format = KvFormat::f32;

  LOOM_HOST_DEVICE int64_t rows() const { return 2 * block_size * n_kv_heads; }  // keys and values
  LOOM_HOST_DEVICE int64_t row_bytes() const { return head_dim * kv_elem_bytes(format); }
  LOOM_HOST_DEVICE int64_t scales_offset() const { return (rows() * row_bytes() + 15) / 16 * 16; }
  LOOM_HOST_DEVICE int64_t bytes_per_block() const {
    if (!kv_quantized(format)) return rows() * row_bytes();
    return (scales_offset() + rows() * 4 + 15) / 16 * 16;
  }
  LOOM_HOST_DEVICE int64_t row(int64_t which, int64_t slot, int64_t kv_head) const {
    return (which * block_size + slot) * n_kv_heads + kv_head;
  }
  // Row r of a block starting at `block`.
  LOOM_HOST_DEVICE uint8_t* row_data(uint8_t* block, int64_t r) const { return block + r * row_bytes(); }
  LOOM_HOST_DEVICE float* row_scale(uint8_t* block, int64_t r) const {
    return reinterpret_cast<float*>(block + scales_offset()) + r;
  }
};

LOOM_HOST_DEVICE inline uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u = 0;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}
LOOM_HOST_DEVICE inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x = 0;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// float -> bfloat16 bits, round to nearest even (NaN stays a quiet NaN), as __float2bfloat16_rn.
LOOM_HOST_DEVICE inline uint16_t bf16_bits(float x) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// The scale of a row whose largest magnitude is `absmax` (quantized formats only).
LOOM_HOST_DEVICE inline float kv_scale(float absmax, KvFormat f) {
  return f == KvFormat::int8 ? absmax / 127.0f : absmax / e4m3::kMax;
}

// Stores x as element d of a row; `scale` is the row's (ignored by f32/bf16).
LOOM_HOST_DEVICE inline void kv_store(uint8_t* row, int64_t d, float x, float scale, KvFormat f) {
  switch (f) {
    case KvFormat::f32:
      reinterpret_cast<float*>(row)[d] = x;
      return;
    case KvFormat::bf16:
      reinterpret_cast<uint16_t*>(row)[d] = bf16_bits(x);
      return;
    case KvFormat::int8: {
      float q = scale == 0.0f ? 0.0f : e4m3::round_half_even(x / scale);
      q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;  // x / scale can overshoot 127 by an ulp
      reinterpret_cast<int8_t*>(row)[d] = static_cast<int8_t>(q);
      return;
    }
    case KvFormat::fp8:
      row[d] = scale == 0.0f ? uint8_t{0} : e4m3::encode(x / scale);
      return;
  }
}

// Element d of a row, as float.
LOOM_HOST_DEVICE inline float kv_load(const uint8_t* row, int64_t d, float scale, KvFormat f) {
  switch (f) {
    case KvFormat::f32:
      return reinterpret_cast<const float*>(row)[d];
    case KvFormat::bf16:
      return bits_float(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(row)[d]) << 16);
    case KvFormat::int8:
      return static_cast<float>(reinterpret_cast<const int8_t*>(row)[d]) * scale;
    case KvFormat::fp8:
      return e4m3::decode(row[d]) * scale;
  }
  return 0.0f;
}

}  // namespace loomp::kvcache

#endif
