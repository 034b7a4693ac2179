// CUDA kernels of training (see loom/kernels/train.hpp for the contract).
//
// Determinism is the rule here: a training step must give the same bits on every run so that a
// resumed run continues an interrupted one exactly. So no atomics: row kernels reduce a row in
// one block in a fixed order, column sums walk the rows in order, the embedding's backward sums
// each token's rows in the order the host sorted them, and the gradient norm reduces fixed
// partials. Row kernels use one block of kRowThreads per row; element-wise ones grid-stride.
#include "loom/kernels/train.hpp"

#include "model_device.cuh"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace loom::kernels {
namespace {

using device::block_sum;
using device::kFullMask;
using device::kRowThreads;

int launched() { return static_cast<int>(cudaGetLastError()); }

int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[kRowThreads / 32];
  __shared__ float total;
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < kRowThreads / 32 ? partial[lane] : -INFINITY;
    for (int offset = 16; offset > 0; offset >>= 1) s = fmaxf(s, __shfl_xor_sync(kFullMask, s, offset));
    if (lane == 0) total = s;
  }
  __syncthreads();
  const float result = total;
  __syncthreads();
  return result;
}

__global__ void rms_norm_forward_kernel(const float* x, const float* w, int32_t H, float eps, float* y, float* r) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * H;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < H; i += kRowThreads) ss += xr[i] * xr[i];
  const float inv = 1.0f / sqrtf(block_sum(ss) / static_cast<float>(H) + eps);
  for (int i = threadIdx.x; i < H; i += kRowThreads) y[row * H + i] = w[i] * (xr[i] * inv);
  if (threadIdx.x == 0) r[row] = inv;
}

__global__ void rms_norm_backward_kernel(const float* dy, const float* x, const float* w, const float* r, int32_t H,
                                         float* dx, float* dw_rows) {
  const int64_t row = blockIdx.x;
  const float* g = dy + row * H;
  const float* xr = x + row * H;
  const float inv = r[row];
  float gx = 0.0f;
  for (int i = threadIdx.x; i < H; i += kRowThreads) gx += w[i] * g[i] * xr[i];
  const float c = inv * inv * inv * block_sum(gx) / static_cast<float>(H);
  for (int i = threadIdx.x; i < H; i += kRowThreads) {
    dx[row * H + i] += inv * w[i] * g[i] - xr[i] * c;
    dw_rows[row * H + i] = g[i] * xr[i] * inv;
  }
}

__global__ void layer_norm_forward_kernel(const float* x, const float* w, const float* b, int32_t H, float eps, float* y,
                                          float* mean, float* r) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * H;
  float s = 0.0f;
  for (int i = threadIdx.x; i < H; i += kRowThreads) s += xr[i];
  const float mu = block_sum(s) / static_cast<float>(H);
  float v = 0.0f;
  for (int i = threadIdx.x; i < H; i += kRowThreads) v += (xr[i] - mu) * (xr[i] - mu);
  const float inv = 1.0f / sqrtf(block_sum(v) / static_cast<float>(H) + eps);
  for (int i = threadIdx.x; i < H; i += kRowThreads) y[row * H + i] = (xr[i] - mu) * inv * w[i] + b[i];
  if (threadIdx.x == 0) {
    mean[row] = mu;
    r[row] = inv;
  }
}

__global__ void layer_norm_backward_kernel(const float* dy, const float* x, const float* w, const float* mean,
                                           const float* r, int32_t H, float* dx, float* dw_rows) {
  const int64_t row = blockIdx.x;
  const float* g = dy + row * H;
  const float* xr = x + row * H;
  const float mu = mean[row], inv = r[row];
  float gs = 0.0f, gxs = 0.0f;
  for (int i = threadIdx.x; i < H; i += kRowThreads) {
    const float xh = (xr[i] - mu) * inv, gi = w[i] * g[i];
    gs += gi;
    gxs += gi * xh;
  }
  const float g_mean = block_sum(gs) / static_cast<float>(H);
  const float gx_mean = block_sum(gxs) / static_cast<float>(H);
  for (int i = threadIdx.x; i < H; i += kRowThreads) {
    const float xh = (xr[i] - mu) * inv;
    dx[row * H + i] += inv * (w[i] * g[i] - g_mean - xh * gx_mean);
    dw_rows[row * H + i] = g[i] * xh;
  }
}

