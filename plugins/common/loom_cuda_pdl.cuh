// Programmatic dependent launch (sm_90) for the builtin plugins' CUDA kernels: no-ops on older
// architectures and for a kernel not launched with cudaLaunchAttributeProgrammaticStreamSerialization.
// Header-only, Loom-free.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace loomp::pdl {

// Lets the next kernel on the stream start its own prologue (its blocks wait for this grid
// before they read what it writes).
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Waits until the previous kernel's writes are visible.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Launches kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch
// where `programmatic` (sm_90 and newer): the kernel may then be scheduled while the one before
// it finishes, so it must call wait_for_previous_kernel() before it touches memory that kernel
// writes or reads. (kernels/cuda/model_device.cuh keeps the core's own copy: plugins build
// against plugin-api and plugins/common only.)
template <class... Params, class... Args>
cudaError_t launch(bool programmatic, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, void (*kernel)(Params...),
                   Args... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = programmatic ? &attribute : nullptr;
  config.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

}  // namespace loomp::pdl
