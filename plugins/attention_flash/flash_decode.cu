// Flash: attention for batches of one new token per sequence (decode), flash-decoding style.
//
// Work split. A CTA (W warps: 4, or 16 when the batch is too small to fill the GPU) takes one
// token, G query heads of one KV group (G = the largest power of two dividing H/Hkv, at most 4:
// more heads would not fit their accumulators in registers; the other CTAs of the group read the
// same K/V rows, mostly from L2) and one split of the token's visible keys. A key row (D
// elements, 16 bytes per lane) is read by D/8 lanes, so one load of K and V serves all G heads;
// each group of D/8 lanes keeps its own online softmax over the keys it reads, the groups of a
// warp are merged with shuffles and the warps through shared memory at the end.
//
// Tensor cores (kMma, unquantized pools). The CUDA-core loop above spends about 700 instructions
// a thread per trip (q converted per key, a shuffle tree per score, 8 multiply-adds per value and
// head), which at batch 32-128 bounded the kernel, not the memory. The tensor-core kernel keeps
// the work split and the ring, but each warp's share of a trip (16 keys at D = 64, 8 at 128) is
// one tile: S = Q K^T as m16n8k16 products with the G heads as rows 0..G-1 of a 16-row A
// fragment (the rest zero: tensor cores have throughput to spare, the padding costs nothing that
// binds), the online softmax on the S fragments (a row's four lanes share its max through two
// shuffles), and O += P V with P straight from the S registers (m16n8k16 at D = 64, m16n8k8 at
// 128) and V through ldmatrix.trans. Its ring is laid out by warp and key, swizzled so that
// ldmatrix reads conflict-free rows; a warp reads keys other lanes copied, so it waits for its
// copies with __syncwarp, and a ballot tells it which keys exist. It measured 1.2-1.4x the
// CUDA-core kernel at batch 16-128 on the H200 (BENCHMARKS.md) and no slower at batch 1-4.
//
// The decode kernel also appends the batch's k/v to the cache (no separate launch: at batch 1
// every launch costs about as much as the attention itself).
//
// Splits. With few tokens (batch 1) the grid would be a handful of CTAs, so a token's keys are
// cut into n_splits chunks, each CTA writes an unnormalised partial (row, max, sum) into scratch,
// and the last CTA of the (token, head group) to arrive merges them (a second launch cost about
// as much as the merge at batch 1). The host picks W and n_splits from T, the table width, the
// scratch size and the CTAs an SM holds (found once at prepare) only; each CTA computes its
// chunk from the actual key range on the device (at least plan.min_chunk keys, one load of every
// lane of a 16-warp CTA; splits past the end leave at once), so the launch is the same whatever
// the lengths are. A single live split writes the output itself, with no partials and no merge:
// the usual batch-1 case up to 256 keys (D = 64).
//
// Latency. At batch 1 the kernel is a chain of dependent memory round trips, so each is started
// as early as it may be: the sequence metadata and the block table (uploaded by the host, never
// written by the kernel before this one) are read and the first keys' addresses found before
// griddepcontrol.wait; q, the new k/v and every cache row after it (the kernel before may write
// q/k/v, and the cache is only read once it is complete); the next step's table entries are read
// before the current keys are waited for (their K/V copies go into a shared-memory ring one trip
// ahead), and the cache append is stored behind the first trip's copies.
//
// int8 / fp8 caches (sdpa's block format, loom_kv_format.hpp). Same work split and ring, but a
// lane's 8 values of a key row are 8 code bytes (half the bytes of bf16: decode is bound by
// reading the cache, which is the point of the format) plus the row's float32 scale; a ring
// piece holds the K and V codes, the next one the two scales. Codes are converted to float in
// registers with integer tricks (a byte permute and an add or mask per value, not the
// quarter-rate conversion instructions, which made the kernel compute-bound at head dim 128);
// the key scale multiplies the reduced dot product and the value scale the softmax weight, so a
// row costs two multiplications, not D. Every key is read from the pool, the new ones as sdpa
// reads them, quantized: each CTA whose split holds new positions quantizes those rows (warp 0,
// one row at a time, as sdpa's cache write does: same absmax, scale and codes, so the same
// bytes) and stores them before its first copy is issued; CTAs of other heads of the KV group,
// or later tokens of the same sequence, may store the same row, with identical bytes.
#include <cmath>

#include "flash_device.cuh"

namespace loomp::flash {
namespace {

struct DecodeArgs : dev::BatchArgs {
  const uint8_t* k;  // [T, Hkv, D]: the batch's new keys
  const uint8_t* v;
  int n_splits;
  int min_chunk;
  int stages;  // 1 or 2; the tensor-core kernel 3 where it fits
  float* partial_out;
  float* partial_ml;
  unsigned* arrivals;
};

// A lane's 8 cached values of a quantized row, as float, the row's scale not applied and, for
// fp8, times 2^-8 (kCodeScale undoes it, folded into the row scale).
//   int8: the byte with its sign bit flipped (c + 128, in [1, 255]) becomes the low mantissa
//     bits of 2^23, so the float is 2^23 + c + 128 exactly; subtracting 2^23 + 128 leaves c.
//   fp8 E4M3: e4m3::decode2_half_bits_scaled (loom_e4m3.hpp, tested on every code pair) makes
//     two halves of value code * 2^-8, exact; the NaN codes (kv_store writes them only for NaN
//     inputs) read as +-480 * 2^-8 instead.
template <KvFormat F>
constexpr float kCodeScale = F == KvFormat::fp8 ? 256.0f : 1.0f;
template <KvFormat F>
__device__ __forceinline__ void codes_to_float(uint32_t lo, uint32_t hi, float (&f)[8]) {
  const uint32_t w[2] = {lo, hi};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if constexpr (F == KvFormat::int8) {
      const uint32_t biased = w[i] ^ 0x80808080u;
#pragma unroll
      for (int b = 0; b < 4; ++b)
        f[4 * i + b] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7440u + b)) - 8388736.0f;
    } else {
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const uint32_t h = e4m3::decode2_half_bits_scaled(w[i] >> (16 * b));
        __half2 pair;
        memcpy(&pair, &h, sizeof pair);
        const float2 v = __half22float2(pair);
        f[4 * i + 2 * b] = v.x;
        f[4 * i + 2 * b + 1] = v.y;
      }
    }
  }
}

