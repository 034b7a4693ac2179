// Fused causal attention for training (loom/kernels/train.hpp: flash_attention_forward_cuda and
// flash_attention_backward_cuda), the FlashAttention-2 scheme on bfloat16 tensor cores (WMMA):
// the [n, n] scores never reach global memory. The forward keeps each query row's log-sum-exp,
// from which the backward recomputes the probabilities a block at a time.
//
// Layout: q, k, v, o, dO, dq, dk, dv are the trainer's token-major float32 rows (train.hpp), read
// in place at their strides and rounded to bfloat16 as they are staged into shared memory;
// products accumulate in float32. Blocks of kBlock queries and kBlock keys; kWarps warps, each
// owning 16 rows of a block. Forward: a CTA per (query block, query head) walks the key blocks its
// queries see. Backward: a CTA per (key block, kv head) walks the query blocks that see its keys,
// for each query head of its group in turn, accumulating dK and dV; then a CTA per (query block,
// query head) walks its key blocks again for dQ (recomputing S, dP and dS instead of adding dQ
// atomically, so that a step gives the same bits every time). Each warp keeps its rows of O, dK,
// dV or dQ in WMMA accumulators across the whole walk; S, P, dP and dS pass through shared memory,
// where each lane pair works on one row.
#include "loom/kernels/train.hpp"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace loom::kernels {
namespace {

namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;

constexpr int kBlock = 64;              // queries or keys a block
constexpr int kWarps = kBlock / 16;     // a warp per 16 rows
constexpr int kThreads = kWarps * 32;
constexpr int kHalfPad = 8;             // bf16 row padding (keeps WMMA pointers 32-byte aligned)
constexpr int kFloatPad = 4;
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct Dims {
  static constexpr int kH = D + kHalfPad;        // bf16 tile row stride (elements)
  static constexpr int kS = kBlock + kFloatPad;  // float score row stride
  static constexpr int kHalfTile = kBlock * kH;  // elements
  static constexpr int kP = kBlock + kHalfPad;   // bf16 row stride of a [query][key] tile (P, dS)
  static constexpr int kPTile = kBlock * kP;
};

// The operands of one call (train.hpp's layout): pointers to row 0 of head 0 of sequence 0.
struct Args {
  const float *q, *k, *v, *o, *dout, *lse;
  float *out, *lse_out, *delta, *dq, *dk, *dv;
  int64_t q_stride, kv_stride, o_stride, dq_stride, dkv_stride;
  int n, heads, group, window;
  float scale;
};

// Offset of position 0 of head `head_in_row` (its D columns) of sequence b in rows of `stride`.
template <int D>
__device__ __forceinline__ int64_t head_origin(int b, int n, int64_t stride, int head_in_row) {
  return static_cast<int64_t>(b) * n * stride + static_cast<int64_t>(head_in_row) * D;
}

// rows [row0, row0 + kBlock) of a head (src: its position 0, rows `stride` floats apart) into dst
// [kBlock][kH] bfloat16; zeros past n.
template <int D>
__device__ __forceinline__ void stage(const float* src, int64_t stride, int n, int row0, bf16* dst) {
  constexpr int kQuads = D / 4;
  for (int e = threadIdx.x; e < kBlock * kQuads; e += kThreads) {
    const int r = e / kQuads, c = (e % kQuads) * 4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row0 + r < n) v = *reinterpret_cast<const float4*>(src + static_cast<int64_t>(row0 + r) * stride + c);
    // one 8-byte store (c is a multiple of 4 and kH of 8: aligned)
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    uint2 packed;
    packed.x = *reinterpret_cast<const uint32_t*>(&lo);
    packed.y = *reinterpret_cast<const uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(dst + r * Dims<D>::kH + c) = packed;
  }
}

// Key block k0 of kv head kv_head of sequence b: its k and v rows into shared memory.
template <int D>
__device__ __forceinline__ void stage_keys(const Args& a, int b, int kv_head, int k0, bf16* ks, bf16* vs) {
  const int64_t origin = head_origin<D>(b, a.n, a.kv_stride, kv_head);
  stage<D>(a.k + origin, a.kv_stride, a.n, k0, ks);
  stage<D>(a.v + origin, a.kv_stride, a.n, k0, vs);
}

