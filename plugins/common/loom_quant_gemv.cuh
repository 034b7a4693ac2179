// Decode GEMV for quantized weights, shared by the builtin quantizers' CUDA code (int8, int4):
// one kernel template over a weight format, with the fusions of loom.quantizer.fused/1 (RMSNorm
// prologue, residual add and SwiGLU epilogues). Header-only and Loom-free (CUDA runtime only), so
// a third-party quantizer can use it the same way.
//
// Work split, as the host's bf16 GEMV (kernels/cuda/gemv.cu): a "unit" is two streams of 16-byte
// weight pieces read together by one warp: rows (2u, 2u + 1), or (gate j, up j) for SwiGLU, or,
// where the output has fewer row pairs than the grid has warps, the two halves of one row's K
// (the halves summed). A warp takes a contiguous range of units; each lane reads the format's
// kSteps pieces per stream per stage, and the next stage is loaded into registers while the
// current one is multiplied. The grid is one wave of resident blocks. On sm_90 each block requests its first two
// stages of weights and then waits for the previous kernel (programmatic dependent launch), so
// the weight stream starts while the previous kernel drains.
//
// The block's input rows (normalised by the prologue, divided by the per-input scale when the
// format has one) are staged in shared memory as bfloat16, or as float32 where the caller works in
// float32 (Args::stage_f32), in a lane-major order: the 16 bytes of inputs that lane l multiplies
// with its piece's chunk j lie at ((piece / 32) * kChunks + j) * 512 + l * 16, so each 16-byte
// read of a quarter warp hits all 32 banks once (a row-major staging of 16 or 32 inputs per lane
// reads with 2- or 4-way conflicts).
//
// A Format provides: kPer (weights per 16-byte piece, a multiple of 8), kSteps (pieces per stream
// and lane in one pipeline stage: as many as its registers allow), Meta (what a piece needs
// besides its codes, loaded with them), meta(args, row, piece), decode(piece, meta, w[kPer])
// (code values as floats, zero point removed), decode_half(piece, meta, w[kPer / 2]) (the same
// as half2 pairs) with half_pos(e) (where weight e of a piece sits in that pair order: pair p
// holds positions 2p and 2p + 1), kActF32 (see launch), piece_scale(meta) (applied to a piece's sum) and
// row_scale(args, row) (applied to the row's sum).
//
// Precision: with a bfloat16 caller the inputs are staged as float16, scaled per token by a power
// of two into [16, 32) (undone on the result), and a piece's products are summed in half2 before
// float32 takes over: two products per instruction, and codes become half2 pairs in two
// instructions (byte or nibble into the mantissa of 1024, minus 1024 + zero point). A float32
// caller gets float32 staging and products throughout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>

#include "loom_cuda_pdl.cuh"
#include "loom_quant_gemv_args.hpp"

