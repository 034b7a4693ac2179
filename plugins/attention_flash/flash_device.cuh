// Device-side helpers shared by flash's kernels: element types, the paged KV pool as the kernels
// see it, the token -> sequence lookup, the visible key range of a query, and thin wrappers of
// the PTX instructions the prefill kernel uses (cp.async, ldmatrix, mma.sync m16n8k16).
//
// Everything here is stateless device code (no ownership, no synchronisation of its own). The
// kernels never trust device data they cannot check on the host: a sequence offset, position or
// block table entry out of range makes the affected rows or keys be skipped (reads then see
// zeros), never an access outside the tensors or the pool.
#ifndef LOOM_PLUGINS_ATTENTION_FLASH_DEVICE_CUH
#define LOOM_PLUGINS_ATTENTION_FLASH_DEVICE_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "flash_launch.hpp"
#include "loom_cuda_pdl.cuh"

namespace loomp::flash::dev {

// ---- element types ----

template <class T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float2 to_float2(uint32_t packed) {
    __nv_bfloat162 h;
    memcpy(&h, &packed, sizeof h);
    return __bfloat1622float2(h);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t packed;
    memcpy(&packed, &h, sizeof packed);
    return packed;
  }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float2 to_float2(uint32_t packed) {
    __half2 h;
    memcpy(&h, &packed, sizeof h);
    return __half22float2(h);
  }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t packed;
    memcpy(&packed, &h, sizeof packed);
    return packed;
  }
};

// ---- programmatic dependent launch (plugins/common/loom_cuda_pdl.cuh) ----

using pdl::allow_next_kernel;
using pdl::wait_for_previous_kernel;

// ---- the batch ----

// The sequence holding token t: the largest s with off[s] <= t. Empty sequences (equal
// neighbouring offsets) are skipped naturally; garbage offsets still give an s in [0, S).
__device__ __forceinline__ int seq_of_token(const int32_t* off, int n_seqs, int t) {
  int lo = 0, hi = n_seqs;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (__ldg(off + mid) <= t) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Position of token t (of sequence s) in its sequence, in 64 bits so that garbage cannot overflow.
__device__ __forceinline__ int64_t token_position(const int32_t* pos, const int32_t* off, int s, int t) {
  return static_cast<int64_t>(__ldg(pos + s)) + t - static_cast<int64_t>(__ldg(off + s));
}

// The tokens of sequence s, clamped into [0, T) so that bad offsets cannot reach outside q/out.
struct SeqSpan {
  int begin;  // first token index in the batch
  int count;  // new tokens of the sequence
};
__device__ __forceinline__ SeqSpan seq_span(const int32_t* off, int n_tokens, int s) {
  const int b = min(max(__ldg(off + s), 0), n_tokens);
  const int e = min(max(__ldg(off + s + 1), b), n_tokens);
  return {b, e - b};
}

// Keys [lo, hi] seen by a query at position p (64-bit: positions come from device memory the host
// never checked) of a sequence with `total` cached tokens after this call. hi is capped by the
// positions the block table can address (`capacity` = table_cols * B), which keeps the work
// bounded whatever the positions say; both ends then fit an int.
struct KeyRange {
  int lo, hi;  // inclusive; empty when hi < lo
};
__device__ __forceinline__ KeyRange key_range(int64_t p, int64_t total, int causal, int window, int capacity) {
  const int64_t hi = causal ? p : total - 1;
  const int64_t lo = window > 0 ? p - window + 1 : 0;
  KeyRange r;
  r.hi = static_cast<int>(min(max(hi, int64_t{-1}), static_cast<int64_t>(capacity) - 1));
  r.lo = static_cast<int>(min(max(lo, int64_t{0}), static_cast<int64_t>(capacity)));
  return r;
}

// The paged pool of one layer, as the kernels address it: either the compute dtype's layout (2
// bytes a value; the prefill kernels only ever see this one) or sdpa's quantized block (1-byte
// codes and a float32 scale per row, loom_kv_format.hpp).
struct Pool {
  uint8_t* base;  // written only by the cache-write kernel (and decode's append)
  int64_t n_blocks;
  int64_t block_bytes;   // 2 * B * Hkv * D * 2, or the quantized block's bytes_per_block
  int64_t values_bytes;  // offset of the value rows inside a block: B * Hkv * row_bytes
  int64_t scales_bytes;  // quantized: offset of the key scales inside a block (values' are B * Hkv * 4 further)
  const int32_t* table;  // [S, cols]
  int cols;
  int block_shift;
  int kv_heads;
  int head_dim;
  int row_bytes;  // D * 2, or D for 1-byte codes

  // Byte offset of the block holding (sequence s, position pos) from `base`, or -1 when the table
  // has no valid block there.
  __device__ __forceinline__ int64_t block_offset(int s, int64_t pos) const {
    if (pos < 0) return -1;
    const int64_t logical = pos >> block_shift;
    if (logical >= cols) return -1;
    const int block = __ldg(table + static_cast<int64_t>(s) * cols + logical);
    if (block < 0 || block >= n_blocks) return -1;
    return static_cast<int64_t>(block) * block_bytes;
  }
  // The key row (slot * Hkv + h) of position pos and kv head h inside its block.
  __device__ __forceinline__ int key_row(int64_t pos, int h) const {
    return static_cast<int>(pos & ((1 << block_shift) - 1)) * kv_heads + h;
  }
  // Byte offset of the key row of (sequence s, position pos, kv head h) from `base`, or -1 when
  // the table has no valid block there. The value row is values_bytes further.
  __device__ __forceinline__ int64_t key_offset(int s, int64_t pos, int h) const {
    return key_offset_in(block_offset(s, pos), pos, h);
  }
  // The same, with the block's offset already looked up (block_offset of a position in the same
  // block), so that one lookup serves several keys of a block.
  __device__ __forceinline__ int64_t key_offset_in(int64_t block, int64_t pos, int h) const {
    return block < 0 ? -1 : block + static_cast<int64_t>(key_row(pos, h)) * row_bytes;
  }
};

__host__ __forceinline__ Pool make_pool(const Problem& p) {
  const bool quantized = kvcache::kv_quantized(p.kv_format);
  const int64_t rows = (int64_t{1} << p.block_shift) * p.n_kv_heads;  // key rows of a block
  Pool pool;
  pool.base = p.pool;
  pool.n_blocks = p.pool_blocks;
  pool.row_bytes = quantized ? p.head_dim : p.head_dim * 2;
  pool.values_bytes = rows * pool.row_bytes;
  pool.block_bytes = quantized ? p.kv_block_bytes : 2 * pool.values_bytes;
  pool.scales_bytes = quantized ? kvcache::KvGeometry{int64_t{1} << p.block_shift, p.n_kv_heads, p.head_dim,
                                                      p.kv_format}.scales_offset()
                                : 0;
  pool.table = p.block_table;
  pool.cols = p.table_cols;
  pool.block_shift = p.block_shift;
  pool.kv_heads = p.n_kv_heads;
  pool.head_dim = p.head_dim;
  return pool;
}

// One warp quantizes and stores one new row (`src`: D values of the batch's k or v) as row `row`
// of the int8/fp8 block at `block` (format kv.format), exactly as sdpa's cache write does: lane
// l takes values l, l + 32, ..., the row's absmax over the warp, then loom_kv_format.hpp's scale
// and codes, so the bytes are sdpa's. Every lane of the warp must call it.
template <class T, int D>
__device__ __forceinline__ void store_quantized_row(const T* src, uint8_t* block, int64_t row,
                                                    const kvcache::KvGeometry& kv, int lane) {
  float x[D / 32];
  float absmax = 0.0f;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) {
    x[i] = Elem<T>::to_float(src[lane + 32 * i]);
    absmax = fmaxf(absmax, fabsf(x[i]));
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) absmax = fmaxf(absmax, __shfl_xor_sync(0xffffffffu, absmax, o));
  const float scale = kvcache::kv_scale(absmax, kv.format);
  if (lane == 0) *kv.row_scale(block, row) = scale;
  uint8_t* const dst = kv.row_data(block, row);
#pragma unroll
  for (int i = 0; i < D / 32; ++i) kvcache::kv_store(dst, lane + 32 * i, x[i], scale, kv.format);
}