// Whether query i sees key j (causal, and within the window when window > 0).
__device__ __forceinline__ bool visible(int i, int j, int n, int window) {
  return j <= i && j < n && (window <= 0 || i - j < window);
}

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// out[16 x kBlock] (float, stride ldo) = a[16 x D] (rows of A, stride lda) b^T, b [kBlock x D] rows
// (stride ldb): each A fragment loaded once, the block's four column tiles accumulated together.
template <int D>
__device__ __forceinline__ void rows_times_rows_t(const bf16* a, int lda, const bf16* b, int ldb, float* out, int ldo) {
  Acc acc[kBlock / 16];
  for (auto& f : acc) wmma::fill_fragment(f, 0.0f);
  for (int k = 0; k < D / 16; ++k) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + k * 16, lda);
    for (int c = 0; c < kBlock / 16; ++c) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb;  // b^T: b's rows are its columns
      wmma::load_matrix_sync(fb, b + c * 16 * ldb + k * 16, ldb);
      wmma::mma_sync(acc[c], fa, fb, acc[c]);
    }
  }
  for (int c = 0; c < kBlock / 16; ++c) wmma::store_matrix_sync(out + c * 16, acc[c], ldo, wmma::mem_row_major);
}

// acc (a 16 x D product in registers, D / 16 tiles) += a[16 x kBlock] b, b [kBlock x D] (stride
// ldb); ATransposed: a is read as the transpose of a [kBlock x 16] column block (stride lda).
template <int D, bool ATransposed>
__device__ __forceinline__ void accumulate(Acc (&acc)[D / 16], const bf16* a, int lda, const bf16* b, int ldb) {
  using ALayout = std::conditional_t<ATransposed, wmma::col_major, wmma::row_major>;
  for (int k = 0; k < kBlock / 16; ++k) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, ALayout> fa;
    // row-major a: its k-th 16 columns; transposed: rows k*16.. of the column block.
    wmma::load_matrix_sync(fa, ATransposed ? a + k * 16 * lda : a + k * 16, lda);
    for (int c = 0; c < D / 16; ++c) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, b + k * 16 * ldb + c * 16, ldb);
      wmma::mma_sync(acc[c], fa, fb, acc[c]);
    }
  }
}

// A warp's 16 rows of a 16 x D product in registers into `rows` [16][ldr] floats (its own rows, so
// only the warp synchronises), then row r's D values to dst + r * stride (r < valid), scaled by
// row_scale[r] where given.
template <int D>
__device__ __forceinline__ void write_rows(const Acc (&acc)[D / 16], float* rows, int ldr, int valid, float* dst,
                                           int64_t stride, const float* row_scale) {
  for (int c = 0; c < D / 16; ++c) wmma::store_matrix_sync(rows + c * 16, acc[c], ldr, wmma::mem_row_major);
  __syncwarp();
  const int lane = threadIdx.x % 32;
  for (int e = lane; e < 16 * D; e += 32) {
    const int r = e / D, c = e % D;
    if (r < valid) dst[r * stride + c] = rows[r * ldr + c] * (row_scale ? row_scale[r] : 1.0f);
  }
  __syncwarp();
}

// Which row of its 16 x 16 tile each element of this lane's accumulator fragment holds. WMMA leaves
// the layout unspecified, so it is learnt: a tile whose entries are their row numbers is loaded into
// a fragment (scratch: the warp's own 16 x 16 floats, stride ld).
__device__ __forceinline__ void fragment_rows(float* scratch, int ld, int (&rows)[Acc::num_elements]) {
  const int lane = threadIdx.x % 32;
  for (int e = lane; e < 256; e += 32) scratch[(e / 16) * ld + e % 16] = static_cast<float>(e / 16);
  __syncwarp();
  Acc probe;
  wmma::load_matrix_sync(probe, scratch, ld, wmma::mem_row_major);
  for (int e = 0; e < Acc::num_elements; ++e) rows[e] = static_cast<int>(probe.x[e]);
  __syncwarp();
}

// The score column a lane handles at step c of its half row (c < kBlock / 2): the half's columns
// rotated by the row's place, so that the 32 lanes of a warp (16 rows at a float stride of 4 mod
// 32 banks, two halves) touch 32 different banks at each step.
__device__ __forceinline__ int score_column(int c, int half) {
  const int lane = threadIdx.x % 32, rotation = 2 * (lane / 16) + half;
  return half * (kBlock / 2) + ((c + rotation) & (kBlock / 2 - 1));
}

