// Tensor-core skinny GEMM for decode steps (see loom/kernels/skinny_gemm.hpp for the contract).
//
// A block of eight warps (two warpgroups) owns a tile of 128 weight rows (kRows) and every token.
// K advances in steps of 64 through a ring of kStages shared-memory stages filled by cp.async:
// the 128 weight rows and the NT * 8 token rows of the step, each 128-byte row stored with its
// 16-byte chunks XOR-swizzled by the row (the 128-byte swizzle of wgmma's descriptors). On sm_90a
// each warpgroup multiplies its 64 rows by the tokens with wgmma, both operands read from shared
// memory; elsewhere each warp takes 16 rows with mma.sync m16n8k16 (ldmatrix, conflict-free on
// the swizzled rows).
//
// Split K (sm_90+): when the output has too few tiles to fill the GPU, each tile's K is cut into
// `splits` ranges, one block each, and the blocks of a tile form a thread-block cluster. Their
// ring is kSplitStages deep (a split has few steps; two blocks then fit an SM). Each stages its
// float32 partial tile in its shared memory; after a cluster barrier, block q adds the q-th slice
// of every block's partial (distributed shared memory, four outputs at a time, every rank's load
// issued before the sum, which is in rank order, so the bits do not depend on timing) and applies
// the epilogue to it.
//
// Measured on the H100 at T = 64, the 1B model's shapes, per batch-64 decode step (16 layers;
// LOOM_CUDA_OP_TIMES, launch gaps included): gate/up + SwiGLU 507 us against 552-556 for cuBLAS's
// gate/up and the SwiGLU kernel summed. Step by step: mma.sync with four stages 564, wgmma 541,
// the weight loads asking L2 for 256-byte blocks 529, six stages 507. Split K lost to cuBLAS
// (the first version, which reduced the partials through global memory in the last block of each
// tile, 2.6-3.9 times slower). On the H200 (bench/linear_bench.cu, 16 calls in a CUDA graph, us a
// call at T = 64): the vectorised cluster reduce and shorter split ring took o from 10.1 to 7.3,
// down from 17.6 to 14.3 and q/k/v from 8.8 to 7.4, still behind cuBLAS (5.9, 13.7-14.1, 6.3);
// gate/up unsplit 20.4 against cuBLAS's 18.9 plus a SwiGLU launch. So the backend uses it for
// gate/up only.

#include "loom/kernels/skinny_gemm.hpp"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>

#include "model_device.cuh"

namespace loom::kernels {
namespace {

constexpr int kRows = 128;    // weight rows per block
constexpr int kBK = 64;       // K per stage: one 128-byte row of bfloat16
constexpr int kThreads = 256; // eight warps, 16 rows each
constexpr int kStages = 6;   // 145 KB at 64 tokens: one block per SM
// Where K is split each block has few steps, and a shorter ring lets two or three blocks share
// an SM (97 KB at 64 tokens), so that the split tiles are resident at once.
constexpr int kSplitStages = 4;
constexpr int kMinStepsPerSplit = 4;
constexpr int kMaxSplits = 8; // the portable cluster size
constexpr int kEpilogueStride = kRows + 4; // floats per token row of the staged tile

template <int NT, int Stages>
struct Layout {
  static constexpr int w_bytes = kRows * kBK * 2;
  static constexpr int x_bytes = NT * 8 * kBK * 2;
  static constexpr int stage_bytes = w_bytes + x_bytes;
  static constexpr int ring_bytes = stage_bytes * Stages;
  static constexpr int tile_bytes = NT * 8 * kEpilogueStride * 4;
  static constexpr int smem_bytes = (ring_bytes > tile_bytes ? ring_bytes : tile_bytes) + 1024; // + alignment
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
// The same, asking L2 to fetch the 256-byte block around it: the next step's piece of the same
// weight row, so that DRAM serves each row in longer bursts.
__device__ __forceinline__ void cp_async16_prefetch(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a tile of 128-byte rows.
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}
#if !(defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)) // the mma.sync loop's
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr));
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// ---- wgmma (the sm_90a pass only; sm_80 runs the mma.sync loop) ----
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LOOM_SKINNY_WGMMA 1
// Shared-memory descriptor of a 128-byte-swizzled K-major tile (1024-byte aligned) whose 8-row
// atoms are 1024 bytes apart: start address >> 4, leading byte offset 16 (unused by this layout),
// stride byte offset 1024, swizzle mode 1 (128 B). K advances by 16 values (32 bytes) by adding 2.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(16 >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (uint64_t{1} << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// The tensor cores read through the async proxy what cp.async wrote through the generic one.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// d (64 weight rows x NT * 8 tokens, this thread's NT * 4 floats, the mma.sync layout per 8
// tokens) += a (64 x 16, descriptor) * b (NT * 8 x 16, K-major, descriptor).
template <int NT>
__device__ __forceinline__ void wgmma_ss(float* d, uint64_t a, uint64_t b);
template <>
__device__ __forceinline__ void wgmma_ss<2>(float* d, uint64_t a, uint64_t b) {
  asm volatile(
      "{ .reg .pred p; setp.ne.b32 p, %10, 0; "
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7}, %8, %9, p, 1, 1, 0, 0; }\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(a), "l"(b), "n"(1));
}
template <>
__device__ __forceinline__ void wgmma_ss<4>(float* d, uint64_t a, uint64_t b) {
  asm volatile(
      "{ .reg .pred p; setp.ne.b32 p, %18, 0; "
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, 0, 0; }\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(a), "l"(b), "n"(1));
}
template <>
__device__ __forceinline__ void wgmma_ss<8>(float* d, uint64_t a, uint64_t b) {
  asm volatile(
      "{ .reg .pred p; setp.ne.b32 p, %34, 0; "
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0; }\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b), "n"(1));
}
#endif

