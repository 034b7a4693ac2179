// CUDA kernels of the transformer forward pass (see loom/kernels/model.hpp for the contract).
//
// Every kernel does its arithmetic in float32 and rounds once when it stores an activation, so a
// bfloat16 run differs from the float32 one only by the storage rounding of activations and
// weights. Row kernels use one block per row and reduce with warp shuffles; element-wise
// kernels use grid-stride loops, so any size is launched with a bounded grid.
#include "loom/kernels/model.hpp"

#include "model_device.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace loom::kernels {
namespace {

using device::kRowThreads;
using device::load;
using device::launch_maybe_programmatic;
using device::store;


int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

template <class T>
__global__ void embed_kernel(const int32_t* tokens, const int32_t* positions, int32_t hidden, const T* table,
                             const T* pos_table, float* x) {
  const int64_t t = blockIdx.x;
  const T* row = table + static_cast<int64_t>(tokens[t]) * hidden;
  const T* pos_row = pos_table ? pos_table + static_cast<int64_t>(positions[t]) * hidden : nullptr;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    x[t * hidden + i] = load(row, i) + (pos_row ? load(pos_row, i) : 0.0f);
}

// PER > 0: hidden == PER * kRowThreads, the row held in registers (norm_row_regs); 0: any
// hidden, norm_row's loops.
template <class T, int PER>
__global__ void __launch_bounds__(kRowThreads)
add_bias_norm_kernel(float* x, const int32_t* row_index, int32_t hidden, const float* pending_bias, const float* w,
                     const float* b, float eps, T* out, SplitParts parts) {
  // A programmatic launch after this one (the skinny GEMM) may start and fetch its weights now;
  // it waits for this grid before it reads the normalised rows. This one, launched
  // programmatically, waits for the kernel that wrote x.
  device::allow_next_kernel();
  device::wait_for_previous_kernel();
  const int64_t r = blockIdx.x, src = row_index ? row_index[r] : r;
  float* row = x + src * hidden;
  const float* row_parts = parts.count > 0 ? parts.data + src * hidden : nullptr;
  if constexpr (PER > 0) {
    device::norm_row_regs<PER>(row, pending_bias, w, b, eps, out + r * hidden, row_parts, parts.count, parts.stride);
  } else {
    if (row_parts || pending_bias) device::add_row_parts_bias(row, hidden, row_parts, parts.count, parts.stride, pending_bias);
    device::norm_row(row, hidden, w, b, eps, out + r * hidden);
  }
}

template <class T, int PER = 16>
cudaError_t launch_norm(float* x, const int32_t* row_index, int32_t n_rows, int32_t hidden, const float* pending_bias,
                        const float* w, const float* b, float eps, T* out, bool programmatic, SplitParts parts,
                        cudaStream_t s) {
  if constexpr (PER > 0) {
    if (hidden != PER * kRowThreads)
      return launch_norm<T, PER - 1>(x, row_index, n_rows, hidden, pending_bias, w, b, eps, out, programmatic, parts, s);
  }
  return launch_maybe_programmatic(programmatic, dim3(static_cast<unsigned>(n_rows)), dim3(kRowThreads), 0, s,
                                   add_bias_norm_kernel<T, PER>, x, row_index, hidden, pending_bias, w, b, eps, out,
                                   parts);
}

// Block (t, chunk): the chunk's kRowThreads consecutive entries of token t's (head, pair) index
// space, so blocks are full whatever the head dim (a block per head was 32 threads at D = 64) and
// a single token still spreads over several blocks. Pair i of a head is (i, i + D/2), the
// rotate-half layout.
template <class T>
__global__ void __launch_bounds__(kRowThreads)
qkv_kernel(const T* qkv, const float* bias, const float* cos_sin, const int32_t* positions, int32_t n_heads,
           int32_t n_kv_heads, int32_t head_dim, T* q, T* k, T* v, SplitParts parts) {
  device::allow_next_kernel();  // the attention kernel after it waits for this grid itself
  device::wait_for_previous_kernel();
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const int heads_total = n_heads + 2 * n_kv_heads;
  const int64_t row_offset = t * heads_total * head_dim;
  const float* cs_row = cos_sin ? cos_sin + static_cast<int64_t>(positions[t]) * half * 2 : nullptr;
  const int j = blockIdx.y * kRowThreads + threadIdx.x;
  if (j < heads_total * half) {
    const int head = j / half, i = j - head * half;
    const int64_t src = row_offset + head * head_dim;
    T* dst;
    bool rotate = cs_row != nullptr;
    if (head < n_heads) {
      dst = q + (t * n_heads + head) * head_dim;
    } else if (head < n_heads + n_kv_heads) {
      dst = k + (t * n_kv_heads + (head - n_heads)) * head_dim;
    } else {
      dst = v + (t * n_kv_heads + (head - n_heads - n_kv_heads)) * head_dim;
      rotate = false;
    }
    float a = 0.0f, c = 0.0f;
    if (parts.count > 0) {
      for (int p = 0; p < parts.count; ++p) {
        a += parts.data[p * parts.stride + src + i];
        c += parts.data[p * parts.stride + src + i + half];
      }
    } else {
      a = load(qkv, src + i);
      c = load(qkv, src + i + half);
    }
    if (bias) {
      a += bias[head * head_dim + i];
      c += bias[head * head_dim + i + half];
    }
    if (rotate) {
      const float cosv = cs_row[i * 2], sinv = cs_row[i * 2 + 1];
      const float ra = a * cosv - c * sinv, rc = c * cosv + a * sinv;
      a = ra;
      c = rc;
    }
    store(dst, i, a);
    store(dst, i + half, c);
  }
}

// Grid (column blocks, tokens): no per-element division.
template <class T>
__global__ void swiglu_kernel(const T* gate_up, int32_t inter, T* out) {
  const int64_t t = blockIdx.y;
  const T* row = gate_up + t * 2 * inter;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < inter; i += gridDim.x * blockDim.x)
    store(out, t * inter + i, device::silu(load(row, i)) * load(row, inter + i));
}