// Counts this CTA's arrival (thread 0, after a __syncthreads that orders the CTA's partial
// stores before it): a release of those stores and an acquire of the other CTAs' ones.
__device__ __forceinline__ unsigned arrive(unsigned* counter) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
  return old;
}

// F: KvFormat::int8 or fp8 for a quantized pool, bf16 for the compute dtype's (T's) layout.
// kMma: scores and the weighted sum of values on tensor cores (unquantized pools only; see the
// file comment).
template <class T, int D, int G, int W, KvFormat F, bool kMma>
__global__ void __launch_bounds__(W * 32, 16 / W) decode_kernel(const DecodeArgs a) {
  using E = dev::Elem<T>;
  constexpr bool kQuant = F == KvFormat::int8 || F == KvFormat::fp8;
  static_assert(!kMma || !kQuant, "the tensor-core decode reads unquantized pools only");
  constexpr int kThreads = W * 32;
  constexpr int kLanesPerKey = D / 8;
  constexpr int kGroups = kThreads / kLanesPerKey;      // keys read at once by the CTA
  constexpr int kUnroll = kDecodeUnroll;                // keys per lane group and trip
  constexpr int kStep = kGroups * kUnroll;              // keys per trip of the loop
  // kMma: a warp's share of a trip is kKeys keys (16 at D = 64, 8 at D = 128: one k step of
  // P V), its K tile then its V tile in the ring, each key's D / 8 pieces of 16 bytes at piece
  // (c ^ (key & 7)), so that the eight rows an ldmatrix reads fall in distinct banks.
  constexpr int kKeys = (32 / kLanesPerKey) * kUnroll;
  static_assert(kKeys == 16 || kKeys == 8, "a warp's trip is one m16n8k16 or m16n8k8 step");
  constexpr int kWarpTile = 2 * kKeys * kLanesPerKey;  // uint4 of one warp's K and V tiles
  // The trips in flight. CUDA-core kernel: this thread's K and V pieces, [stages][kUnroll][K, V]
  // [kThreads]: each thread reads back only what it copied itself, so the ring needs no barrier;
  // quantized, the K piece holds K codes (bytes 0-7) and V codes (8-15), the V piece the K and
  // V scales. Tensor-core kernel: [stages][warp][K, V][kKeys][D / 8] (swizzled as above), read
  // by the whole warp after a __syncwarp.
  extern __shared__ uint4 s_ring[];
  __shared__ float s_acc[W][G][D];
  __shared__ float s_m[W][G];
  __shared__ float s_l[W][G];

  dev::allow_next_kernel();
  const int t = static_cast<int>(blockIdx.z);
  const int split = static_cast<int>(blockIdx.x);
  const int head0 = static_cast<int>(blockIdx.y) * G;
  const int kvh = head0 / a.group;
  const int warp = threadIdx.x / 32;
  const int grp = threadIdx.x / kLanesPerKey;
  const int li = threadIdx.x % kLanesPerKey;
  [[maybe_unused]] const int lane_id = static_cast<int>(threadIdx.x % 32);

  // Before the wait: only the metadata and the table (see the file comment).
  const int s = dev::seq_of_token(a.off, a.n_seqs, t);
  const dev::SeqSpan span = dev::seq_span(a.off, a.n_tokens, s);
  const int64_t p = dev::token_position(a.pos, a.off, s, t);
  const int64_t total = p - (t - span.begin) + span.count;
  // Position of the sequence's first new token, read from k/v rather than the pool (quantized
  // pools: none, see the file comment).
  const int64_t new_begin = kQuant ? total : total - span.count;
  const int64_t row_bytes = static_cast<int64_t>(D) * 2;
  [[maybe_unused]] const int64_t value_scales = a.pool.values_bytes / D * 4;  // quantized: key -> value scale
  const dev::KeyRange range =
      dev::key_range(p, total, a.causal, a.window, a.pool.cols << a.pool.block_shift);
  const int len = range.hi - range.lo + 1;
  const int chunk = max(a.min_chunk, (len + a.n_splits - 1) / a.n_splits);
  // Splits that hold keys (at least one, so that a query with none still writes its zero row).
  // The others have nothing to add and leave at once; a single active split writes the output
  // itself.
  const int active = len > chunk ? (len + chunk - 1) / chunk : 1;
  if (split >= active) return;  // never split 0, which appends k/v
  const bool direct = active == 1;
  const int64_t begin64 = range.lo + static_cast<int64_t>(split) * chunk;
  const int k_begin = static_cast<int>(min(begin64, static_cast<int64_t>(range.hi) + 1));
  const int k_end = static_cast<int>(min(static_cast<int64_t>(range.hi) + 1, static_cast<int64_t>(k_begin) + chunk));

  // Key j's K row (its V row is a.v - a.k further for this batch's keys, values_bytes for the
  // pool's): this batch's from k/v, earlier ones from the pool; null outside the split or where
  // the table has no block. Found for one trip just before its copies are issued.
  const uint8_t* kp[kUnroll];
  [[maybe_unused]] const uint8_t* ksp[kUnroll];  // quantized: the key row's scale (the value's is B * Hkv * 4 further)
  [[maybe_unused]] bool fresh[kUnroll];
  // A lane group's kUnroll keys of a trip are consecutive, so that one table lookup serves those
  // in the same cache block (a lookup is a dependent load in front of the trip's copies). The
  // entry of the block holding the group's first key of the next trip is loaded when a trip is
  // issued (prefetch), so that its latency passes during the computation in between rather than
  // in front of the next trip's copies; keys of another block look theirs up then.
  int64_t next_logical = -1;  // the logical block prefetched, or -1
  int next_entry = -1;        // its table entry
  auto prefetch = [&](int base) {
    const int j = base + grp * kUnroll;
    next_logical = -1;
    if (j >= 0 && j < k_end && (j >> a.pool.block_shift) < a.pool.cols) {
      next_logical = j >> a.pool.block_shift;
      next_entry = __ldg(a.pool.table + static_cast<int64_t>(s) * a.pool.cols + next_logical);
    }
  };
  auto locate = [&](int base) {
    if constexpr (!kQuant) {
      // The usual trip: the group's kUnroll keys are cache rows of one block (the group's first
      // key a multiple of kUnroll, blocks of at least kUnroll keys), all inside the split and
      // none new, so one table entry and one address serve all of them (the general code below
      // looks each key up; it made the loop's bookkeeping longer than its arithmetic).
      const int j0 = base + grp * kUnroll;
      if (j0 >= 0 && (j0 & (kUnroll - 1)) == 0 && (1 << a.pool.block_shift) >= kUnroll && j0 + kUnroll <= k_end &&
          j0 + kUnroll <= new_begin) {
        const int64_t logical = j0 >> a.pool.block_shift;
        int64_t block = -1;
        if (logical < a.pool.cols) {
          const int entry = logical == next_logical
                                ? next_entry
                                : __ldg(a.pool.table + static_cast<int64_t>(s) * a.pool.cols + logical);
          if (entry >= 0 && entry < a.pool.n_blocks) block = entry * a.pool.block_bytes;
        }
        const uint8_t* const first =
            block < 0 ? nullptr : a.pool.base + a.pool.key_offset_in(block, j0, kvh) + li * 16;
        const int64_t key_stride = static_cast<int64_t>(a.pool.kv_heads) * a.pool.row_bytes;  // next slot, same head
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          kp[u] = first == nullptr ? nullptr : first + u * key_stride;
          fresh[u] = false;
        }
        return;
      }
    }
    int64_t looked_up = -1, block_at = -1;  // the last logical block looked up, and its offset
    auto block_of = [&](int j) {
      const int64_t logical = j >> a.pool.block_shift;
      if (logical != looked_up) {
        looked_up = logical;
        if (logical == next_logical)
          block_at = next_entry < 0 || next_entry >= a.pool.n_blocks ? -1 : next_entry * a.pool.block_bytes;
        else
          block_at = a.pool.block_offset(s, j);
      }
      return block_at;
    };
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + grp * kUnroll + u;
      kp[u] = nullptr;
      fresh[u] = j >= new_begin;
      if (j < k_end) {
        if constexpr (kQuant) {
          const int64_t block = block_of(j);
          if (block >= 0) {
            const int64_t row = a.pool.key_row(j, kvh);
            kp[u] = a.pool.base + block + row * D + li * 8;
            ksp[u] = a.pool.base + block + a.pool.scales_bytes + row * 4;
          }
        } else if (fresh[u]) {
          if (j - new_begin < span.count)
            kp[u] = a.k + ((span.begin + (j - new_begin)) * a.pool.kv_heads + kvh) * row_bytes + li * 16;
        } else {
          const int64_t block = block_of(j);
          const int64_t at = a.pool.key_offset_in(block, j, kvh);
          if (at >= 0) kp[u] = a.pool.base + at + li * 16;
        }
      }
    }
  };
  locate(k_begin);
  // The cache append: the first CTA of each (token, KV head) stores the token's k/v rows. Nothing
  // in this launch reads them back from the cache (new keys are read from k/v), so no reader
  // races with these stores.
  const bool appends = !kQuant && split == 0 && head0 % a.group == 0 && threadIdx.x < D / 8;
  const int64_t append_at = appends ? a.pool.key_offset(s, p, kvh) : -1;
  auto append = [&] {
    if (append_at < 0) return;
    const int64_t src = (static_cast<int64_t>(t) * a.pool.kv_heads + kvh) * row_bytes + threadIdx.x * 16;
    const uint4 new_k = *reinterpret_cast<const uint4*>(a.k + src);
    const uint4 new_v = *reinterpret_cast<const uint4*>(a.v + src);
    *reinterpret_cast<uint4*>(a.pool.base + append_at + threadIdx.x * 16) = new_k;
    *reinterpret_cast<uint4*>(a.pool.base + append_at + a.pool.values_bytes + threadIdx.x * 16) = new_v;
  };

  dev::wait_for_previous_kernel();

  if constexpr (kQuant) {
    // The new rows this split reads (see the file comment), stored before any copy is issued and
    // made visible to the CTA's copies by the barrier. Bounds are CTA-uniform.
    const int64_t first_new = total - span.count;
    const int64_t lo_new = max(first_new, static_cast<int64_t>(k_begin));
    const int64_t hi_new = min(total, static_cast<int64_t>(k_end));
    if (lo_new < hi_new) {
      if (warp == 0) {
        const kvcache::KvGeometry kv{int64_t{1} << a.pool.block_shift, a.pool.kv_heads, D, F};
        const int lane = static_cast<int>(threadIdx.x);
        for (int64_t j = lo_new; j < hi_new; ++j) {
          const int64_t block = a.pool.block_offset(s, j);
          if (block < 0) continue;
          const int64_t src = ((span.begin + (j - first_new)) * a.pool.kv_heads + kvh) * D;
          const int64_t slot = j & ((int64_t{1} << a.pool.block_shift) - 1);
          dev::store_quantized_row<T, D>(reinterpret_cast<const T*>(a.k) + src, a.pool.base + block,
                                         kv.row(0, slot, kvh), kv, lane);
          dev::store_quantized_row<T, D>(reinterpret_cast<const T*>(a.v) + src, a.pool.base + block,
                                         kv.row(1, slot, kvh), kv, lane);
        }
      }
      __syncthreads();
    }
  }

  // The ring. With two stages (three: two trips ahead), trip i + 1's copies are issued before
  // trip i is computed, so that
  // its loads are in flight during the arithmetic (they used to wait for it and for the next
  // table lookup). Each trip commits one cp.async group (empty past the split's end), so that
  // "all but the newest stages - 1 groups complete" means "this trip has landed". Bit
  // kUnroll * n + u of ok_bits: key u of the trip n trips after the one computed next exists
  // (its piece is real, not zero-filled). kMma: bit kKeys * n + r: key r of the warp's
  // share of that trip exists (gathered from the lanes that copy it with a ballot).
  const int ahead = a.stages - 1;
  uint64_t ok_bits = 0;
  int issue_base = k_begin;  // first key of the next trip to issue
  int issue_slot = 0;
  auto issue_next = [&](int trips_ahead) {
    if (issue_base < k_end) {
      if (issue_base != k_begin) locate(issue_base);  // k_begin's keys were found before the wait
      uint4* const dst = s_ring + issue_slot * (kUnroll * 2 * kThreads) + threadIdx.x;
      [[maybe_unused]] uint4* const tile = s_ring + issue_slot * (kUnroll * 2 * kThreads) + warp * kWarpTile;
      [[maybe_unused]] unsigned valid = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const bool ok = kp[u] != nullptr;
        if constexpr (kQuant) {
          // Absent keys read nothing (zero codes, zero scales).
          const uint8_t* const key = ok ? kp[u] : a.pool.base;
          const uint8_t* const value = ok ? kp[u] + a.pool.values_bytes : a.pool.base;
          const uint8_t* const key_scale = ok ? ksp[u] : a.pool.base;
          const uint8_t* const value_scale = ok ? ksp[u] + value_scales : a.pool.base;
          uint8_t* const codes = reinterpret_cast<uint8_t*>(dst + (2 * u) * kThreads);
          uint8_t* const scales = reinterpret_cast<uint8_t*>(dst + (2 * u + 1) * kThreads);
          dev::cp_async8(codes, key, ok);
          dev::cp_async8(codes + 8, value, ok);
          dev::cp_async4(scales, key_scale, ok);
          dev::cp_async4(scales + 4, value_scale, ok);
        } else {
          // Absent keys read nothing (zero-filled); the pool base only keeps the address valid.
          const uint8_t* const key = ok ? kp[u] : a.pool.base;
          const uint8_t* const value = ok ? kp[u] + (fresh[u] ? a.v - a.k : a.pool.values_bytes) : a.pool.base;
          if constexpr (kMma) {
            const int r = (lane_id / kLanesPerKey) * kUnroll + u;  // the key within the warp's share
            const int at = r * kLanesPerKey + (li ^ (r & 7));
            dev::cp_async16(tile + at, key, ok);
            dev::cp_async16(tile + kKeys * kLanesPerKey + at, value, ok);
            valid |= static_cast<unsigned>(ok) << u;  // this lane group's keys; gathered below
          } else {
            dev::cp_async16(dst + (2 * u) * kThreads, key, ok);
            dev::cp_async16(dst + (2 * u + 1) * kThreads, value, ok);
          }
        }
        if constexpr (!kMma) ok_bits |= static_cast<unsigned>(ok) << (trips_ahead * kUnroll + u);
      }
      if constexpr (kMma) {
        // Key r = q * kUnroll + u of the warp's share exists: bit u of lane group q's mask (the
        // lanes of a group agree on it).
        unsigned gathered = 0;
#pragma unroll
        for (int q = 0; q < 32 / kLanesPerKey; ++q)
          gathered |= __shfl_sync(0xffffffffu, valid, q * kLanesPerKey) << (q * kUnroll);
        ok_bits |= static_cast<uint64_t>(gathered) << (trips_ahead * kKeys);
      }
      prefetch(issue_base + kStep);
    }
    dev::cp_async_commit();
    issue_base += kStep;
    issue_slot = issue_slot + 1 == a.stages ? 0 : issue_slot + 1;
  };
  for (int i = 0; i < ahead; ++i) issue_next(i);

  // This lane's D/8 slice of each head's query, kept packed (converted per use: 16 registers
  // fewer for G = 4) and not read until the first keys' loads are out.
  // kMma: the m16n8k16 A fragments of the query rows (row g = head g of the CTA's G, rows G to
  // 15 zero) for each 16 dimensions, loaded once.
  const T* const q = static_cast<const T*>(a.q);
  [[maybe_unused]] uint4 qr[G];
  [[maybe_unused]] uint32_t qa[kMma ? D / 16 : 1][4];
  [[maybe_unused]] const int mg = lane_id / 4, mt = lane_id % 4;  // kMma: this lane's fragment row and column pair
  if constexpr (kMma) {
    const T* const row = q + (static_cast<int64_t>(t) * a.n_heads + head0 + mg) * D + 2 * mt;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      qa[ks][0] = mg < G ? *reinterpret_cast<const uint32_t*>(row + 16 * ks) : 0u;
      qa[ks][1] = 0u;
      qa[ks][2] = mg < G ? *reinterpret_cast<const uint32_t*>(row + 16 * ks + 8) : 0u;
      qa[ks][3] = 0u;
    }
  } else {
#pragma unroll
    for (int h = 0; h < G; ++h)
      qr[h] = *reinterpret_cast<const uint4*>(q + (static_cast<int64_t>(t) * a.n_heads + head0 + h) * D + li * 8);
  }

  [[maybe_unused]] float m[G], l[G], acc[G][8];
  // kMma: this lane's running max and sum of its fragment row (the max is the same across the
  // row's four lanes, each sums its own keys), and the m16n8 accumulators of O [16 x D].
  [[maybe_unused]] float mrow = -INFINITY, lrow = 0.0f;
  [[maybe_unused]] float o[kMma ? D / 8 : 1][4];
  if constexpr (kMma) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  } else {
#pragma unroll
    for (int h = 0; h < G; ++h) {
      m[h] = -INFINITY;
      l[h] = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] = 0.0f;
    }
  }

  // The trip count is the same for every lane (the shuffles below need the whole warp). Each
  // trip reads kUnroll keys per lane group and folds them into the running softmax at once: one
  // rescale of the accumulators per trip instead of one per key.
  int slot = 0;
  for (int base = k_begin; base < k_end; base += kStep) {
    // kMma: every lane of the warp is past its reads of the slot the next copies go to.
    if constexpr (kMma) __syncwarp();
    issue_next(ahead);
    if (base == k_begin) append();  // behind the first trip's copies, so that the waits overlap
    if (ahead == 0) dev::cp_async_wait<0>();
    else if (ahead == 1) dev::cp_async_wait<1>();
    else dev::cp_async_wait<2>();
    if constexpr (kMma) {
      __syncwarp();  // the other lanes' copies of this trip are visible too
      const uint4* const tile = s_ring + slot * (kUnroll * 2 * kThreads) + warp * kWarpTile;
      const auto valid = static_cast<unsigned>(ok_bits & ((1u << kKeys) - 1u));
      ok_bits >>= kKeys;
      slot = slot + 1 == a.stages ? 0 : slot + 1;
      // S = Q K^T for the warp's keys: kNt n8 tiles, D / 16 k-steps, one ldmatrix per two.
      constexpr int kNt = kKeys / 8;
      float sacc[kNt][4];
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) sacc[nt][0] = sacc[nt][1] = sacc[nt][2] = sacc[nt][3] = 0.0f;
#pragma unroll
      for (int pc = 0; pc < kLanesPerKey / 4; ++pc) {
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt) {
          const int r = nt * 8 + (lane_id & 7);
          const int c = 4 * pc + (lane_id >> 3);
          uint32_t b[4];
          dev::ldmatrix_x4(b, tile + r * kLanesPerKey + (c ^ (r & 7)));
          dev::mma_16816<T>(sacc[nt], qa[2 * pc], b[0], b[1]);
          dev::mma_16816<T>(sacc[nt], qa[2 * pc + 1], b[2], b[3]);
        }
      }
      // This lane's scores: row mg, keys 8 nt + 2 mt + e (rows 8-15, sacc[.][2..3], are padding).
      float sc[kNt][2];
      float mx = mrow;
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = nt * 8 + 2 * mt + e;
          sc[nt][e] = (valid >> key) & 1u ? sacc[nt][e] * a.scale_log2 : -INFINITY;
          mx = fmaxf(mx, sc[nt][e]);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_use = mx == -INFINITY ? 0.0f : mx;  // nothing visible yet: keep exp2 finite
      const float alpha = exp2f(mrow - m_use);
      mrow = mx;
      float pw[kNt][2];
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          pw[nt][e] = exp2f(sc[nt][e] - m_use);
          sum += pw[nt][e];
        }
      lrow = lrow * alpha + sum;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[j][0] *= alpha;
        o[j][1] *= alpha;
      }
      // O += P V: P is the A fragment (its k dimension the warp's keys; rows 8-15 zero), V comes
      // through ldmatrix.trans, each 8 x 8 matrix (8 keys x dims 8c .. 8c + 7) a B fragment.
      const uint4* const v_tile = tile + kKeys * kLanesPerKey;
      if constexpr (kKeys == 16) {
        const uint32_t pa[4] = {E::pack(pw[0][0], pw[0][1]), 0u, E::pack(pw[kNt - 1][0], pw[kNt - 1][1]), 0u};
#pragma unroll
        for (int jp = 0; jp < D / 16; ++jp) {
          const int r = (lane_id & 7) + ((lane_id >> 3) & 1) * 8;  // matrices (keys 0-7 | 8-15) x (c | c + 1)
          const int c = 2 * jp + (lane_id >> 4);
          uint32_t b[4];
          dev::ldmatrix_x4_trans(b, v_tile + r * kLanesPerKey + (c ^ (r & 7)));
          dev::mma_16816<T>(o[2 * jp], pa, b[0], b[1]);
          dev::mma_16816<T>(o[2 * jp + 1], pa, b[2], b[3]);
        }
      } else {
        const uint32_t pa[2] = {E::pack(pw[0][0], pw[0][1]), 0u};
#pragma unroll
        for (int jq = 0; jq < D / 32; ++jq) {
          const int r = lane_id & 7;  // matrices keys 0-7 x (c .. c + 3)
          const int c = 4 * jq + (lane_id >> 3);
          uint32_t b[4];
          dev::ldmatrix_x4_trans(b, v_tile + r * kLanesPerKey + (c ^ (r & 7)));
#pragma unroll
          for (int i = 0; i < 4; ++i) dev::mma_1688<T>(o[4 * jq + i], pa, b[i]);
        }
      }
      continue;
    }
    const uint4* const src = s_ring + slot * (kUnroll * 2 * kThreads) + threadIdx.x;
    uint4 kr[kUnroll], vr[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ok[u] = (ok_bits >> u) & 1u;
      kr[u] = src[(2 * u) * kThreads];
      vr[u] = src[(2 * u + 1) * kThreads];
    }
    ok_bits >>= kUnroll;
    slot = slot + 1 == a.stages ? 0 : slot + 1;
    float sc[kUnroll][G];  // scores in log2 units; -inf for keys outside the split or the table
    float vf[kUnroll][8];
    [[maybe_unused]] float key_scale[kUnroll], value_scale[kUnroll];  // quantized rows' scales
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      if constexpr (kQuant) {
        codes_to_float<F>(kr[u].x, kr[u].y, kf);
        codes_to_float<F>(kr[u].z, kr[u].w, vf[u]);
        key_scale[u] = __uint_as_float(vr[u].x) * (kCodeScale<F> * a.scale_log2);
        value_scale[u] = __uint_as_float(vr[u].y) * kCodeScale<F>;
      } else {
        const uint32_t kw[4] = {kr[u].x, kr[u].y, kr[u].z, kr[u].w};
        const uint32_t vw[4] = {vr[u].x, vr[u].y, vr[u].z, vr[u].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 kf2 = E::to_float2(kw[e]);
          const float2 vf2 = E::to_float2(vw[e]);
          kf[2 * e] = kf2.x;
          kf[2 * e + 1] = kf2.y;
          vf[u][2 * e] = vf2.x;
          vf[u][2 * e + 1] = vf2.y;
        }
      }