// The weight row that local row r (0..63) of tile `tile` multiplies: 64 consecutive rows, or
// for SwiGLU 32 gate rows and the 32 up rows of the same outputs.
template <SkinnyEpilogue E>
__device__ __forceinline__ int64_t weight_row(int tile, int r, int32_t out) {
  if constexpr (E == SkinnyEpilogue::swiglu)
    return r < kRows / 2 ? int64_t{tile} * (kRows / 2) + r : out / 2 + int64_t{tile} * (kRows / 2) + (r - kRows / 2);
  return int64_t{tile} * kRows + r;
}

template <SkinnyEpilogue E>
__device__ __forceinline__ void finish(const SkinnyGemmArgs& a, int tile, int t, int r, float v, float up) {
  if constexpr (E == SkinnyEpilogue::store_bf16) {
    static_cast<__nv_bfloat16*>(a.out_ptr)[int64_t{t} * a.out + int64_t{tile} * kRows + r] = __float2bfloat16_rn(v);
  } else if constexpr (E == SkinnyEpilogue::store_f32) {
    static_cast<float*>(a.out_ptr)[int64_t{t} * a.out + int64_t{tile} * kRows + r] = v;
  } else if constexpr (E == SkinnyEpilogue::add_f32) {
    static_cast<float*>(a.out_ptr)[int64_t{t} * a.out + int64_t{tile} * kRows + r] += v;
  } else {
    const float g = device::round_bf16(v), u = device::round_bf16(up);
    static_cast<__nv_bfloat16*>(a.out_ptr)[int64_t{t} * (a.out / 2) + int64_t{tile} * (kRows / 2) + r] =
        __float2bfloat16_rn(device::silu(g) * u);
  }
}

