// One-token decode GEMV for quantized weights (batch-1 decode): the products of
// loom_quant_gemv.cuh (same formats, fusions, float16 staging and numerics) with the weights
// streamed through shared memory. Header-only and Loom-free, like loom_quant_gemv.cuh.
//
// Why a second kernel: at one token a product's bytes are few (int8 q/k/v of the 1B shape is
// 6 MB, 48 KB an SM) and its time is mostly its chain of dependent steps after the previous
// kernel: stage the input, multiply, write. loom_quant_gemv.cuh's kernel holds two stages of
// weights in registers and fills every register of its SMs, so the next product's blocks cannot
// be resident before its blocks leave, and their weights start only then. Here each warp copies
// its weight pieces into a ring of shared-memory slots with cp.async (16 bytes a lane), 80 KB of
// ring a block; the grid is one block an SM, using half of an SM's registers and shared memory,
// so the next product's block becomes resident while this one runs and requests its first 80 KB
// of weights (programmatic dependent launch) before it waits for this kernel. A lane reads back
// only what it copied itself, so cp.async.wait_group orders each slot without warp or block
// barriers.
//
// The chain after the wait is kept short: the input's loads (and the norm's weights) are issued
// first, the epilogue's reads of the caller's data (the residual's old values, RoPE's position,
// a bias) right behind them; the rows' scales, the format's own, are read before the wait with
// the weights. Each warp's lane l holds its unit l's epilogue values.
//
// Work split: the products' units (streams_of in loom_quant_gemv.cuh: two rows each, the pair
// the epilogue needs) are dealt to the blocks in contiguous ranges and within a block to the
// warps in turn; a slot holds Q pieces a lane of both rows of a unit (each input read from
// shared memory serves both rows).
//
// A Format used here sets kStreamed: its pieces decode without per-piece metadata (Meta{}) and
// its piece_scale is 1 (the row's scale, row_scale, is applied to the row's sum). int8 is such a
// format; int4 (a scale and zero per group) keeps loom_quant_gemv.cuh's kernel: its decode costs
// twice int8's per byte, and its products measured slower here than there (H200, batch-1 decode of
// the 1B shape: 1,137 against 1,231 tok/s with metadata words copied beside the codes).
#pragma once

#include <cstdlib>
#include <cstring>

#include "loom_quant_gemv.cuh"

namespace loomp::qgemv::stream {

constexpr int kMaxIn = 8192;           // staged input of at most 16 KB (float16)

constexpr int kRingBytes = 80 * 1024;  // a block's ring: two blocks and their staging fit an SM

// A launch shape: T threads a block, Q pieces of each of a unit's two rows a lane in a slot.
template <int T, int Q>
struct Shape {
  static constexpr int kThreads = T, kWarps = T / 32, kQ = Q;
  static constexpr int kSlotBytes = 2 * Q * 512;                     // both rows' codes
  static constexpr int kSlots = kRingBytes / kWarps / kSlotBytes;   // ring slots a warp
  static constexpr int kMaxGroups = (kMaxIn / 8 + T - 1) / T;       // input groups of 8 a thread
  static_assert(kSlots >= 2, "ring too small");
};

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Weights are read once per step: L2 fetches whole 256-byte sectors, L1 is bypassed (.cg).
__device__ __forceinline__ void copy16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait_groups() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
// Sum of the first members and max of the second over a block of `warps` warps (red: 2 x warps floats).
template <int W>
__device__ __forceinline__ float2 block_sum_max(float2 v, float* red) {
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(kFullMask, v.x, o);
    v.y = fmaxf(v.y, __shfl_xor_sync(kFullMask, v.y, o));
  }
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) {
    red[warp] = v.x;
    red[W + warp] = v.y;
  }
  __syncthreads();
  float2 r = make_float2(0.0f, 0.0f);
#pragma unroll
  for (int w = 0; w < W; ++w) {
    r.x += red[w];
    r.y = fmaxf(r.y, red[W + w]);
  }
  return r;
}

