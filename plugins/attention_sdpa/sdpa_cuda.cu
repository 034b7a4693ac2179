// sdpa on CUDA: the GPU reference. Clear over fast, like the CPU path it mirrors: the same cache
// format (loom_kv_format.hpp: keys then values per block in f32, bf16, int8 or fp8, the last two
// with a float32 scale per row, quantized by the same functions, so the stored bytes equal the
// CPU's), float32 arithmetic throughout, and the same three steps per (token, head): the max
// score, the softmax denominator, then the weighted sum of values.
//
// One CTA per (token, query head). A CTA finds its sequence by binary search in seq_offsets and
// reads positions and the block table on the device. Entries that point outside the pool make
// the key be skipped (and a new key not be written), so bad device data cannot fault.
#include <cuda_bf16.h>

#include <cmath>

#include "sdpa_cuda_kernels.hpp"

namespace loomp::sdpa {
namespace {

constexpr int kThreads = 128;
constexpr int kChunk = 256;  // softmax weights staged in shared memory per step of the value sum

__device__ float to_float(float x) { return x; }
__device__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
__device__ T from_float(float x);
template <>
__device__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The largest s with off[s] <= t: the sequence that holds token t.
__device__ int seq_of_token(const int32_t* off, int n_seqs, int t) {
  int lo = 0, hi = n_seqs;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (off[mid] <= t) lo = mid;
    else hi = mid;
  }
  return lo;
}

// The pool block holding position pos of sequence s; nullptr when the block table has no valid
// block there.
__device__ uint8_t* cache_block(const CudaProblem& p, int s, int64_t pos) {
  if (pos < 0 || pos / p.block_size >= p.table_cols) return nullptr;
  const int block = p.block_table[static_cast<int64_t>(s) * p.table_cols + pos / p.block_size];
  if (block < 0 || block >= p.pool_blocks) return nullptr;
  return p.pool + static_cast<int64_t>(block) * p.bytes_per_block;
}

// A cache row of D elements and its scale (0 for formats without scales).
struct CacheRow {
  uint8_t* data = nullptr;
  float scale = 0.0f;
};

// The key (which = 0) or value (which = 1) row of (sequence s, position pos, kv head h); data is
// nullptr when the block table has no valid block there.
__device__ CacheRow cache_row(const CudaProblem& p, int s, int64_t pos, int h, int which) {
  CacheRow r;
  uint8_t* block = cache_block(p, s, pos);
  if (block == nullptr) return r;
  const int64_t row = p.kv.row(which, pos % p.block_size, h);
  r.data = p.kv.row_data(block, row);
  if (kv_quantized(p.kv.format)) r.scale = *p.kv.row_scale(block, row);
  return r;
}

__device__ int64_t position_of(const CudaProblem& p, int s, int t) {
  return static_cast<int64_t>(p.seq_positions[s]) + t - p.seq_offsets[s];
}

// One warp per new key or value row (token, kv head, which): the lanes reduce the row's absmax
// for its scale (quantized formats), then store D elements strided by 32. A warp's lanes share
// one row, so the early exits below are warp-uniform and the full-mask shuffles are safe.
template <class T>
__global__ void cache_write_kernel(const CudaProblem p) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (row >= static_cast<int64_t>(p.n_tokens) * p.n_kv_heads * 2) return;
  const int which = static_cast<int>(row % 2);
  const int64_t token_head = row / 2;
  const int h = static_cast<int>(token_head % p.n_kv_heads);
  const int t = static_cast<int>(token_head / p.n_kv_heads);
  const int s = seq_of_token(p.seq_offsets, p.n_seqs, t);
  uint8_t* block = cache_block(p, s, position_of(p, s, t));
  if (block == nullptr) return;
  const T* src = static_cast<const T*>(which == 0 ? p.k : p.v) + token_head * p.head_dim;
  const int64_t r = p.kv.row(which, position_of(p, s, t) % p.block_size, h);
  const KvFormat format = p.kv.format;
  float scale = 0.0f;
  if (kv_quantized(format)) {
    float absmax = 0.0f;
    for (int d = lane; d < p.head_dim; d += 32) absmax = fmaxf(absmax, fabsf(to_float(src[d])));
    for (int o = 16; o > 0; o /= 2) absmax = fmaxf(absmax, __shfl_xor_sync(0xffffffffu, absmax, o));
    scale = kv_scale(absmax, format);
    if (lane == 0) *p.kv.row_scale(block, r) = scale;
  }
  uint8_t* dst = p.kv.row_data(block, r);
  for (int d = lane; d < p.head_dim; d += 32) kv_store(dst, d, to_float(src[d]), scale, format);
}

