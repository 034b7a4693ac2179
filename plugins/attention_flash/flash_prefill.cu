// Flash: FlashAttention-style tiled attention on tensor cores (float32 accumulation) over the
// paged KV cache, for any ragged batch. Two kernels share the work split, the masking and the
// online softmax: prefill_kernel (mma.sync m16n8k16, any sm_80+ GPU, head_dim 64 and 128) and,
// on compute capability 9.0, prefill_wgmma_kernel (wgmma, head_dim 64 and 128, see there).
//
// Work split. A CTA owns a tile of kRows query rows (16 per warp and m16 tile; kMT tiles per
// warp) and streams the keys it can see in tiles of kKeys through a kStages-deep cp.async ring
// in shared memory; the row max and sum of the softmax are carried online, so scores never
// leave registers (they become the A fragments of P V directly). A query row is a (token, head)
// pair: the `pack` query heads of one KV group that share a CTA (pack = the largest power of two
// dividing H/Hkv, at most 16) are interleaved with kRows/pack tokens, so each K/V tile read from
// the cache serves every packed head. That matters most for short per-sequence chunks, where a
// tile of tokens of one head would be mostly empty. With kMT = 2 a warp's two m16 tiles share
// every K and V fragment it loads from shared memory, halving that traffic per mma.
//
// Per key tile, each warp (warpgroup for wgmma) decides from its rows' key ranges whether the
// tile is invisible to all of its rows (skipped: the causal diagonal's far side), visible to all
// (no mask: every tile left of the diagonal), or partly visible (masked per element). Scores
// stay unscaled until exp2: the max is taken raw and the scale folds into one FMA per score
// (the host makes the scale positive by negating q, exactly, when it is not).
//
// Geometry depends only on the host-known T, S and the config: a 1-D grid of (ceil(T /
// tokens_per_tile) + S) tiles (enough for any split of T tokens into S sequences) times H / pack
// head groups. Each CTA finds its (sequence, tile) from seq_offsets on the device; surplus CTAs
// exit at once. Tiles are numbered so that each sequence's last (longest under causal masking)
// tiles start first. Both kernels are programmatic dependent launches on compute capability 9.0
// and newer: their first instruction waits for the cache write before them.
//
// Shared memory of prefill_kernel (bf16/f16 elements, rows padded by 16 bytes so that
// ldmatrix's eight row addresses fall in distinct banks): Q [kRows][D+8], K [kStages][kKeys][D+8],
// V likewise. prefill_wgmma_kernel keeps its tiles 128-byte swizzled instead.
#include <climits>
#include <cmath>
#include <type_traits>

#include "flash_device.cuh"