// The one token's input into xs as float16, in loom_quant_gemv.cuh's staged order and with its
// numerics (stage_input): each thread holds its groups of 8 inputs in registers from one round
// of 16-byte loads, so the input is read once; nw holds the norm weights of those groups.
// after_loads() runs once the input's loads are issued. Returns 1 / the float16 scale.
template <class F, class Sh, class AfterLoads>
__device__ __forceinline__ float stage_one(const Args& a, __half* xs, const float (&nw)[Sh::kMaxGroups][8], float* red,
                                           AfterLoads&& after_loads) {
  constexpr int G = Sh::kMaxGroups, T = Sh::kThreads;
  const int groups = a.in / 8;
  const bool vec_x = aligned16(a.x), vec_s = !a.act_scale || aligned16(a.act_scale);
  float v[G][8];
#pragma unroll
  for (int j = 0; j < G; ++j) {
    const int g = static_cast<int>(threadIdx.x) + j * T;
    if (g >= groups) continue;
    if (a.input == input_rms_norm || !a.x_bf16)
      load8_f32(static_cast<const float*>(a.x), 8 * g, vec_x, v[j]);
    else
      load8_bf16(static_cast<const __nv_bfloat16*>(a.x), 8 * g, vec_x, v[j]);
  }
  after_loads();  // more reads of the previous kernels' outputs, in flight beside these
  auto slot = [](int k) { return staged_slot<F, __half>(k / F::kPer, k % F::kPer); };
  // body(j, g, sc) for each of this thread's groups: j its index here, g the group, sc the
  // group's input scales (AWQ; else ones).
  auto each_group = [&](auto&& body) {
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const int g = static_cast<int>(threadIdx.x) + j * T;
      if (g >= groups) continue;
      float sc[8] = {1, 1, 1, 1, 1, 1, 1, 1};
      if (a.act_scale) load8_f32(a.act_scale, 8 * g, vec_s, sc);
      body(j, g, sc);
    }
  };
  float scale = 1.0f;
  if (a.input == input_rms_norm) {
    float sq = 0.0f, big = 0.0f;
    each_group([&](int j, int, const float (&sc)[8]) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        sq += v[j][e] * v[j][e];
        big = fmaxf(big, fabsf(nw[j][e] * v[j][e]) / sc[e]);
      }
    });
    const float2 both = block_sum_max<Sh::kWarps>(make_float2(sq, big), red);
    const float inv = rsqrtf(both.x / static_cast<float>(a.in) + a.eps);
    scale = half_scale(both.y * inv * 1.00390625f);  // headroom for rounding up to bfloat16
    each_group([&](int j, int g, const float (&sc)[8]) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float x = round_bf16(nw[j][e] * (v[j][e] * inv));
        if (a.act_scale) x /= sc[e];
        xs[slot(8 * g + e)] = __float2half_rn(x * scale);
      }
    });
  } else {
    float largest = 0.0f;
    each_group([&](int j, int, const float (&sc)[8]) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v[j][e] = round_bf16(a.act_scale ? v[j][e] / sc[e] : v[j][e]);
        largest = fmaxf(largest, fabsf(v[j][e]));
      }
    });
    scale = half_scale(block_sum_max<Sh::kWarps>(make_float2(0.0f, largest), red).y);
    each_group([&](int j, int g, const float (&)[8]) {
#pragma unroll
      for (int e = 0; e < 8; ++e) xs[slot(8 * g + e)] = __float2half_rn(v[j][e] * scale);
    });
  }
  __syncthreads();
  return 1.0f / scale;
}

// What a unit's epilogue reads besides its sums, loaded early so that the kernel's chain after
// the previous kernel is input, products, stores: the rows' scales are the format's own, constant
// (read before the wait, with the weights); the bias, the residual's old values and RoPE's
// cos/sin are the caller's and are read right after the wait, beside the input staging. Lane l
// of a warp holds its unit l's (units past 32 read theirs at the end).
struct Epilogue {
  float scale0 = 1.0f, scale1 = 1.0f, bias0 = 0.0f, bias1 = 0.0f, old0 = 0.0f, old1 = 0.0f, c = 1.0f, s = 0.0f;
};

template <class F>
__device__ __forceinline__ void epilogue_constants(const Args& a, const Streams& m, Epilogue& e) {
  e.scale0 = F::row_scale(a, m.r0);
  e.scale1 = m.r1 >= 0 ? F::row_scale(a, m.r1) : 1.0f;
}
// After the wait: what the caller passed (the bias: a previous kernel may write it) and what
// the previous kernels wrote.
__device__ __forceinline__ void epilogue_inputs(const Args& a, int unit, const Streams& m, Epilogue& e) {
  if (a.bias && a.output != output_swiglu) {
    e.bias0 = a.bias[m.r0];
    e.bias1 = m.r1 >= 0 ? a.bias[m.r1] : 0.0f;
  }
  if (a.output == output_add) {
    const float* y = static_cast<const float*>(a.y);
    e.old0 = y[m.r0];
    e.old1 = m.r1 >= 0 ? y[m.r1] : 0.0f;
  } else if (a.output == output_rope_qkv) {
    const int half = a.head_dim / 2, head = unit / half, i = unit - head * half;
    if (head < a.heads + a.kv_heads) {
      const float* cs = a.cos_sin + (static_cast<int64_t>(a.positions[0]) * half + i) * 2;
      e.c = cs[0];
      e.s = cs[1];
    }
  }
}