#pragma unroll
      for (int h = 0; h < G; ++h) {
        const uint32_t qw[4] = {qr[h].x, qr[h].y, qr[h].z, qr[h].w};
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 qf = E::to_float2(qw[e]);
          dot = fmaf(qf.x, kf[2 * e], dot);
          dot = fmaf(qf.y, kf[2 * e + 1], dot);
        }
#pragma unroll
        for (int o = kLanesPerKey / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if constexpr (kQuant) sc[u][h] = ok[u] ? dot * key_scale[u] : -INFINITY;
        else sc[u][h] = ok[u] ? dot * a.scale_log2 : -INFINITY;
      }
    }
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float mx = m[h];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, sc[u][h]);
      const float m_use = mx == -INFINITY ? 0.0f : mx;  // nothing visible yet: keep exp2 finite
      const float alpha = exp2f(m[h] - m_use);
      m[h] = mx;
      float pw[kUnroll];
      float sum = 0.0f;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        pw[u] = exp2f(sc[u][h] - m_use);
        sum += pw[u];
      }
      l[h] = l[h] * alpha + sum;
      if constexpr (kQuant) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) pw[u] *= value_scale[u];  // the weight of the codes
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float acc_e = acc[h][e] * alpha;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) acc_e = fmaf(pw[u], vf[u][e], acc_e);
        acc[h][e] = acc_e;
      }
    }
  }
  if (k_begin >= k_end) append();  // no keys (garbage positions): the loop never ran

  // Merge the lane groups of each warp (lanes li, li + D/8, ...) with shuffles, then the warps
  // through shared memory. kMma: a row's four lanes add their sums; the lanes of rows below G
  // hold the warp's output for head mg, dimensions 8 j + 2 mt + e.
  if constexpr (kMma) {
    lrow += __shfl_xor_sync(0xffffffffu, lrow, 1);
    lrow += __shfl_xor_sync(0xffffffffu, lrow, 2);
    if (mg < G) {
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        s_acc[warp][mg][8 * j + 2 * mt] = o[j][0];
        s_acc[warp][mg][8 * j + 2 * mt + 1] = o[j][1];
      }
      if (mt == 0) {
        s_m[warp][mg] = mrow;
        s_l[warp][mg] = lrow;
      }
    }
  }
