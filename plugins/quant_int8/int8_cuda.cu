// W8A16 on CUDA for the `int8` quantizer (see int8_cuda.hpp).
//
// A warp computes one output row for a chunk of up to kTokens tokens: each lane reads 16 int8
// weights (one 16-byte load) per step and the matching 16 activations of each token, so the
// weight row streams through once per chunk; the sums are reduced across the warp and the row's
// scale applied once. The activations (a few KB per token) are re-read by every warp from L1/L2.
// Decode (a few tokens) is one chunk: the kernel streams the int8 weights once, half the bytes
// of bfloat16. Long prefills loop over chunks and re-read the weights: correct, not fast (a
// tiled tensor-core path is still to come).
#include "int8_cuda.hpp"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace loomp::int8q {
namespace {

constexpr int kTokens = 8;   // tokens per chunk
constexpr int kWarps = 8;    // output rows per block

__device__ __forceinline__ void load16(const __nv_bfloat16* p, float* v) {
  const uint4 a = *reinterpret_cast<const uint4*>(p), b = *reinterpret_cast<const uint4*>(p + 8);
  const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  for (int i = 0; i < 8; ++i) {
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void load16(const float* p, float* v) {
  for (int i = 0; i < 4; ++i) {
    const float4 f = reinterpret_cast<const float4*>(p)[i];
    v[4 * i] = f.x;
    v[4 * i + 1] = f.y;
    v[4 * i + 2] = f.z;
    v[4 * i + 3] = f.w;
  }
}
__device__ __forceinline__ void store(float* y, float v) { *y = v; }
__device__ __forceinline__ void store(__nv_bfloat16* y, float v) { *y = __float2bfloat16_rn(v); }

template <class X, class Y>
__global__ void __launch_bounds__(kWarps * 32) w8a16_kernel(const int8_t* __restrict__ q, const float* __restrict__ scales,
                                                            const X* __restrict__ x, const float* __restrict__ bias,
                                                            Y* __restrict__ y, int tokens, int out, int in) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (row >= out) return;
  const int8_t* w = q + static_cast<int64_t>(row) * in;
  for (int t0 = 0; t0 < tokens; t0 += kTokens) {
    const int n = min(kTokens, tokens - t0);
    float acc[kTokens] = {};
    for (int k = lane * 16; k < in; k += 32 * 16) {
      const int4 packed = *reinterpret_cast<const int4*>(w + k);
      const uint32_t words[4] = {static_cast<uint32_t>(packed.x), static_cast<uint32_t>(packed.y),
                                 static_cast<uint32_t>(packed.z), static_cast<uint32_t>(packed.w)};
      float wv[16];
      for (int i = 0; i < 16; ++i) wv[i] = static_cast<float>(static_cast<int8_t>((words[i / 4] >> (8 * (i % 4))) & 0xff));
      for (int t = 0; t < kTokens; ++t) {
        if (t >= n) break;
        float xv[16];
        load16(x + static_cast<int64_t>(t0 + t) * in + k, xv);
        float s = 0.0f;
        for (int i = 0; i < 16; ++i) s += wv[i] * xv[i];
        acc[t] += s;
      }
    }
    for (int t = 0; t < kTokens; ++t) {
      if (t >= n) break;
      float v = acc[t];
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) store(y + static_cast<int64_t>(t0 + t) * out + row, v * scales[row] + (bias ? bias[row] : 0.0f));
    }
  }
}

template <class X>
int launch(const int8_t* q, const float* scales, const X* x, const float* bias, void* y, bool y_bf16, int tokens, int out,
           int in, cudaStream_t s) {
  const dim3 grid((out + kWarps - 1) / kWarps);
  if (y_bf16)
    w8a16_kernel<<<grid, kWarps * 32, 0, s>>>(q, scales, x, bias, static_cast<__nv_bfloat16*>(y), tokens, out, in);
  else
    w8a16_kernel<<<grid, kWarps * 32, 0, s>>>(q, scales, x, bias, static_cast<float*>(y), tokens, out, in);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int w8a16_linear_cuda(const int8_t* q, const float* scales, const void* x, bool x_bf16, const float* bias, void* y,
                      bool y_bf16, int32_t tokens, int32_t out, int32_t in, void* stream) {
  if (tokens <= 0 || out <= 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (x_bf16) return launch(q, scales, static_cast<const __nv_bfloat16*>(x), bias, y, y_bf16, tokens, out, in, s);
  return launch(q, scales, static_cast<const float*>(x), bias, y, y_bf16, tokens, out, in, s);
}

}  // namespace loomp::int8q