namespace loomp::flash {
namespace {

// One tiling of the prefill kernel: warps per CTA, m16 tiles per warp, keys per K/V tile and
// shared-memory stages of K/V.
template <int D_, int Warps, int MT, int Keys, int Stages>
struct Tiling {
  static constexpr int D = D_;
  static constexpr int kMT = MT;
  static constexpr int kKeys = Keys;
  static constexpr int kStages = Stages;
  static constexpr int kThreads = 32 * Warps;
  static constexpr int kRows = 16 * MT * Warps;
  static constexpr int kLd = D + 8;
  static constexpr int kSmemBytes = (kRows + 2 * Stages * Keys) * kLd * 2;
  static_assert(Stages >= 2 && Keys % 16 == 0 && kThreads % (D / 8) == 0, "tiling");
};

struct PrefillArgs : dev::BatchArgs {
  int pack_shift;   // log2(pack)
  int tile_tokens;  // kRows / pack
  int head_groups;  // H / pack
  uint32_t q_sign;  // XORed into each packed pair of q: 0x80008000 negates q (for a negative scale)
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

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A prefill CTA's work item: its sequence, tile of tokens and head group, and the key tiles its
// rows can see (from the first row's window start to the last row's end). Both prefill kernels
// start with claim_tile().
struct TileWork {
  int s, head_group, tok0, n_tok, capacity, pack, head0, kvh, kv_lo, kv_hi, kt0, n_kt;
  int64_t p_first, total;  // position of the tile's first token; cached tokens after this call
  dev::SeqSpan span;
};
// Waits for the kernel before (the cache write and q are then visible) and claims the CTA's tile;
// false for a surplus CTA (uniform across the block). Every thread calls it (barriers inside).
// Work items are numbered tile-major so that the heads of one tile start together. `pair`: two
// ints of shared memory that nothing else writes.
__device__ bool claim_tile(const PrefillArgs& a, int keys_per_tile, TileWork& w, int* pair) {
  dev::wait_for_previous_kernel();
  if (threadIdx.x == 0) pair[0] = -1;
  __syncthreads();
  w.head_group = static_cast<int>(blockIdx.x % a.head_groups);
  if (threadIdx.x < 32) find_tile(a, static_cast<int>(blockIdx.x / a.head_groups), &pair[0], &pair[1]);
  __syncthreads();
  w.s = pair[0];
  if (w.s < 0) return false;  // uniform: the whole block leaves
  w.span = dev::seq_span(a.off, a.n_tokens, w.s);
  w.tok0 = pair[1] * a.tile_tokens;  // first token of the tile, within the sequence
  w.n_tok = min(a.tile_tokens, w.span.count - w.tok0);
  w.p_first = dev::token_position(a.pos, a.off, w.s, w.span.begin + w.tok0);
  w.total = w.p_first - w.tok0 + w.span.count;
  w.capacity = a.pool.cols << a.pool.block_shift;
  w.pack = 1 << a.pack_shift;
  w.head0 = w.head_group * w.pack;
  w.kvh = w.head0 / a.group;
  w.kv_lo = dev::key_range(w.p_first, w.total, a.causal, a.window, w.capacity).lo;
  w.kv_hi = dev::key_range(w.p_first + w.n_tok - 1, w.total, a.causal, a.window, w.capacity).hi;
  w.kt0 = w.kv_lo / keys_per_tile;
  w.n_kt = w.kv_hi >= w.kv_lo ? w.kv_hi / keys_per_tile - w.kt0 + 1 : 0;
  return true;
}

template <class T, class L>
__global__ void __launch_bounds__(L::kThreads) prefill_kernel(const PrefillArgs a) {
  constexpr int D = L::D, LD = L::kLd, N = L::kKeys, MT = L::kMT, ST = L::kStages;
  constexpr int kPieces = D / 8;  // 16-byte pieces per row
  using E = dev::Elem<T>;
  extern __shared__ uint4 smem[];
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sK = sQ + L::kRows * LD;  // [ST][N][LD]
  T* const sV = sK + ST * N * LD;

  TileWork w;
  __shared__ int pair[2];
  if (!claim_tile(a, N, w, pair)) return;
  const int s = w.s, tok0 = w.tok0, n_tok = w.n_tok, capacity = w.capacity, pack = w.pack, head0 = w.head0;
  const int kvh = w.kvh, kv_hi = w.kv_hi, kt0 = w.kt0, n_kt = w.n_kt;
  const int64_t p_first = w.p_first, total = w.total;
  const dev::SeqSpan span = w.span;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;  // mma fragment coordinates
  // This thread's accumulator rows: warp * 16 * MT + mt * 16 + g + 8 * i. Rows past the tile's
  // tokens see nothing (lo > hi). Over the warp's live rows: the smallest and largest window
  // start and end, which classify each key tile as skipped, unmasked or masked.
  int row_lo[MT][2], row_hi[MT][2];
  int lo_min = INT_MAX, lo_max = INT_MIN, hi_min = INT_MAX, hi_max = INT_MIN;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int tl = (warp * 16 * MT + mt * 16 + g + 8 * i) >> a.pack_shift;
      const dev::KeyRange r = dev::key_range(p_first + tl, total, a.causal, a.window, capacity);
      const bool ok = tl < n_tok;
      row_lo[mt][i] = ok ? r.lo : INT_MAX;
      row_hi[mt][i] = ok ? r.hi : -1;
      if (ok) {
        lo_min = min(lo_min, r.lo);
        lo_max = max(lo_max, r.lo);
        hi_min = min(hi_min, r.hi);
        hi_max = max(hi_max, r.hi);
      }
    }
  lo_min = __reduce_min_sync(0xffffffffu, lo_min);
  lo_max = __reduce_max_sync(0xffffffffu, lo_max);
  hi_min = __reduce_min_sync(0xffffffffu, hi_min);
  hi_max = __reduce_max_sync(0xffffffffu, hi_max);

  // Q tile: row r is token tok0 + r / pack, head head0 + r % pack; missing rows read as zeros.
  const T* const q = static_cast<const T*>(a.q);
  for (int i = threadIdx.x; i < L::kRows * kPieces; i += L::kThreads) {
    const int r = i / kPieces, c = i % kPieces;
    const int tl = r >> a.pack_shift;
    const bool ok = tl < n_tok;
    const int64_t token = span.begin + tok0 + tl;
    const T* src = ok ? q + (token * a.n_heads + head0 + (r & (pack - 1))) * D + c * 8 : q;
    dev::cp_async16(sQ + r * LD + c * 8, src, ok);
  }

  // A thread moves the same 16-byte piece of every (kThreads / kPieces)-th key row.
  auto load_kv = [&](int kt, int buf) {
    const int c = threadIdx.x % kPieces;
    T* const k_dst = sK + buf * N * LD + c * 8;
    T* const v_dst = sV + buf * N * LD + c * 8;
#pragma unroll
    for (int r = threadIdx.x / kPieces; r < N; r += L::kThreads / kPieces) {
      const int j = kt * N + r;
      const int64_t at = j <= kv_hi ? a.pool.key_offset(s, j, kvh) : -1;
      const bool ok = at >= 0;
      const uint8_t* key = ok ? a.pool.base + at + c * 16 : a.pool.base;
      const uint8_t* value = ok ? key + a.pool.values_bytes : a.pool.base;
      dev::cp_async16(k_dst + r * LD, key, ok);
      dev::cp_async16(v_dst + r * LD, value, ok);
    }
  };
  // Group 0 is Q and the first K/V tile; groups 1 .. ST-2 the next tiles (empty past the end).
#pragma unroll
  for (int st = 0; st < ST - 1; ++st) {
    if (st < n_kt) load_kv(kt0 + st, st);
    dev::cp_async_commit();
  }

