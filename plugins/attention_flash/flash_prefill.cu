// Flash: FlashAttention-2-style tiled attention on tensor cores (mma.sync m16n8k16, float32
// accumulation) over the paged KV cache, for any ragged batch.
//
// Work split. A CTA (4 warps) owns a tile of 64 query rows and streams the keys it can see in
// tiles of 64, double-buffered in shared memory with cp.async; the row max and sum of the
// softmax are carried online, so scores never leave registers. A query row is a (token, head)
// pair: the `pack` query heads of one KV group that share a CTA (pack = the largest power of two
// dividing H/Hkv, at most 16) are interleaved with 64/pack tokens, so each K/V tile read from the
// cache serves every packed head. That matters most for short per-sequence chunks, where a
// tile of 64 tokens of one head would be mostly empty.
//
// Geometry depends only on the host-known T, S and the config: a 1-D grid of (ceil(T /
// tokens_per_tile) + S) tiles (enough for any split of T tokens into S sequences) times H / pack
// head groups. Each CTA finds its (sequence, tile) from seq_offsets on the device; surplus CTAs
// exit at once.
//
// Shared memory (bf16/f16 elements, rows padded by 16 bytes so that ldmatrix's eight row
// addresses fall in distinct banks): Q [64][D+8], K [2][64][D+8], V [2][64][D+8].
#include <cmath>

#include "flash_device.cuh"

