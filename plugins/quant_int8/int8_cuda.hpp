// The `int8` quantizer's CUDA product (int8_cuda.cu): W8A16, int8 weights with a float32 scale
// per output row, bfloat16 or float32 activations, float32 sums. Plugin-internal.
#pragma once

#include <cstdint>

namespace loomp::int8q {

// y[T, out] = (x[T, in] @ q^T) * scales[out] (+ bias[out]); x bf16 or f32, y bf16 or f32; every
// pointer on the current device; in % 16 == 0 and the pointers 16-byte aligned (checked by the
// caller). Enqueues on `stream` (a cudaStream_t) and returns a cudaError_t as int.
int w8a16_linear_cuda(const int8_t* q, const float* scales, const void* x, bool x_bf16, const float* bias, void* y,
                      bool y_bf16, int32_t tokens, int32_t out, int32_t in, void* stream);

}  // namespace loomp::int8q