// bfloat16, 8 values per thread (16-byte loads and stores): the prefill's SwiGLU moves three
// bytes for every FLOP, so it runs at the speed of its memory instructions. inter % 8 == 0.
__global__ void swiglu_bf16x8_kernel(const uint4* gate_up, int32_t inter8, uint4* out) {
  const int64_t t = blockIdx.y;
  const uint4* row = gate_up + t * 2 * inter8;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < inter8; i += gridDim.x * blockDim.x) {
    const uint4 g = row[i], u = row[inter8 + i];
    const uint32_t gw[4] = {g.x, g.y, g.z, g.w}, uw[4] = {u.x, u.y, u.z, u.w};
    uint32_t o[4];
    for (int e = 0; e < 4; ++e) {
      const float lo = device::silu(__uint_as_float(gw[e] << 16)) * __uint_as_float(uw[e] << 16);
      const float hi = device::silu(__uint_as_float(gw[e] & 0xffff0000u)) * __uint_as_float(uw[e] & 0xffff0000u);
      const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
      o[e] = *reinterpret_cast<const uint32_t*>(&h);
    }
    out[t * inter8 + i] = make_uint4(o[0], o[1], o[2], o[3]);
  }
}

template <class T>
__global__ void bias_gelu_kernel(T* x, const float* bias, int32_t n_tokens, int32_t inter) {
  const int64_t n = static_cast<int64_t>(n_tokens) * inter;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = load(x, e) + (bias ? bias[e % inter] : 0.0f);
    store(x, e, device::gelu_tanh(v));
  }
}

__global__ void add_f32_kernel(float* x, const float* add, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[e] += add[e];
}

__global__ void f32_to_bf16_kernel(const float* in, int64_t n, __nv_bfloat16* out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[e] = __float2bfloat16_rn(in[e]);
}

// The same, four values a thread per step (16-byte loads, 8-byte stores) for aligned arrays of
// n4 * 4 values; the caller converts any tail with the scalar kernel.
__global__ void f32_to_bf16_x4_kernel(const float4* in, int64_t n4, uint2* out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n4;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 v = in[e];
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    uint2 packed;
    memcpy(&packed.x, &lo, 4);
    memcpy(&packed.y, &hi, 4);
    out[e] = packed;
  }
}

int launched() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

int embed_rows_cuda(const int32_t* tokens, const int32_t* positions, int32_t n_tokens, int32_t hidden,
                    const void* table, const void* pos_table, Dtype dtype, float* x, void* stream) {
  if (n_tokens <= 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == Dtype::bf16)
    embed_kernel<<<n_tokens, kRowThreads, 0, s>>>(tokens, positions, hidden, static_cast<const __nv_bfloat16*>(table),
                                                  static_cast<const __nv_bfloat16*>(pos_table), x);
  else
    embed_kernel<<<n_tokens, kRowThreads, 0, s>>>(tokens, positions, hidden, static_cast<const float*>(table),
                                                  static_cast<const float*>(pos_table), x);
  return launched();
}