// b (when given, C wide): g gets its bias added first (kept: the backward reads g).
__global__ void gelu_forward_kernel(float* g, const float* b, int32_t C, int64_t n, float* m) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float x = g[i];
    if (b) g[i] = x += b[i % C];
    m[i] = device::gelu_tanh(x);
  }
}

__global__ void gelu_backward_kernel(const float* dm, const float* g, int64_t n, float* dg) {
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = g[i];
    const float t = tanhf(c * (x + 0.044715f * x * x * x));
    dg[i] = dm[i] * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * x * x));
  }
}

// A block of 32 x 8 threads per 32 columns and kColumnSumChunk rows: thread (c, k) sums rows k,
// k + 8, ... of its chunk in column c, then the 8 partials are added in k order into the chunk's
// partial sum.
__global__ void column_partial_kernel(const float* m, int32_t n, int32_t C, float* partial) {
  __shared__ float part[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * kColumnSumChunk;
  const int64_t last = min(first + kColumnSumChunk, static_cast<int64_t>(n));
  float s = 0.0f;
  if (c < C)
    for (int64_t row = first + threadIdx.y; row < last; row += 8) s += m[row * C + c];
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float total = 0.0f;
    for (int k = 0; k < 8; ++k) total += part[k][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * C + c] = total;
  }
}

__global__ void column_total_kernel(const float* partial, int32_t chunks, int32_t C, float* out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float total = 0.0f;
  for (int k = 0; k < chunks; ++k) total += partial[static_cast<int64_t>(k) * C + c];
  out[c] += total;
}

__global__ void rope_kernel(float* v, int64_t pairs, int32_t heads, int32_t D, int32_t seq_len, const float* cos_sin,
                            bool inverse) {
  const int half = D / 2;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % half);
    const int64_t head_row = i / half;  // t * heads + h
    const int64_t t = head_row / heads;
    const int pos = static_cast<int>(t % seq_len);
    const float c = cos_sin[(static_cast<int64_t>(pos) * half + d) * 2];
    const float s = inverse ? -cos_sin[(static_cast<int64_t>(pos) * half + d) * 2 + 1]
                            : cos_sin[(static_cast<int64_t>(pos) * half + d) * 2 + 1];
    float* row = v + head_row * D;
    const float a = row[d], b = row[d + half];
    row[d] = a * c - b * s;
    row[d + half] = b * c + a * s;
  }
}

// dst[b, h, t, d] = src[(b n + t), h / rep, d] for h < heads * rep.
__global__ void split_heads_kernel(const float* src, int64_t stride, int64_t total, int32_t n, int32_t heads, int32_t D,
                                   int32_t rep, float* dst) {
  const int out_heads = heads * rep;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % D);
    int64_t rest = i / D;
    const int t = static_cast<int>(rest % n);
    rest /= n;
    const int h = static_cast<int>(rest % out_heads);
    const int64_t b = rest / out_heads;
    dst[i] = src[(b * n + t) * stride + static_cast<int64_t>(h / rep) * D + d];
  }
}

// dst[(b n + t), h, d] = sum over g < group of src[b, h group + g, t, d].
__global__ void merge_heads_kernel(const float* src, int64_t total, int32_t n, int32_t heads, int32_t D, int32_t group,
                                   float* dst, int64_t stride) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % D);
    int64_t rest = i / D;
    const int h = static_cast<int>(rest % heads);
    const int64_t bt = rest / heads;
    const int t = static_cast<int>(bt % n);
    const int64_t b = bt / n;
    float s = 0.0f;
    for (int g = 0; g < group; ++g) s += src[(((b * heads * group) + h * group + g) * n + t) * D + d];
    dst[bt * stride + static_cast<int64_t>(h) * D + d] = s;
  }
}