  uint32_t qf[MT][D / 16][4];
  float o[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][nd][e] = 0.0f;
  float m[MT][2], l[MT][2];  // running max (log2 units) and sum (this thread's columns) per row
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      m[mt][i] = -INFINITY;
      l[mt][i] = 0.0f;
    }
  const float scale = a.scale_log2;  // > 0

  for (int it = 0; it < n_kt; ++it) {
    dev::cp_async_wait<ST - 2>();  // tile `it` (and Q) have landed for this thread
    __syncthreads();               // ... for every thread, and tile it-1's buffer is free again
    if (it + ST - 1 < n_kt) load_kv(kt0 + it + ST - 1, (it + ST - 1) % ST);
    dev::cp_async_commit();

    if (it == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const int mi = lane >> 3;
          dev::ldmatrix_x4(qf[mt][kk],
                           sQ + (warp * 16 * MT + mt * 16 + (lane & 7) + (mi & 1) * 8) * LD + kk * 16 + (mi >> 1) * 8);
#pragma unroll
          for (int e = 0; e < 4; ++e) qf[mt][kk][e] ^= a.q_sign;
        }
    }
    const int key0 = (kt0 + it) * N;
    if (key0 > hi_max || key0 + N - 1 < lo_min) continue;  // no row of this warp sees the tile
    const bool full = key0 >= lo_max && key0 + N - 1 <= hi_min;
    const T* const k_tile = sK + (it % ST) * N * LD;
    const T* const v_tile = sV + (it % ST) * N * LD;

    // S = Q K^T for 16 * MT rows x N keys per warp; each K fragment serves all MT row tiles.
    float sc[MT][N / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nb = 0; nb < N / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[mt][nb][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk)
#pragma unroll
      for (int nb = 0; nb < N / 8; ++nb) {
        uint32_t b[4];
        dev::ldmatrix_x4(b, k_tile + (nb * 8 + (lane & 7)) * LD + kk * 32 + (lane >> 3) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          dev::mma_16816<T>(sc[mt][nb], qf[mt][2 * kk], b[0], b[1]);
          dev::mma_16816<T>(sc[mt][nb], qf[mt][2 * kk + 1], b[2], b[3]);
        }
      }

    // Causal / window / padding mask, only where some row sees part of the tile.
    if (!full) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nb = 0; nb < N / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = e >> 1;
            const int j = key0 + nb * 8 + tq * 2 + (e & 1);
            if (j < row_lo[mt][i] || j > row_hi[mt][i]) sc[mt][nb][e] = -INFINITY;
          }
    }

    // Online softmax: new row max (over the quad that shares a row), rescale what came before.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < N / 8; ++nb) mx = fmaxf(mx, fmaxf(sc[mt][nb][2 * i], sc[mt][nb][2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[mt][i], mx * scale);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet
        const float alpha = fast_exp2(m[mt][i] - m_use);
        m[mt][i] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int nb = 0; nb < N / 8; ++nb)
#pragma unroll
          for (int e = 2 * i; e < 2 * i + 2; ++e) {
            sc[mt][nb][e] = fast_exp2(fmaf(sc[mt][nb][e], scale, -m_use));
            sum += sc[mt][nb][e];
          }
        l[mt][i] = l[mt][i] * alpha + sum;
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
          o[mt][nd][2 * i] *= alpha;
          o[mt][nd][2 * i + 1] *= alpha;
        }
      }

    // O += P V: the score accumulators become the A fragments of P; each V fragment serves all
    // MT row tiles.
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = E::pack(sc[mt][2 * kk][0], sc[mt][2 * kk][1]);
        pa[mt][1] = E::pack(sc[mt][2 * kk][2], sc[mt][2 * kk][3]);
        pa[mt][2] = E::pack(sc[mt][2 * kk + 1][0], sc[mt][2 * kk + 1][1]);
        pa[mt][3] = E::pack(sc[mt][2 * kk + 1][2], sc[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int nd2 = 0; nd2 < D / 16; ++nd2) {
        uint32_t b[4];
        dev::ldmatrix_x4_trans(b, v_tile + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + nd2 * 16 +
                                      (lane >> 4) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          dev::mma_16816<T>(o[mt][2 * nd2], pa[mt], b[0], b[1]);
          dev::mma_16816<T>(o[mt][2 * nd2 + 1], pa[mt], b[2], b[3]);
        }
      }
    }
  }
  dev::cp_async_wait<0>();

  T* const out = static_cast<T*>(a.out);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float sum = l[mt][i];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int r = warp * 16 * MT + mt * 16 + g + 8 * i;
      if ((r >> a.pack_shift) >= n_tok) continue;
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      const int64_t token = span.begin + tok0 + (r >> a.pack_shift);
      T* const dst = out + (token * a.n_heads + head0 + (r & (pack - 1))) * D + tq * 2;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd)
        *reinterpret_cast<uint32_t*>(dst + nd * 8) = E::pack(o[mt][nd][2 * i] * inv, o[mt][nd][2 * i + 1] * inv);
    }
}

