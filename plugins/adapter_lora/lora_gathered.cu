// The `lora` adapter's gathered kernels (see lora_gathered.hpp): on sm_90 and newer one fused
// kernel (a cluster of blocks per row sharing h through distributed shared memory); elsewhere
// shrink in blocks of (row, chunk of 2048 inputs), then expand a thread per output element.
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>

#include "lora_gathered.hpp"
#include "loom_cuda_pdl.cuh"

namespace loomp::lora {
namespace {

namespace cg = cooperative_groups;
constexpr int kThreads = 256;

__device__ __forceinline__ float load(const void *p, int64_t i, bool bf16) {
  return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[i]) : static_cast<const float *>(p)[i];
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Shrink: h_part[c][t][k] = x[t, chunk c] . A[k, chunk c], a block per (row, chunk of 2048
// inputs, launch and group of 4 k): each thread loads its 8 inputs and uses them for the group's
// k; warps reduce, then the block. Chunks keep 8192-wide inputs (down_proj) on 4 blocks a row and
// k groups give a rank-16 adapter 4, so a decode step's few rows still fill the GPU.
constexpr int kChunk = kThreads * 8;
constexpr int kRankGroup = 4;  // k values a block computes (blocks over (row, chunk, launch x k group))
constexpr int kWarps = kThreads / 32;

struct Launches {
  GatheredLaunch l[kMaxGathered];
  int groups = 1;  // k groups per launch in the shrink's grid (the largest r_max / kRankGroup)
};

// Whether a launch's inputs and A can be read 8 bfloat16 values (16 bytes) at a time.
__device__ __forceinline__ bool vector_inputs(const GatheredLaunch &l, const __nv_bfloat16 *A) {
  return l.x_bf16 && l.in % 8 == 0 && (reinterpret_cast<uintptr_t>(l.x) & 15) == 0 &&
         (reinterpret_cast<uintptr_t>(A) & 15) == 0;
}

// Row t's inputs [j0, j0 + 8) as floats, 0 at and past j_end.
__device__ __forceinline__ void load_inputs(const GatheredLaunch &l, int64_t t, int64_t j0, int64_t j_end, bool vec,
                                            float (&xv)[8]) {
  if (vec && j0 + 8 <= j_end) {
    const uint4 raw = *reinterpret_cast<const uint4 *>(static_cast<const __nv_bfloat16 *>(l.x) + t * l.in + j0);
    const __nv_bfloat162 *p = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(p[i]);
      xv[2 * i] = f.x;
      xv[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) xv[i] = j0 + i < j_end ? load(l.x, t * l.in + j0 + i, l.x_bf16) : 0.0f;
  }
}

// A's row (`row` points at its first input) over inputs [j0, j0 + 8) dotted with xv.
__device__ __forceinline__ float a_row_dot(const __nv_bfloat16 *row, int64_t j0, int64_t j_end, bool vec, const float (&xv)[8]) {
  float acc = 0.0f;
  if (vec && j0 + 8 <= j_end) {
    const uint4 raw = *reinterpret_cast<const uint4 *>(row + j0);
    const __nv_bfloat162 *p = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(p[i]);
      acc += xv[2 * i] * f.x + xv[2 * i + 1] * f.y;
    }
  } else {
    for (int i = 0; i < 8 && j0 + i < j_end; ++i) acc += xv[i] * __bfloat162float(row[j0 + i]);
  }
  return acc;
}

// sum_k h(k) B[o, k]: B's row of r values read 8 at a time where it is aligned.
template <class H>
__device__ __forceinline__ float b_row_dot(const GatheredEntry &e, int64_t o, H h) {
  const auto *B = static_cast<const __nv_bfloat16 *>(e.b) + o * e.r;
  float acc = 0.0f;
  if (e.r % 8 == 0 && (reinterpret_cast<uintptr_t>(B) & 15) == 0) {
    for (int k0 = 0; k0 < e.r; k0 += 8) {
      const uint4 raw = *reinterpret_cast<const uint4 *>(B + k0);
      const __nv_bfloat162 *p = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(p[i]);
        acc += h(k0 + 2 * i) * f.x + h(k0 + 2 * i + 1) * f.y;
      }
    }
  } else {
    for (int k = 0; k < e.r; ++k) acc += h(k) * __bfloat162float(B[k]);
  }
  return acc;
}

// y[t, o] += scale * delta, in y's dtype.
__device__ __forceinline__ void add_delta(const GatheredLaunch &l, const GatheredEntry &e, int64_t t, int64_t o, float delta) {
  const int64_t at = t * l.y_stride + o;
  if (l.y_bf16) {
    auto *y = static_cast<__nv_bfloat16 *>(l.y);
    y[at] = __float2bfloat16(__bfloat162float(y[at]) + e.scale * delta);
  } else {
    static_cast<float *>(l.y)[at] += e.scale * delta;
  }
}

__global__ void shrink(Launches all) {
  // Programmatic dependent launch (sm_90): this grid is scheduled while the GEMM before it
  // finishes, and waits for it here; the expand after it may be scheduled at once.
  pdl::allow_next_kernel();
  pdl::wait_for_previous_kernel();
  const GatheredLaunch &l = all.l[blockIdx.z / all.groups];
  const int k_first = static_cast<int>(blockIdx.z % all.groups) * kRankGroup;
  const int64_t t = blockIdx.x;
  const int chunk = blockIdx.y;
  if (static_cast<int64_t>(chunk) * kChunk >= l.in) return;
  const int32_t which = l.row_adapter[t];
  if (which < 0) return;
  const GatheredEntry e = l.entries[which];
  if (e.a == nullptr || k_first >= e.r) return;
  __shared__ float partial[kWarps][kRankGroup];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto *A = static_cast<const __nv_bfloat16 *>(e.a);
  const int64_t j0 = static_cast<int64_t>(chunk) * kChunk + threadIdx.x * 8;  // this thread's 8 inputs
  const bool vec = vector_inputs(l, A);
  float xv[8];
  load_inputs(l, t, j0, l.in, vec, xv);
  float acc[kRankGroup];
#pragma unroll
  for (int k = 0; k < kRankGroup; ++k)
    acc[k] = k_first + k < e.r && j0 < l.in ? a_row_dot(A + static_cast<int64_t>(k_first + k) * l.in, j0, l.in, vec, xv) : 0.0f;
#pragma unroll
  for (int k = 0; k < kRankGroup; ++k) {
    const float v = warp_sum(acc[k]);
    if (lane == 0) partial[warp][k] = v;
  }
  __syncthreads();
  if (threadIdx.x < kRankGroup && k_first + static_cast<int>(threadIdx.x) < e.r) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][threadIdx.x];
    l.h[(static_cast<int64_t>(chunk) * l.n + t) * l.r_max + k_first + threadIdx.x] = sum;
  }
}