namespace loomp::flash {
namespace {

constexpr int kRows = 64;     // query rows per CTA, 16 per warp
constexpr int kKeys = 64;     // keys per K/V tile
constexpr int kThreads = 128; // 4 warps

template <int D>
constexpr int kLd = D + 8;
template <int D>
constexpr int kSmemBytes = (kRows + 4 * kKeys) * kLd<D> * 2;

struct PrefillArgs : dev::BatchArgs {
  int pack_shift;   // log2(pack)
  int tile_tokens;  // kRows / pack
  int head_groups;  // H / pack
};

// Warp 0 finds which (sequence, tile) work item `x` is: sequence s owns ceil(n_s / tile_tokens)
// consecutive items, its last tile first (under causal masking the last tiles see the most keys,
// and starting them first shortens the tail). A warp-wide prefix sum walks 32 sequences at a
// time. Leaves *seq untouched when x is past the last tile.
__device__ void find_tile(const PrefillArgs& a, int x, int* seq, int* tile) {
  const int lane = threadIdx.x & 31;
  int base = 0;
  for (int s0 = 0; s0 < a.n_seqs; s0 += 32) {
    const int s = s0 + lane;
    const int n = s < a.n_seqs ? (dev::seq_span(a.off, a.n_tokens, s).count + a.tile_tokens - 1) / a.tile_tokens : 0;
    int inclusive = n;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += y;
    }
    const int first = base + inclusive - n;
    if (x >= first && x < base + inclusive) {
      *seq = s;
      *tile = n - 1 - (x - first);
    }
    base += __shfl_sync(0xffffffffu, inclusive, 31);
    if (base > x) break;
  }
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) prefill_kernel(const PrefillArgs a) {
  constexpr int LD = kLd<D>;
  constexpr int kPieces = D / 8;  // 16-byte pieces per row
  using E = dev::Elem<T>;
  extern __shared__ uint4 smem[];
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sK = sQ + kRows * LD;  // [2][kKeys][LD]
  T* const sV = sK + 2 * kKeys * LD;
  __shared__ int s_seq, s_tile;

  if (threadIdx.x == 0) s_seq = -1;
  __syncthreads();
  // Work items are numbered tile-major so that the heads of one tile start together.
  const int head_group = static_cast<int>(blockIdx.x % a.head_groups);
  if (threadIdx.x < 32) find_tile(a, static_cast<int>(blockIdx.x / a.head_groups), &s_seq, &s_tile);
  __syncthreads();
  const int s = s_seq;
  if (s < 0) return;  // surplus CTA (uniform across the block)

  const dev::SeqSpan span = dev::seq_span(a.off, a.n_tokens, s);
  const int tok0 = s_tile * a.tile_tokens;  // first token of the tile, within the sequence
  const int n_tok = min(a.tile_tokens, span.count - tok0);
  const int64_t p_first = dev::token_position(a.pos, a.off, s, span.begin + tok0);
  const int64_t total = p_first - tok0 + span.count;  // cached tokens of the sequence after this call
  const int capacity = a.pool.cols << a.pool.block_shift;
  const int pack = 1 << a.pack_shift;
  const int head0 = head_group * pack;
  const int kvh = head0 / a.group;

  // Keys any row of the tile can see: from the first row's window start to the last row's end.
  const int kv_lo = dev::key_range(p_first, total, a.causal, a.window, capacity).lo;
  const int kv_hi = dev::key_range(p_first + n_tok - 1, total, a.causal, a.window, capacity).hi;
  const int kt0 = kv_lo / kKeys;
  const int n_kt = kv_hi >= kv_lo ? kv_hi / kKeys - kt0 + 1 : 0;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;  // mma fragment coordinates
  // This thread's two accumulator rows: warp * 16 + g and warp * 16 + g + 8.
  bool row_ok[2];
  int row_lo[2], row_hi[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int tl = (warp * 16 + g + 8 * i) >> a.pack_shift;
    row_ok[i] = tl < n_tok;
    const dev::KeyRange r = dev::key_range(p_first + tl, total, a.causal, a.window, capacity);
    row_lo[i] = r.lo;
    row_hi[i] = r.hi;
  }
  const bool warp_active = ((warp * 16) >> a.pack_shift) < n_tok;

  // Q tile: row r is token tok0 + r / pack, head head0 + r % pack; missing rows read as zeros.
  const T* const q = static_cast<const T*>(a.q);
  for (int i = threadIdx.x; i < kRows * kPieces; i += kThreads) {
    const int r = i / kPieces, c = i % kPieces;
    const int tl = r >> a.pack_shift;
    const bool ok = tl < n_tok;
    const int64_t token = span.begin + tok0 + tl;
    const T* src = ok ? q + (token * a.n_heads + head0 + (r & (pack - 1))) * D + c * 8 : q;
    dev::cp_async16(sQ + r * LD + c * 8, src, ok);
  }
  dev::cp_async_commit();

  auto load_kv = [&](int kt, int buf) {
    for (int i = threadIdx.x; i < kKeys * kPieces; i += kThreads) {
      const int r = i / kPieces, c = i % kPieces;
      const int j = kt * kKeys + r;
      const int64_t at = j <= kv_hi ? a.pool.key_offset(s, j, kvh) : -1;
      const bool ok = at >= 0;
      const uint8_t* key = ok ? a.pool.base + at + c * 16 : a.pool.base;
      const uint8_t* value = ok ? key + a.pool.values_bytes : a.pool.base;
      dev::cp_async16(sK + (buf * kKeys + r) * LD + c * 8, key, ok);
      dev::cp_async16(sV + (buf * kKeys + r) * LD + c * 8, value, ok);
    }
  };
  if (n_kt > 0) load_kv(kt0, 0);
  dev::cp_async_commit();

  uint32_t qf[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nd][e] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // running max per row, log2 units
  float l[2] = {0.0f, 0.0f};            // running sum per row, this thread's columns only

  for (int it = 0; it < n_kt; ++it) {
    const int buf = it & 1;
    if (it + 1 < n_kt) load_kv(kt0 + it + 1, buf ^ 1);
    dev::cp_async_commit();
    dev::cp_async_wait<1>();  // everything but the prefetch just issued has landed
    __syncthreads();

    if (warp_active) {
      if (it == 0) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const int mi = lane >> 3;
          dev::ldmatrix_x4(qf[kk], sQ + (warp * 16 + (lane & 7) + (mi & 1) * 8) * LD + kk * 16 + (mi >> 1) * 8);
        }
      }
      const T* const k_tile = sK + buf * kKeys * LD;
      const T* const v_tile = sV + buf * kKeys * LD;

      // S = Q K^T for 16 rows x 64 keys per warp.
      float sc[kKeys / 8][4];
#pragma unroll
      for (int nb = 0; nb < kKeys / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[nb][e] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 32; ++kk)
#pragma unroll
        for (int nb = 0; nb < kKeys / 8; ++nb) {
          uint32_t b[4];
          dev::ldmatrix_x4(b, k_tile + (nb * 8 + (lane & 7)) * LD + kk * 32 + (lane >> 3) * 8);
          dev::mma_16816<T>(sc[nb], qf[2 * kk], b[0], b[1]);
          dev::mma_16816<T>(sc[nb], qf[2 * kk + 1], b[2], b[3]);
        }

      // Causal / window / padding mask, then scale into log2 units.
      const int key0 = (kt0 + it) * kKeys;
#pragma unroll
      for (int nb = 0; nb < kKeys / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1;
          const int j = key0 + nb * 8 + tq * 2 + (e & 1);
          const bool visible = row_ok[i] && j >= row_lo[i] && j <= row_hi[i];
          sc[nb][e] = visible ? sc[nb][e] * a.scale_log2 : -INFINITY;
        }

      // Online softmax: new row max (over the quad that shares a row), rescale what came before.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < kKeys / 8; ++nb) mx = fmaxf(mx, fmaxf(sc[nb][2 * i], sc[nb][2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[i], mx);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet
        const float alpha = exp2f(m[i] - m_use);
        m[i] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int nb = 0; nb < kKeys / 8; ++nb)
#pragma unroll
          for (int e = 2 * i; e < 2 * i + 2; ++e) {
            sc[nb][e] = exp2f(sc[nb][e] - m_use);
            sum += sc[nb][e];
          }
        l[i] = l[i] * alpha + sum;
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
          o[nd][2 * i] *= alpha;
          o[nd][2 * i + 1] *= alpha;
        }
      }

      // O += P V: the score accumulators become the A fragments of P directly.
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        const uint32_t pa[4] = {E::pack(sc[2 * kk][0], sc[2 * kk][1]), E::pack(sc[2 * kk][2], sc[2 * kk][3]),
                                E::pack(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                E::pack(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
        for (int nd2 = 0; nd2 < D / 16; ++nd2) {
          uint32_t b[4];
          dev::ldmatrix_x4_trans(b, v_tile + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + nd2 * 16 +
                                        (lane >> 4) * 8);
          dev::mma_16816<T>(o[2 * nd2], pa, b[0], b[1]);
          dev::mma_16816<T>(o[2 * nd2 + 1], pa, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this buffer
  }
  dev::cp_async_wait<0>();
  if (!warp_active) return;

  T* const out = static_cast<T*>(a.out);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    if (!row_ok[i]) continue;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    const int r = warp * 16 + g + 8 * i;
    const int64_t token = span.begin + tok0 + (r >> a.pack_shift);
    T* const dst = out + (token * a.n_heads + head0 + (r & (pack - 1))) * D + tq * 2;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
      *reinterpret_cast<uint32_t*>(dst + nd * 8) = E::pack(o[nd][2 * i] * inv, o[nd][2 * i + 1] * inv);
  }
}

template <class T, int D>
cudaError_t launch(const Problem& p, cudaStream_t stream) {
  PrefillArgs a;
  static_cast<dev::BatchArgs&>(a) = dev::make_batch_args(p);
  const int pack = prefill_pack(a.group);
  a.pack_shift = 0;
  while ((1 << a.pack_shift) < pack) ++a.pack_shift;
  a.tile_tokens = kRows / pack;
  a.head_groups = p.n_heads / pack;
  const int64_t tiles = (p.n_tokens + a.tile_tokens - 1) / a.tile_tokens + p.n_seqs;
  const auto grid = static_cast<unsigned>(tiles * a.head_groups);
  prefill_kernel<T, D><<<grid, kThreads, kSmemBytes<D>, stream>>>(a);
  return cudaGetLastError();
}

template <class T, int D>
cudaError_t configure() {
  return cudaFuncSetAttribute(prefill_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes<D>);
}

}  // namespace

cudaError_t configure_kernels(Dtype dtype, int head_dim) {
  if (dtype == Dtype::bf16) return head_dim == 64 ? configure<__nv_bfloat16, 64>() : configure<__nv_bfloat16, 128>();
  return head_dim == 64 ? configure<__half, 64>() : configure<__half, 128>();
}

cudaError_t launch_prefill(const Problem& p, cudaStream_t stream) {
  if (p.n_tokens == 0) return cudaSuccess;
  if (p.dtype == Dtype::bf16)
    return p.head_dim == 64 ? launch<__nv_bfloat16, 64>(p, stream) : launch<__nv_bfloat16, 128>(p, stream);
  return p.head_dim == 64 ? launch<__half, 64>(p, stream) : launch<__half, 128>(p, stream);
}

}  // namespace loomp::flash