// One token's outputs of a unit from its two sums (finish_unit's arithmetic, with e's values).
__device__ __forceinline__ void finish_with(const Args& a, int unit, const Streams& m, float y0, float y1,
                                            const Epilogue& e) {
  write_unit(a, unit, 0, m, y0 * e.scale0 + e.bias0, y1 * e.scale1 + e.bias1, e.c, e.s, e.old0, e.old1);
}

template <class F, class Sh>
__global__ void __launch_bounds__(Sh::kThreads, 2) stream_kernel(const Args a) {
  extern __shared__ uint4 smem[];
  constexpr int S = Sh::kSlots, Q = Sh::kQ, W = Sh::kWarps, kSlot = Sh::kSlotBytes, G = Sh::kMaxGroups;
  static_assert(F::kStreamed, "the format's pieces need no metadata and no scale of their own");
  constexpr int kVals = 8, kChunks = F::kPer / kVals;  // float16 inputs in a 16-byte read; reads a piece
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const char* ring = reinterpret_cast<const char*>(smem) + warp * S * kSlot;
  auto* xs = reinterpret_cast<__half*>(reinterpret_cast<char*>(smem) + W * S * kSlot);

  const int units = units_of(a);
  const int per = units / static_cast<int>(gridDim.x), extra = units % static_cast<int>(gridDim.x);
  const int block = static_cast<int>(blockIdx.x);
  const int u0 = block * per + min(block, extra), n = per + (block < extra ? 1 : 0);
  const int mine = n > warp ? (n - 1 - warp) / W + 1 : 0;  // units u0 + warp + W i
  const int chunks = a.row_pieces / (32 * Q);               // slots a unit
  const int total = mine * chunks;                          // slots of this warp
  // 0 (total is not negative), which the compiler cannot know: a value ANDed with it and added
  // to an address makes the address depend on the value without changing it.
  const uint32_t unseen_zero = static_cast<uint32_t>(total) >> 31;
  const auto* codes = static_cast<const uint4*>(a.codes);

  allow_next_kernel();
  // The issue cursor: unit i_unit of the warp's, chunk i_chunk; its two rows' pieces for this lane.
  int i_unit = 0, i_chunk = 0, i_slot = 0;
  Streams im{};
  const uint4 *src0 = nullptr, *src1 = nullptr;
  auto start_unit = [&] {
    im = streams_of(a, u0 + warp + W * i_unit);
    src0 = codes + static_cast<int64_t>(im.r0) * a.row_pieces + lane;
    src1 = codes + static_cast<int64_t>(im.r1 >= 0 ? im.r1 : im.r0) * a.row_pieces + lane;
  };
  if (mine > 0) start_unit();
  // Copies the next slot (both rows, Q pieces each: piece c 32 Q + 32 j + lane, so that each copy
  // instruction of the warp reads 512 contiguous bytes) into ring slot i_slot.
  // `after`: zero, but computed from values the copy must not overtake (see the refill below).
  auto issue = [&](uint32_t after = 0) {
    const uint32_t slot = shared_address(ring + i_slot * kSlot + lane * 16) + after;
    const int off = i_chunk * 32 * Q;
#pragma unroll
    for (int j = 0; j < Q; ++j) {
      copy16(slot + j * 512, src0 + off + 32 * j);
      copy16(slot + (Q + j) * 512, src1 + off + 32 * j);
    }
    if (++i_slot == S) i_slot = 0;
    if (++i_chunk == chunks) {
      i_chunk = 0;
      if (++i_unit < mine) start_unit();
    }
  };
  // The first S slots are requested before the previous kernel is waited for: weights are
  // constant. A group is committed for each slot, empty past the end, so that waiting for all but
  // the newest S - 1 groups always means the oldest slot has landed.
  for (int s = 0; s < S; ++s) {
    if (s < total) issue();
    commit();
  }
  Epilogue mine_e;  // lane l: the warp's unit l
  if (lane < mine) epilogue_constants<F>(a, streams_of(a, u0 + warp + W * lane), mine_e);
  wait_for_previous_kernel();
  // The norm's weights are the caller's (a previous kernel may write them): read after the wait,
  // in flight with the input's loads.
  float nw[G][8] = {};
  if (a.input == input_rms_norm) {
    const bool vec = aligned16(a.norm_w);
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const int g = static_cast<int>(threadIdx.x) + j * Sh::kThreads;
      if (g < a.in / 8) load8_f32(a.norm_w, 8 * g, vec, nw[j]);
    }
  }
  __shared__ float red[2 * W];
  const float unscale = stage_one<F, Sh>(a, xs, nw, red, [&] {
    if (lane < mine) epilogue_inputs(a, u0 + warp + W * lane, streams_of(a, u0 + warp + W * lane), mine_e);
  });

  int o_slot = 0, o_chunk = 0, o_unit = 0;
  float acc0 = 0.0f, acc1 = 0.0f;
  for (int s = 0; s < total; ++s) {
    wait_groups<S - 1>();
    const char* slot = ring + o_slot * kSlot + lane * 16;
    uint4 w0[Q], w1[Q];
#pragma unroll
    for (int j = 0; j < Q; ++j) {
      w0[j] = *reinterpret_cast<const uint4*>(slot + j * 512);
      w1[j] = *reinterpret_cast<const uint4*>(slot + (Q + j) * 512);
    }
    // Refill the slot S ahead now, while its values are multiplied. PTX does not order a later
    // cp.async after an earlier load of the same address, so the copy's address depends on the
    // loaded values (one word of each 16-byte load, ANDed with a zero the compiler cannot see): it is
    // issued only once they have arrived. (Refilling after the multiplications instead cost 5%
    // of int8's batch-1 decode: BENCHMARKS.md, session 28.)
    uint32_t loaded = 0;
#pragma unroll
    for (int j = 0; j < Q; ++j) loaded |= w0[j].x | w1[j].x;
    if (s + S < total) issue(loaded & unseen_zero);
    commit();
    if (++o_slot == S) o_slot = 0;
    const int unit = u0 + warp + W * o_unit;
#pragma unroll
    for (int j = 0; j < Q; ++j) {
      // This lane's inputs of piece o_chunk 32 Q + 32 j + lane (staged_slot's order), read once
      // for both rows.
      const __half* x = xs + ((o_chunk * Q + j) * kChunks) * (32 * kVals) + lane * kVals;
      __half2 v0[F::kPer / 2], v1[F::kPer / 2];
      F::decode_half(w0[j], typename F::Meta{}, v0);
      F::decode_half(w1[j], typename F::Meta{}, v1);
      __half2 h0 = __float2half2_rn(0.0f), h1 = h0;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const uint4 xv = *reinterpret_cast<const uint4*>(x + c * 32 * kVals);
        const uint32_t words[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          __half2 xe;
          memcpy(&xe, &words[e], 4);
          h0 = __hfma2(v0[4 * c + e], xe, h0);
          h1 = __hfma2(v1[4 * c + e], xe, h1);
        }
      }
      const float2 f0 = __half22float2(h0), f1 = __half22float2(h1);
      acc0 += f0.x + f0.y;  // the format's scale is the row's, applied in finish_with
      acc1 += f1.x + f1.y;
    }
    if (++o_chunk == chunks) {
      o_chunk = 0;
      for (int o = 16; o > 0; o >>= 1) {
        acc0 += __shfl_xor_sync(kFullMask, acc0, o);
        acc1 += __shfl_xor_sync(kFullMask, acc1, o);
      }
      const Streams m = streams_of(a, unit);
      Epilogue e;
      if (o_unit < 32) {
        e.scale0 = __shfl_sync(kFullMask, mine_e.scale0, o_unit);
        e.scale1 = __shfl_sync(kFullMask, mine_e.scale1, o_unit);
        e.bias0 = __shfl_sync(kFullMask, mine_e.bias0, o_unit);
        e.bias1 = __shfl_sync(kFullMask, mine_e.bias1, o_unit);
        e.old0 = __shfl_sync(kFullMask, mine_e.old0, o_unit);
        e.old1 = __shfl_sync(kFullMask, mine_e.old1, o_unit);
        e.c = __shfl_sync(kFullMask, mine_e.c, o_unit);
        e.s = __shfl_sync(kFullMask, mine_e.s, o_unit);
      } else if (lane == 0) {
        epilogue_constants<F>(a, m, e);
        epilogue_inputs(a, unit, m, e);
      }
      if (lane == 0) finish_with(a, unit, m, acc0 * unscale, acc1 * unscale, e);
      acc0 = acc1 = 0.0f;
      ++o_unit;
    }
  }
  wait_groups<0>();
}