// The kernel arguments every flash kernel over a batch takes (decode and prefill add their own
// by deriving from it): the pool, q and out, the batch's metadata and the attention geometry.
struct BatchArgs {
  Pool pool;
  const void* q;
  void* out;
  const int32_t* off;
  const int32_t* pos;
  int n_tokens;
  int n_seqs;
  int n_heads;
  int group;  // H / Hkv
  int window;
  int causal;
  float scale_log2;
};

__host__ __forceinline__ BatchArgs make_batch_args(const Problem& p) {
  BatchArgs a;
  a.pool = make_pool(p);
  a.q = p.q;
  a.out = p.out;
  a.off = p.seq_offsets;
  a.pos = p.seq_positions;
  a.n_tokens = p.n_tokens;
  a.n_seqs = p.n_seqs;
  a.n_heads = p.n_heads;
  a.group = p.n_heads / p.n_kv_heads;
  a.window = p.window;
  a.causal = p.causal;
  a.scale_log2 = p.scale_log2;
  return a;
}

// ---- PTX wrappers (sm_80+) ----

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; when !valid, writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes)
               : "memory");
}
// 8- and 4-byte ones (quantized cache rows and their scales; .cg takes 16 bytes only, so these
// go through L1), zero-filled likewise.
__device__ __forceinline__ void cp_async8(void* dst, const void* src, bool valid) {
  const int bytes = valid ? 8 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

// d += a * b for one m16n8k16 tile: a row-major 16x16, b column-major 16x8, d float 16x8.
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d += a * b for one m16n8k8 tile: a row-major 16x8 (rows g and g + 8 of each lane), b 8x8.
template <class T>
__device__ __forceinline__ void mma_1688(float (&d)[4], const uint32_t (&a)[2], uint32_t b);

template <>
__device__ __forceinline__ void mma_1688<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[2], uint32_t b) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(b));
}
template <>
__device__ __forceinline__ void mma_1688<__half>(float (&d)[4], const uint32_t (&a)[2], uint32_t b) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(b));
}

}  // namespace loomp::flash::dev

#endif
