// The `lora` adapter's gathered kernels (see lora_gathered.hpp): shrink in blocks of (row, chunk
// of 2048 inputs), expand a thread per output element, B's row of r values read as one run.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>

#include "lora_gathered.hpp"
#include "loom_cuda_pdl.cuh"

namespace loomp::lora {
namespace {

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

struct Launches {
  GatheredLaunch l[kMaxGathered];
  int groups = 1;  // k groups per launch in the shrink's grid (the largest r_max / kRankGroup)
};

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
  __shared__ float partial[kThreads / 32][kRankGroup];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto *A = static_cast<const __nv_bfloat16 *>(e.a);
  const int64_t j0 = static_cast<int64_t>(chunk) * kChunk + threadIdx.x * 8;  // this thread's 8 inputs
  const bool vec = l.x_bf16 && l.in % 8 == 0 && (reinterpret_cast<uintptr_t>(l.x) & 15) == 0 &&
                   (reinterpret_cast<uintptr_t>(A) & 15) == 0;
  float xv[8];
  if (vec && j0 < l.in) {
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
    for (int i = 0; i < 8; ++i) xv[i] = j0 + i < l.in ? load(l.x, t * l.in + j0 + i, l.x_bf16) : 0.0f;
  }
  float acc[kRankGroup];
#pragma unroll
  for (int k = 0; k < kRankGroup; ++k) {
    acc[k] = 0.0f;
    if (k_first + k >= e.r || j0 >= l.in) continue;
    const __nv_bfloat16 *row = A + static_cast<int64_t>(k_first + k) * l.in + j0;
    if (vec) {
      const uint4 raw = *reinterpret_cast<const uint4 *>(row);
      const __nv_bfloat162 *p = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(p[i]);
        acc[k] += xv[2 * i] * f.x + xv[2 * i + 1] * f.y;
      }
    } else {
      for (int i = 0; i < 8 && j0 + i < l.in; ++i) acc[k] += xv[i] * __bfloat162float(row[i]);
    }
  }
#pragma unroll
  for (int k = 0; k < kRankGroup; ++k) {
    const float v = warp_sum(acc[k]);
    if (lane == 0) partial[warp][k] = v;
  }
  __syncthreads();
  if (threadIdx.x < kRankGroup && k_first + static_cast<int>(threadIdx.x) < e.r) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) sum += partial[w][threadIdx.x];
    l.h[(static_cast<int64_t>(chunk) * l.n + t) * l.r_max + k_first + threadIdx.x] = sum;
  }
}

// Expand: y[t, o] += scale * sum_k h[t, k] B[o, k], each thread summing h over the chunks as it
// goes (a few floats, cached) and reading B's row 8 values at a time.
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
  const auto *B = static_cast<const __nv_bfloat16 *>(e.b) + o * e.r;
  float acc = 0.0f;
  if (e.r % 8 == 0 && (reinterpret_cast<uintptr_t>(B) & 15) == 0) {
    for (int k0 = 0; k0 < e.r; k0 += 8) {
      const uint4 raw = *reinterpret_cast<const uint4 *>(B + k0);
      const __nv_bfloat162 *p = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(p[i]);
        float h0 = 0.0f, h1 = 0.0f;
        for (int c = 0; c < chunks; ++c) {
          const float *h = l.h + (static_cast<int64_t>(c) * l.n + t) * l.r_max + k0 + 2 * i;
          h0 += h[0];
          h1 += h[1];
        }
        acc += h0 * f.x + h1 * f.y;
      }
    }
  } else {
    for (int k = 0; k < e.r; ++k) {
      float hk = 0.0f;
      for (int c = 0; c < chunks; ++c) hk += l.h[(static_cast<int64_t>(c) * l.n + t) * l.r_max + k];
      acc += hk * __bfloat162float(B[k]);
    }
  }
  const int64_t at = t * l.y_stride + o;
  if (l.y_bf16) {
    auto *y = static_cast<__nv_bfloat16 *>(l.y);
    y[at] = __float2bfloat16(__bfloat162float(y[at]) + e.scale * acc);
  } else {
    static_cast<float *>(l.y)[at] += e.scale * acc;
  }
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
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  auto launch = [&](auto kernel, dim3 grid) {
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = dim3(kThreads);
    config.stream = s;
    config.attrs = programmatic ? &attribute : nullptr;
    config.numAttrs = programmatic ? 1 : 0;
    return cudaLaunchKernelEx(&config, kernel, all);
  };
  if (cudaError_t e = launch(shrink, dim3(n, static_cast<unsigned>(chunks), z * static_cast<unsigned>(all.groups)));
      e != cudaSuccess)
    return static_cast<int>(e);
  return static_cast<int>(launch(expand, dim3(static_cast<unsigned>(out_blocks), n, z)));
}

int lora_gathered_chunks(int64_t in) { return static_cast<int>((in + kChunk - 1) / kChunk); }

}  // namespace loomp::lora