#pragma unroll
  for (int h = 0; h < (kMma ? 0 : G); ++h) {
    float mx = m[h];
#pragma unroll
    for (int o = kLanesPerKey; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float w = mx == -INFINITY ? 0.0f : exp2f(m[h] - mx);
    float lw = l[h] * w;
#pragma unroll
    for (int o = kLanesPerKey; o < 32; o <<= 1) lw += __shfl_xor_sync(0xffffffffu, lw, o);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float x = acc[h][e] * w;
#pragma unroll
      for (int o = kLanesPerKey; o < 32; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
      acc[h][e] = x;
    }
    if (grp % (32 / kLanesPerKey) == 0) {
#pragma unroll
      for (int e = 0; e < 8; ++e) s_acc[warp][h][li * 8 + e] = acc[h][e];
      if (li == 0) {
        s_m[warp][h] = mx;
        s_l[warp][h] = lw;
      }
    }
  }
  __syncthreads();
  T* const out = static_cast<T*>(a.out);
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int h = i / D, d = i % D;
    float mx = -INFINITY;
#pragma unroll
    for (int wi = 0; wi < W; ++wi) mx = fmaxf(mx, s_m[wi][h]);
    float num = 0.0f, den = 0.0f;
    if (mx != -INFINITY)
#pragma unroll
      for (int wi = 0; wi < W; ++wi) {
        const float w = exp2f(s_m[wi][h] - mx);
        num = fmaf(w, s_acc[wi][h][d], num);
        den = fmaf(w, s_l[wi][h], den);
      }
    const int64_t row = static_cast<int64_t>(t) * a.n_heads + head0 + h;
    if (direct) {
      const float r = den > 0.0f ? num / den : 0.0f;
      out[row * D + d] = E::from_float(r);
    } else {
      const int64_t prow = row * a.n_splits + split;
      a.partial_out[prow * D + d] = num;
      if (d == 0) {
        a.partial_ml[prow * 2] = mx;
        a.partial_ml[prow * 2 + 1] = den;
      }
    }
  }
  if (direct) return;
  // The last CTA of this (token, head group) to arrive combines the group's partials; it also
  // puts the counter back to zero for the next launch.
  __shared__ bool s_last;
  __syncthreads();
  unsigned* counter = a.arrivals + static_cast<int64_t>(t) * gridDim.y + blockIdx.y;
  if (threadIdx.x == 0) s_last = arrive(counter) == static_cast<unsigned>(active) - 1;
  __syncthreads();
  if (!s_last) return;
  // Each thread combines one (head, dim) over the splits, kBatch splits' loads in flight at once
  // (L2 reads: the partials were written by other SMs).
  constexpr int kBatch = 8;
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int h = i / D, d = i % D;
    const int64_t row = static_cast<int64_t>(t) * a.n_heads + head0 + h;
    const float* ml = a.partial_ml + row * a.n_splits * 2;
    const float* rows = a.partial_out + row * a.n_splits * D + d;
    float mx = -INFINITY, num = 0.0f, den = 0.0f;
    for (int i0 = 0; i0 < active; i0 += kBatch) {
      float pm[kBatch], pl[kBatch], pv[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const bool live = i0 + u < active;
        pm[u] = live ? __ldcg(ml + 2 * (i0 + u)) : -INFINITY;
        pl[u] = live ? __ldcg(ml + 2 * (i0 + u) + 1) : 0.0f;
        pv[u] = live ? __ldcg(rows + static_cast<int64_t>(i0 + u) * D) : 0.0f;
      }
      float bm = mx;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) bm = fmaxf(bm, pm[u]);
      if (bm == -INFINITY) continue;
      const float r = exp2f(mx - bm);
      num *= r;
      den *= r;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const float w = exp2f(pm[u] - bm);
        num = fmaf(w, pv[u], num);
        den = fmaf(w, pl[u], den);
      }
      mx = bm;
    }
    out[row * D + d] = E::from_float(den > 0.0f ? num / den : 0.0f);
  }
  if (threadIdx.x == 0) *counter = 0;
}

