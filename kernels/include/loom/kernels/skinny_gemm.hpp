// Tensor-core GEMMs for decode steps of a few dozen tokens: y[T, out] = x[T, in] W[out, in]^T
// with 1 <= T <= skinny_gemm_max_tokens(), bfloat16 weights and inputs, float32 accumulation.
//
// Why: at these shapes a step reads each weight once and does little arithmetic, so the speed is
// the weight stream's, and the consumer of the product costs a launch of its own. On sm_90a the
// kernel multiplies with wgmma; K is split across the blocks of a thread-block cluster (sm_90+)
// when the output has too few tiles to fill the GPU, the cluster adding its partials in shared
// memory in a fixed order. Its epilogue does the consumer's work: SwiGLU of the gate/up
// projection, or the residual add of an output projection. The CUDA backend uses it for the
// gate/up projection, where it beat cuBLAS plus the SwiGLU kernel; where K must be split it
// measured slower than cuBLAS (skinny_gemm.cu has the numbers).
//
// Numerics: the float32 sum over K is in a different order than cuBLAS's, so results agree to
// float32 rounding, not bit for bit; the same shape on the same device always gives the same bits.
// Epilogues round as the unfused path stores: swiglu rounds gate and up to bfloat16 first.
//
// Conventions as loom/kernels/model.hpp: device pointers, one enqueue on `stream`, a
// cudaError_t as int, capturable in CUDA graphs. `programmatic` launches the kernel as a
// programmatic dependent launch (sm_90+): it loads its first weight tiles before it waits for
// the previous kernel on the stream. Thread-safety: no state is kept (launch configuration is
// cached per device behind a mutex).
#pragma once

#include <cstdint>

namespace loom::kernels {

enum class SkinnyEpilogue {
  store_bf16, // out [T, out] bfloat16 = y
  store_f32,  // out [T, out] float32 = y (logits)
  add_f32,    // out [T, out] float32 += y (an output projection into the residual stream)
  // W = [gate; up] ([2 I, in]); out [T, I] bfloat16 = bf16(silu(bf16(y[j])) * bf16(y[I + j])).
  swiglu,
};

struct SkinnyGemmArgs {
  int32_t tokens = 0;            // T, 1..skinny_gemm_max_tokens()
  int32_t in = 0;                // a multiple of 64
  int32_t out = 0;               // a multiple of 128 (swiglu: of 256)
  const void* weight = nullptr;  // [out, in] bfloat16, 16-byte aligned
  const void* act = nullptr;     // [T, in] bfloat16, 16-byte aligned
  void* out_ptr = nullptr;       // as the epilogue says
  // K splits (a cluster of blocks per output tile, sm_90+): 0 lets the kernel choose by the
  // shape and the GPU; a benchmark may ask for 1..8 (more are capped to 8 and to the K steps; 1
  // where clusters are absent).
  int32_t splits = 0;
};

constexpr int32_t skinny_gemm_max_tokens() { return 64; }

// Whether the kernel takes a weight of this shape with this epilogue (in a multiple of 64, out
// of 128, or of 256 for swiglu).
bool skinny_gemm_takes(int32_t in, int32_t out, SkinnyEpilogue epilogue);

// Whether the current device can run the kernel: its shared-memory ring needs about 145 KB a
// block (not on GPUs of 99 KB, such as sm_86/89/120). False when the device cannot be queried.
bool skinny_gemm_supported();

// Enqueues y = x W^T with the epilogue. Shapes outside the contract, null pointers, a
// misaligned weight or input, or a device that is not supported return cudaErrorInvalidValue
// without any CUDA call that could leave an error behind.
int skinny_gemm_bf16_cuda(const SkinnyGemmArgs& args, SkinnyEpilogue epilogue, bool programmatic, void* stream);

}  // namespace loom::kernels