template <int D>
__global__ void __launch_bounds__(kThreads, 4) flash_forward_kernel(Args a) {
  using Dm = Dims<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);
  bf16* ks = qs + Dm::kHalfTile;
  bf16* vs = ks + Dm::kHalfTile;
  bf16* ps = vs + Dm::kHalfTile;
  float* ss = reinterpret_cast<float*>(ps + Dm::kPTile);  // [kBlock][kS]: scores, at the end O
  float* row_s = ss + kBlock * Dm::kS;                     // [kBlock]: each row's rescale, then 1 / sum
  const int head = blockIdx.y, q0 = blockIdx.x * kBlock, n = a.n, window = a.window;
  const int b = head / a.heads, h = head % a.heads;
  const float* qh = a.q + head_origin<D>(b, n, a.q_stride, h);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Lane pair (2r, 2r + 1) of a warp owns row 16 warp + r; each lane half of its columns.
  const int row = 16 * warp + lane / 2, half = lane % 2, i = q0 + row;
  float* warp_s = ss + 16 * warp * Dm::kS;
  int frag_row[Acc::num_elements];
  fragment_rows(warp_s, Dm::kS, frag_row);
  Acc o_acc[D / 16];  // the warp's 16 rows of O, unnormalised
  for (auto& f : o_acc) wmma::fill_fragment(f, 0.0f);
  stage<D>(qh, a.q_stride, n, q0, qs);
  float m = -INFINITY, l = 0.0f;  // the row's running max (log2 units) and sum
  const float scale2 = a.scale * kLog2e;
  const int last_key = min(n, q0 + kBlock) - 1;
  const int first_key = window > 0 ? max(0, q0 - window + 1) : 0;
  for (int k0 = first_key / kBlock * kBlock; k0 <= last_key; k0 += kBlock) {
    __syncthreads();  // the previous block's keys and values are no longer read
    stage_keys<D>(a, b, h / a.group, k0, ks, vs);
    __syncthreads();
    rows_times_rows_t<D>(qs + 16 * warp * Dm::kH, Dm::kH, ks, Dm::kH, warp_s, Dm::kS);
    __syncwarp();
    float* srow = ss + row * Dm::kS;
    float block_max = -INFINITY;
    for (int c = 0; c < kBlock / 2; ++c) {
      const int col = score_column(c, half);
      const float s = visible(i, k0 + col, n, window) ? srow[col] * scale2 : -INFINITY;
      srow[col] = s;
      block_max = fmaxf(block_max, s);
    }
    block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
    const float m_new = fmaxf(m, block_max);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // (no key seen yet: every p is 0)
    const float alpha = exp2f(m - m_use);
    float sum = 0.0f;
    bf16* prow = ps + row * Dm::kP;
    for (int c = 0; c < kBlock / 2; ++c) {
      const int col = score_column(c, half);
      const float p = exp2f(srow[col] - m_use);
      sum += p;
      prow[col] = __float2bfloat16_rn(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = m_new;
    if (half == 0) row_s[row] = alpha;
    __syncwarp();
    for (auto& f : o_acc)
      for (int e = 0; e < Acc::num_elements; ++e) f.x[e] *= row_s[16 * warp + frag_row[e]];
    accumulate<D, false>(o_acc, ps + 16 * warp * Dm::kP, Dm::kP, vs, Dm::kH);
    __syncwarp();
  }
  if (half == 0) row_s[row] = l > 0.0f ? 1.0f / l : 0.0f;
  if (half == 0 && i < n) a.lse_out[static_cast<int64_t>(head) * n + i] = l > 0.0f ? m + log2f(l) : INFINITY;
  __syncwarp();
  write_rows<D>(o_acc, warp_s, Dm::kS, n - (q0 + 16 * warp),
                a.out + head_origin<D>(b, n, a.o_stride, h) + static_cast<int64_t>(q0 + 16 * warp) * a.o_stride, a.o_stride,
                row_s + 16 * warp);
}

// delta[b heads + h][i] = sum_d dO o of query head h at token t = b n + i (both at o_stride): a
// warp a (token, head).
template <int D>
__global__ void row_dot_kernel(Args a, int64_t rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t t = r / a.heads, h = r % a.heads, at = t * a.o_stride + h * D;
  float s = 0.0f;
  for (int c = lane; c < D; c += 32) s += a.dout[at + c] * a.o[at + c];
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) a.delta[((t / a.n) * a.heads + h) * a.n + t % a.n] = s;
}

