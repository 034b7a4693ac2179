// Row-wise kernels over a [rows, cols] float32 matrix: softmax and argmax, on the CPU and, when
// Loom is built with CUDA, on the GPU. Used by core (the host kernels extension) and its tests.
//
// Shapes: x is [rows, cols], row-major, contiguous (row r starts at x + r * cols).
// Numerics, identical on both backends:
//  - softmax subtracts the row maximum before exponentiating (no overflow for large logits);
//  - -INFINITY entries (masked tokens) become exactly 0;
//  - a row whose entries are all -INFINITY has no distribution: it is written as all zeros and
//    reported (the CPU version returns false; the CUDA version counts it when asked);
//  - argmax returns the first index of the maximum; NaN entries are never the maximum; a row of
//    only -INFINITY (or NaN) yields index 0.
#pragma once

#include <cstdint>

namespace loom::kernels {

// x: [rows, cols] float32 contiguous, in place; -inf -> 0; returns false when a row is all -inf
// (every other row is still normalised) or when cols <= 0 with rows > 0.
bool softmax_rows_cpu(float* x, int64_t rows, int64_t cols);

// x: [rows, cols] float32 contiguous; out: [rows] host memory, first index of each row's max
// (-1 for every row when cols <= 0).
void argmax_rows_cpu(const float* x, int64_t rows, int64_t cols, int32_t* out);

// True when built with CUDA and a device is present (cudaGetDeviceCount succeeds and is > 0).
bool cuda_available();

#if defined(LOOM_HAVE_CUDA) && LOOM_HAVE_CUDA
// x: [rows, cols] float32 on the device, in place; ordered on `stream` (a cudaStream_t passed as
// void*, NULL = the legacy default stream); returns a cudaError_t as int (0 ok). The call only
// enqueues: errors of the kernel itself surface at the next synchronisation.
// masked_rows_device: optional (NULL), one int32 on the device; every all -inf row adds 1 to it
// (the caller zeroes it first), so the caller can report such rows as the CPU version does.
// cols may be up to 2^31 - 1 (a vocabulary of 128256 is the case that matters).
int softmax_rows_cuda(float* x, int64_t rows, int64_t cols, void* stream,
                      int32_t* masked_rows_device = nullptr);

// x: [rows, cols] float32 on the device; out_device: [rows] int32 on the device, first index of
// each row's max. Ordered on `stream`; returns a cudaError_t as int (0 ok).
int argmax_rows_cuda(const float* x, int64_t rows, int64_t cols, int32_t* out_device, void* stream);

// Sampler candidates (loom_sampling_candidates, plugin-api/sampler.h) back into dense rows: row r
// of x [rows, cols] becomes -inf everywhere but ids[r, i] -> values[r, i] for i < count[r]
// (ids, values: [rows, capacity]; count: [rows]; all on the device). Ids outside [0, cols) and
// counts outside [0, capacity] are ignored (clamped), never written out of bounds. Ordered on
// `stream`; returns a cudaError_t as int (0 ok).
int scatter_candidates_cuda(float* x, int64_t rows, int64_t cols, const int32_t* ids, const float* values,
                            const int32_t* count, int64_t capacity, void* stream);

// x[i] = x[i] * s (one rounded float32 multiply) over n floats on the device: the dense scale a
// sampler link deferred (loom_sampling_candidates.dense_scale). Ordered on `stream`; returns a
// cudaError_t as int (0 ok).
int scale_cuda(float* x, int64_t n, float s, void* stream);
#endif

}  // namespace loom::kernels
