// CUDA row kernels: softmax and argmax over [rows, cols] float32, one block per row.
//
// Each thread walks its row with a stride of blockDim.x (coalesced loads), keeps a partial
// result in registers, and the block combines the partials with warp shuffles, then across
// warps through shared memory. Rows of any length fit (128256 columns is the case that
// matters): the work per thread grows, the shared memory does not. Numerics follow rows.hpp.
#include "loom/kernels/rows.hpp"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace loom::kernels {
namespace {

constexpr int kThreads = 512;              // per block; a multiple of 32
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGrid = 1 << 20;       // rows beyond this loop in a grid-stride

// A running softmax denominator: the maximum seen so far and sum(exp(x - max)) over it.
struct MaxSum {
  float max;
  float sum;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.0f};  // both empty: avoid exp(-inf - -inf) = NaN
  const float sa = (a.max == -INFINITY) ? 0.0f : a.sum * expf(a.max - m);
  const float sb = (b.max == -INFINITY) ? 0.0f : b.sum * expf(b.max - m);
  return {m, sa + sb};
}

__device__ __forceinline__ MaxSum warp_reduce(MaxSum v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum other;
    other.max = __shfl_xor_sync(kFullMask, v.max, offset);
    other.sum = __shfl_xor_sync(kFullMask, v.sum, offset);
    v = merge(v, other);
  }
  return v;
}

// x: [rows, cols]; masked_rows: optional single counter of all -inf rows.
__global__ void __launch_bounds__(kThreads)
softmax_rows_kernel(float* __restrict__ x, int64_t rows, int64_t cols, int32_t* masked_rows) {
  __shared__ MaxSum partial[kWarps];
  __shared__ MaxSum total;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float* row = x + r * cols;  // [cols]
    // Pass 1: online max and sum of exponentials.
    MaxSum acc{-INFINITY, 0.0f};
    for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
      const float v = row[c];
      if (v > acc.max) {
        acc.sum = (acc.max == -INFINITY ? 0.0f : acc.sum * expf(acc.max - v)) + 1.0f;
        acc.max = v;
      } else if (v != -INFINITY) {
        acc.sum += expf(v - acc.max);
      }
    }
    acc = warp_reduce(acc);
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (warp == 0) {
      MaxSum v = lane < kWarps ? partial[lane] : MaxSum{-INFINITY, 0.0f};
      v = warp_reduce(v);
      if (lane == 0) total = v;
    }
    __syncthreads();
    const MaxSum t = total;
    // Pass 2: normalise. -inf becomes exactly 0; an all -inf row becomes all zeros.
    if (t.max == -INFINITY) {
      for (int64_t c = threadIdx.x; c < cols; c += kThreads) row[c] = 0.0f;
      if (threadIdx.x == 0 && masked_rows != nullptr) atomicAdd(masked_rows, 1);
    } else {
      const float inv = 1.0f / t.sum;
      for (int64_t c = threadIdx.x; c < cols; c += kThreads) row[c] = expf(row[c] - t.max) * inv;
    }
    __syncthreads();  // `total` and `partial` are reused by the next row
  }
}

// The best (value, index) so far; index -1 means "nothing seen that beats -inf".
struct Best {
  float value;
  int64_t index;
};

__device__ __forceinline__ Best better(Best a, Best b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

__device__ __forceinline__ Best warp_reduce(Best v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Best other;
    other.value = __shfl_xor_sync(kFullMask, v.value, offset);
    other.index = __shfl_xor_sync(kFullMask, v.index, offset);
    v = better(v, other);
  }
  return v;
}

// x: [rows, cols]; out: [rows].
__global__ void __launch_bounds__(kThreads)
argmax_rows_kernel(const float* __restrict__ x, int64_t rows, int64_t cols, int32_t* __restrict__ out) {
  __shared__ Best partial[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = x + r * cols;  // [cols]
    Best acc{-INFINITY, -1};
    // Strict comparisons: within a thread, indices only grow, so ties keep the first index.
    if (cols % 4 == 0 && (reinterpret_cast<uintptr_t>(row) & 15u) == 0) {
      // float4 loads, four in flight per thread: one block streams a 128k-column row at several
      // times the rate of one float per thread per trip.
      const float4* row4 = reinterpret_cast<const float4*>(row);
      const int64_t n4 = cols / 4;
      for (int64_t c0 = threadIdx.x; c0 < n4; c0 += 4 * kThreads) {
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t c = c0 + u * kThreads;
          v[u] = c < n4 ? row4[c] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t c = 4 * (c0 + u * kThreads);
          if (v[u].x > acc.value) acc = {v[u].x, c};
          if (v[u].y > acc.value) acc = {v[u].y, c + 1};
          if (v[u].z > acc.value) acc = {v[u].z, c + 2};
          if (v[u].w > acc.value) acc = {v[u].w, c + 3};
        }
      }
    } else {
      for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
        const float v = row[c];
        if (v > acc.value) acc = {v, c};
      }
    }
    acc = warp_reduce(acc);
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (warp == 0) {
      Best v = lane < kWarps ? partial[lane] : Best{-INFINITY, -1};
      v = warp_reduce(v);
      if (lane == 0) out[r] = static_cast<int32_t>(v.index < 0 ? 0 : v.index);
    }
    __syncthreads();  // `partial` is reused by the next row
  }
}

unsigned grid_for(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxGrid ? rows : kMaxGrid);
}

}  // namespace

int softmax_rows_cuda(float* x, int64_t rows, int64_t cols, void* stream, int32_t* masked_rows_device) {
  if (rows == 0) return static_cast<int>(cudaSuccess);
  if (rows < 0 || cols <= 0 || cols > INT32_MAX || x == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  softmax_rows_kernel<<<grid_for(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, rows, cols, masked_rows_device);
  return static_cast<int>(cudaGetLastError());
}

int argmax_rows_cuda(const float* x, int64_t rows, int64_t cols, int32_t* out_device, void* stream) {
  if (rows == 0) return static_cast<int>(cudaSuccess);
  if (rows < 0 || cols <= 0 || cols > INT32_MAX || x == nullptr || out_device == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  argmax_rows_kernel<<<grid_for(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, rows, cols, out_device);
  return static_cast<int>(cudaGetLastError());
}

bool cuda_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

}  // namespace loom::kernels