namespace loomp::qgemv {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// Weights are read once per step: keep them out of L1, let L2 fetch whole 256-byte sectors.
__device__ __forceinline__ uint4 load_weights(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

using pdl::allow_next_kernel;
using pdl::wait_for_previous_kernel;

__host__ __device__ __forceinline__ int units_of(const Args& a) {
  if (a.split) return a.out;
  if (a.output == output_swiglu || a.output == output_rope_qkv) return a.out / 2;
  return (a.out + 1) / 2;
}

// A unit's two streams: rows r0 and r1 (r1 < 0: none) from pieces p0 and p1, `len` pieces each.
struct Streams {
  int r0, r1, p1, len;
};
__device__ __forceinline__ Streams streams_of(const Args& a, int unit) {
  if (a.split) return {unit, unit, a.row_pieces / 2, a.row_pieces / 2};
  if (a.output == output_swiglu) return {unit, unit + a.out / 2, 0, a.row_pieces};
  if (a.output == output_rope_qkv) {  // rows i and i + D/2 of one head: a rotation pair
    const int half = a.head_dim / 2, head = unit / half, i = unit - head * half;
    return {head * a.head_dim + i, head * a.head_dim + i + half, 0, a.row_pieces};
  }
  return {2 * unit, 2 * unit + 1 < a.out ? 2 * unit + 1 : -1, 0, a.row_pieces};
}

// Pieces per stream and lane in one stage: the format's, per staging type (its decoded weights
// take half the registers in half2).
template <class F, class XT>
constexpr int kStepsOf = sizeof(XT) == 4 ? F::kSteps : F::kStepsHalf;

template <class F, class XT>
struct Stage {
  static constexpr int kSteps = kStepsOf<F, XT>;
  uint4 w0[kSteps], w1[kSteps];
  typename F::Meta m0[kSteps], m1[kSteps];
};

template <class F, class XT>
__device__ __forceinline__ void load_stage(const Args& a, int unit, int step, int lane, Stage<F, XT>& st) {
  constexpr int kSteps = kStepsOf<F, XT>;
  const Streams m = streams_of(a, unit);
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int c = (step * kSteps + s) * 32 + lane;
    const bool ok = c < m.len;
    const int64_t base0 = static_cast<int64_t>(m.r0) * a.row_pieces;
    st.w0[s] = ok ? load_weights(static_cast<const uint4*>(a.codes) + base0 + c) : make_uint4(0, 0, 0, 0);
    st.m0[s] = ok ? F::meta(a, m.r0, c) : typename F::Meta{};
    const bool ok1 = ok && m.r1 >= 0;
    const int64_t base1 = static_cast<int64_t>(ok1 ? m.r1 : 0) * a.row_pieces;
    st.w1[s] = ok1 ? load_weights(static_cast<const uint4*>(a.codes) + base1 + m.p1 + c) : make_uint4(0, 0, 0, 0);
    st.m1[s] = ok1 ? F::meta(a, m.r1, m.p1 + c) : typename F::Meta{};
  }
}

// Staged input values: float16 (8 a 16-byte chunk, multiplied in half2 pairs) or float32 (4).
template <class XT>
struct Staging {
  static constexpr int kVals = 16 / static_cast<int>(sizeof(XT));
};

// Input k's place in a token's staged row (lane-major, see the top of the file).
// In float16 the inputs of a piece are in the format's pair order (F::half_pos), so that each
// half2 of a chunk meets the half2 of weights the format decodes.
template <class F, class XT>
__device__ __forceinline__ int64_t staged_slot(int piece, int e) {
  constexpr int kVals = Staging<XT>::kVals, kChunks = F::kPer / kVals;
  if constexpr (sizeof(XT) == 2) e = F::half_pos(e);
  return (static_cast<int64_t>(piece >> 5) * kChunks + e / kVals) * (32 * kVals) + (piece & 31) * kVals + e % kVals;
}

// Sum over one piece of w[k] * x[k] for token t, in float32 (float32 staging).
template <class F>
__device__ __forceinline__ float piece_dot(const float (&w)[F::kPer], const float* xs, int stride, int t, int piece) {
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < F::kPer / 4; ++j) {
    const uint4 c = *reinterpret_cast<const uint4*>(xs + static_cast<int64_t>(t) * stride + staged_slot<F, float>(piece, j * 4));
    s = fmaf(w[4 * j], __uint_as_float(c.x), s);
    s = fmaf(w[4 * j + 1], __uint_as_float(c.y), s);
    s = fmaf(w[4 * j + 2], __uint_as_float(c.z), s);
    s = fmaf(w[4 * j + 3], __uint_as_float(c.w), s);
  }
  return s;
}

// The same in half2 (float16 staging): the piece's products accumulate in one half2 (the input
// is scaled so that |x| < 32, so a format's kPer / 2 products per lane stay far from the float16
// range), which is then summed in float32.
template <class F>
__device__ __forceinline__ float piece_dot(const __half2 (&w)[F::kPer / 2], const __half* xs, int stride, int t,
                                           int piece) {
  __half2 acc = __float2half2_rn(0.0f);
#pragma unroll
  for (int j = 0; j < F::kPer / 8; ++j) {
    const uint4 c = *reinterpret_cast<const uint4*>(xs + static_cast<int64_t>(t) * stride + staged_slot<F, __half>(piece, j * 8));
    const uint32_t words[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      __half2 x;
      static_assert(sizeof(x) == 4);
      memcpy(&x, &words[e], 4);
      acc = __hfma2(w[4 * j + e], x, acc);
    }
  }
  const float2 f = __half22float2(acc);
  return f.x + f.y;
}

template <class F, int NT, class XT>
__device__ __forceinline__ void multiply_stage(const Stage<F, XT>& st, const XT* xs, int stride, const Streams& m, int step,
                                               int lane, float (&acc0)[NT], float (&acc1)[NT]) {
  constexpr int kSteps = kStepsOf<F, XT>;
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const int c = (step * kSteps + s) * 32 + lane;
    if (c >= m.len) break;
    // One stream at a time, so that only one piece's decoded weights are live.
    using W = std::conditional_t<sizeof(XT) == 4, float[F::kPer], __half2[F::kPer / 2]>;
    W w;
    if constexpr (sizeof(XT) == 4)
      F::decode(st.w0[s], st.m0[s], w);
    else
      F::decode_half(st.w0[s], st.m0[s], w);
    const float s0 = F::piece_scale(st.m0[s]);
#pragma unroll
    for (int t = 0; t < NT; ++t) acc0[t] = fmaf(s0, piece_dot<F>(w, xs, stride, t, c), acc0[t]);
    if constexpr (sizeof(XT) == 4)
      F::decode(st.w1[s], st.m1[s], w);
    else
      F::decode_half(st.w1[s], st.m1[s], w);
    const float s1 = F::piece_scale(st.m1[s]);
#pragma unroll
    for (int t = 0; t < NT; ++t) acc1[t] = fmaf(s1, piece_dot<F>(w, xs, stride, t, c + m.p1), acc1[t]);
  }
}