// Expand: y[t, o] += scale * sum_k h[t, k] B[o, k], each thread summing h over the chunks as it
// goes (a few floats, cached).
__global__ void expand(Launches all) {
  pdl::wait_for_previous_kernel();
  const GatheredLaunch &l = all.l[blockIdx.z];
  if (static_cast<int64_t>(blockIdx.x) * kThreads >= l.out) return;
  const int chunks = static_cast<int>((l.in + kChunk - 1) / kChunk);
  const int64_t t = blockIdx.y;
  const int32_t which = l.row_adapter[t];
  if (which < 0) return;
  const GatheredEntry e = l.entries[which];
  if (e.a == nullptr) return;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (o >= l.out) return;
  const float delta = b_row_dot(e, o, [&](int k) {
    float hk = 0.0f;
    for (int c = 0; c < chunks; ++c) hk += l.h[(static_cast<int64_t>(c) * l.n + t) * l.r_max + k];
    return hk;
  });
  add_delta(l, e, t, o, delta);
}

// Fused (sm_90 and newer): shrink and expand in one launch. A cluster of kClusterBlocks blocks
// per (row, launch): block c computes the partial h over its slice of the inputs (every rank at
// once: warp w takes k = w, w + 8, ...), the cluster sums the partials through distributed shared
// memory, and block c adds the delta to its slice of the outputs. One launch instead of two, no
// workspace round trip, and a row's 8 blocks keep a decode step's few rows spread over the GPU.
constexpr int kClusterBlocks = 8;

__global__ void fused(Launches all) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Inside the guard: the sm_80 pass compiles an empty body, where these would be unused.
  constexpr int kMaxRank = 64;  // lora_gathered_chunks' contract: r_max <= 64
  constexpr int kRanksPerWarp = kMaxRank / kWarps;
  pdl::allow_next_kernel();
  pdl::wait_for_previous_kernel();
  const GatheredLaunch &l = all.l[blockIdx.z];
  const int64_t t = blockIdx.y;
  // Every block of a cluster has the same row and launch, so a cluster returns whole (its
  // barriers below never wait for a block that left).
  const int32_t which = l.row_adapter[t];
  if (which < 0) return;
  const GatheredEntry e = l.entries[which];
  if (e.a == nullptr) return;
  cg::cluster_group cluster = cg::this_cluster();
  const int c = static_cast<int>(cluster.block_rank());
  __shared__ float partial[kMaxRank];
  __shared__ float h[kMaxRank];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto *A = static_cast<const __nv_bfloat16 *>(e.a);
  const int64_t per_in = (l.in + kClusterBlocks * 8 - 1) / (kClusterBlocks * 8) * 8;
  const int64_t j_begin = c * per_in, j_end = j_begin + per_in < l.in ? j_begin + per_in : l.in;
  const bool vec = vector_inputs(l, A);
  float acc[kRanksPerWarp];
