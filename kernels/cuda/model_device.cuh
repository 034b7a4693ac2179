// Device helpers shared by the row kernels of model.cu and the decode GEMVs of gemv.cu. One
// implementation on purpose: a norm or an activation computed by either file must give the same
// bits, so that a decode step (norm fused into the GEMV) and a prefill (norm kernel, then
// cuBLAS) see the same normalised activations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace loom::kernels::device {

constexpr int kRowThreads = 256;  // a multiple of 32; blocks that call block_sum have this size
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
// The value a bfloat16 store followed by a load gives back.
__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }
// GPT-2's gelu_new (tanh approximation).
__device__ __forceinline__ float gelu_tanh(float v) {
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * v * (1.0f + tanhf(c * (v + 0.044715f * v * v * v)));
}

// Programmatic dependent launch (sm_90; no-ops before): wait until the previous kernel's writes are visible;
// then let the next kernel start its own prologue.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Launches kernel<<<grid, block, smem, s>>>(args...), as a programmatic dependent launch when
// `programmatic` (sm_90+): the kernel may then be scheduled while the one before it finishes, so
// it must call wait_for_previous_kernel() before it touches global memory the previous kernel
// writes or reads.
template <class... Params, class... Args>
cudaError_t launch_maybe_programmatic(bool programmatic, dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                                      void (*kernel)(Params...), Args... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = s;
  config.attrs = programmatic ? &attribute : nullptr;
  config.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

// Sum over the block (kRowThreads threads); every thread gets the total. All threads must call.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[kRowThreads / 32];
  __shared__ float total;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < kRowThreads / 32 ? partial[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(kFullMask, s, offset);
    if (lane == 0) total = s;
  }
  __syncthreads();
  const float result = total;
  __syncthreads();  // `total` and `partial` are reused by the next call
  return result;
}

// out[i] = norm(row)[i] for a block of kRowThreads threads: RMSNorm (w * x / sqrt(mean(x^2) +
// eps)) when b is null, else LayerNorm with the variance from a second pass over the row, as the
// CPU reference computes it. Thread j owns values j, j + kRowThreads, ... of the row, so a caller
// that wrote the row with the same partition need not synchronise first. (Reading float4s
// instead measured slower in the prefill: the bfloat16 stores no longer coalesce.)
template <class T>
__device__ __forceinline__ void norm_row(const float* row, int32_t hidden, const float* w, const float* b, float eps,
                                         T* out) {
  const float inv_h = 1.0f / static_cast<float>(hidden);
  float sum = 0.0f, sum_sq = 0.0f;
  for (int i = threadIdx.x; i < hidden; i += kRowThreads) {
    const float v = row[i];
    sum += v;
    sum_sq += v * v;
  }
  if (b == nullptr) {
    const float inv = rsqrtf(block_sum(sum_sq) * inv_h + eps);
    for (int i = threadIdx.x; i < hidden; i += kRowThreads) store(out, i, w[i] * (row[i] * inv));
    return;
  }
  const float mean = block_sum(sum) * inv_h;
  float var = 0.0f;
  for (int i = threadIdx.x; i < hidden; i += kRowThreads) var += (row[i] - mean) * (row[i] - mean);
  const float inv = rsqrtf(block_sum(var) * inv_h + eps);
  for (int i = threadIdx.x; i < hidden; i += kRowThreads) store(out, i, (row[i] - mean) * inv * w[i] + b[i]);
}

// norm_row with the row in registers: hidden == PER * kRowThreads, thread j holding values j,
// j + kRowThreads, ... as norm_row partitions the row, and adding pending_bias (optional) into
// the row first, as add_row_parts_bias does. Every load is issued at once and w is loaded before the
// reduction, so a row costs one memory latency instead of norm_row's three (load, reload after
// the sum, store); the sums and products are norm_row's, in the same order.
// Before the bias, the row's split-K partial products are added (parts: the row's entry in the
// first of n_parts arrays, part_stride floats apart), so a linear split along its inputs needs
// no kernel of its own to sum its parts into the residual.
template <int PER, class T>
__device__ __forceinline__ void norm_row_regs(float* row, const float* pending_bias, const float* w, const float* b,
                                              float eps, T* out, const float* parts, int n_parts, int64_t part_stride) {
  float v[PER], wv[PER];
#pragma unroll
  for (int k = 0; k < PER; ++k) v[k] = row[threadIdx.x + k * kRowThreads];
  for (int p = 0; p < n_parts; ++p) {
#pragma unroll
    for (int k = 0; k < PER; ++k) v[k] += parts[p * part_stride + threadIdx.x + k * kRowThreads];
  }
#pragma unroll
  for (int k = 0; k < PER; ++k) wv[k] = w[threadIdx.x + k * kRowThreads];
  if (pending_bias) {
#pragma unroll
    for (int k = 0; k < PER; ++k) v[k] += pending_bias[threadIdx.x + k * kRowThreads];
  }
  if (pending_bias || n_parts > 0) {
#pragma unroll
    for (int k = 0; k < PER; ++k) row[threadIdx.x + k * kRowThreads] = v[k];
  }
  const float inv_h = 1.0f / static_cast<float>(PER * kRowThreads);
  float sum = 0.0f, sum_sq = 0.0f;
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    sum += v[k];
    sum_sq += v[k] * v[k];
  }
  if (b == nullptr) {
    const float inv = rsqrtf(block_sum(sum_sq) * inv_h + eps);
#pragma unroll
    for (int k = 0; k < PER; ++k) store(out, threadIdx.x + k * kRowThreads, wv[k] * (v[k] * inv));
    return;
  }
  const float mean = block_sum(sum) * inv_h;
  float var = 0.0f;
#pragma unroll
  for (int k = 0; k < PER; ++k) var += (v[k] - mean) * (v[k] - mean);
  const float inv = rsqrtf(block_sum(var) * inv_h + eps);
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int i = threadIdx.x + k * kRowThreads;
    store(out, i, (v[k] - mean) * inv * wv[k] + b[i]);
  }
}

// row += the sum of n_parts split-K partial products (norm_row_regs's parts), then bias when not
// null, in one pass with norm_row's partition of the row over the threads (the same order as
// norm_row_regs).
__device__ __forceinline__ void add_row_parts_bias(float* row, int32_t hidden, const float* parts, int n_parts,
                                                   int64_t part_stride, const float* bias) {
  for (int i = threadIdx.x; i < hidden; i += kRowThreads) {
    float v = row[i];
    for (int p = 0; p < n_parts; ++p) v += parts[p * part_stride + i];
    if (bias) v += bias[i];
    row[i] = v;
  }
}

}  // namespace loom::kernels::device