// The probability of query i (row `srow` of scores, log2-sum-exp l2) for key k0 + col: recomputed
// from the forward's lse, 0 where the key is not seen or the query is past n.
__device__ __forceinline__ float probability(const float* srow, int col, int i, int k0, int n, int window, float scale2,
                                             float l2) {
  return visible(i, k0 + col, n, window) && i < n ? exp2f(srow[col] * scale2 - l2) : 0.0f;
}

// dS of this lane's half row of a (query block, key block) tile, from the block's scores and dP
// rows (ss, dps: [kBlock][kS]) and the queries' lse and delta. (dS from the float P here, for dQ;
// the dK/dV kernel takes it from the bfloat16 P it multiplies, so the two differ within bfloat16
// rounding.)
template <int D>
__device__ __forceinline__ void score_gradients_of_scores(const float* ss, const float* dps, const float* lse_s,
                                                          const float* delta_s, int q0, int k0, int n, int window,
                                                          float scale, bf16* dss) {
  using Dm = Dims<D>;
  const int lane = threadIdx.x % 32, row = 16 * (threadIdx.x / 32) + lane / 2, half = lane % 2, i = q0 + row;
  const float scale2 = scale * kLog2e, l2 = lse_s[row], dl = delta_s[row];
  const float* srow = ss + row * Dm::kS;
  const float* dprow = dps + row * Dm::kS;
  for (int c = 0; c < kBlock / 2; ++c) {
    const int col = score_column(c, half);
    const float p = probability(srow, col, i, k0, n, window, scale2, l2);
    dss[row * Dm::kP + col] = __float2bfloat16_rn(p * (dprow[col] - dl) * scale);
  }
}

// The dK/dV kernel's two steps, its dP overwriting its scores (one fewer float tile,
// so that three of its CTAs fit an SM): P from this lane's half row of scores into ps, then dS from
// its half row of dP and that P (bfloat16, as the products read it).
template <int D>
__device__ __forceinline__ void probabilities(const float* ss, const float* lse_s, int q0, int k0, int n, int window,
                                              float scale, bf16* ps) {
  using Dm = Dims<D>;
  const int lane = threadIdx.x % 32, row = 16 * (threadIdx.x / 32) + lane / 2, half = lane % 2, i = q0 + row;
  const float scale2 = scale * kLog2e, l2 = lse_s[row];
  const float* srow = ss + row * Dm::kS;
  for (int c = 0; c < kBlock / 2; ++c) {
    const int col = score_column(c, half);
    ps[row * Dm::kP + col] = __float2bfloat16_rn(probability(srow, col, i, k0, n, window, scale2, l2));
  }
}
template <int D>
__device__ __forceinline__ void score_gradients(const float* dps, const bf16* ps, const float* delta_s, float scale,
                                                bf16* dss) {
  using Dm = Dims<D>;
  const int lane = threadIdx.x % 32, row = 16 * (threadIdx.x / 32) + lane / 2, half = lane % 2;
  const float dl = delta_s[row];
  const float* dprow = dps + row * Dm::kS;
  for (int c = 0; c < kBlock / 2; ++c) {
    const int col = score_column(c, half), at = row * Dm::kP + col;
    dss[at] = __float2bfloat16_rn(__bfloat162float(ps[at]) * (dprow[col] - dl) * scale);
  }
}

// The backward's query block q0 of query head h of sequence b into shared memory: its q and dO
// rows, and its lse and delta (past n: P and dS come out 0).
template <int D>
__device__ __forceinline__ void stage_queries(const Args& a, int b, int h, int q0, bf16* qs, bf16* dos, float* lse_s,
                                              float* delta_s) {
  const int n = a.n;
  stage<D>(a.q + head_origin<D>(b, n, a.q_stride, h), a.q_stride, n, q0, qs);
  stage<D>(a.dout + head_origin<D>(b, n, a.o_stride, h), a.o_stride, n, q0, dos);
  const int64_t head = static_cast<int64_t>(b) * a.heads + h;
  for (int r = threadIdx.x; r < kBlock; r += kThreads) {
    const bool in = q0 + r < n;
    lse_s[r] = in ? a.lse[head * n + q0 + r] : INFINITY;
    delta_s[r] = in ? a.delta[head * n + q0 + r] : 0.0f;
  }
}