// Sum of the first members and max of the second over the block.
__device__ __forceinline__ float2 block_sum2(float2 v, float2* red) {
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(kFullMask, v.x, o);
    v.y = fmaxf(v.y, __shfl_xor_sync(kFullMask, v.y, o));
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float2 r = make_float2(0.0f, 0.0f);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    r.x += red[w].x;
    r.y = fmaxf(r.y, red[w].y);
  }
  return r;
}

__device__ __forceinline__ float block_max(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) m = fmaxf(m, red[w]);
  return m;
}

// The power of two that brings a row's largest magnitude into [16, 32) for float16 staging.
__device__ __forceinline__ float half_scale(float largest) {
  if (!(largest > 0.0f) || !isfinite(largest)) return 1.0f;
  int e = 0;
  frexpf(largest, &e);  // largest = m 2^e, m in [0.5, 1)
  return ldexpf(1.0f, 5 - e);
}

// Eight consecutive float32 values from p (k a multiple of 8): two 16-byte loads where the
// array is 16-byte aligned (`vec`), else eight.
__device__ __forceinline__ void load8_f32(const float* p, int k, bool vec, float (&v)[8]) {
  if (vec) {
    const float4 lo = *reinterpret_cast<const float4*>(p + k), hi = *reinterpret_cast<const float4*>(p + k + 4);
    v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = p[k + e];
  }
}
__device__ __forceinline__ void load8_bf16(const __nv_bfloat16* p, int k, bool vec, float (&v)[8]) {
  if (vec) {
    const uint4 c = *reinterpret_cast<const uint4*>(p + k);
    const uint32_t words[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      v[2 * e] = __uint_as_float(words[e] << 16);
      v[2 * e + 1] = __uint_as_float(words[e] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = __bfloat162float(p[k + e]);
  }
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The block's input rows into shared memory (lane-major, see the top of the file). A normalised
// value is rounded to bfloat16 first unless the caller works in float32, as the host's norm
// kernel writes it in the compute dtype.
//
// Every block reads the whole input before its first product, so this prologue is on the
// critical path of each GEMV. Unnormalised inputs (the o and down projections'): a thread takes
// groups of 8 consecutive inputs (16- or 32-byte loads) and issues kStageBatch groups' loads
// before using any, so that their latencies overlap (with one scalar load a loop trip the
// 8192-wide int8 down projection of a batch-1 step took 22.3 us on the H200, 19.4 batched:
// Nsight Compute, one kernel at a time from a cold L2).
constexpr int kStageBatch = 4;

template <class F, class XT>
__device__ __forceinline__ void stage_input(const Args& a, XT* xs, int stride, float* unscale) {
  __shared__ float red[kWarps];
  __shared__ float2 red2[kWarps];
  auto slot = [&](int k) { return staged_slot<F, XT>(k / F::kPer, k % F::kPer); };
  const int groups = a.in / 8;  // in is a multiple of the format's kPer, itself of 8
  const bool rms = a.input == input_rms_norm;
  const bool vec_x = aligned16(a.x), vec_s = !a.act_scale || aligned16(a.act_scale);
  // Group g's 8 raw inputs of token t (float32 or bfloat16, as the caller gave them).
  auto load_x = [&](int t, int g, float (&v)[8]) {
    const int64_t row = static_cast<int64_t>(t) * a.in;
    if (a.x_bf16)
      load8_bf16(static_cast<const __nv_bfloat16*>(a.x) + row, 8 * g, vec_x, v);
    else
      load8_f32(static_cast<const float*>(a.x) + row, 8 * g, vec_x, v);
  };
  // Runs body(g, x[8]) for each of this thread's groups, kStageBatch groups' loads at a time.
  auto for_groups = [&](int t, auto&& body) {
    for (int g0 = threadIdx.x; g0 < groups; g0 += kThreads * kStageBatch) {
      float v[kStageBatch][8];
#pragma unroll
      for (int b = 0; b < kStageBatch; ++b)
        if (g0 + b * kThreads < groups) load_x(t, g0 + b * kThreads, v[b]);
#pragma unroll
      for (int b = 0; b < kStageBatch; ++b)
        if (g0 + b * kThreads < groups) body(g0 + b * kThreads, v[b]);
    }
  };
  for (int t = 0; t < a.tokens; ++t) {
    XT* dst = xs + static_cast<int64_t>(t) * stride;
    if (rms) {
      // RMSNorm inputs (the hidden size, 2048 here) keep one value a loop trip: batching them
      // measured slower (int8 at batch 1 on the H200, Nsight Compute, one kernel at a time from
      // a cold L2: 2048-wide q/k/v 10.0 -> 13.3 us, gate/up 18.8 -> 28.4 us), the batch's
      // registers live beside the two stages of weights loaded before it.
      const float* row = static_cast<const float*>(a.x) + static_cast<int64_t>(t) * a.in;
      float sq = 0.0f, big = 0.0f;
      for (int k = threadIdx.x; k < a.in; k += kThreads) {
        sq += row[k] * row[k];
        // float16 staging: max |w x| / a in the same pass, for the scale (an upper bound of the
        // normalised row's max after inv, exact but for the bfloat16 rounding).
        if constexpr (sizeof(XT) == 2) big = fmaxf(big, fabsf(a.norm_w[k] * row[k]) / (a.act_scale ? a.act_scale[k] : 1.0f));
      }
      float2 both = block_sum2(make_float2(sq, big), red2);
      const float inv = rsqrtf(both.x / static_cast<float>(a.in) + a.eps);
      const float largest = both.y * inv * 1.00390625f;  // headroom for rounding up to bfloat16
      const float scale = sizeof(XT) == 2 ? half_scale(largest) : 1.0f;
      for (int k = threadIdx.x; k < a.in; k += kThreads) {
        float v = a.norm_w[k] * (row[k] * inv);
        if (!a.stage_f32) v = round_bf16(v);
        if (a.act_scale) v /= a.act_scale[k];
        if constexpr (sizeof(XT) == 4)
          dst[slot(k)] = v;
        else
          dst[slot(k)] = __float2half_rn(v * scale);
      }
      if (sizeof(XT) == 2 && threadIdx.x == 0) unscale[t] = 1.0f / scale;
      continue;
    }
    // Group g's 8 staged values (before the float16 scale) from its raw inputs.
    auto values = [&](int g, const float (&x)[8], float (&v)[8]) {
      float sc[8] = {};
      if (a.act_scale) load8_f32(a.act_scale, 8 * g, vec_s, sc);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = a.act_scale ? x[e] / sc[e] : x[e];
    };
    if constexpr (sizeof(XT) == 4) {
      for_groups(t, [&](int g, const float (&x)[8]) {
        float v[8];
        values(g, x, v);
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[slot(8 * g + e)] = v[e];
      });
    } else {
      // One pass over x (read by every block, so it is the costly one): the values go to their
      // slots as bfloat16 while the largest is found; then each thread rescales its own slots
      // to float16 in place (bfloat16 -> float16 times a power of two is exact in range).
      auto* raw = reinterpret_cast<__nv_bfloat16*>(dst);
      float largest = 0.0f;
      for_groups(t, [&](int g, const float (&x)[8]) {
        float v[8];
        values(g, x, v);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          largest = fmaxf(largest, fabsf(v[e]));
          raw[slot(8 * g + e)] = __float2bfloat16_rn(v[e]);
        }
      });
      const float scale = half_scale(block_max(largest, red));
      for (int g = threadIdx.x; g < groups; g += kThreads)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int64_t at = slot(8 * g + e);
          dst[at] = __float2half_rn(__bfloat162float(raw[at]) * scale);
        }
      if (threadIdx.x == 0) unscale[t] = 1.0f / scale;
    }
  }
  __syncthreads();
}

__device__ __forceinline__ void store(const Args& a, int64_t at, float v) {
  if (a.y_bf16)
    static_cast<__nv_bfloat16*>(a.y)[at] = __float2bfloat16_rn(v);
  else
    static_cast<float*>(a.y)[at] = v;
}

// Writes token t's outputs of a unit (not split) from its two finished sums y0, y1 (row scales
// and biases applied): RoPE on q and k by (c, s) and the q/k/v split, SwiGLU, or a store; an
// add writes old0 + y0 and old1 + y1 (the residual's values before).
__device__ __forceinline__ void write_unit(const Args& a, int unit, int t, const Streams& m, float y0, float y1,
                                           float c, float s, float old0, float old1) {
  if (a.output == output_rope_qkv) {
    const int D = a.head_dim, half = D / 2, head = unit / half, i = unit - head * half;
    float x0 = a.y_bf16 ? round_bf16(y0) : y0, x1 = a.y_bf16 ? round_bf16(y1) : y1;
    void* base;
    int64_t at;
    if (head < a.heads) {
      base = a.q;
      at = (static_cast<int64_t>(t) * a.heads + head) * D;
    } else if (head < a.heads + a.kv_heads) {
      base = a.k;
      at = (static_cast<int64_t>(t) * a.kv_heads + head - a.heads) * D;
    } else {
      base = a.v;
      at = (static_cast<int64_t>(t) * a.kv_heads + head - a.heads - a.kv_heads) * D;
    }
    if (head < a.heads + a.kv_heads) {
      const float r0 = x0 * c - x1 * s, r1 = x1 * c + x0 * s;
      x0 = r0;
      x1 = r1;
    }
    if (a.y_bf16) {
      static_cast<__nv_bfloat16*>(base)[at + i] = __float2bfloat16_rn(x0);
      static_cast<__nv_bfloat16*>(base)[at + i + half] = __float2bfloat16_rn(x1);
    } else {
      static_cast<float*>(base)[at + i] = x0;
      static_cast<float*>(base)[at + i + half] = x1;
    }
    return;
  }
  if (a.output == output_swiglu) {
    const float g = a.y_bf16 ? round_bf16(y0) : y0, u = a.y_bf16 ? round_bf16(y1) : y1;
    store(a, static_cast<int64_t>(t) * (a.out / 2) + unit, g / (1.0f + __expf(-g)) * u);
    return;
  }
  const int64_t at = static_cast<int64_t>(t) * a.out;
  if (a.output == output_add) {
    float* y = static_cast<float*>(a.y) + at;
    y[m.r0] = old0 + y0;
    if (m.r1 >= 0) y[m.r1] = old1 + y1;
  } else {
    store(a, at + m.r0, y0);
    if (m.r1 >= 0) store(a, at + m.r1, y1);
  }
}

// Token t's sums of one unit's two streams.
template <class F>
__device__ __forceinline__ void finish_unit(const Args& a, int unit, int t, float y0, float y1) {
  const Streams m = streams_of(a, unit);
  if (a.split) {
    const float v = (y0 + y1) * F::row_scale(a, m.r0) + (a.bias ? a.bias[m.r0] : 0.0f);
    const int64_t at = static_cast<int64_t>(t) * a.out + m.r0;
    if (a.output == output_add)
      static_cast<float*>(a.y)[at] += v;
    else
      store(a, at, v);
    return;
  }
  y0 *= F::row_scale(a, m.r0);
  if (m.r1 >= 0) y1 *= F::row_scale(a, m.r1);
  if (a.bias && a.output != output_swiglu) {
    y0 += a.bias[m.r0];
    if (m.r1 >= 0) y1 += a.bias[m.r1];
  }
  float c = 1.0f, s = 0.0f, old0 = 0.0f, old1 = 0.0f;
  if (a.output == output_rope_qkv) {
    const int half = a.head_dim / 2, head = unit / half, i = unit - head * half;
    if (head < a.heads + a.kv_heads) {
      const float* cs = a.cos_sin + (static_cast<int64_t>(a.positions[t]) * half + i) * 2;
      c = cs[0];
      s = cs[1];
    }
  } else if (a.output == output_add) {
    const float* y = static_cast<const float*>(a.y) + static_cast<int64_t>(t) * a.out;
    old0 = y[m.r0];
    if (m.r1 >= 0) old1 = y[m.r1];
  }
  write_unit(a, unit, t, m, y0, y1, c, s, old0, old1);
}

template <class F, int NT, class XT>
__global__ void __launch_bounds__(kThreads, 2) gemv_kernel(const Args a) {
  extern __shared__ uint4 smem[];
  auto* xs = reinterpret_cast<XT*>(smem);
  const int stride = ((a.row_pieces + 31) / 32) * 32 * F::kPer;  // staged values per token
  const int lane = threadIdx.x & 31;
  const int units = units_of(a);
  const int len = a.split ? a.row_pieces / 2 : a.row_pieces;
  constexpr int kSteps = kStepsOf<F, XT>;
  const int steps = (len + 32 * kSteps - 1) / (32 * kSteps);
  const int warps = static_cast<int>(gridDim.x) * kWarps;
  const int gw = static_cast<int>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int base = units / warps, extra = units % warps;
  const int first = gw * base + min(gw, extra);
  const int work = (base + (gw < extra ? 1 : 0)) * steps;  // (unit, step) items of this warp

  allow_next_kernel();
  auto unit_of = [&](int item) { return first + item / steps; };
  auto step_of = [&](int item) { return item % steps; };
  Stage<F, XT> A, B;
  if (work > 0) load_stage<F, XT>(a, unit_of(0), step_of(0), lane, A);
  if (work > 1) load_stage<F, XT>(a, unit_of(1), step_of(1), lane, B);
  wait_for_previous_kernel();
  __shared__ float unscale[kMaxTokens];  // float16 staging: each token's results times this
  stage_input<F, XT>(a, xs, stride, unscale);

  float acc0[NT], acc1[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = 0.0f;
  auto finish_if_last = [&](int item) {
    if (step_of(item) != steps - 1) return;
#pragma unroll
    for (int t = 0; t < NT; ++t)
      for (int o = 16; o > 0; o >>= 1) {
        acc0[t] += __shfl_xor_sync(kFullMask, acc0[t], o);
        acc1[t] += __shfl_xor_sync(kFullMask, acc1[t], o);
      }
    float y0 = acc0[0], y1 = acc1[0];
#pragma unroll
    for (int t = 1; t < NT; ++t)
      if (lane == t) {
        y0 = acc0[t];
        y1 = acc1[t];
      }
    if constexpr (sizeof(XT) == 2) {
      if (lane < NT) {
        y0 *= unscale[lane];
        y1 *= unscale[lane];
      }
    }
    if (lane < NT && lane < a.tokens) finish_unit<F>(a, unit_of(item), lane, y0, y1);
#pragma unroll
    for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = 0.0f;
  };
  for (int f = 0; f < work; f += 2) {
    multiply_stage<F, NT, XT>(A, xs, stride, streams_of(a, unit_of(f)), step_of(f), lane, acc0, acc1);
    finish_if_last(f);
    if (f + 2 < work) load_stage<F, XT>(a, unit_of(f + 2), step_of(f + 2), lane, A);
    if (f + 1 >= work) break;
    multiply_stage<F, NT, XT>(B, xs, stride, streams_of(a, unit_of(f + 1)), step_of(f + 1), lane, acc0, acc1);
    finish_if_last(f + 1);
    if (f + 3 < work) load_stage<F, XT>(a, unit_of(f + 3), step_of(f + 3), lane, B);
  }
}

// A kernel's setup on each device it runs on (shared memory above 48 KB is a per-device attribute,
// and SM counts differ): set_up(device) returns a positive value, kept for the device, or a
// negative one for a failure, kept too (-error code where it has one). The caller's static table
// (one per kernel) is read without a lock once its device is set up; the setup runs under the
// table's lock. Returns the kept value, or -cudaErrorInvalidDevice where the current device cannot
// be told.
struct PerDevice {
  static constexpr int kDevices = 64;
  std::mutex mutex;
  std::atomic<int> state[kDevices] = {};  // 0: not yet
};
template <class SetUp>
int set_up_once(PerDevice& table, SetUp&& set_up) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= PerDevice::kDevices)
    return -static_cast<int>(cudaErrorInvalidDevice);
  int s = table.state[device].load(std::memory_order_acquire);
  if (s == 0) {
    std::lock_guard<std::mutex> lock(table.mutex);
    s = table.state[device].load(std::memory_order_relaxed);
    if (s == 0) {
      s = set_up(device);
      if (s == 0) s = -static_cast<int>(cudaErrorUnknown);  // (0 would read as not yet)
      table.state[device].store(s, std::memory_order_release);
    }
  }
  return s;
}