// ---- wgmma (sm_90a only: the device code below exists in the sm_90a pass and the host pass) ----
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LOOM_FLASH_WGMMA 1

// Shared-memory matrix descriptor of a 128-byte-swizzled tile whose 8-row atoms are 1024 bytes
// apart (the tile 1024-byte aligned): start address, leading byte offset 16 (unused by these
// layouts), stride byte offset 1024, swizzle mode 1 (128 B). Moving along the tile adds
// (bytes >> 4) to the descriptor: shared addresses stay under 256 KB, so the 14-bit field never
// carries.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(16 >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (uint64_t{1} << 62);
}
// Byte offset of 16-byte piece c of row r in such a tile (rows of 128 bytes).
__device__ __forceinline__ int sw128_offset(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void wgmma_wait_all() { wgmma_wait<0>(); }
// Keeps the compiler from reading an accumulator before the wgmma that writes it has completed.
template <int Size>
__device__ __forceinline__ void reg_fence(float (&d)[Size]) {
#pragma unroll
  for (int i = 0; i < Size; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Shared-memory barriers (mbarrier) and named barriers, for the ping-pong tiling.
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(dev::smem_addr(bar)), "r"(count) : "memory");
}
// One arrival, made when every cp.async this thread issued so far has landed.
__device__ __forceinline__ void mbar_arrive_on_copies(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(dev::smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(dev::smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{ .reg .pred done;\n"
      "LOOM_MBAR_WAIT%=: mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra LOOM_MBAR_WAIT%=; }\n" ::"r"(dev::smem_addr(bar)),
      "r"(parity)
      : "memory");
}
// Barrier ids as immediates: an id in a register makes ptxas reserve all 16 of the CTA's.
template <int Id>
__device__ __forceinline__ void named_sync(int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"n"(Id), "r"(threads) : "memory");
}
template <int Id>
__device__ __forceinline__ void named_arrive(int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"n"(Id), "r"(threads) : "memory");
}

// d (64 x 64, this thread's 32 floats) (+)= a (64 x 16 from registers, the mma.sync A fragment of
// each warp's 16 rows) * b (16 x 64 in shared memory, descriptor `b`). TransB: b is stored
// N-major ([k][n], as V is); else K-major ([n][k], as K is). accumulate == 0 overwrites d.
#define LOOM_FLASH_WGMMA_RS(TYPE, TRANS_B)                                                                  \
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %37, 0; "                                                    \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                              \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                    \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "          \
               "{%32, %33, %34, %35}, %36, p, 1, 1, " TRANS_B "; }\n"                                       \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),        \
                 "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),    \
                 "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
                 "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
                 "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate))

template <class T, int TransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b,
                                         int accumulate) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if constexpr (TransB) LOOM_FLASH_WGMMA_RS("bf16", "1");
    else LOOM_FLASH_WGMMA_RS("bf16", "0");
  } else {
    if constexpr (TransB) LOOM_FLASH_WGMMA_RS("f16", "1");
    else LOOM_FLASH_WGMMA_RS("f16", "0");
  }
}
#undef LOOM_FLASH_WGMMA_RS

#endif

// The sm_90a prefill for head_dim 64 and 128: the same work split, masking and online softmax
// as prefill_kernel, with each warpgroup (4 warps) owning 64 query rows and both products on
// wgmma: S = Q K^T with Q's fragments in registers and K read by the tensor cores from shared
// memory, O += P V with P's fragments (the score accumulators, converted) in registers and V
// from shared memory. Tiles are stored 128-byte swizzled as the wgmma descriptors describe them:
// a row of 64 elements is 128 bytes, so a head_dim 128 tile is two panels, each holding 64 of
// every row's elements (S sums over both; O is two 64-column halves, one m64n64 product each).
// Warpgroups decide skip / mask per key tile for all their rows. Without PingPong every thread
// copies part of each K/V tile and the CTA meets at one barrier per tile, so both warpgroups do
// their softmax at the same time. With PingPong (two warpgroups) the copies complete on
// mbarriers (full[stage], armed by cp.async.mbarrier.arrive), each warp frees a stage on
// another mbarrier (empty[stage]) once its P V has read it, and the warpgroups take turns to
// issue their wgmma, so that one's softmax overlaps the other's products.
template <int D_, int NWG, int Stages, int Keys = 64, bool PingPong = false>
struct WgTiling {
  static constexpr int D = D_;
  static constexpr bool kPingPong = PingPong;
  static constexpr int kPanels = D / 64;
  static constexpr int kKeys = Keys;
  static constexpr int kStages = Stages;
  static constexpr int kThreads = 128 * NWG;
  // CTAs per SM that the registers allow (head_dim 128 holds twice the O accumulators).
  static constexpr int kMinBlocks = D == 128 ? 1 : NWG == 1 ? 3 : NWG == 2 ? 2 : 1;
  static constexpr int kRows = 64 * NWG;
  static constexpr int kPanelBytes = kKeys * 128;       // one panel of a K or V tile
  static constexpr int kTileBytes = kPanels * kPanelBytes;
  static constexpr int kQPanelBytes = kRows * 128;
  // Q, then K and V per stage; 1024 more so that the base can be rounded up to 1024 bytes.
  // With PingPong, 2 * Stages mbarriers of 8 bytes after them.
  static constexpr int kSmemBytes = 1024 + kPanels * kQPanelBytes + 2 * Stages * kTileBytes + (kPingPong ? 16 * Stages : 0);
  static_assert(!kPingPong || NWG == 2, "ping-pong alternates two warpgroups");
  static_assert((D == 64 || D == 128) && Stages >= 3, "P V of a tile still reads it while the tile two ahead loads");
};