// dK and dV of one key block: a CTA per (key block, kv head) over the query blocks that see it,
// for each query head of the group in turn.
template <int D>
__global__ void __launch_bounds__(kThreads, 3) flash_dkdv_kernel(Args a) {
  using Dm = Dims<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* ks = reinterpret_cast<bf16*>(smem);
  bf16* vs = ks + Dm::kHalfTile;
  bf16* qs = vs + Dm::kHalfTile;
  bf16* dos = qs + Dm::kHalfTile;
  bf16* ps = dos + Dm::kHalfTile;
  bf16* dss = ps + Dm::kPTile;
  float* ss = reinterpret_cast<float*>(dss + Dm::kPTile);  // scores, then dP; at the end dK and dV
  float* lse_s = ss + kBlock * Dm::kS;  // [kBlock]
  float* delta_s = lse_s + kBlock;
  const int n = a.n, window = a.window, k0 = blockIdx.x * kBlock;
  const int kv_heads = a.heads / a.group, b = blockIdx.y / kv_heads, kv_head = blockIdx.y % kv_heads;
  const int warp = threadIdx.x / 32;
  const float scale = a.scale;
  stage_keys<D>(a, b, kv_head, k0, ks, vs);
  Acc dk_acc[D / 16], dv_acc[D / 16];  // the warp's 16 keys
  for (auto& f : dk_acc) wmma::fill_fragment(f, 0.0f);
  for (auto& f : dv_acc) wmma::fill_fragment(f, 0.0f);
  const int last_key = min(n, k0 + kBlock) - 1;
  // Queries that see these keys: from the first key on, to the last key plus the window.
  const int last_query =
      window > 0 ? static_cast<int>(min(static_cast<int64_t>(n) - 1, static_cast<int64_t>(last_key) + window - 1)) : n - 1;
  const int per_head = (last_query - k0) / kBlock + 1;  // query blocks a query head
  for (int step = 0; step < a.group * per_head; ++step) {
    // (query head g of the group, query block q0), the group's heads one after another
    const int g = step / per_head, q0 = k0 + (step % per_head) * kBlock;
    __syncthreads();  // the previous query block is no longer read
    stage_queries<D>(a, b, kv_head * a.group + g, q0, qs, dos, lse_s, delta_s);
    __syncthreads();
    // This warp's 16 queries against the block's keys: S = Q K^T, P, then dP = dO V^T in S's place.
    rows_times_rows_t<D>(qs + 16 * warp * Dm::kH, Dm::kH, ks, Dm::kH, ss + 16 * warp * Dm::kS, Dm::kS);
    __syncwarp();
    probabilities<D>(ss, lse_s, q0, k0, n, window, scale, ps);
    __syncwarp();
    rows_times_rows_t<D>(dos + 16 * warp * Dm::kH, Dm::kH, vs, Dm::kH, ss + 16 * warp * Dm::kS, Dm::kS);
    __syncwarp();
    score_gradients<D>(ss, ps, delta_s, scale, dss);
    __syncthreads();  // every warp's P and dS rows are in
    // This warp's 16 keys: dV += P^T dO, dK += dS^T Q.
    accumulate<D, true>(dv_acc, ps + 16 * warp, Dm::kP, dos, Dm::kH);
    accumulate<D, true>(dk_acc, dss + 16 * warp, Dm::kP, qs, Dm::kH);
  }
  // (the warp's own rows of ss: its last dP rows were read before the products above)
  const int64_t at = head_origin<D>(b, n, a.dkv_stride, kv_head) + static_cast<int64_t>(k0 + 16 * warp) * a.dkv_stride;
  const int valid = n - (k0 + 16 * warp);
  write_rows<D>(dk_acc, ss + 16 * warp * Dm::kS, Dm::kS, valid, a.dk + at, a.dkv_stride, nullptr);
  write_rows<D>(dv_acc, ss + 16 * warp * Dm::kS, Dm::kS, valid, a.dv + at, a.dkv_stride, nullptr);
}