// Blocks of `kernel` resident at once on the current device (SMs x blocks per SM); driver
// queries, so kept per (kernel, device) by the caller (set_up_once).
inline cudaError_t resident_blocks(const void* kernel, int smem, int& wave) {
  int device = 0, sms = 0, per_sm = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device); e != cudaSuccess) return e;
  if (cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem); e != cudaSuccess)
    return e;
  wave = std::max(sms, 1) * std::max(per_sm, 1);
  return cudaSuccess;
}

template <class F, int NT, class XT>
cudaError_t launch_tokens(Args a, cudaStream_t stream) {
  const auto kernel = gemv_kernel<F, NT, XT>;
  const int smem = static_cast<int>(smem_bytes(a.row_pieces, F::kPer, a.tokens, sizeof(XT)));
  // The wave at the largest staging (48 KB): a smaller staging fits at least as many blocks.
  // Per kernel and device: (wave << 1) | (compute capability 9 or newer), or -error.
  static PerDevice table;
  const int set = set_up_once(table, [&](int device) {
    int major = 0, wave = 0;
    if (cudaError_t e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device); e != cudaSuccess)
      return -static_cast<int>(e);
    // The staging may take all 48 KB, past the default limit with the reduction's static bytes.
    if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
        e != cudaSuccess)
      return -static_cast<int>(e);
    if (cudaError_t e = resident_blocks(reinterpret_cast<const void*>(kernel), kSmemBytes, wave); e != cudaSuccess)
      return -static_cast<int>(e);
    return (wave << 1) | (major >= 9 ? 1 : 0);
  });
  if (set < 0) {
    (void)cudaGetLastError();  // (the error is returned, not left for the next launch to find)
    return static_cast<cudaError_t>(-set);
  }
  const int wave = set >> 1;
  const bool programmatic = (set & 1) != 0;
  // Fewer row pairs than warps: split each row's K in two instead, so that all warps stream
  // (only where the halves start on a 32-piece boundary, which keeps the staged reads aligned).
  if (a.output != output_swiglu && a.output != output_rope_qkv && (a.out + 1) / 2 < wave * kWarps &&
      a.row_pieces % 64 == 0)
    a.split = true;
  return pdl::launch(programmatic, dim3(static_cast<unsigned>(std::min(wave, (units_of(a) + kWarps - 1) / kWarps))),
                     dim3(kThreads), static_cast<size_t>(smem), stream, kernel, a);
}