__global__ void causal_softmax_kernel(float* s, int32_t n, int32_t window) {
  const int64_t row = blockIdx.x;
  const int i = static_cast<int>(row % n);
  const int first = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;
  float* r = s + row * n;
  float mx = -INFINITY;
  for (int j = first + threadIdx.x; j <= i; j += kRowThreads) mx = fmaxf(mx, r[j]);
  mx = block_max(mx);
  float sum = 0.0f;
  for (int j = first + threadIdx.x; j <= i; j += kRowThreads) sum += expf(r[j] - mx);
  const float inv = 1.0f / block_sum(sum);
  for (int j = threadIdx.x; j < n; j += kRowThreads) r[j] = j >= first && j <= i ? expf(r[j] - mx) * inv : 0.0f;
}

// Only the kept keys [first, i] of row i are read; the others' gradients are 0 (the causal half
// of the matrix is never loaded).
__global__ void softmax_backward_kernel(const float* p, float* dp, int32_t n, int32_t window, float scale) {
  const int64_t row = blockIdx.x;
  const int i = static_cast<int>(row % n);
  const int first = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;
  const float* pr = p + row * n;
  float* dr = dp + row * n;
  float dot = 0.0f;
  for (int j = first + threadIdx.x; j <= i; j += kRowThreads) dot += pr[j] * dr[j];
  dot = block_sum(dot);
  for (int j = threadIdx.x; j < n; j += kRowThreads) dr[j] = j >= first && j <= i ? scale * pr[j] * (dr[j] - dot) : 0.0f;
}

__global__ void swiglu_forward_kernel(const float* g, const float* u, int64_t n, float* m) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    m[i] = device::silu(g[i]) * u[i];
}

__global__ void swiglu_backward_kernel(const float* dm, const float* g, const float* u, int64_t n, float* dg, float* du) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float s = 1.0f / (1.0f + expf(-g[i]));
    dg[i] = dm[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    du[i] = dm[i] * device::silu(g[i]);
  }
}

__global__ void accumulate_kernel(float* y, const float* x, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] += x[i];
}

__global__ void bias_add_kernel(const float* x, const float* b, int64_t n, int32_t C, float* y) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = x[i] + b[i % C];
}

__global__ void embedding_backward_kernel(const float* dx, const int32_t* order, const int32_t* starts,
                                          const int32_t* unique, int32_t H, float* dtable) {
  const int u = blockIdx.x;
  const int begin = starts[u], end = starts[u + 1];
  float* row = dtable + static_cast<int64_t>(unique[u]) * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    float s = 0.0f;
    for (int k = begin; k < end; ++k) s += dx[static_cast<int64_t>(order[k]) * H + i];
    row[i] += s;
  }
}

__global__ void cross_entropy_kernel(float* logits, const int32_t* targets, int32_t V, float weight, bool grad,
                                     float* loss) {
  const int64_t row = blockIdx.x;
  float* r = logits + row * V;
  const int target = targets[row];
  if (target < 0) {
    if (grad)
      for (int c = threadIdx.x; c < V; c += kRowThreads) r[c] = 0.0f;
    if (threadIdx.x == 0) loss[row] = 0.0f;
    return;
  }
  // One pass over the row: each thread's running max and its sum of exponentials below it,
  // rescaled to the row's max after.
  float m = -INFINITY, sum = 0.0f;
  for (int c = threadIdx.x; c < V; c += kRowThreads) {
    const float v = r[c];
    if (v > m) {
      sum = sum * expf(m - v) + 1.0f;
      m = v;
    } else {
      sum += expf(v - m);
    }
  }
  const float mx = block_max(m);
  const float lse = logf(block_sum(m == -INFINITY ? 0.0f : sum * expf(m - mx))) + mx;
  const float target_logit = r[target];
  __syncthreads();  // every thread has read the target's logit before any overwrites it
  if (threadIdx.x == 0) loss[row] = lse - target_logit;
  if (grad)
    for (int c = threadIdx.x; c < V; c += kRowThreads) r[c] = (expf(r[c] - lse) - (c == target ? 1.0f : 0.0f)) * weight;
}

__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, int64_t n, int64_t decayed, double lr,
                             double beta1, double beta2, double eps, double decay, double c1, double c2) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double gi = g[i];
    const float mi = static_cast<float>(beta1 * static_cast<double>(m[i]) + (1.0 - beta1) * gi);
    const float vi = static_cast<float>(beta2 * static_cast<double>(v[i]) + (1.0 - beta2) * gi * gi);
    m[i] = mi;
    v[i] = vi;
    double w = static_cast<double>(p[i]) * (1.0 - lr * (i < decayed ? decay : 0.0));
    w -= lr * (static_cast<double>(mi) / c1) / (sqrt(static_cast<double>(vi) / c2) + eps);
    p[i] = static_cast<float>(w);
  }
}

