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
#include <map>
#include <mutex>
#include <utility>

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

// The block's best (value, first index) over row[begin, end), begin a multiple of 4; the
// result is valid in every thread. `partial` is the block's shared scratch.
__device__ Best block_argmax(const float* __restrict__ row, int64_t begin, int64_t end, Best* partial) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  Best acc{-INFINITY, -1};
  // Strict comparisons: within a thread, indices only grow, so ties keep the first index.
  if ((end - begin) % 4 == 0 && (reinterpret_cast<uintptr_t>(row + begin) & 15u) == 0) {
    // float4 loads, four in flight per thread: one block streams a 128k-column row at several
    // times the rate of one float per thread per trip.
    const float4* row4 = reinterpret_cast<const float4*>(row + begin);
    const int64_t n4 = (end - begin) / 4;
    for (int64_t c0 = threadIdx.x; c0 < n4; c0 += 4 * kThreads) {
      float4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t c = c0 + u * kThreads;
        v[u] = c < n4 ? row4[c] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t c = begin + 4 * (c0 + u * kThreads);
        if (v[u].x > acc.value) acc = {v[u].x, c};
        if (v[u].y > acc.value) acc = {v[u].y, c + 1};
        if (v[u].z > acc.value) acc = {v[u].z, c + 2};
        if (v[u].w > acc.value) acc = {v[u].w, c + 3};
      }
    }
  } else {
    for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) {
      const float v = row[c];
      if (v > acc.value) acc = {v, c};
    }
  }
  acc = warp_reduce(acc);
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  Best v = lane < kWarps ? partial[lane] : Best{-INFINITY, -1};
  v = warp_reduce(v);
  __syncthreads();  // `partial` may be reused by the caller
  return v;
}

// x: [rows, cols]; out: [rows]. One block per row.
__global__ void __launch_bounds__(kThreads)
argmax_rows_kernel(const float* __restrict__ x, int64_t rows, int64_t cols, int32_t* __restrict__ out) {
  __shared__ Best partial[kWarps];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const Best v = block_argmax(x + r * cols, 0, cols, partial);
    if (threadIdx.x == 0) out[r] = static_cast<int32_t>(v.index < 0 ? 0 : v.index);
  }
}

// Few long rows (a decode step's logits at batch 1-16): one row over gridDim.x blocks, each
// taking a chunk; the last block of a row to finish (an arrival counter, reset by that block
// for the next call) merges the chunks' results in chunk order, so the first index still wins
// ties. A single block per row would stream the row from one SM.
constexpr int kSplitChunks = 32;
constexpr int64_t kSplitMaxRows = 16;

__global__ void __launch_bounds__(kThreads)
argmax_split_kernel(const float* __restrict__ x, int64_t cols, int64_t chunk, Best* __restrict__ chunk_best,
                    unsigned* __restrict__ arrivals, int32_t* __restrict__ out) {
  __shared__ Best partial[kWarps];
  __shared__ bool last;
  const int64_t r = blockIdx.y;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < cols ? begin + chunk : cols;
  const Best v = begin < end ? block_argmax(x + r * cols, begin, end, partial) : Best{-INFINITY, -1};
  if (threadIdx.x == 0) {
    chunk_best[r * gridDim.x + blockIdx.x] = v;
    __threadfence();
    last = atomicAdd(&arrivals[r], 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last || threadIdx.x >= 32) return;
  __threadfence();
  Best acc{-INFINITY, -1};
  for (unsigned c = threadIdx.x; c < gridDim.x; c += 32) {
    // Written by other blocks: read past the L1 cache.
    const Best* b = &chunk_best[r * gridDim.x + c];
    acc = better(acc, Best{__ldcg(&b->value), static_cast<int64_t>(__ldcg(reinterpret_cast<const long long*>(&b->index)))});
  }
  acc = warp_reduce(acc);
  if (threadIdx.x == 0) {
    out[r] = static_cast<int32_t>(acc.index < 0 ? 0 : acc.index);
    arrivals[r] = 0;
  }
}

// The split kernel's scratch on the current device (chunk results and arrival counters, zeroed
// once), made on first use and kept for the process. Calls share it, so they must be ordered on
// one stream per device (core's compute stream).
cudaError_t split_scratch(Best** chunk_best, unsigned** arrivals) {
  static std::mutex mutex;
  static std::map<int, std::pair<Best*, unsigned*>> by_device;
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  std::lock_guard lock(mutex);
  auto it = by_device.find(device);
  if (it == by_device.end()) {
    Best* best = nullptr;
    unsigned* counters = nullptr;
    if (cudaError_t e = cudaMalloc(&best, sizeof(Best) * kSplitChunks * kSplitMaxRows); e != cudaSuccess) return e;
    if (cudaError_t e = cudaMalloc(&counters, sizeof(unsigned) * kSplitMaxRows); e != cudaSuccess) {
      cudaFree(best);
      return e;
    }
    if (cudaError_t e = cudaMemset(counters, 0, sizeof(unsigned) * kSplitMaxRows); e != cudaSuccess) return e;
    it = by_device.emplace(device, std::make_pair(best, counters)).first;
  }
  *chunk_best = it->second.first;
  *arrivals = it->second.second;
  return cudaSuccess;
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
  if (rows <= kSplitMaxRows && cols >= 8 * 4 * kThreads) {
    Best* chunk_best = nullptr;
    unsigned* arrivals = nullptr;
    if (cudaError_t e = split_scratch(&chunk_best, &arrivals); e != cudaSuccess) return static_cast<int>(e);
    // Chunks of a multiple of 4 columns, so that every chunk but the last starts 16-byte aligned.
    const int64_t chunk = ((cols + kSplitChunks - 1) / kSplitChunks + 3) / 4 * 4;
    const dim3 grid(static_cast<unsigned>((cols + chunk - 1) / chunk), static_cast<unsigned>(rows));
    argmax_split_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, cols, chunk, chunk_best, arrivals,
                                                                                   out_device);
    return static_cast<int>(cudaGetLastError());
  }
  argmax_rows_kernel<<<grid_for(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, rows, cols, out_device);
  return static_cast<int>(cudaGetLastError());
}