#pragma unroll
  for (int i = 0; i < kRanksPerWarp; ++i) acc[i] = 0.0f;
  for (int64_t j0 = j_begin + lane * 8; j0 < j_end; j0 += 32 * 8) {
    float xv[8];
    load_inputs(l, t, j0, j_end, vec, xv);
#pragma unroll
    for (int i = 0; i < kRanksPerWarp; ++i) {
      const int k = warp + i * kWarps;
      if (k < e.r) acc[i] += a_row_dot(A + static_cast<int64_t>(k) * l.in, j0, j_end, vec, xv);
    }
  }
#pragma unroll
  for (int i = 0; i < kRanksPerWarp; ++i) {
    const int k = warp + i * kWarps;
    const float v = warp_sum(acc[i]);
    if (lane == 0 && k < e.r) partial[k] = v;
  }
  cluster.sync();  // every block's partials are written and visible cluster-wide
  if (static_cast<int>(threadIdx.x) < e.r) {
    float sum = 0.0f;
    for (int b = 0; b < kClusterBlocks; ++b) sum += *cluster.map_shared_rank(&partial[threadIdx.x], b);
    h[threadIdx.x] = sum;
  }
  // Done reading the other blocks' shared memory; a block may leave only when all have said so
  // (the wait at the end), and the expand runs in between.
  cluster.barrier_arrive();
  __syncthreads();
  const int64_t per_out = (l.out + kClusterBlocks - 1) / kClusterBlocks;
  const int64_t o_end = (c + 1) * per_out < l.out ? (c + 1) * per_out : l.out;
  for (int64_t o = c * per_out + threadIdx.x; o < o_end; o += kThreads)
    add_delta(l, e, t, o, b_row_dot(e, o, [&](int k) { return h[k]; }));
  cluster.barrier_wait();
#endif
}

// Whether this process runs the fused kernel: compute capability 9.0 or newer, the kernel built
// for it (its PTX version 90 or newer), and LOOM_LORA_FUSED not "0" (read at each call, so a
// bench can run both ways in one process; a captured graph keeps the choice of its capture).
bool fused_available() {
  const char *off = std::getenv("LOOM_LORA_FUSED");
  if (off != nullptr && off[0] == '0') return false;
  static const bool supported = [] {
    int device = 0, major = 0;
    cudaFuncAttributes attributes{};
    return cudaGetDevice(&device) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9 &&
           cudaFuncGetAttributes(&attributes, fused) == cudaSuccess && attributes.ptxVersion >= 90 &&
           attributes.binaryVersion >= 90;
  }();
  return supported;
}

}  // namespace

int lora_gathered_cuda(const GatheredLaunch *launches, int count, void *stream) {
  if (count < 1 || count > kMaxGathered || launches[0].n <= 0) return 0;
  Launches all;
  int64_t chunks = 1, out_blocks = 1;
  for (int i = 0; i < count; ++i) {
    all.l[i] = launches[i];
    all.groups = std::max(all.groups, (launches[i].r_max + kRankGroup - 1) / kRankGroup);
    chunks = std::max<int64_t>(chunks, (launches[i].in + kChunk - 1) / kChunk);
    out_blocks = std::max<int64_t>(out_blocks, (launches[i].out + kThreads - 1) / kThreads);
  }
  auto s = static_cast<cudaStream_t>(stream);
  const auto n = static_cast<unsigned>(launches[0].n), z = static_cast<unsigned>(count);
  // Programmatic launches on compute capability 9.0 and newer (LOOM_LORA_PDL=0 turns them off).
  static const bool programmatic = [] {
    int device = 0, major = 0;
    const char *off = std::getenv("LOOM_LORA_PDL");
    if (off != nullptr && off[0] == '0') return false;
    return cudaGetDevice(&device) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9;
  }();
  cudaLaunchAttribute attributes[2]{};
  attributes[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[0].val.programmaticStreamSerializationAllowed = 1;
  attributes[1].id = cudaLaunchAttributeClusterDimension;
  attributes[1].val.clusterDim.x = kClusterBlocks;
  attributes[1].val.clusterDim.y = 1;
  attributes[1].val.clusterDim.z = 1;
  auto launch = [&](auto kernel, dim3 grid, bool cluster) {
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = dim3(kThreads);
    config.stream = s;
    config.attrs = programmatic ? attributes : attributes + 1;
    config.numAttrs = (programmatic ? 1 : 0) + (cluster ? 1 : 0);
    return cudaLaunchKernelEx(&config, kernel, all);
  };
  // The fused grid's y extent is the row count (at most 65535 there).
  if (n <= 65535 && fused_available()) return static_cast<int>(launch(fused, dim3(kClusterBlocks, n, z), true));
  if (cudaError_t e = launch(shrink, dim3(n, static_cast<unsigned>(chunks), z * static_cast<unsigned>(all.groups)), false);
      e != cudaSuccess)
    return static_cast<int>(e);
  return static_cast<int>(launch(expand, dim3(static_cast<unsigned>(out_blocks), n, z), false));
}

int lora_gathered_chunks(int64_t in) { return static_cast<int>((in + kChunk - 1) / kChunk); }

}  // namespace loomp::lora