template <class T, int D, int G, int W, KvFormat F, bool kMma>
cudaError_t launch(const Problem& p, const DecodePlan& plan, cudaStream_t stream) {
  DecodeArgs a;
  static_cast<dev::BatchArgs&>(a) = dev::make_batch_args(p);
  a.k = static_cast<const uint8_t*>(p.k);
  a.v = static_cast<const uint8_t*>(p.v);
  a.n_splits = plan.n_splits;
  a.min_chunk = plan.min_chunk;
  a.partial_out = plan.partial_out;
  a.partial_ml = plan.partial_ml;
  a.arrivals = plan.arrivals;
  a.stages = plan.stages;
  const dim3 grid(static_cast<unsigned>(plan.n_splits), static_cast<unsigned>(p.n_heads / G),
                  static_cast<unsigned>(p.n_tokens));
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(W * 32);
  config.dynamicSmemBytes = static_cast<size_t>(plan.stages) * decode_stage_bytes(W);
  config.stream = stream;
  config.attrs = p.programmatic ? &attribute : nullptr;
  config.numAttrs = p.programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&config, decode_kernel<T, D, G, W, F, kMma>, a);
}

template <class T, int D, int G, KvFormat F, bool kMma>
cudaError_t launch_warps(const Problem& p, const DecodePlan& plan, cudaStream_t stream) {
  switch (plan.warps) {
    case kDecodeWideWarps: return launch<T, D, G, kDecodeWideWarps, F, kMma>(p, plan, stream);
    default: return launch<T, D, G, kDecodeWarps, F, kMma>(p, plan, stream);
  }
}