// dQ of one query block: a CTA per (query block, head) over the key blocks it sees, recomputing
// S, dP and dS (a second pass rather than atomic adds from the key blocks' CTAs, so that a step
// gives the same bits every time).
template <int D>
__global__ void __launch_bounds__(kThreads, 2) flash_dq_kernel(Args a) {
  using Dm = Dims<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);
  bf16* dos = qs + Dm::kHalfTile;
  bf16* ks = dos + Dm::kHalfTile;
  bf16* vs = ks + Dm::kHalfTile;
  bf16* dss = vs + Dm::kHalfTile;
  float* ss = reinterpret_cast<float*>(dss + Dm::kPTile);
  float* dps = ss + kBlock * Dm::kS;
  float* lse_s = dps + kBlock * Dm::kS;  // [kBlock]
  float* delta_s = lse_s + kBlock;
  const int head = blockIdx.y, q0 = blockIdx.x * kBlock, n = a.n, window = a.window;
  const int b = head / a.heads, h = head % a.heads;
  const int warp = threadIdx.x / 32;
  const float scale = a.scale;
  stage_queries<D>(a, b, h, q0, qs, dos, lse_s, delta_s);
  Acc dq_acc[D / 16];  // the warp's 16 queries
  for (auto& f : dq_acc) wmma::fill_fragment(f, 0.0f);
  const int last_key = min(n, q0 + kBlock) - 1;
  const int first_key = window > 0 ? max(0, q0 - window + 1) : 0;
  for (int k0 = first_key / kBlock * kBlock; k0 <= last_key; k0 += kBlock) {
    __syncthreads();  // the previous block's keys are no longer read
    stage_keys<D>(a, b, h / a.group, k0, ks, vs);
    __syncthreads();
    rows_times_rows_t<D>(qs + 16 * warp * Dm::kH, Dm::kH, ks, Dm::kH, ss + 16 * warp * Dm::kS, Dm::kS);
    rows_times_rows_t<D>(dos + 16 * warp * Dm::kH, Dm::kH, vs, Dm::kH, dps + 16 * warp * Dm::kS, Dm::kS);
    __syncwarp();
    score_gradients_of_scores<D>(ss, dps, lse_s, delta_s, q0, k0, n, window, scale, dss);
    __syncwarp();  // (a warp reads only its own dS rows)
    accumulate<D, false>(dq_acc, dss + 16 * warp * Dm::kP, Dm::kP, ks, Dm::kH);
  }
  write_rows<D>(dq_acc, ss + 16 * warp * Dm::kS, Dm::kS, n - (q0 + 16 * warp),
                a.dq + head_origin<D>(b, n, a.dq_stride, h) + static_cast<int64_t>(q0 + 16 * warp) * a.dq_stride,
                a.dq_stride, nullptr);
}

template <int D>
constexpr size_t forward_smem() {  // (54,528 bytes at D = 64: four CTAs an SM on sm_90)
  return sizeof(bf16) * (3 * Dims<D>::kHalfTile + Dims<D>::kPTile) + sizeof(float) * kBlock * (Dims<D>::kS + 1);
}
template <int D>
constexpr size_t dkdv_smem() {  // (73,216 bytes at D = 64: three CTAs an SM)
  return sizeof(bf16) * (4 * Dims<D>::kHalfTile + 2 * Dims<D>::kPTile) + sizeof(float) * kBlock * (Dims<D>::kS + 2);
}
template <int D>
constexpr size_t dq_smem() {
  return sizeof(bf16) * (4 * Dims<D>::kHalfTile + Dims<D>::kPTile) + sizeof(float) * kBlock * (2 * Dims<D>::kS + 2);
}