template <class F, class XT>
cudaError_t launch_staged(const Args& a, cudaStream_t stream) {
  switch (a.tokens) {
    case 1: return launch_tokens<F, 1, XT>(a, stream);
    case 2: return launch_tokens<F, 2, XT>(a, stream);
    case 3: return launch_tokens<F, 3, XT>(a, stream);
    default: return launch_tokens<F, 4, XT>(a, stream);
  }
}

// One product of at most max_tokens(a.row_pieces, F::kPer, a.stage_f32) tokens.
// A format with kActF32 stages a bfloat16 activation (input_act) as float32 too where its rows
// fit: exact, and for int4 faster than float16, whose per-token scale needs a block-wide max
// and a second pass before any product (H100, one token: int4's down 11.9 us in float32, 14.5
// in float16; int8's 11.8 and 10.5). A normalised input goes to float16, whose scale the norm's
// own reduction gives.
template <class F>
cudaError_t launch(const Args& a, cudaStream_t stream) {
  const bool f32 = a.stage_f32 || (F::kActF32 && a.input == input_act &&
                                   smem_bytes(a.row_pieces, F::kPer, a.tokens, 4) <= kSmemBytes);
  return f32 ? launch_staged<F, float>(a, stream) : launch_staged<F, __half>(a, stream);
}