template <class T, int D, int G>
cudaError_t launch_format(const Problem& p, const DecodePlan& plan, cudaStream_t stream) {
  switch (p.kv_format) {
    case KvFormat::int8: return launch_warps<T, D, G, KvFormat::int8, false>(p, plan, stream);
    case KvFormat::fp8: return launch_warps<T, D, G, KvFormat::fp8, false>(p, plan, stream);
    default:
      return plan.mma ? launch_warps<T, D, G, KvFormat::bf16, true>(p, plan, stream)
                      : launch_warps<T, D, G, KvFormat::bf16, false>(p, plan, stream);
  }
}

template <class T, int D>
cudaError_t launch_heads(const Problem& p, const DecodePlan& plan, cudaStream_t stream) {
  switch (decode_heads_per_cta(p.n_heads / p.n_kv_heads)) {
    case 1: return launch_format<T, D, 1>(p, plan, stream);
    case 2: return launch_format<T, D, 2>(p, plan, stream);
    default: return launch_format<T, D, 4>(p, plan, stream);
  }
}

template <class T, int D, int G, int W, KvFormat F, bool kMma>
cudaError_t fit(DecodeFit& f) {
  const auto kernel = decode_kernel<T, D, G, W, F, kMma>;
  cudaFuncAttributes attr{};
  cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
  int device = 0, optin = 0;
  if (e == cudaSuccess) e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return e;
  const int stage = decode_stage_bytes(W);
  const int room = (optin - static_cast<int>(attr.sharedSizeBytes)) / stage;
  if (room < 1) return cudaErrorInvalidConfiguration;  // below any GPU flash accepts (sm_80+)
  auto occupancy = [&](int stages, int& per_sm) {
    cudaError_t r = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, stages * stage);
    if (r == cudaSuccess)
      r = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, W * 32, static_cast<size_t>(stages) * stage);
    return r;
  };
  // Two stages (one where only one fits); the tensor-core kernel takes a third where that keeps
  // as many CTAs on an SM (its arithmetic is short, so more copies in flight pay).
  f.stages = room < kDecodeMaxStages ? room : kDecodeMaxStages;
  e = occupancy(f.stages, f.per_sm);
  if (e == cudaSuccess && kMma && room >= kMmaMaxStages) {
    int deeper = 0;
    e = occupancy(kMmaMaxStages, deeper);
    if (e == cudaSuccess && deeper >= f.per_sm) f.stages = kMmaMaxStages;
    else if (e == cudaSuccess) e = occupancy(f.stages, f.per_sm);  // back to the shallower ring's limit
  }
  if (e == cudaSuccess && kMma && f.per_sm < 1) return cudaErrorInvalidConfiguration;  // cannot run at all
  if (f.per_sm < 1) f.per_sm = 1;
  f.mma = kMma;
  return e;
}