template <int D>
cudaError_t forward_of(const Args& a, int batch, cudaStream_t s) {
  constexpr size_t smem = forward_smem<D>();
  if (const cudaError_t e = cudaFuncSetAttribute(flash_forward_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
      e != cudaSuccess)
    return e;
  const dim3 grid(static_cast<unsigned>((a.n + kBlock - 1) / kBlock), static_cast<unsigned>(batch * a.heads));
  flash_forward_kernel<D><<<grid, kThreads, smem, s>>>(a);
  return cudaGetLastError();
}

template <int D>
cudaError_t backward_of(const Args& a, int batch, cudaStream_t s) {
  const int64_t rows = static_cast<int64_t>(batch) * a.heads * a.n;
  row_dot_kernel<D><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, s>>>(a, rows);
  const auto blocks = static_cast<unsigned>((a.n + kBlock - 1) / kBlock);
  if (const cudaError_t e = cudaFuncSetAttribute(flash_dkdv_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(dkdv_smem<D>()));
      e != cudaSuccess)
    return e;
  flash_dkdv_kernel<D><<<dim3(blocks, static_cast<unsigned>(batch * (a.heads / a.group))), kThreads, dkdv_smem<D>(), s>>>(a);
  if (const cudaError_t e = cudaFuncSetAttribute(flash_dq_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(dq_smem<D>()));
      e != cudaSuccess)
    return e;
  flash_dq_kernel<D><<<dim3(blocks, static_cast<unsigned>(batch * a.heads)), kThreads, dq_smem<D>(), s>>>(a);
  return cudaGetLastError();
}

// The shape's checks and the Args both calls share; false: a shape the kernels refuse.
bool args_of(const FlashAttentionShape& shape, Args& a) {
  if (!flash_attention_takes(shape)) return false;
  a.n = shape.n;
  a.heads = shape.heads;
  a.group = shape.heads / shape.kv_heads;
  a.window = shape.window;
  a.scale = shape.scale;
  return true;
}

template <typename F>
cudaError_t by_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool flash_attention_takes(int32_t head_dim) { return head_dim == 16 || head_dim == 32 || head_dim == 64; }

bool flash_attention_takes(const FlashAttentionShape& shape) {
  return flash_attention_takes(shape.head_dim) && shape.heads > 0 && shape.kv_heads > 0 &&
         shape.heads % shape.kv_heads == 0 && static_cast<int64_t>(shape.batch) * shape.heads <= 65535 && shape.window >= 0;
}

int flash_attention_forward_cuda(const FlashAttentionShape& shape, const float* q, int64_t q_stride, const float* k,
                                 const float* v, int64_t kv_stride, float* o, int64_t o_stride, float* lse, void* stream) {
  if (shape.batch <= 0 || shape.n <= 0) return 0;
  Args a{};
  // (rows are staged four floats at a time)
  if (!args_of(shape, a) || (q_stride | kv_stride | o_stride) % 4 != 0) return static_cast<int>(cudaErrorInvalidValue);
  a.q = q;
  a.k = k;
  a.v = v;
  a.out = o;
  a.lse_out = lse;
  a.q_stride = q_stride;
  a.kv_stride = kv_stride;
  a.o_stride = o_stride;
  auto s = static_cast<cudaStream_t>(stream);
  return static_cast<int>(by_head_dim(shape.head_dim, [&](auto d) { return forward_of<decltype(d)::value>(a, shape.batch, s); }));
}

int flash_attention_backward_cuda(const FlashAttentionShape& shape, const float* q, int64_t q_stride, const float* k,
                                  const float* v, int64_t kv_stride, const float* o, const float* dout, int64_t o_stride,
                                  const float* lse, float* delta, float* dq, int64_t dq_stride, float* dk, float* dv,
                                  int64_t dkv_stride, void* stream) {
  if (shape.batch <= 0 || shape.n <= 0) return 0;
  Args a{};
  if (!args_of(shape, a) || (q_stride | kv_stride | o_stride) % 4 != 0) return static_cast<int>(cudaErrorInvalidValue);
  a.q = q;
  a.k = k;
  a.v = v;
  a.o = o;
  a.dout = dout;
  a.lse = lse;
  a.delta = delta;
  a.dq = dq;
  a.dk = dk;
  a.dv = dv;
  a.q_stride = q_stride;
  a.kv_stride = kv_stride;
  a.o_stride = o_stride;
  a.dq_stride = dq_stride;
  a.dkv_stride = dkv_stride;
  auto s = static_cast<cudaStream_t>(stream);
  return static_cast<int>(by_head_dim(shape.head_dim, [&](auto d) { return backward_of<decltype(d)::value>(a, shape.batch, s); }));
}

}  // namespace loom::kernels