template <class T, class L>
__global__ void __launch_bounds__(L::kThreads, L::kMinBlocks) prefill_wgmma_kernel(const PrefillArgs a) {
#if defined(LOOM_FLASH_WGMMA)
  constexpr int D = L::D, N = L::kKeys, ST = L::kStages, NP = L::kPanels;
  constexpr int kPieces = D / 8;  // 16-byte pieces per row; piece c lies in panel c / 8
  using E = dev::Elem<T>;
  extern __shared__ uint4 smem[];
  uint8_t* const base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem) + 1023) & ~uintptr_t{1023});
  uint8_t* const sQ = base;                          // [NP][kRows rows of 128 bytes]
  uint8_t* const sK = sQ + NP * L::kQPanelBytes;  // [ST][NP][N rows of 128 bytes]
  uint8_t* const sV = sK + ST * L::kTileBytes;

  // The pair lies in the first bytes of the dynamic shared memory: in the alignment padding or
  // at the start of Q, and then read by every thread before Q's loads start (the barrier). A
  // static pair would move the dynamic base and cost up to 1 KiB more alignment padding.
  TileWork w;
  const bool claimed = claim_tile(a, N, w, reinterpret_cast<int*>(smem));
  if (!claimed) return;
  // Ping-pong: full[b] completes when every thread's copies into buffer b have landed; empty[b]
  // when every warp has finished reading it (its P V complete).
  uint64_t* const full = reinterpret_cast<uint64_t*>(sV + ST * L::kTileBytes);
  uint64_t* const empty = full + ST;
  if constexpr (L::kPingPong) {
    if (threadIdx.x == 0)
      for (int b = 0; b < ST; ++b) {
        mbar_init(full + b, L::kThreads);
        mbar_init(empty + b, L::kThreads / 32);
      }
  }
  __syncthreads();
  const int s = w.s, tok0 = w.tok0, n_tok = w.n_tok, capacity = w.capacity, pack = w.pack, head0 = w.head0;
  const int kvh = w.kvh, kv_hi = w.kv_hi, kt0 = w.kt0, n_kt = w.n_kt;
  const int64_t p_first = w.p_first, total = w.total;
  const dev::SeqSpan span = w.span;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;
  int row_lo[2], row_hi[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int tl = (warp * 16 + g + 8 * i) >> a.pack_shift;
    const dev::KeyRange r = dev::key_range(p_first + tl, total, a.causal, a.window, capacity);
    row_lo[i] = tl < n_tok ? r.lo : INT_MAX;
    row_hi[i] = tl < n_tok ? r.hi : -1;
  }
  // The warpgroup's live rows are tokens [first, last]; key ranges grow with the position, so the
  // first token has the smallest window start and end, the last the largest.
  const int wg = warp >> 2;
  const int wg_first = (wg * 64) >> a.pack_shift;
  const int wg_last = min((wg * 64 + 63) >> a.pack_shift, n_tok - 1);
  const dev::KeyRange wr0 = dev::key_range(p_first + wg_first, total, a.causal, a.window, capacity);
  const dev::KeyRange wr1 = dev::key_range(p_first + wg_last, total, a.causal, a.window, capacity);
  const bool wg_live = wg_first <= wg_last;
  const int lo_min = wr0.lo, hi_min = wr0.hi, lo_max = wr1.lo, hi_max = wr1.hi;

  const T* const q = static_cast<const T*>(a.q);
  for (int i = threadIdx.x; i < L::kRows * kPieces; i += L::kThreads) {
    const int r = i / kPieces, c = i % kPieces;
    const int tl = r >> a.pack_shift;
    const bool ok = tl < n_tok;
    const int64_t token = span.begin + tok0 + tl;
    const T* src = ok ? q + (token * a.n_heads + head0 + (r & (pack - 1))) * D + c * 8 : q;
    dev::cp_async16(sQ + (c >> 3) * L::kQPanelBytes + sw128_offset(r, c & 7), src, ok);
  }

  // A thread copies piece c of kRowsPerThread consecutive key rows, so that where a cache block
  // holds them all (block size >= kRowsPerThread) one table lookup serves them: the copies are
  // issued by the same warps that do the softmax, and their address arithmetic is part of the
  // instruction stream that bounds this kernel.
  constexpr int kRowsPerThread = N / (L::kThreads / kPieces);
  static_assert(kRowsPerThread >= 1 && (kRowsPerThread & (kRowsPerThread - 1)) == 0, "rows per thread");
  const bool one_block = (1 << a.pool.block_shift) >= kRowsPerThread;
  auto load_kv = [&](int kt, int buf) {
    const int c = threadIdx.x % kPieces;
    uint8_t* const k_dst = sK + buf * L::kTileBytes + (c >> 3) * L::kPanelBytes;
    uint8_t* const v_dst = sV + buf * L::kTileBytes + (c >> 3) * L::kPanelBytes;
    const int r0 = (threadIdx.x / kPieces) * kRowsPerThread;
    const int j0 = kt * N + r0;
    const int64_t block0 = one_block && j0 <= kv_hi ? a.pool.block_offset(s, j0) : -1;
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      const int r = r0 + u;
      const int j = j0 + u;
      int64_t at = -1;
      if (j <= kv_hi) {
        at = one_block ? a.pool.key_offset_in(block0, j, kvh) : a.pool.key_offset(s, j, kvh);
      }
      const bool ok = at >= 0;
      const uint8_t* key = ok ? a.pool.base + at + c * 16 : a.pool.base;
      const uint8_t* value = ok ? key + a.pool.values_bytes : a.pool.base;
      dev::cp_async16(k_dst + sw128_offset(r, c & 7), key, ok);
      dev::cp_async16(v_dst + sw128_offset(r, c & 7), value, ok);
    }
  };
  // P V of one key tile runs on the tensor cores while the softmax of the next one runs on the
  // other units: the loop issues S = Q K^T of tile `it` and O += P V of the previous tile
  // together, and waits for the latter only before rescaling O. V of the previous tile is then
  // still being read when tile `it` starts, so loads run ST - 2 tiles ahead. (A plain order,
  // P V issued and waited for right after the softmax, measured 3% faster on H200 but gave
  // 13-19% errors in attention_cuda_test, with or without a barrier before the wgmma; the cause
  // was not found, so the order below is the tested one.)
  constexpr int kAhead = ST - 2;
  static_assert(kAhead >= 1, "stages");
