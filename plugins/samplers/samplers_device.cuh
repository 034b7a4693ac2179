// Device helpers shared by the samplers' CUDA files (samplers_cuda.cu: dense rows;
// candidates_cuda.cu: candidate rows). CUDA only; included after samplers_cuda.hpp.
#ifndef LOOM_PLUGINS_SAMPLERS_DEVICE_CUH
#define LOOM_PLUGINS_SAMPLERS_DEVICE_CUH

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "loom_cuda_pdl.cuh"

namespace loomp::samplers::cuda {

// Order-preserving key: a larger float gives a larger key; -0.0 is folded onto +0.0 (the CPU
// compares them equal, so the id decides).
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
// (logit desc, id asc) as one descending 64-bit key: the order top-k and top-p keep tokens in.
__device__ __forceinline__ uint64_t composite(float f, int64_t id) {
  return (static_cast<uint64_t>(order_key(f)) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(id));
}
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
// A token's unnormalised probability exp(x - max) in double, as the CPU computes it; 0 for -inf.
// With a +inf max, softmax's limit: 1 for a +inf entry, 0 for the rest (exp(inf - inf) would be
// NaN); the CPU's logit_weight in sampler_common.hpp.
__device__ __forceinline__ double weight(float x, float mx) {
  if (mx == INFINITY) return x == INFINITY ? 1.0 : 0.0;
  return x == -INFINITY ? 0.0 : exp(__dsub_rn(static_cast<double>(x), static_cast<double>(mx)));
}
// Its logarithm: x - max in double; with a +inf max, 0 or -inf (the CPU's log_logit_weight).
__device__ __forceinline__ double log_weight(float x, float mx) {
  if (mx == INFINITY) return x == INFINITY ? 0.0 : -INFINITY;
  return __dsub_rn(static_cast<double>(x), static_cast<double>(mx));
}

// ---- programmatic dependent launch (sm_90) ----
// The links' kernels follow one another on the host's stream, each a few microseconds long:
// launched with programmatic stream serialization, a kernel's blocks are resident while the one
// before drains, and wait (griddepcontrol.wait) for its writes before reading anything. Every
// kernel launched through launch_after() must call wait_for_previous_kernel() before its first
// global read; each lets the next kernel in early (allow_next_kernel()).
using pdl::allow_next_kernel;          // plugins/common/loom_cuda_pdl.cuh
using pdl::wait_for_previous_kernel;
// Whether the current device runs programmatic dependent launches (compute capability 9.0+).
bool programmatic_launch();
template <typename... Params, typename... Args>
cudaError_t launch_after(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t st, Args&&... args) {
  return pdl::launch(programmatic_launch(), grid, block, 0, st, kernel, static_cast<Args&&>(args)...);
}

// src (host, `bytes`) -> dst (device) through the staging's pinned memory, ordered on st.
cudaError_t upload(Staging*& s, void* dst, const void* src, size_t bytes, cudaStream_t st);

// Each row's uniform travels in the launch itself for up to kParamRows rows (kernel parameters
// up to 32 KiB: Volta and later, CUDA 12.1 and later), so no copy precedes the kernel.
constexpr int kParamRows = 4096;
struct UniformParams {
  float u[kParamRows];
};
// The rows' uniforms u[rows] (host memory) for a dist kernel: in `up` (the launch carries them)
// when they fit, else uploaded to device_u; returns the device pointer the kernel reads (NULL:
// read `up`), or sets *error.
inline const float* stage_uniforms(const float* u, int64_t rows, float* device_u, Staging*& staging, cudaStream_t st,
                                   UniformParams& up, cudaError_t* error) {
  *error = cudaSuccess;
  const size_t bytes = sizeof(float) * static_cast<size_t>(rows);
  if (rows <= kParamRows) {
    memcpy(up.u, u, bytes);
    return nullptr;
  }
  *error = upload(staging, device_u, u, bytes, st);
  return device_u;
}

}  // namespace loomp::samplers::cuda

#endif