// The ring, then one token's input staged as float16 (smem_bytes: loom_quant_gemv_args.hpp).
template <class Sh>
int smem_of(int row_pieces, int per) {
  return Sh::kWarps * Sh::kSlots * Sh::kSlotBytes + static_cast<int>(smem_bytes(row_pieces, per, 1, 2));
}

// The shapes measured (H200, bench/quant_gemv_bench.cu, a batch-1 step's 65 int8 products; the
// us of BENCHMARKS.md, sessions 27-29): 256 threads with both rows of a unit in a slot and an
// 80 KB ring 573-577 (609.3 after the review's ordering fixes, 600.1-600.2 with the slot refilled
// right after its loads); 512 threads 595; a 96 KB ring 589; four pieces of each row 577; three
// blocks an SM 721-741; two blocks an SM for the products of 16 MB and more 584-595.
using Chosen = Shape<256, 2>;

// Whether stream_kernel takes this product: one token staged as float16 (a bfloat16 caller),
// rows of whole slots, an input that fits the staging.
inline bool applies(const Args& a) {
  return a.tokens == 1 && !a.stage_f32 && !a.split && a.row_pieces > 0 && a.row_pieces % (32 * Chosen::kQ) == 0 &&
         a.in <= kMaxIn;
}

// blocks_on_current_device's setup of `device` (the current one): its state value.
template <class F>
int set_up(int device) {
  using Sh = Chosen;
  const auto kernel = stream_kernel<F, Sh>;
  const int smem = smem_of<Sh>(kMaxIn / F::kPer, F::kPer);
  int major = 0, count = 0;
  const bool ok =
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && count > 0 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess &&
      // Every product the same carveout (all shared memory): an SM changes its split between L1
      // and shared memory only when idle, which would stop the next product's block from
      // starting beside this one.
      cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                           static_cast<int>(cudaSharedmemCarveoutMaxShared)) == cudaSuccess;
  if (!ok) {
    (void)cudaGetLastError();  // the failure is answered by the other kernel, not kept
    return -1;
  }
  return (count << 1) | (major >= 9 ? 1 : 0);
}

