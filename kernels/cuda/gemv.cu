// Fused decode GEMVs (see loom/kernels/gemv.hpp for the contract).
//
// Work split. An output "unit" is two weight rows read together (two independent load streams
// per warp): rows (2u, 2u + 1) for plain outputs, (gate j, up j) for SwiGLU, (i, i + D/2) of one
// head for RoPE, whose rotation needs both. A warp takes a contiguous range of units; each lane
// reads 16-byte pieces of both rows, kSteps pieces per row per pipeline stage, and the next
// stage is loaded into registers while the current one is multiplied, so a warp keeps about
// 4 KB of weights in flight. The grid is one wave of resident blocks; each block requests its
// first stage of weights before it waits for the previous kernel (programmatic dependent
// launch), so one GEMV's weight stream starts while the previous kernel drains.
//
// Measured alternatives (H100, the 1B shape, kernels_cuda_test "[.bench]"): a cp.async
// ring of 2-4 stages in shared memory helped the small matrices (o, down) but slowed the large
// ones (gate/up, lm_head), and the whole step was no faster; prefetching the next weights into
// L2 before the wait, one block per SM, and 2 pieces per stage (3 blocks per SM) were slower.
//
// The block's input rows, normalised by the prologue where there is one, are staged in shared
// memory as bfloat16 (at most 48 KB: T * in * 2 bytes), read back by every warp.
#include "loom/kernels/gemv.hpp"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "model_device.cuh"