constexpr int kSquareThreads = 256;

__device__ double block_sum_double(double v) {
  __shared__ double partial[kSquareThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  double total = 0.0;
  for (int k = 0; k < kSquareThreads / 32; ++k) total += partial[k];
  return total;
}

__global__ void sum_squares_partial_kernel(const float* x, int64_t n, double* scratch) {
  double s = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kSquareThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kSquareThreads)
    s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  const double total = block_sum_double(s);
  if (threadIdx.x == 0) scratch[blockIdx.x] = total;
}

__global__ void sum_squares_final_kernel(const double* scratch, int32_t parts, double* out) {
  double s = threadIdx.x < parts ? scratch[threadIdx.x] : 0.0;
  const double total = block_sum_double(s);
  if (threadIdx.x == 0) out[0] = total;
}

}  // namespace

int rms_norm_forward_cuda(const float* x, const float* w, int32_t n, int32_t H, float eps, float* y, float* r,
                          void* stream) {
  if (n <= 0) return 0;
  rms_norm_forward_kernel<<<n, kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, w, H, eps, y, r);
  return launched();
}

int rms_norm_backward_cuda(const float* dy, const float* x, const float* w, const float* r, int32_t n, int32_t H,
                           float* dx, float* dw_rows, void* stream) {
  if (n <= 0) return 0;
  rms_norm_backward_kernel<<<n, kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(dy, x, w, r, H, dx, dw_rows);
  return launched();
}

int layer_norm_forward_cuda(const float* x, const float* w, const float* b, int32_t n, int32_t H, float eps, float* y,
                            float* mean, float* r, void* stream) {
  if (n <= 0) return 0;
  layer_norm_forward_kernel<<<n, kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, w, b, H, eps, y, mean, r);
  return launched();
}

int layer_norm_backward_cuda(const float* dy, const float* x, const float* w, const float* mean, const float* r,
                             int32_t n, int32_t H, float* dx, float* dw_rows, void* stream) {
  if (n <= 0) return 0;
  layer_norm_backward_kernel<<<n, kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(dy, x, w, mean, r, H, dx,
                                                                                       dw_rows);
  return launched();
}

int gelu_forward_cuda(float* g, const float* b, int64_t rows, int32_t C, float* m, void* stream) {
  const int64_t n = rows * C;
  if (n <= 0) return 0;
  gelu_forward_kernel<<<grid_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(g, b, C, n, m);
  return launched();
}

int gelu_backward_cuda(const float* dm, const float* g, int64_t n, float* dg, void* stream) {
  if (n <= 0) return 0;
  gelu_backward_kernel<<<grid_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(dm, g, n, dg);
  return launched();
}