bool cuda_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

// One block per (chunk of a row): the chunk becomes -inf, then the row's candidates that fall in
// it are written (the block's own writes are ordered by the barrier; no other block touches the
// chunk). Reading every candidate of the row per chunk costs little: a row lists at most a few
// thousand, against a chunk of kScatterChunk dense entries.
constexpr int64_t kScatterChunk = 8192;
__global__ void __launch_bounds__(kThreads)
scatter_candidates_kernel(float* __restrict__ x, int64_t cols, const int32_t* __restrict__ ids,
                          const float* __restrict__ values, const int32_t* __restrict__ count, int64_t capacity) {
  const int64_t row = blockIdx.y;
  const int64_t begin = blockIdx.x * kScatterChunk, end = cols < begin + kScatterChunk ? cols : begin + kScatterChunk;
  float* r = x + row * cols;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) r[i] = -INFINITY;
  __syncthreads();
  const int64_t c = count[row] < 0 ? 0 : count[row];
  const int64_t n = c < capacity ? c : capacity;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const int64_t id = ids[row * capacity + i];
    if (id >= begin && id < end) r[id] = values[row * capacity + i];
  }
}

int scatter_candidates_cuda(float* x, int64_t rows, int64_t cols, const int32_t* ids, const float* values,
                            const int32_t* count, int64_t capacity, void* stream) {
  if (rows == 0) return static_cast<int>(cudaSuccess);
  if (rows < 0 || rows > 65535 || cols <= 0 || capacity <= 0 || x == nullptr || ids == nullptr ||
      values == nullptr || count == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>((cols + kScatterChunk - 1) / kScatterChunk), static_cast<unsigned>(rows));
  scatter_candidates_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, cols, ids, values, count,
                                                                                      capacity);
  return static_cast<int>(cudaGetLastError());
}

__global__ void scale_kernel(float* __restrict__ x, int64_t n, float s) {
  const int64_t n4 = reinterpret_cast<uintptr_t>(x) % 16 == 0 ? n / 4 : 0;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  auto* x4 = reinterpret_cast<float4*>(x);
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n4; i += stride) {
    float4 v = x4[i];
    v.x = __fmul_rn(v.x, s);
    v.y = __fmul_rn(v.y, s);
    v.z = __fmul_rn(v.z, s);
    v.w = __fmul_rn(v.w, s);
    x4[i] = v;
  }
  for (int64_t i = 4 * n4 + blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += stride)
    x[i] = __fmul_rn(x[i], s);
}

int scale_cuda(float* x, int64_t n, float s, void* stream) {
  if (n == 0) return static_cast<int>(cudaSuccess);
  if (n < 0 || x == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t blocks = (n / 4 + kThreads - 1) / kThreads + 1;
  scale_kernel<<<static_cast<unsigned>(blocks < 4096 ? blocks : 4096), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, n, s);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace loom::kernels