namespace loom::kernels {
namespace {

using device::kFullMask;
using device::kRowThreads;
using device::allow_next_kernel;
using device::round_bf16;
using device::wait_for_previous_kernel;

constexpr int kWarps = kRowThreads / 32;
constexpr int kSteps = 4;        // 16-byte pieces per row and lane in one pipeline stage
constexpr int kMaxTokens = 4;    // register accumulators: 2 rows x T per lane
constexpr int kSmemBytes = 48 * 1024;

// bfloat16 pairs packed in a 32-bit word -> floats (exact).
__device__ __forceinline__ float lo_bf16(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_bf16(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// KS ("K split"): a unit is one row whose two halves are the two load streams, for outputs with
// fewer row pairs than the grid has warps (o and down: 2048 rows at batch 1), so that every warp
// streams weights.
template <GemvEpilogue E, bool KS>
__host__ __device__ __forceinline__ int units_of(const GemvArgs& a) {
  if constexpr (KS) return a.out;
  if constexpr (E == GemvEpilogue::swiglu || E == GemvEpilogue::rope_split) return a.out / 2;
  return (a.out + 1) / 2;
}

// The two weight rows of a unit; r1 < 0 when the unit has one row (an odd `out`).
template <GemvEpilogue E>
__device__ __forceinline__ void rows_of(const GemvArgs& a, int unit, int& r0, int& r1) {
  if constexpr (E == GemvEpilogue::swiglu) {
    r0 = unit;
    r1 = unit + a.out / 2;
  } else if constexpr (E == GemvEpilogue::rope_split) {
    const int half = a.head_dim / 2;
    const int head = unit / half;
    r0 = head * a.head_dim + (unit - head * half);
    r1 = r0 + half;
  } else {
    r0 = 2 * unit;
    r1 = 2 * unit + 1 < a.out ? 2 * unit + 1 : -1;
  }
}

// A unit's two load streams: `len` 16-byte pieces of W from piece w0 and from piece w1, multiplied
// with the input from its piece 0 and from its piece x1.
struct Streams {
  int64_t w0, w1;
  int len, x1;
  bool two;  // false: the unit has one row (an odd `out`), stream 1 reads nothing
};

template <GemvEpilogue E, bool KS>
__device__ __forceinline__ Streams streams_of(const GemvArgs& a, int unit) {
  const int chunks = a.in >> 3;
  if constexpr (KS) {
    const int half = chunks / 2;
    return {static_cast<int64_t>(unit) * chunks, static_cast<int64_t>(unit) * chunks + half, half, half, true};
  }
  int r0, r1;
  rows_of<E>(a, unit, r0, r1);
  return {static_cast<int64_t>(r0) * chunks, static_cast<int64_t>(r1 < 0 ? r0 : r1) * chunks, chunks, 0, r1 >= 0};
}

// Weights are read once per step: keep them out of L1, and let L2 fetch whole 256-byte sectors.
__device__ __forceinline__ uint4 load_weights(const uint4* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// One pipeline stage in registers: Steps 16-byte pieces of the unit's two rows per lane.
template <int Steps>
struct Stage {
  uint4 w0[Steps], w1[Steps];
};

template <GemvEpilogue E, bool KS, int Steps>
__device__ __forceinline__ void load_stage(const GemvArgs& a, int unit, int step, int lane, Stage<Steps>& st) {
  const Streams m = streams_of<E, KS>(a, unit);
  const uint4* w = static_cast<const uint4*>(a.weight);
#pragma unroll
  for (int s = 0; s < Steps; ++s) {
    const int c = (step * Steps + s) * 32 + lane;
    const bool ok = c < m.len;
    st.w0[s] = ok ? load_weights(w + m.w0 + c) : make_uint4(0, 0, 0, 0);
    st.w1[s] = ok && m.two ? load_weights(w + m.w1 + c) : make_uint4(0, 0, 0, 0);
  }
}

template <int NT, int Steps>
__device__ __forceinline__ void multiply_stage(const Stage<Steps>& st, const __nv_bfloat16* xs, int in, int len, int x1,
                                               int step, int lane, float (&acc0)[NT], float (&acc1)[NT]) {
#pragma unroll
  for (int s = 0; s < Steps; ++s) {
    const int c = (step * Steps + s) * 32 + lane;
    if (c >= len) break;
    const uint32_t w0[4] = {st.w0[s].x, st.w0[s].y, st.w0[s].z, st.w0[s].w};
    const uint32_t w1[4] = {st.w1[s].x, st.w1[s].y, st.w1[s].z, st.w1[s].w};
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const uint4* x = reinterpret_cast<const uint4*>(xs + static_cast<int64_t>(t) * in);
      const uint4 xr = x[c], xr1 = x1 == 0 ? xr : x[c + x1];
      const uint32_t xw[4] = {xr.x, xr.y, xr.z, xr.w};
      const uint32_t xw1[4] = {xr1.x, xr1.y, xr1.z, xr1.w};
      float s0 = acc0[t], s1 = acc1[t];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s0 = fmaf(lo_bf16(w0[e]), lo_bf16(xw[e]), s0);
        s0 = fmaf(hi_bf16(w0[e]), hi_bf16(xw[e]), s0);
        s1 = fmaf(lo_bf16(w1[e]), lo_bf16(xw1[e]), s1);
        s1 = fmaf(hi_bf16(w1[e]), hi_bf16(xw1[e]), s1);
      }
      acc0[t] = s0;
      acc1[t] = s1;
    }
  }
}

// The block's T input rows into shared memory, as the unfused path stores them.
template <GemvPrologue P, int NT>
__device__ __forceinline__ void stage_input(const GemvArgs& a, __nv_bfloat16* xs) {
  if constexpr (P == GemvPrologue::act) {
    const uint4* src = static_cast<const uint4*>(a.act);
    uint4* dst = reinterpret_cast<uint4*>(xs);
    const int n = NT * (a.in >> 3);
    for (int i = threadIdx.x; i < n; i += kRowThreads) dst[i] = src[i];
  } else {
    // With an embedding table, the rows are looked up here (as embed_rows_cuda does) into
    // `looked_up`, and block 0 also writes them to resid; each thread reads back only the
    // values it wrote (norm_row's partition), so no barrier is needed between the two.
    float* looked_up = reinterpret_cast<float*>(xs + static_cast<int64_t>(NT) * a.in);
#pragma unroll 1
    for (int t = 0; t < NT; ++t) {
      const float* row = a.resid + static_cast<int64_t>(t) * a.in;
      if (a.embed_table) {
        const auto* table = static_cast<const __nv_bfloat16*>(a.embed_table) + static_cast<int64_t>(a.tokens_ids[t]) * a.in;
        const auto* pos = a.embed_pos_table ? static_cast<const __nv_bfloat16*>(a.embed_pos_table) +
                                                  static_cast<int64_t>(a.positions[t]) * a.in
                                            : nullptr;
        for (int i = threadIdx.x; i < a.in; i += kRowThreads) {
          const float v = device::load(table, i) + (pos ? device::load(pos, i) : 0.0f);
          looked_up[i] = v;
          if (blockIdx.x == 0) a.resid[static_cast<int64_t>(t) * a.in + i] = v;
        }
        row = looked_up;
      }
      device::norm_row(row, a.in, a.norm_w, P == GemvPrologue::layer_norm ? a.norm_b : nullptr, a.eps,
                       xs + static_cast<int64_t>(t) * a.in);
    }
  }
  __syncthreads();
}

// Token t's results y0 (row r0) and y1 (row r1) of one unit.
// What a unit's epilogue reads besides its products, for token t: biases, the rotary cos/sin
// (rope_split), the residual values it adds to (add_f32). Loaded ahead of the epilogue, so that
// their latency overlaps the unit's multiplications instead of following them.
struct EpilogueInputs {
  float v0 = 0.0f, v1 = 0.0f;  // add_f32: residual of rows 0/1; rope_split: cos, sin
  float b0 = 0.0f, b1 = 0.0f;  // biases of rows 0/1 (zero when there are none)
};

// The inputs no kernel writes (biases, rotary tables, positions): safe before the wait.
template <GemvEpilogue E, bool KS>
__device__ __forceinline__ void load_fixed_inputs(const GemvArgs& a, int unit, int t, EpilogueInputs& in) {
  if constexpr (KS) {
    if (a.bias) in.b0 = a.bias[unit];
    return;
  }
  if constexpr (E == GemvEpilogue::rope_split) {
    const int D = a.head_dim, half = D / 2;
    const int head = unit / half, i = unit - head * half;
    if (a.bias) {
      in.b0 = a.bias[head * D + i];
      in.b1 = a.bias[head * D + i + half];
    }
    if (a.cos_sin && head < a.n_heads + a.n_kv_heads) {
      const float* cs = a.cos_sin + (static_cast<int64_t>(a.positions[t]) * half + i) * 2;
      in.v0 = cs[0];
      in.v1 = cs[1];
    }
  } else if constexpr (E == GemvEpilogue::add_f32 || E == GemvEpilogue::bias_gelu) {
    int r0, r1;
    rows_of<E>(a, unit, r0, r1);
    if (a.bias) {
      in.b0 = a.bias[r0];
      if (r1 >= 0) in.b1 = a.bias[r1];
    }
  }
}

// The inputs the previous kernel may have written (the residual): only after the wait.
template <GemvEpilogue E, bool KS>
__device__ __forceinline__ void load_produced_inputs(const GemvArgs& a, int unit, int t, EpilogueInputs& in) {
  if constexpr (E == GemvEpilogue::add_f32) {
    const float* o = a.out_f32 + static_cast<int64_t>(t) * a.out;
    if constexpr (KS) {
      in.v0 = o[unit] * a.resid_scale;
    } else {
      int r0, r1;
      rows_of<E>(a, unit, r0, r1);
      in.v0 = o[r0] * a.resid_scale;
      if (r1 >= 0) in.v1 = o[r1] * a.resid_scale;
    }
  }
}

// Token t's results y0 (row r0) and y1 (row r1) of one unit.
template <GemvEpilogue E, bool KS>
__device__ __forceinline__ void finish_unit(const GemvArgs& a, int unit, int t, float y0, float y1,
                                            const EpilogueInputs& in) {
  if constexpr (KS) {  // one row, its halves summed (add_f32 only)
    float v = in.v0 + (y0 + y1);
    if (a.bias) v += in.b0;
    a.out_f32[static_cast<int64_t>(t) * a.out + unit] = v;
    return;
  }
  int r0, r1;
  rows_of<E>(a, unit, r0, r1);
  if constexpr (E == GemvEpilogue::add_f32 || E == GemvEpilogue::store_f32) {
    float* o = a.out_f32 + static_cast<int64_t>(t) * a.out;
    if constexpr (E == GemvEpilogue::add_f32) {
      float v0 = in.v0 + y0;
      if (a.bias) v0 += in.b0;
      o[r0] = v0;
      if (r1 >= 0) {
        float v1 = in.v1 + y1;
        if (a.bias) v1 += in.b1;
        o[r1] = v1;
      }
    } else {
      o[r0] = y0;
      if (r1 >= 0) o[r1] = y1;
    }
  } else if constexpr (E == GemvEpilogue::swiglu) {
    const int inter = a.out / 2;
    device::store(static_cast<__nv_bfloat16*>(a.out_act), static_cast<int64_t>(t) * inter + unit,
                  device::silu(round_bf16(y0)) * round_bf16(y1));
  } else if constexpr (E == GemvEpilogue::bias_gelu) {
    auto* o = static_cast<__nv_bfloat16*>(a.out_act) + static_cast<int64_t>(t) * a.out;
    device::store(o, r0, device::gelu_tanh(round_bf16(y0) + in.b0));
    if (r1 >= 0) device::store(o, r1, device::gelu_tanh(round_bf16(y1) + in.b1));
  } else {  // rope_split
    const int D = a.head_dim, half = D / 2;
    const int head = unit / half, i = unit - head * half;
    float x0 = round_bf16(y0), x1 = round_bf16(y1);
    if (a.bias) {
      x0 += in.b0;
      x1 += in.b1;
    }
    __nv_bfloat16* dst;
    bool rotate = a.cos_sin != nullptr;
    if (head < a.n_heads) {
      dst = static_cast<__nv_bfloat16*>(a.q) + (static_cast<int64_t>(t) * a.n_heads + head) * D;
    } else if (head < a.n_heads + a.n_kv_heads) {
      dst = static_cast<__nv_bfloat16*>(a.k) + (static_cast<int64_t>(t) * a.n_kv_heads + head - a.n_heads) * D;
    } else {
      dst = static_cast<__nv_bfloat16*>(a.v) +
            (static_cast<int64_t>(t) * a.n_kv_heads + head - a.n_heads - a.n_kv_heads) * D;
      rotate = false;
    }
    if (rotate) {
      const float c = in.v0, s = in.v1;
      const float r0v = x0 * c - x1 * s, r1v = x1 * c + x0 * s;
      x0 = r0v;
      x1 = r1v;
    }
    device::store(dst, i, x0);
    device::store(dst, i + half, x1);
  }
}

template <GemvPrologue P, GemvEpilogue E, bool KS, int NT, int Steps>
__global__ void __launch_bounds__(kRowThreads, 2) gemv_kernel(const GemvArgs a) {
  extern __shared__ uint4 smem[];
  auto* xs = reinterpret_cast<__nv_bfloat16*>(smem);
  const int lane = threadIdx.x & 31;
  const int units = units_of<E, KS>(a);
  const int len = KS ? (a.in >> 4) : (a.in >> 3);  // pieces per stream
  const int x1 = KS ? len : 0;
  const int steps = (len + 32 * Steps - 1) / (32 * Steps);
  // This warp's units: a contiguous range (whole rows, one after another).
  const int warps = static_cast<int>(gridDim.x) * kWarps;
  const int gw = static_cast<int>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int base = units / warps, extra = units % warps;
  const int first = gw * base + min(gw, extra);
  // The warp's work as a flat sequence of (unit, step) items; the same for all its lanes.
  const int work = (base + (gw < extra ? 1 : 0)) * steps;

  // Before waiting for the previous kernel: the next kernel may start too, and this one's first
  // two stages of weights (which no kernel writes) are requested: for the small matrices (q/k/v,
  // o) that is all of a warp's work, so only arithmetic is left after the wait.
  allow_next_kernel();
  auto unit_of = [&](int item) { return first + item / steps; };
  auto step_of = [&](int item) { return item % steps; };
  Stage<Steps> A, B;  // items f and f + 1 of the loop below
  if (work > 0) load_stage<E, KS, Steps>(a, unit_of(0), step_of(0), lane, A);
  if (work > 1) load_stage<E, KS, Steps>(a, unit_of(1), step_of(1), lane, B);
  EpilogueInputs inputs;  // lane t < NT: token t's, for the unit being multiplied
  if (work > 0 && lane < NT) load_fixed_inputs<E, KS>(a, first, lane, inputs);
  wait_for_previous_kernel();
  if (work > 0 && lane < NT) load_produced_inputs<E, KS>(a, first, lane, inputs);
  stage_input<P, NT>(a, xs);

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
    if (lane < NT) {
      finish_unit<E, KS>(a, unit_of(item), lane, y0, y1, inputs);
      if (item + 1 < work) {  // the next unit's inputs, while its weights are multiplied
        inputs = EpilogueInputs{};
        load_fixed_inputs<E, KS>(a, unit_of(item + 1), lane, inputs);
        load_produced_inputs<E, KS>(a, unit_of(item + 1), lane, inputs);
      }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = 0.0f;
  };
  // Two register stages: each is refilled with the item two ahead as soon as it is multiplied.
  for (int f = 0; f < work; f += 2) {
    multiply_stage<NT, Steps>(A, xs, a.in, len, x1, step_of(f), lane, acc0, acc1);
    finish_if_last(f);
    if (f + 2 < work) load_stage<E, KS, Steps>(a, unit_of(f + 2), step_of(f + 2), lane, A);
    if (f + 1 >= work) break;
    multiply_stage<NT, Steps>(B, xs, a.in, len, x1, step_of(f + 1), lane, acc0, acc1);
    finish_if_last(f + 1);
    if (f + 3 < work) load_stage<E, KS, Steps>(a, unit_of(f + 3), step_of(f + 3), lane, B);
  }
}

// The input rows as bfloat16, and one float32 row for an embedding lookup.
int smem_bytes(const GemvArgs& a, int tokens) { return tokens * a.in * 2 + (a.embed_table ? a.in * 4 : 0); }

// How many blocks of `kernel` with `smem` bytes of dynamic shared memory fit on the current
// device at once (SMs x blocks per SM), after opting in to that much shared memory (past the
// default 48 KB with the norm's static bytes). Driver queries, so done once per (kernel,
// device, size): a decode step launches these kernels every time when it is not replayed from
// a graph.
cudaError_t resident_blocks(const void* kernel, int smem, int64_t& wave) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int>, int64_t> known;
  // The opt-in is one attribute per kernel and device: it only ever grows, because a launch
  // with a size met before relies on it still being large enough (setting it to a smaller
  // size for a later, smaller launch would make that earlier size fail with "invalid
  // argument").
  static std::map<std::pair<const void*, int>, int> opted_in;
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  std::lock_guard lock(mutex);
  const auto key = std::make_tuple(kernel, device, smem);
  if (auto it = known.find(key); it != known.end()) {
    wave = it->second;
    return cudaSuccess;
  }
  int sms = 0, per_sm = 0;
  int& opt_in = opted_in[{kernel, device}];
  if (smem > opt_in) {
    if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem); e != cudaSuccess)
      return e;
    opt_in = smem;
  }
  if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device); e != cudaSuccess) return e;
  if (cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kRowThreads, smem); e != cudaSuccess)
    return e;
  wave = static_cast<int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
  known.emplace(key, wave);
  return cudaSuccess;
}