// Any number of tokens, in launches of at most max_tokens each (the unfused `linear`; a long
// prefill re-reads the weights once per launch).
template <class F>
cudaError_t launch_chunked(Args a, cudaStream_t stream) {
  const int chunk = max_tokens(a.row_pieces, F::kPer, a.stage_f32);
  if (chunk == 0) return cudaErrorInvalidValue;
  const int total = a.tokens;
  const int y_cols = a.output == output_swiglu ? a.out / 2 : a.out;
  const int x_bytes = a.input == input_rms_norm ? 4 : (a.x_bf16 ? 2 : 4);
  const int y_bytes = a.y_bf16 ? 2 : 4;
  for (int t0 = 0; t0 < total; t0 += chunk) {
    Args part = a;
    part.tokens = std::min(chunk, total - t0);
    part.x = static_cast<const char*>(a.x) + static_cast<int64_t>(t0) * a.in * x_bytes;
    if (a.output == output_rope_qkv) {
      const int64_t qn = static_cast<int64_t>(t0) * a.heads * a.head_dim * y_bytes,
                    kn = static_cast<int64_t>(t0) * a.kv_heads * a.head_dim * y_bytes;
      part.q = static_cast<char*>(a.q) + qn;
      part.k = static_cast<char*>(a.k) + kn;
      part.v = static_cast<char*>(a.v) + kn;
      part.positions = a.positions + t0;
    } else {
      part.y = static_cast<char*>(a.y) + static_cast<int64_t>(t0) * y_cols * y_bytes;
    }
    if (cudaError_t e = launch<F>(part, stream); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// ---- prefill: dequantize a block of rows, then cuBLAS ----

// Rows [row0, row0 + rows) of the weight as the product uses it, (q - z) s / act_scale, in
// bfloat16 into w [rows, in]: one 16-byte piece per thread.
template <class F>
__global__ void dequantize_kernel(const Args a, int row0, int rows, __nv_bfloat16* __restrict__ w) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<int64_t>(rows) * a.row_pieces) return;
  const int r = static_cast<int>(id / a.row_pieces), piece = static_cast<int>(id - static_cast<int64_t>(r) * a.row_pieces);
  const int row = row0 + r;
  const typename F::Meta m = F::meta(a, row, piece);
  float v[F::kPer];
  F::decode(static_cast<const uint4*>(a.codes)[static_cast<int64_t>(row) * a.row_pieces + piece], m, v);
  const float scale = F::piece_scale(m) * F::row_scale(a, row);
  // 16-byte stores of eight values each (the row is 16-byte aligned: in % kPer == 0).
  uint4* out = reinterpret_cast<uint4*>(w + static_cast<int64_t>(r) * a.in + static_cast<int64_t>(piece) * F::kPer);
#pragma unroll
  for (int j = 0; j < F::kPer / 8; ++j) {
    uint32_t words[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float lo = v[8 * j + 2 * e] * scale, hi = v[8 * j + 2 * e + 1] * scale;
      if (a.act_scale) {
        lo /= a.act_scale[piece * F::kPer + 8 * j + 2 * e];
        hi /= a.act_scale[piece * F::kPer + 8 * j + 2 * e + 1];
      }
      const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
      memcpy(&words[e], &pair, 4);
    }
    out[j] = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// A template over the format only so that two formats' sources link into one binary (a
// non-template kernel defined in a header is defined once per source).
template <class F>
__global__ void add_bias_kernel(const Args a) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<int64_t>(a.tokens) * a.out) return;
  const int o = static_cast<int>(id % a.out);
  if (a.y_bf16) {
    auto* y = static_cast<__nv_bfloat16*>(a.y);
    y[id] = __float2bfloat16_rn(__bfloat162float(y[id]) + a.bias[o]);
  } else {
    static_cast<float*>(a.y)[id] += a.bias[o];
  }
}

// Whether launch_tiled takes this product: a plain store of enough bfloat16 rows, with the
// tiled resources set up. (AWQ's input scales are folded into the dequantized rows.)
inline bool tiled_applies(const Args& a, const Tiled& t) {
  return t.cublas != nullptr && a.tokens >= kTiledMinTokens && a.x_bf16 && a.input == input_act &&
         a.output == output_store;
}

// y [T, out] = x [T, in] W~^T (+ bias): blocks of rows dequantized into t.scratch, each
// multiplied by cuBLAS (bfloat16 in, float32 accumulation) into its columns of y. Returns a
// cudaError_t, or cudaErrorUnknown for a cuBLAS failure.
template <class F>
int launch_tiled(const Args& a, const Tiled& t, cudaStream_t stream) {
  auto handle = static_cast<cublasHandle_t>(t.cublas);
  if (cublasSetStream(handle, stream) != CUBLAS_STATUS_SUCCESS) return static_cast<int>(cudaErrorUnknown);
  const int64_t per_row = static_cast<int64_t>(a.in) * 2;
  const int block_rows = static_cast<int>(std::min<int64_t>(a.out, t.scratch_bytes / per_row));
  if (block_rows < 1) return static_cast<int>(cudaErrorInvalidValue);
  auto* w = static_cast<__nv_bfloat16*>(t.scratch);
  const float one = 1.0f, zero = 0.0f;
  for (int row0 = 0; row0 < a.out; row0 += block_rows) {
    const int rows = std::min(block_rows, a.out - row0);
    const int64_t threads = static_cast<int64_t>(rows) * a.row_pieces;
    dequantize_kernel<F><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(a, row0, rows, w);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return static_cast<int>(e);
    // Row-major y[T, out] is column-major y^T [out, T]: its rows row0.. are columns of W~^T.
    void* y = static_cast<char*>(a.y) + static_cast<int64_t>(row0) * (a.y_bf16 ? 2 : 4);
    if (cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, rows, a.tokens, a.in, &one, w, CUDA_R_16BF, a.in, a.x, CUDA_R_16BF,
                     a.in, &zero, y, a.y_bf16 ? CUDA_R_16BF : CUDA_R_32F, a.out, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
      return static_cast<int>(cudaErrorUnknown);
  }
  if (a.bias) {
    const int64_t n = static_cast<int64_t>(a.tokens) * a.out;
    add_bias_kernel<F><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(a);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return static_cast<int>(e);
  }
  return 0;
}

// A plugin's whole product: the tiled path where it applies, else the GEMV in chunks.
template <class F>
int launch_any(const Args& a, const Tiled& t, cudaStream_t stream) {
  if (a.tokens <= 0 || a.out <= 0) return 0;
  if (tiled_applies(a, t)) return launch_tiled<F>(a, t, stream);
  return static_cast<int>(launch_chunked<F>(a, stream));
}

// Creates the cuBLAS handle of `t` with `workspace` (device memory the caller owns, at least
// kTiledWorkspaceBytes) as its workspace; 0 or a nonzero cuBLAS status.
inline int tiled_create(Tiled& t, void* workspace) {
  cublasHandle_t h = nullptr;
  if (cublasStatus_t s = cublasCreate(&h); s != CUBLAS_STATUS_SUCCESS) return static_cast<int>(s);
  if (cublasStatus_t s = cublasSetWorkspace(h, workspace, kTiledWorkspaceBytes); s != CUBLAS_STATUS_SUCCESS) {
    cublasDestroy(h);
    return static_cast<int>(s);
  }
  t.cublas = h;
  return 0;
}

inline void tiled_destroy(Tiled& t) {
  if (t.cublas) cublasDestroy(static_cast<cublasHandle_t>(t.cublas));
  t.cublas = nullptr;
}

}  // namespace loomp::qgemv