template <int NT, SkinnyEpilogue E, int Stages>
__global__ void __launch_bounds__(kThreads) skinny_gemm_kernel(SkinnyGemmArgs a, int splits) {
  extern __shared__ __align__(128) unsigned char smem[];
  using L = Layout<NT, Stages>;
  const int tile = blockIdx.x, split = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int steps = a.in / kBK;
  const int first = static_cast<int>(int64_t{steps} * split / splits);
  const int last = static_cast<int>(int64_t{steps} * (split + 1) / splits);
  const int n = last - first;
  const auto* w = static_cast<const __nv_bfloat16*>(a.weight);
  const auto* x = static_cast<const __nv_bfloat16*>(a.act);
  const uint32_t base = (smem_addr(smem) + 1023u) & ~1023u; // swizzle atoms are 1024-byte aligned

  // Each thread copies the same (row, chunk) pieces at every step.
  const __nv_bfloat16* w_src[kRows * 8 / kThreads];
  uint32_t w_dst[kRows * 8 / kThreads];
  for (int i = 0; i < kRows * 8 / kThreads; ++i) {
    const int piece = tid + i * kThreads, row = piece >> 3, chunk = piece & 7;
    w_src[i] = w + weight_row<E>(tile, row, a.out) * a.in + chunk * 8;
    w_dst[i] = swizzled(row, chunk);
  }
  auto load_weights = [&](int step, int stage) {
    const uint32_t dst = base + stage * L::stage_bytes;
    const int64_t k0 = int64_t{first + step} * kBK;
    for (int i = 0; i < kRows * 8 / kThreads; ++i) cp_async16_prefetch(dst + w_dst[i], w_src[i] + k0);
  };
  auto load_tokens = [&](int step, int stage) {
    const uint32_t dst = base + stage * L::stage_bytes + L::w_bytes;
    const int64_t k0 = int64_t{first + step} * kBK;
    for (int piece = tid; piece < NT * 8 * 8; piece += kThreads) {
      const int row = piece >> 3, chunk = piece & 7;
      const int t = row < a.tokens ? row : a.tokens - 1; // rows past T: any finite row, ignored
      cp_async16(dst + swizzled(row, chunk), x + int64_t{t} * a.in + k0 + chunk * 8);
    }
  };

  // The weights do not depend on the previous kernel: start them before waiting for it.
  for (int s = 0; s < Stages - 1; ++s)
    if (s < n) load_weights(s, s);
  device::wait_for_previous_kernel();
  device::allow_next_kernel();
  for (int s = 0; s < Stages - 1; ++s) {
    if (s < n) load_tokens(s, s);
    cp_async_commit();
  }

  float acc[NT][4] = {};
  for (int step = 0; step < n; ++step) {
    cp_async_wait<Stages - 2>();
#if defined(LOOM_SKINNY_WGMMA)
    fence_proxy_async();
#endif
    __syncthreads();
    const int next = step + Stages - 1;
    if (next < n) {
      load_weights(next, next % Stages);
      load_tokens(next, next % Stages);
    }
    cp_async_commit();
    const uint32_t sw = base + (step % Stages) * L::stage_bytes, sx = sw + L::w_bytes;
#if defined(LOOM_SKINNY_WGMMA)
    // Each warpgroup multiplies its 64 rows; the tensor cores read both tiles from shared memory.
    {
      const uint64_t da = sw128_desc(sw + (warp / 4) * 64 * 128), db = sw128_desc(sx);
      wgmma_fence();
      for (int ks = 0; ks < kBK / 16; ++ks) wgmma_ss<NT>(&acc[0][0], da + 2 * ks, db + 2 * ks);
      wgmma_commit();
      wgmma_wait_all(); // before the next step's copies overwrite a stage
    }
#else
    for (int ks = 0; ks < kBK / 16; ++ks) {
      uint32_t af[4];
      ldmatrix_x4(sw + swizzled(warp * 16 + (lane & 15), ks * 2 + (lane >> 4)), af[0], af[1], af[2], af[3]);
      for (int j = 0; j < NT; j += 2) {
        if (j + 1 < NT) {
          uint32_t b0, b1, b2, b3;
          ldmatrix_x4(sx + swizzled(8 * (j + (lane >> 4)) + (lane & 7), ks * 2 + ((lane >> 3) & 1)), b0, b1, b2, b3);
          mma_bf16(acc[j], af, b0, b1);
          mma_bf16(acc[j + 1], af, b2, b3);
        } else {
          uint32_t b0, b1;
          ldmatrix_x2(sx + swizzled(8 * j + (lane & 7), ks * 2 + ((lane >> 3) & 1)), b0, b1);
          mma_bf16(acc[j], af, b0, b1);
        }
      }
    }
#endif
  }
  cp_async_wait<0>();
  __syncthreads(); // the ring is reused for the tile

  // The block's tile, [token][local row], float32.
  float* staged = reinterpret_cast<float*>(smem);
  {
    const int g = lane >> 2, c = (lane & 3) * 2;
    for (int j = 0; j < NT; ++j) {
      const int r = warp * 16 + g, t = j * 8 + c;
      staged[t * kEpilogueStride + r] = acc[j][0];
      staged[(t + 1) * kEpilogueStride + r] = acc[j][1];
      staged[t * kEpilogueStride + r + 8] = acc[j][2];
      staged[(t + 1) * kEpilogueStride + r + 8] = acc[j][3];
    }
  }
  __syncthreads();
  const int T = a.tokens;
  constexpr int outputs = E == SkinnyEpilogue::swiglu ? kRows / 2 : kRows;
  if (splits == 1) {
    for (int e = tid; e < T * outputs; e += kThreads) {
      const int t = e / outputs, r = e - t * outputs;
      const float* row = staged + t * kEpilogueStride;
      finish<E>(a, tile, t, r, row[r], E == SkinnyEpilogue::swiglu ? row[r + kRows / 2] : 0.0f);
    }
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The tile's blocks are one cluster, ranked by split.
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync(); // every partial is staged
  // Four outputs of a token at a time; each rank's partial loaded before any is added (in rank
  // order), so that the remote loads are in flight together rather than one latency each.
  constexpr int quads = outputs / 4;
  const int per_block = (T * quads + splits - 1) / splits;
  const int begin = split * per_block, end = min(T * quads, begin + per_block);
  for (int e = begin + tid; e < end; e += kThreads) {
    const int t = e / quads, r = (e - t * quads) * 4;
    float4 part[kMaxSplits], part_up[E == SkinnyEpilogue::swiglu ? kMaxSplits : 1];
#pragma unroll
    for (int q = 0; q < kMaxSplits; ++q)
      if (q < splits) {
        const float* row = cluster.map_shared_rank(staged, q) + t * kEpilogueStride;
        part[q] = *reinterpret_cast<const float4*>(row + r);
        if constexpr (E == SkinnyEpilogue::swiglu) part_up[q] = *reinterpret_cast<const float4*>(row + r + kRows / 2);
      }
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f), up = v;
#pragma unroll
    for (int q = 0; q < kMaxSplits; ++q)
      if (q < splits) {
        v.x += part[q].x, v.y += part[q].y, v.z += part[q].z, v.w += part[q].w;
        if constexpr (E == SkinnyEpilogue::swiglu)
          up.x += part_up[q].x, up.y += part_up[q].y, up.z += part_up[q].z, up.w += part_up[q].w;
      }
    finish<E>(a, tile, t, r, v.x, up.x);
    finish<E>(a, tile, t, r + 1, v.y, up.y);
    finish<E>(a, tile, t, r + 2, v.z, up.z);
    finish<E>(a, tile, t, r + 3, v.w, up.w);
  }
  cluster.sync(); // no block leaves while another reads its shared memory
#else
  __trap(); // the host splits only where this code was compiled for sm_90+ (device_shape)
#endif
}