// One launch of a grid of at most one wave (as many blocks as fit at once: measured on the
// H100, two per SM), so that each warp has as many weight bytes in flight as the registers
// allow and every block starts before the previous kernel ends.
template <GemvPrologue P, GemvEpilogue E, bool KS, int NT>
int launch_kernel(const GemvArgs& a, bool programmatic, cudaStream_t stream, int64_t wave) {
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(wave, (units_of<E, KS>(a) + kWarps - 1) / kWarps)));
  return static_cast<int>(device::launch_maybe_programmatic(programmatic, grid, dim3(kRowThreads),
                                                            static_cast<size_t>(smem_bytes(a, NT)), stream,
                                                            gemv_kernel<P, E, KS, NT, kSteps>, a));
}

template <GemvPrologue P, GemvEpilogue E, int NT>
int launch(const GemvArgs& a, bool programmatic, cudaStream_t stream) {
  int64_t wave = 0;
  if (cudaError_t e = resident_blocks(reinterpret_cast<const void*>(gemv_kernel<P, E, false, NT, kSteps>),
                                      smem_bytes(a, NT), wave);
      e != cudaSuccess)
    return static_cast<int>(e);
  if constexpr (E == GemvEpilogue::add_f32) {
    // Fewer row pairs than warps: split each row's K in two instead, so that all warps stream.
    if (units_of<E, false>(a) < wave * kWarps && a.in % 16 == 0) {
      if (cudaError_t e = resident_blocks(reinterpret_cast<const void*>(gemv_kernel<P, E, true, NT, kSteps>),
                                          smem_bytes(a, NT), wave);
          e != cudaSuccess)
        return static_cast<int>(e);
      return launch_kernel<P, E, true, NT>(a, programmatic, stream, wave);
    }
  }
  return launch_kernel<P, E, false, NT>(a, programmatic, stream, wave);
}

