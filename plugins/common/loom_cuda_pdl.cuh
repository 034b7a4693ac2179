// Programmatic dependent launch (sm_90) for the builtin plugins' CUDA kernels: no-ops on older
// architectures and for a kernel not launched with cudaLaunchAttributeProgrammaticStreamSerialization.
// Header-only, Loom-free.
#pragma once

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

}  // namespace loomp::pdl