struct DeviceShape {
  int sms = 0;
  size_t smem_optin = 0;  // the most dynamic shared memory a block may have
  // K may be split: a GPU of compute capability 9.0+ running code compiled for it (a newer GPU
  // that JIT-compiles the sm_80 PTX runs a kernel without the cluster reduce).
  bool clusters = false;
};

cudaError_t device_shape(DeviceShape& shape);

int32_t tiles_of(int32_t out) { return out / kRows; }

// K splits for a shape: none when the tiles fill the GPU; else enough that the blocks cover about
// three quarters of the SMs, each split at least kMinStepsPerSplit steps of K. Measured on the
// H200 at T = 16 and 64 (bench/linear_bench.cu, BENCHMARKS.md): q/k/v (24 tiles) was fastest at
// 4 splits, o and down (16 tiles) at 5-6; splits that put a block on every SM (5 and 8) ran up
// to 1.75x slower in some runs and about as fast in others.
int splits_for(int32_t in, int32_t out, const DeviceShape& d) {
  const int tiles = tiles_of(out);
  if (!d.clusters || tiles >= d.sms) return 1;
  const int by_room = std::max(1, d.sms * 3 / 4 / std::max(tiles, 1));
  const int by_k = std::max(1, in / kBK / kMinStepsPerSplit);
  return std::min({by_room, by_k, kMaxSplits});
}