template <GemvPrologue P, GemvEpilogue E>
int launch_tokens(const GemvArgs& a, bool programmatic, cudaStream_t stream) {
  switch (a.tokens) {
    case 1: return launch<P, E, 1>(a, programmatic, stream);
    case 2: return launch<P, E, 2>(a, programmatic, stream);
    case 3: return launch<P, E, 3>(a, programmatic, stream);
    default: return launch<P, E, 4>(a, programmatic, stream);
  }
}

template <GemvPrologue P>
int launch_norm(const GemvArgs& a, GemvEpilogue e, bool programmatic, cudaStream_t stream) {
  switch (e) {
    case GemvEpilogue::store_f32: return launch_tokens<P, GemvEpilogue::store_f32>(a, programmatic, stream);
    case GemvEpilogue::swiglu: return launch_tokens<P, GemvEpilogue::swiglu>(a, programmatic, stream);
    case GemvEpilogue::bias_gelu: return launch_tokens<P, GemvEpilogue::bias_gelu>(a, programmatic, stream);
    case GemvEpilogue::rope_split: return launch_tokens<P, GemvEpilogue::rope_split>(a, programmatic, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

int32_t gemv_max_embed_tokens(int32_t in) {
  const int32_t t = gemv_max_tokens(in);
  const int64_t fit = (kSmemBytes - static_cast<int64_t>(in) * 4) / (static_cast<int64_t>(in) * 2);
  return static_cast<int32_t>(std::clamp<int64_t>(fit, 0, t));
}

int32_t gemv_max_tokens(int32_t in) {
  if (in <= 0 || in % 8 != 0) return 0;
  return static_cast<int32_t>(std::min<int64_t>(kMaxTokens, kSmemBytes / (static_cast<int64_t>(in) * 2)));
}

int gemv_bf16_cuda(const GemvArgs& a, GemvPrologue prologue, GemvEpilogue epilogue, bool programmatic, void* stream) {
  const auto invalid = static_cast<int>(cudaErrorInvalidValue);
  if (a.tokens < 1 || a.tokens > gemv_max_tokens(a.in) || a.out < 1 || a.weight == nullptr || !aligned16(a.weight))
    return invalid;
  if (a.embed_table != nullptr &&
      (prologue == GemvPrologue::act || a.tokens > gemv_max_embed_tokens(a.in) || a.tokens_ids == nullptr ||
       a.resid == nullptr || (a.embed_pos_table != nullptr && a.positions == nullptr)))
    return invalid;
  if (epilogue == GemvEpilogue::swiglu && a.out % 2 != 0) return invalid;
  if (epilogue == GemvEpilogue::rope_split &&
      (a.head_dim < 2 || a.head_dim % 2 != 0 || a.n_heads < 1 || a.n_kv_heads < 0 ||
       static_cast<int64_t>(a.n_heads + 2 * a.n_kv_heads) * a.head_dim != a.out || a.q == nullptr ||
       (a.n_kv_heads > 0 && (a.k == nullptr || a.v == nullptr)) || (a.cos_sin != nullptr && a.positions == nullptr)))
    return invalid;
  const bool to_f32 = epilogue == GemvEpilogue::add_f32 || epilogue == GemvEpilogue::store_f32;
  if (to_f32 ? a.out_f32 == nullptr : (epilogue != GemvEpilogue::rope_split && a.out_act == nullptr)) return invalid;
  auto s = static_cast<cudaStream_t>(stream);
  switch (prologue) {
    case GemvPrologue::act:
      if (epilogue != GemvEpilogue::add_f32 || a.act == nullptr || !aligned16(a.act)) return invalid;
      return launch_tokens<GemvPrologue::act, GemvEpilogue::add_f32>(a, programmatic, s);
    case GemvPrologue::rms_norm:
      if (a.resid == nullptr || a.norm_w == nullptr) return invalid;
      return launch_norm<GemvPrologue::rms_norm>(a, epilogue, programmatic, s);
    case GemvPrologue::layer_norm:
      if (a.resid == nullptr || a.norm_w == nullptr || a.norm_b == nullptr) return invalid;
      return launch_norm<GemvPrologue::layer_norm>(a, epilogue, programmatic, s);
  }
  return invalid;
}

}  // namespace loom::kernels