int column_sum_cuda(const float* m, int32_t n, int32_t C, float* out, float* scratch, void* stream) {
  if (C <= 0 || n <= 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  const int chunks = (n + kColumnSumChunk - 1) / kColumnSumChunk;
  column_partial_kernel<<<dim3((C + 31) / 32, chunks), dim3(32, 8), 0, st>>>(m, n, C, scratch);
  column_total_kernel<<<(C + 255) / 256, 256, 0, st>>>(scratch, chunks, C, out);
  return launched();
}

int rope_cuda(float* v, int32_t T, int32_t heads, int32_t D, int32_t seq_len, const float* cos_sin, bool inverse,
              void* stream) {
  const int64_t pairs = static_cast<int64_t>(T) * heads * (D / 2);
  if (pairs <= 0) return 0;
  if (D % 2 != 0 || seq_len <= 0) return static_cast<int>(cudaErrorInvalidValue);
  rope_kernel<<<grid_for(pairs, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(v, pairs, heads, D, seq_len, cos_sin,
                                                                                   inverse);
  return launched();
}

int split_heads_cuda(const float* src, int64_t stride, int32_t B, int32_t n, int32_t heads, int32_t D, int32_t rep,
                     float* dst, void* stream) {
  const int64_t total = static_cast<int64_t>(B) * heads * rep * n * D;
  if (total <= 0) return 0;
  split_heads_kernel<<<grid_for(total, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(src, stride, total, n, heads,
                                                                                          D, rep, dst);
  return launched();
}

int merge_heads_cuda(const float* src, int32_t B, int32_t n, int32_t heads, int32_t D, int32_t group, float* dst,
                     int64_t stride, void* stream) {
  const int64_t total = static_cast<int64_t>(B) * n * heads * D;
  if (total <= 0) return 0;
  merge_heads_kernel<<<grid_for(total, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(src, total, n, heads, D,
                                                                                          group, dst, stride);
  return launched();
}

int causal_softmax_cuda(float* s, int64_t rows, int32_t n, int32_t window, void* stream) {
  if (rows <= 0) return 0;
  if (rows > INT32_MAX) return static_cast<int>(cudaErrorInvalidValue);
  causal_softmax_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(s, n, window);
  return launched();
}

int softmax_backward_cuda(const float* p, float* dp, int64_t rows, int32_t n, int32_t window, float scale,
                          void* stream) {
  if (rows <= 0) return 0;
  if (rows > INT32_MAX) return static_cast<int>(cudaErrorInvalidValue);
  softmax_backward_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      p, dp, n, window, scale);
  return launched();
}

int swiglu_forward_cuda(const float* g, const float* u, int64_t n, float* m, void* stream) {
  if (n <= 0) return 0;
  swiglu_forward_kernel<<<grid_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(g, u, n, m);
  return launched();
}

int swiglu_backward_cuda(const float* dm, const float* g, const float* u, int64_t n, float* dg, float* du,
                         void* stream) {
  if (n <= 0) return 0;
  swiglu_backward_kernel<<<grid_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(dm, g, u, n, dg, du);
  return launched();
}

int accumulate_cuda(float* y, const float* x, int64_t n, void* stream) {
  if (n <= 0) return 0;
  accumulate_kernel<<<grid_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(y, x, n);
  return launched();
}

int bias_add_cuda(float* y, const float* b, int64_t rows, int32_t C, void* stream) {
  return bias_copy_cuda(y, b, rows, C, y, stream);
}

int bias_copy_cuda(const float* x, const float* b, int64_t rows, int32_t C, float* y, void* stream) {
  const int64_t n = rows * C;
  if (n <= 0) return 0;
  bias_add_kernel<<<grid_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(x, b, n, C, y);
  return launched();
}

int embedding_backward_cuda(const float* dx, const int32_t* order, const int32_t* starts, const int32_t* unique,
                            int32_t n_unique, int32_t H, float* dtable, void* stream) {
  if (n_unique <= 0) return 0;
  embedding_backward_kernel<<<n_unique, 128, 0, static_cast<cudaStream_t>(stream)>>>(dx, order, starts, unique, H,
                                                                                     dtable);
  return launched();
}

int cross_entropy_cuda(float* logits, const int32_t* targets, int32_t rows, int32_t V, float weight, bool grad,
                       float* loss, void* stream) {
  if (rows <= 0) return 0;
  cross_entropy_kernel<<<rows, kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(logits, targets, V, weight, grad,
                                                                                    loss);
  return launched();
}

int adamw_cuda(float* p, const float* g, float* m, float* v, int64_t n, int64_t decayed, double lr, double beta1,
               double beta2, double eps, double decay, double c1, double c2, void* stream) {
  if (n <= 0) return 0;
  adamw_kernel<<<grid_for(n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(p, g, m, v, n, decayed, lr, beta1, beta2,
                                                                                eps, decay, c1, c2);
  return launched();
}

int sum_squares_cuda(const float* x, int64_t n, double* scratch, double* out, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t wanted = (n + kSquareThreads - 1) / kSquareThreads;
  const int parts = static_cast<int>(wanted < kSumSquaresScratch ? (wanted > 0 ? wanted : 1) : kSumSquaresScratch);
  sum_squares_partial_kernel<<<parts, kSquareThreads, 0, s>>>(x, n, scratch);
  sum_squares_final_kernel<<<1, kSquareThreads, 0, s>>>(scratch, parts, out);
  return launched();
}

}  // namespace loom::kernels