#pragma unroll
  for (int st = 0; st < kAhead; ++st) {
    if (st < n_kt) {
      load_kv(kt0 + st, st);
      if constexpr (L::kPingPong) mbar_arrive_on_copies(full + st);  // the first also covers Q
    }
    dev::cp_async_commit();
  }

  uint32_t qf[D / 16][4];
  // O's 64-column halves (head_dim 128) or whole (64); S as N / 64 m64n64 accumulators in a
  // row, so that element 4 nb + e holds key column 8 nb + 2 tq + (e & 1) for any N.
  float o[NP][32], sc[N / 2];
#pragma unroll
  for (int e = 0; e < 32; ++e)
#pragma unroll
    for (int h = 0; h < NP; ++h) o[h][e] = 0.0f;
#pragma unroll
  for (int e = 0; e < N / 2; ++e) sc[e] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float scale = a.scale_log2;  // > 0
  const uint64_t k_desc = sw128_desc(dev::smem_addr(sK)), v_desc = sw128_desc(dev::smem_addr(sV));

  uint32_t pa[N / 16][4];
  bool have_p = false;  // pa holds P of the previous tile, whose P V is not issued yet
  int p_buf = 0;
  auto fence_o = [&] {
#pragma unroll
    for (int h = 0; h < NP; ++h) reg_fence(o[h]);
  };
  auto issue_pv = [&](int b) {
    fence_o();
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(pa[kk][e])::"memory");
    wgmma_fence();
    // O += P V: four k-steps of 16 keys per 64-column half; V is N-major (a key's 64 values of
    // a panel are one row).
#pragma unroll
    for (int h = 0; h < NP; ++h)
#pragma unroll
      for (int kk = 0; kk < N / 16; ++kk)
        wgmma_rs<T, 1>(o[h], pa[kk], v_desc + ((b * L::kTileBytes + h * L::kPanelBytes + kk * 2048) >> 4), 1);
    wgmma_commit();
  };

  // Ping-pong: the two warpgroups take turns to issue their wgmma (named barriers 1 and 2, one
  // per warpgroup's turn), so that one's softmax runs while the other's products occupy the
  // tensor cores; no block-wide barrier per tile, so they can drift apart by part of a tile.
  auto release = [&](int b) {
    if constexpr (L::kPingPong)
      if (lane == 0) mbar_arrive(empty + b);
  };
  auto turn_begin = [&] {
    if constexpr (L::kPingPong) {
      if (wg == 0) named_sync<1>(2 * 128);
      else named_sync<2>(2 * 128);
    }
  };
  auto turn_end = [&](int it) {  // the other warpgroup's turn (none after warpgroup 1's last)
    if constexpr (L::kPingPong) {
      if (wg == 0) named_arrive<2>(2 * 128);
      else if (it != n_kt - 1) named_arrive<1>(2 * 128);
    }
  };
  if constexpr (L::kPingPong)
    if (wg == 1 && n_kt > 0) named_arrive<1>(2 * 128);  // warpgroup 0 goes first

  for (int it = 0; it < n_kt; ++it) {
    if constexpr (L::kPingPong) {
      mbar_wait(full + it % ST, (it / ST) & 1);
      fence_proxy_async();  // the tensor cores read what cp.async wrote
      const int next = it + kAhead;
      if (next < n_kt) {
        if (next >= ST) mbar_wait(empty + next % ST, ((next / ST) + 1) & 1);
        load_kv(kt0 + next, next % ST);
        mbar_arrive_on_copies(full + next % ST);
      }
    } else {
      dev::cp_async_wait<kAhead - 1>();
      fence_proxy_async();  // the tensor cores read what cp.async wrote
      __syncthreads();      // ... every thread's part; and the buffer refilled next is free
      if (it + kAhead < n_kt) load_kv(kt0 + it + kAhead, (it + kAhead) % ST);
    }
    dev::cp_async_commit();

    if (it == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int r = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        dev::ldmatrix_x4(qf[kk], sQ + (kk >> 2) * L::kQPanelBytes + sw128_offset(r, 2 * (kk & 3) + (lane >> 4)));
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          qf[kk][e] ^= a.q_sign;
          asm volatile("" : "+r"(qf[kk][e])::"memory");
        }
      }
    }
    const int key0 = (kt0 + it) * N;
    const int buf = it % ST;
    // Uniform over the warpgroup, as wgmma needs.
    const bool live = __shfl_sync(0xffffffffu, static_cast<int>(wg_live && key0 <= hi_max && key0 + N - 1 >= lo_min), 0) != 0;
    turn_begin();
    if (!live) {
      if (have_p) {
        issue_pv(p_buf);
        turn_end(it);
        wgmma_wait_all();
        fence_o();
        release(p_buf);
      } else {
        turn_end(it);
      }
      release(buf);  // never read
      have_p = false;
      continue;
    }
    // S = Q K^T: 64 rows x 64 keys per warpgroup, D / 16 k-steps of 16 along D (four per
    // panel). The fences order every ordinary write of the operand registers before
    // wgmma.fence, as wgmma requires.
    reg_fence(sc);
    wgmma_fence();