__device__ float block_max(float x, float* red) {
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  float r = -INFINITY;
  for (int w = 0; w < kThreads / 32; ++w) r = fmaxf(r, red[w]);
  __syncthreads();  // red is reused by the next reduction
  return r;
}

__device__ float block_sum(float x, float* red) {
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  float r = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) r += red[w];
  __syncthreads();
  return r;
}

// Shared memory: q [D] and acc [D] as float, the weights of one chunk, the reduction slots.
template <class T>
__global__ void __launch_bounds__(kThreads) attention_kernel(const CudaProblem p) {
  extern __shared__ float smem[];
  float* q = smem;
  float* acc = q + p.head_dim;
  float* w = acc + p.head_dim;
  float* red = w + kChunk;

  const int t = static_cast<int>(blockIdx.x);
  const int h = static_cast<int>(blockIdx.y);
  const int kvh = h / (p.n_heads / p.n_kv_heads);
  const int s = seq_of_token(p.seq_offsets, p.n_seqs, t);
  const int64_t pos = position_of(p, s, t);
  const int64_t n_new = static_cast<int64_t>(p.seq_offsets[s + 1]) - p.seq_offsets[s];
  const int64_t total = static_cast<int64_t>(p.seq_positions[s]) + n_new;
  // Keys [lo, hi] as in the CPU path: causal stops at the token's own position, the window keeps
  // keys with position > pos - window; hi is capped by the positions the table can address.
  int64_t hi = p.causal ? pos : total - 1;
  hi = min(hi, static_cast<int64_t>(p.table_cols) * p.block_size - 1);
  const int64_t lo = p.window > 0 ? max(int64_t{0}, pos - p.window + 1) : 0;

  const T* q_in = static_cast<const T*>(p.q) + (static_cast<int64_t>(t) * p.n_heads + h) * p.head_dim;
  for (int d = threadIdx.x; d < p.head_dim; d += kThreads) {
    q[d] = to_float(q_in[d]);
    acc[d] = 0.0f;
  }
  __syncthreads();

  const KvFormat format = p.kv.format;
  auto score = [&](int64_t j) {
    const CacheRow key = cache_row(p, s, j, kvh, 0);
    if (key.data == nullptr) return -INFINITY;
    float dot = 0.0f;
    for (int d = 0; d < p.head_dim; ++d) dot += q[d] * kv_load(key.data, d, key.scale, format);
    return dot * p.scale;
  };

  // 1. The max score keeps exp() in range.
  float mx = -INFINITY;
  for (int64_t j = lo + threadIdx.x; j <= hi; j += kThreads) mx = fmaxf(mx, score(j));
  mx = block_max(mx, red);

  // 2. The softmax denominator.
  float denom = 0.0f;
  for (int64_t j = lo + threadIdx.x; j <= hi; j += kThreads) {
    const float sc = score(j);
    if (sc != -INFINITY) denom += expf(sc - mx);
  }
  denom = block_sum(denom, red);

  // 3. out = sum_j (exp(score_j - max) / denom) * v_j, a chunk of weights at a time.
  for (int64_t c0 = lo; c0 <= hi; c0 += kChunk) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kChunk), hi - c0 + 1));
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const float sc = score(c0 + i);
      w[i] = sc == -INFINITY ? 0.0f : expf(sc - mx) / denom;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < p.head_dim; d += kThreads) {
      float a = acc[d];
      for (int i = 0; i < n; ++i) {
        if (w[i] == 0.0f) continue;
        const CacheRow value = cache_row(p, s, c0 + i, kvh, 1);
        a += w[i] * kv_load(value.data, d, value.scale, format);
      }
      acc[d] = a;
    }
    __syncthreads();
  }

  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(t) * p.n_heads + h) * p.head_dim;
  for (int d = threadIdx.x; d < p.head_dim; d += kThreads) out[d] = from_float<T>(acc[d]);
}

template <class T>
cudaError_t launch(const CudaProblem& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.n_tokens) * p.n_kv_heads * 2;  // a warp each
  cache_write_kernel<T><<<static_cast<unsigned>((rows * 32 + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const size_t smem = (2 * static_cast<size_t>(p.head_dim) + kChunk + 32) * sizeof(float);
  if (smem > 48 * 1024) {
    e = cudaFuncSetAttribute(attention_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  attention_kernel<T><<<dim3(static_cast<unsigned>(p.n_tokens), static_cast<unsigned>(p.n_heads)), kThreads, smem,
                        stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_cuda(const CudaProblem& p, cudaStream_t stream) {
  if (p.n_tokens == 0) return cudaSuccess;
  return p.bf16 ? launch<__nv_bfloat16>(p, stream) : launch<float>(p, stream);
}

}  // namespace loomp::sdpa