// The kernel's per-device setup (its shared memory above 48 KB is a per-device attribute): the
// current device's SM count, or 0 where the setup failed (the caller then takes the other
// kernel). Thread-safe (set_up_once: each device set up once, under a lock, read after without one).
template <class F>
int blocks_on_current_device(bool& programmatic) {
  static PerDevice table;
  const int s = set_up_once(table, [](int device) { return set_up<F>(device); });
  programmatic = s > 0 && (s & 1) != 0;
  return s > 0 ? s >> 1 : 0;
}

// Launches the product, or returns cudaErrorNotSupported (nothing launched) where this device
// could not be set up for it.
template <class F>
cudaError_t launch(const Args& a, cudaStream_t stream) {
  using Sh = Chosen;
  bool programmatic = false;
  const int blocks = blocks_on_current_device<F>(programmatic);
  if (blocks == 0) return cudaErrorNotSupported;
  return pdl::launch(programmatic, dim3(static_cast<unsigned>(std::min(blocks, units_of(a)))), dim3(Sh::kThreads),
                     static_cast<size_t>(smem_of<Sh>(a.row_pieces, F::kPer)), stream, stream_kernel<F, Sh>, a);
}

}  // namespace loomp::qgemv::stream

namespace loomp::qgemv {

// A streamed format's whole product (one with kStreamed; the others call launch_any): the
// streamed one-token kernel where it applies (LOOM_QUANT_STREAM=0 turns it off, for
// measurements), else launch_any.
template <class F>
int launch_product(const Args& a, const Tiled& t, cudaStream_t stream) {
  static_assert(F::kStreamed, "launch_product takes formats the streamed kernel reads");
  static const bool on = [] {
    const char* v = std::getenv("LOOM_QUANT_STREAM");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  if (on && a.out > 0 && stream::applies(a))
    if (const cudaError_t e = stream::launch<F>(a, stream); e != cudaErrorNotSupported) return static_cast<int>(e);
  return launch_any<F>(a, t, stream);
}

}  // namespace loomp::qgemv