template <int NT, SkinnyEpilogue E, int Stages>
int launch_staged(const SkinnyGemmArgs& a, int splits, bool programmatic, cudaStream_t stream) {
  const auto kernel = skinny_gemm_kernel<NT, E, Stages>;
  constexpr int smem = Layout<NT, Stages>::smem_bytes;
  static std::mutex mutex;
  static std::map<int, bool> opted_in; // by device
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  {
    std::lock_guard lock(mutex);
    if (!opted_in[device]) {
      if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem); e != cudaSuccess)
        return e;
      opted_in[device] = true;
    }
  }
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(tiles_of(a.out)), static_cast<unsigned>(splits));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attributes[2]{};
  unsigned n = 0;
  if (splits > 1) {
    attributes[n].id = cudaLaunchAttributeClusterDimension;
    attributes[n].val.clusterDim.x = 1;
    attributes[n].val.clusterDim.y = static_cast<unsigned>(splits);
    attributes[n].val.clusterDim.z = 1;
    ++n;
  }
  if (programmatic) {
    attributes[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  config.attrs = n > 0 ? attributes : nullptr;
  config.numAttrs = n;
  return static_cast<int>(cudaLaunchKernelEx(&config, kernel, a, splits));
}

template <int NT, SkinnyEpilogue E>
int launch(const SkinnyGemmArgs& a, const DeviceShape& d, bool programmatic, cudaStream_t stream) {
  // Splits by the shape and the GPU only, so that a shape splits the same whatever T.
  const int splits = a.splits > 0 ? (d.clusters ? std::min({a.splits, kMaxSplits, a.in / kBK}) : 1)
                                   : splits_for(a.in, a.out, d);
  if (splits == 1) return launch_staged<NT, E, kStages>(a, 1, programmatic, stream);
  return launch_staged<NT, E, kSplitStages>(a, splits, programmatic, stream);
}

template <SkinnyEpilogue E>
int launch_tokens(const SkinnyGemmArgs& a, const DeviceShape& d, bool programmatic, cudaStream_t s) {
  // Tiles of 16, 32 or 64 tokens: the wgmma shapes instantiated (rows past T are ignored).
  if (a.tokens <= 16) return launch<2, E>(a, d, programmatic, s);
  if (a.tokens <= 32) return launch<4, E>(a, d, programmatic, s);
  return launch<8, E>(a, d, programmatic, s);
}

cudaError_t device_shape(DeviceShape& shape) {
  static std::mutex mutex;
  static std::map<int, DeviceShape> known;
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  std::lock_guard lock(mutex);
  if (auto it = known.find(device); it != known.end()) {
    shape = it->second;
    return cudaSuccess;
  }
  cudaDeviceProp prop{};
  if (cudaError_t e = cudaGetDeviceProperties(&prop, device); e != cudaSuccess) return e;
  shape.sms = std::max(prop.multiProcessorCount, 1);
  cudaFuncAttributes attributes{};
  if (cudaError_t e = cudaFuncGetAttributes(&attributes, skinny_gemm_kernel<8, SkinnyEpilogue::store_f32, kStages>); e != cudaSuccess)
    return e;
  shape.clusters = prop.major >= 9 && attributes.ptxVersion >= 90;
  shape.smem_optin = prop.sharedMemPerBlockOptin;
  known.emplace(device, shape);
  return cudaSuccess;
}

bool skinny_gemm_fits(const DeviceShape& d) { return static_cast<size_t>(Layout<8, kStages>::smem_bytes) <= d.smem_optin; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

bool skinny_gemm_supported() {
  DeviceShape d;
  return device_shape(d) == cudaSuccess && skinny_gemm_fits(d);
}

bool skinny_gemm_takes(int32_t in, int32_t out, SkinnyEpilogue epilogue) {
  const int out_multiple = epilogue == SkinnyEpilogue::swiglu ? 2 * kRows : kRows;
  return in >= kBK && in % kBK == 0 && out >= out_multiple && out % out_multiple == 0;
}

int skinny_gemm_bf16_cuda(const SkinnyGemmArgs& a, SkinnyEpilogue epilogue, bool programmatic, void* stream) {
  const auto invalid = static_cast<int>(cudaErrorInvalidValue);
  if (a.tokens < 1 || a.tokens > skinny_gemm_max_tokens() || !skinny_gemm_takes(a.in, a.out, epilogue) ||
      a.weight == nullptr || a.act == nullptr || a.out_ptr == nullptr || !aligned16(a.weight) || !aligned16(a.act) ||
      a.splits < 0)
    return invalid;
  if ((reinterpret_cast<uintptr_t>(a.out_ptr) & 3u) != 0) return invalid;
  DeviceShape d;
  if (cudaError_t e = device_shape(d); e != cudaSuccess) return e;
  // GPUs with less shared memory a block than the ring of 64 tokens (99 KB on sm_86/89/120) are
  // refused before any CUDA call, so that no launch error is left behind for the caller.
  if (!skinny_gemm_fits(d)) return invalid;
  auto s = static_cast<cudaStream_t>(stream);
  switch (epilogue) {
    case SkinnyEpilogue::store_bf16: return launch_tokens<SkinnyEpilogue::store_bf16>(a, d, programmatic, s);
    case SkinnyEpilogue::store_f32: return launch_tokens<SkinnyEpilogue::store_f32>(a, d, programmatic, s);
    case SkinnyEpilogue::add_f32: return launch_tokens<SkinnyEpilogue::add_f32>(a, d, programmatic, s);
    case SkinnyEpilogue::swiglu: return launch_tokens<SkinnyEpilogue::swiglu>(a, d, programmatic, s);
  }
  return invalid;
}

}  // namespace loom::kernels