#pragma unroll
    for (int ns = 0; ns < N / 64; ++ns)
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        wgmma_rs<T, 0>(*reinterpret_cast<float(*)[32]>(sc + 32 * ns), qf[kk],
                       k_desc + ((buf * L::kTileBytes + (kk >> 2) * L::kPanelBytes + ns * 64 * 128 + (kk & 3) * 32) >> 4),
                       kk);
    wgmma_commit();

    // The softmax of S; reads and writes sc only. ptxas tracks which wgmma results are complete
    // along each path, not across two branches on the same flag: each order of waits below
    // lies in one branch, or it would serialise every wgmma of the kernel (its C7514 / C7518
    // notes) to keep the accumulators safe.
    float alpha[2];
    bool moved = false;
    auto softmax = [&] {
      if (!(key0 >= lo_max && key0 + N - 1 <= hi_min)) {  // some row sees part of the tile
#pragma unroll
        for (int e = 0; e < N / 2; ++e) {
          const int i = (e >> 1) & 1;
          const int j = key0 + (e >> 2) * 8 + tq * 2 + (e & 1);
          if (j < row_lo[i] || j > row_hi[i]) sc[e] = -INFINITY;
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < N / 8; ++nb) mx = fmaxf(mx, fmaxf(sc[4 * nb + 2 * i], sc[4 * nb + 2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // Lazy rescaling: the max moves only when a tile beats it by more than 8 (log2 units),
        // so P stays below 256 (exact enough in bf16/f16, far from overflow) and O and the sum
        // are rescaled only in warps where some row's max moved.
        const float mx_s = mx * scale;
        const float m_new = mx_s > m[i] + 8.0f ? mx_s : m[i];
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet
        alpha[i] = fast_exp2(m[i] - m_use);
        moved |= m_new != m[i];
        m[i] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int nb = 0; nb < N / 8; ++nb)
#pragma unroll
          for (int e = 4 * nb + 2 * i; e < 4 * nb + 2 * i + 2; ++e) {
            sc[e] = fast_exp2(fmaf(sc[e], scale, -m_use));
            sum += sc[e];
          }
        l[i] = l[i] * alpha[i] + sum;
      }
    };
    if (have_p) {
      issue_pv(p_buf);  // P V of the previous tile runs on the tensor cores during the softmax
      turn_end(it);
      wgmma_wait<1>();  // S has landed
      reg_fence(sc);
      softmax();
      wgmma_wait_all();  // P V of the previous tile is in O
      fence_o();
      release(p_buf);
    } else {
      turn_end(it);
      wgmma_wait_all();
      reg_fence(sc);
      softmax();
    }
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int h = 0; h < NP; ++h)
#pragma unroll
        for (int e = 0; e < 32; ++e) o[h][e] *= alpha[(e >> 1) & 1];
    }
    // Key columns 8 nb .. 8 nb + 7 are k-half (nb & 1) of P's k-step nb / 2.
#pragma unroll
    for (int nb = 0; nb < N / 8; ++nb)