// One CTA width: the tensor-core kernel where allowed, unless its ring would hold fewer than two
// stages or an SM fewer of its CTAs than of the CUDA-core kernel's (the rings are the same size;
// registers could still differ: a ring of twice the bytes, 3 CTAs an SM instead of 4, measured
// 1.8x slower at batch 64 on the H200). Any failure to fit it leaves the CUDA-core kernel,
// which has fitted already.
template <class T, int D, int G, int W, KvFormat F>
cudaError_t fit_width(bool allow_mma, DecodeFit& f) {
  f = DecodeFit{};
  cudaError_t e = fit<T, D, G, W, F, false>(f);
  if constexpr (F == KvFormat::bf16) {
    if (e == cudaSuccess && allow_mma) {
      DecodeFit mma;
      if (fit<T, D, G, W, F, true>(mma) == cudaSuccess && mma.stages >= 2 && mma.per_sm >= f.per_sm) f = mma;
      (void)cudaGetLastError();  // (a failed query leaves no error behind for a later launch check)
    }
  }
  return e;
}

template <class T, int D, int G, KvFormat F>
cudaError_t fit_widths(bool allow_mma, DecodeFit& narrow, DecodeFit& wide) {
  const cudaError_t e = fit_width<T, D, G, kDecodeWarps, F>(allow_mma, narrow);
  return e != cudaSuccess ? e : fit_width<T, D, G, kDecodeWideWarps, F>(allow_mma, wide);
}