int add_bias_norm_cuda(float* x, const int32_t* row_index, int32_t n_rows, int32_t hidden, const float* pending_bias,
                       const float* w, const float* b, float eps, void* out, Dtype dtype, void* stream,
                       bool programmatic, SplitParts parts) {
  if (n_rows <= 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  // Rows of up to 16 x kRowThreads values (4096) that divide evenly are held in registers.
  const cudaError_t e =
      dtype == Dtype::bf16
          ? launch_norm(x, row_index, n_rows, hidden, pending_bias, w, b, eps, static_cast<__nv_bfloat16*>(out), programmatic,
                        parts, s)
          : launch_norm(x, row_index, n_rows, hidden, pending_bias, w, b, eps, static_cast<float*>(out), programmatic, parts,
                        s);
  return static_cast<int>(e);  // cudaLaunchKernelEx returns the launch's error itself
}

int qkv_bias_rope_split_cuda(const void* qkv, const float* bias, const float* cos_sin, const int32_t* positions,
                             int32_t n_tokens, int32_t n_heads, int32_t n_kv_heads, int32_t head_dim, void* q, void* k,
                             void* v, Dtype dtype, void* stream, bool programmatic, SplitParts parts) {
  if (n_tokens <= 0) return 0;
  if (head_dim % 2 != 0 || head_dim > 1024) return static_cast<int>(cudaErrorInvalidValue);
  auto s = static_cast<cudaStream_t>(stream);
  const int pairs = (n_heads + 2 * n_kv_heads) * (head_dim / 2);
  const dim3 grid(static_cast<unsigned>(n_tokens), static_cast<unsigned>((pairs + kRowThreads - 1) / kRowThreads));
  const dim3 block(kRowThreads);
  cudaError_t e;
  if (dtype == Dtype::bf16) {
    using T = __nv_bfloat16;
    e = launch_maybe_programmatic(programmatic, grid, block, 0, s, qkv_kernel<T>, static_cast<const T*>(qkv), bias, cos_sin,
                                  positions, n_heads, n_kv_heads, head_dim, static_cast<T*>(q), static_cast<T*>(k),
                                  static_cast<T*>(v), parts);
  } else {
    e = launch_maybe_programmatic(programmatic, grid, block, 0, s, qkv_kernel<float>, static_cast<const float*>(qkv), bias,
                                  cos_sin, positions, n_heads, n_kv_heads, head_dim, static_cast<float*>(q),
                                  static_cast<float*>(k), static_cast<float*>(v), parts);
  }
  return static_cast<int>(e);  // cudaLaunchKernelEx returns the launch's error itself
}

int swiglu_cuda(const void* gate_up, int32_t n_tokens, int32_t inter, void* out, Dtype dtype, void* stream) {
  if (n_tokens <= 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  // Enough blocks per token to fill the GPU at batch 1; tokens along y (at most 65535 per launch).
  const bool by8 = dtype == Dtype::bf16 && inter % 8 == 0 && (reinterpret_cast<uintptr_t>(gate_up) & 15u) == 0 &&
                   (reinterpret_cast<uintptr_t>(out) & 15u) == 0;
  const int per_token = std::min(grid_for(by8 ? inter / 8 : inter, 256), 64);
  for (int32_t t0 = 0; t0 < n_tokens; t0 += 65535) {
    const dim3 grid(static_cast<unsigned>(per_token), static_cast<unsigned>(std::min(n_tokens - t0, 65535)));
    const int64_t offset = static_cast<int64_t>(t0) * inter;
    if (by8)
      swiglu_bf16x8_kernel<<<grid, 256, 0, s>>>(static_cast<const uint4*>(gate_up) + 2 * offset / 8, inter / 8,
                                                static_cast<uint4*>(out) + offset / 8);
    else if (dtype == Dtype::bf16)
      swiglu_kernel<<<grid, 256, 0, s>>>(static_cast<const __nv_bfloat16*>(gate_up) + 2 * offset, inter,
                                         static_cast<__nv_bfloat16*>(out) + offset);
    else
      swiglu_kernel<<<grid, 256, 0, s>>>(static_cast<const float*>(gate_up) + 2 * offset, inter,
                                         static_cast<float*>(out) + offset);
  }
  return launched();
}

int bias_gelu_cuda(void* x, const float* bias, int32_t n_tokens, int32_t inter, Dtype dtype, void* stream) {
  if (n_tokens <= 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const int grid = grid_for(static_cast<int64_t>(n_tokens) * inter, 256);
  if (dtype == Dtype::bf16)
    bias_gelu_kernel<<<grid, 256, 0, s>>>(static_cast<__nv_bfloat16*>(x), bias, n_tokens, inter);
  else
    bias_gelu_kernel<<<grid, 256, 0, s>>>(static_cast<float*>(x), bias, n_tokens, inter);
  return launched();
}

int add_f32_cuda(float* x, const float* add, int64_t n, void* stream) {
  if (n <= 0) return 0;
  add_f32_kernel<<<grid_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(x, add, n);
  return launched();
}

int f32_to_bf16_cuda(const float* in, int64_t n, void* out, void* stream) {
  if (n <= 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const bool aligned = reinterpret_cast<uintptr_t>(in) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 8 == 0;
  const int64_t vectors = aligned ? n / 4 : 0;
  if (vectors > 0)
    f32_to_bf16_x4_kernel<<<grid_for(vectors, 256), 256, 0, s>>>(reinterpret_cast<const float4*>(in), vectors,
                                                                 static_cast<uint2*>(out));
  if (n > vectors * 4)
    f32_to_bf16_kernel<<<grid_for(n - vectors * 4, 256), 256, 0, s>>>(in + vectors * 4, n - vectors * 4,
                                                                      static_cast<__nv_bfloat16*>(out) + vectors * 4);
  return launched();
}

}  // namespace loom::kernels