#pragma unroll
      for (int i = 0; i < 2; ++i) pa[nb >> 1][2 * (nb & 1) + i] = E::pack(sc[4 * nb + 2 * i], sc[4 * nb + 2 * i + 1]);
    have_p = true;
    p_buf = buf;
  }
  if (have_p) {
    issue_pv(p_buf);
    wgmma_wait_all();
    fence_o();
  }
  dev::cp_async_wait<0>();  // (ping-pong: every copy was waited for through full[])

  T* const out = static_cast<T*>(a.out);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float sum = l[i];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int r = warp * 16 + g + 8 * i;
    if ((r >> a.pack_shift) >= n_tok) continue;
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    const int64_t token = span.begin + tok0 + (r >> a.pack_shift);
    T* const dst = out + (token * a.n_heads + head0 + (r & (pack - 1))) * D + tq * 2;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      const float* const oh = o[nd >> 3];
      const int e = 4 * (nd & 7) + 2 * i;
      *reinterpret_cast<uint32_t*>(dst + nd * 8) = E::pack(oh[e] * inv, oh[e + 1] * inv);
    }
  }
#else
  static_assert(L::kStages >= 3, "tiling");  // launched on compute capability 9.0 only
  (void)a;
#endif
}

// The tilings in use (bf16, 32 heads over 8 KV heads, causal prompts of 2k-8k tokens). On sm_90a
// the wgmma kernel, two warpgroups and three stages: head_dim 64 with 64 keys a tile (two CTAs
// an SM), head_dim 128 with 128 (3-4% faster than 64 on the H100; one CTA an SM, about 240
// registers) and ping-pong (2-4% faster at head_dim 128, 8-10% slower at 64, where two CTAs
// an SM already overlap each other's softmax). One warpgroup a CTA (more CTAs an SM) was 25-35%
// slower at both head dims, four stages no faster. Elsewhere mma.sync: head_dim 64 as
// Prefill64 (87 us a 2048-token layer on H200 against the wgmma kernel's 80 before its wgmma
// stopped being serialised), head_dim 128 with 8 warps of 16 rows (209 us, against 255 with 4
// warps). BENCHMARKS.md has the measurements.
using Prefill64 = Tiling<64, 4, 2, 64, 3>;
using Prefill128 = Tiling<128, 8, 1, 64, 2>;
using Prefill64Wgmma = WgTiling<64, 2, 3>;
using Prefill128Wgmma = WgTiling<128, 2, 3, 128, true>;

template <class T, class L, bool Wg = false>
cudaError_t launch(const Problem& p, cudaStream_t stream) {
  PrefillArgs a;
  static_cast<dev::BatchArgs&>(a) = dev::make_batch_args(p);
  const int pack = prefill_pack(a.group);
  a.pack_shift = 0;
  while ((1 << a.pack_shift) < pack) ++a.pack_shift;
  a.tile_tokens = L::kRows / pack;
  a.head_groups = p.n_heads / pack;
  // exp2 takes scale * score; a negative scale moves to q's sign (exact), and a zero one becomes
  // a tiny positive one (the same weights, and masked scores still go to zero).
  a.q_sign = p.scale_log2 < 0.0f ? 0x80008000u : 0u;
  a.scale_log2 = p.scale_log2 == 0.0f ? 1e-30f : std::fabs(p.scale_log2);
  const int64_t tiles = (p.n_tokens + a.tile_tokens - 1) / a.tile_tokens + p.n_seqs;
  const auto grid = static_cast<unsigned>(tiles * a.head_groups);
  // A programmatic dependent launch: the CTAs may be placed while the cache write drains, and
  // wait for it in their first instruction.
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(L::kThreads);
  config.dynamicSmemBytes = L::kSmemBytes;
  config.stream = stream;
  config.attrs = p.programmatic ? &attribute : nullptr;
  config.numAttrs = p.programmatic ? 1 : 0;
  if constexpr (Wg)
    return cudaLaunchKernelEx(&config, prefill_wgmma_kernel<T, L>, a);
  else
    return cudaLaunchKernelEx(&config, prefill_kernel<T, L>, a);
}

template <class T, class L, bool Wg = false>
cudaError_t configure() {
  if constexpr (Wg)
    return cudaFuncSetAttribute(prefill_wgmma_kernel<T, L>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                L::kSmemBytes);
  else
    return cudaFuncSetAttribute(prefill_kernel<T, L>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kSmemBytes);
}

template <class T>
cudaError_t configure_type(int head_dim, bool wgmma) {
  if (head_dim != 64) return wgmma ? configure<T, Prefill128Wgmma, true>() : configure<T, Prefill128>();
  return wgmma ? configure<T, Prefill64Wgmma, true>() : configure<T, Prefill64>();
}

template <class T>
cudaError_t launch_type(const Problem& p, cudaStream_t stream) {
  if (p.head_dim != 64) return p.wgmma ? launch<T, Prefill128Wgmma, true>(p, stream) : launch<T, Prefill128>(p, stream);
  return p.wgmma ? launch<T, Prefill64Wgmma, true>(p, stream) : launch<T, Prefill64>(p, stream);
}

}  // namespace

cudaError_t configure_kernels(Dtype dtype, int head_dim, bool wgmma) {
  return dtype == Dtype::bf16 ? configure_type<__nv_bfloat16>(head_dim, wgmma)
                               : configure_type<__half>(head_dim, wgmma);
}

cudaError_t launch_prefill(const Problem& p, cudaStream_t stream) {
  if (p.n_tokens == 0) return cudaSuccess;
  return p.dtype == Dtype::bf16 ? launch_type<__nv_bfloat16>(p, stream) : launch_type<__half>(p, stream);
}

}  // namespace loomp::flash