template <class T, int D, int G>
cudaError_t fit_format(KvFormat format, bool allow_mma, DecodeFit& narrow, DecodeFit& wide) {
  switch (format) {
    case KvFormat::int8: return fit_widths<T, D, G, KvFormat::int8>(false, narrow, wide);
    case KvFormat::fp8: return fit_widths<T, D, G, KvFormat::fp8>(false, narrow, wide);
    default: return fit_widths<T, D, G, KvFormat::bf16>(allow_mma, narrow, wide);
  }
}

template <class T, int D>
cudaError_t fit_heads(int group, KvFormat format, bool allow_mma, DecodeFit& narrow, DecodeFit& wide) {
  switch (decode_heads_per_cta(group)) {
    case 1: return fit_format<T, D, 1>(format, allow_mma, narrow, wide);
    case 2: return fit_format<T, D, 2>(format, allow_mma, narrow, wide);
    default: return fit_format<T, D, 4>(format, allow_mma, narrow, wide);
  }
}

}  // namespace

cudaError_t configure_decode(Dtype dtype, int head_dim, int group, KvFormat format, bool allow_mma,
                             DecodeFit& narrow, DecodeFit& wide) {
  if (dtype == Dtype::bf16)
    return head_dim == 64 ? fit_heads<__nv_bfloat16, 64>(group, format, allow_mma, narrow, wide)
                          : fit_heads<__nv_bfloat16, 128>(group, format, allow_mma, narrow, wide);
  return head_dim == 64 ? fit_heads<__half, 64>(group, format, allow_mma, narrow, wide)
                        : fit_heads<__half, 128>(group, format, allow_mma, narrow, wide);
}

cudaError_t launch_decode(const Problem& p, const DecodePlan& plan, cudaStream_t stream) {
  if (p.n_tokens == 0) return cudaSuccess;
  if (p.dtype == Dtype::bf16)
    return p.head_dim == 64 ? launch_heads<__nv_bfloat16, 64>(p, plan, stream)
                            : launch_heads<__nv_bfloat16, 128>(p, plan, stream);
  return p.head_dim == 64 ? launch_heads<__half, 64>(p, plan, stream) : launch_heads<__half, 128>(p, plan, stream);
}

}  // namespace loomp::flash
