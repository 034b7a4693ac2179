// The samplers' CUDA paths over candidate rows (ABI 1.3, plugin-api/loom/sampler.h
// "Candidates"); see samplers_cuda.hpp for the calls.
//
// top-k from dense rows into candidates, with one read of the rows. Blocks take a chunk of 4096
// entries of a row each.
//  - k <= 128 (top_k_fast_kernel, one kernel): a block keeps the entries of its chunk that reach
//    a bound taken from its threads' maxima (about 1.5 k of them for smooth rows); the row's last
//    block to finish bounds the row the same way over those, ranks what reaches it and writes the
//    row's k best in (logit desc, id asc) order. A chunk with too many entries at its bound
//    (crowds of equal logits) gives its exact k best by a radix select instead.
//  - larger k (chunk_best_kernel then merge_best_kernel): each chunk's exact k best by a radix
//    select on the 32-bit order key (four 8-bit digit histograms, ties at the threshold taken by
//    id through a block scan), then per row a radix select on the 64-bit composite key over the
//    chunks' entries.
// The row's k best are among the chunks' k best, which are among the entries that reach a chunk's
// bound, so every path keeps exactly the CPU's set. Every path reads a dense logit times the scale
// a temperature link deferred (ABI 1.4), so temperature costs no pass of its own over the rows.
// The other links work on a row's few candidates in one block per row; the sums that decide a
// token (top-p's total and nucleus, dist's total and walk) run in one thread, in the CPU's order
// (id order for totals, candidate order for the nucleus), so that they keep and draw exactly the
// CPU's tokens.
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "samplers_cuda.hpp"
#include "samplers_device.cuh"

namespace loomp::samplers::cuda {
namespace {

constexpr int kChunk = 4096;                   // entries of a row per stage-1 block
constexpr int kThreads = 256;                  // threads of a stage-1 block
constexpr int kItems = kChunk / kThreads;      // 16 entries a thread, contiguous ids
constexpr int kMergeThreads = 1024;            // threads of a stage-2 block
constexpr int kRowThreads = 256;               // threads of a per-row candidate kernel
constexpr int kMaxK = 1024;                    // largest k of the candidate path
constexpr int kMaxChunks = 1024;               // largest vocabulary: 4M entries

inline int64_t chunks_of(int64_t vocab) { return (vocab + kChunk - 1) / kChunk; }
inline size_t align256(size_t b) { return (b + 255) / 256 * 256; }

// The level's digit from a 256-bin histogram (from the top): the digit d whose bin holds the
// need-th entry counted from the top, with `above` entries in higher bins and `bin` in d's.
// need is in [1, total]. Run by warp 0; results in shared memory, valid after a barrier.
struct Pick {
  int digit;
  unsigned above, bin, total;
};
__device__ void pick_digit(const unsigned* hist, unsigned need, Pick* out) {
  if (threadIdx.x >= 32) return;
  const int lane = static_cast<int>(threadIdx.x);
  unsigned c[8], sum = 0;
  for (int i = 0; i < 8; ++i) {
    c[i] = hist[255 - 8 * lane - i];
    sum += c[i];
  }
  unsigned incl = sum;
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  const unsigned total = __shfl_sync(0xffffffffu, incl, 31);
  const unsigned excl = incl - sum;
  if (lane == 0) out->total = total;
  if (need >= 1 && excl < need && need <= incl) {
    unsigned run = excl;
    for (int i = 0; i < 8; ++i) {
      if (run + c[i] >= need) {
        out->digit = 255 - 8 * lane - i;
        out->above = run;
        out->bin = c[i];
        break;
      }
      run += c[i];
    }
  }
}

// hist[bin] += 1 for every lane of the warp where `add` holds, one shared atomic per distinct bin:
// logits crowd into few digits (the top digit of most of a row's entries is the same), and
// 32 lanes hitting one counter would serialise. Every lane of the warp must call it.
__device__ __forceinline__ void warp_hist_add(unsigned* hist, unsigned bin, bool add) {
  const unsigned adding = __ballot_sync(0xffffffffu, add);
  if (!add) return;
  const unsigned peers = __match_any_sync(adding, bin);
  if ((threadIdx.x & 31u) == static_cast<unsigned>(__ffs(peers) - 1)) atomicAdd(&hist[bin], __popc(peers));
}

// The radix select of both row-level fallbacks: over keys e of [0, total), where get(e, ok)
// gives key e and whether it takes part (keys distinct, non-zero), the prefix p such that
// exactly `need` of them are >= p, digit by digit (8 bits) from the top. Every thread of the
// block calls it (barriers inside).
template <class Get>
__device__ uint64_t select_kth64(int64_t total, unsigned need, Get get, unsigned* hist, Pick* pick) {
  uint64_t prefix = 0, mask = 0;
  for (int level = 0; level < 8 && need > 0; ++level) {
    const int shift = 56 - 8 * level;
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int64_t base = 0; base < total; base += blockDim.x) {  // the same count on every thread
      bool ok = false;
      const uint64_t key = get(base + threadIdx.x, ok);
      warp_hist_add(hist, static_cast<unsigned>((key >> shift) & 255u), ok && (key & mask) == prefix);
    }
    __syncthreads();
    pick_digit(hist, need, pick);
    __syncthreads();
    prefix |= static_cast<uint64_t>(pick->digit) << shift;
    mask |= uint64_t{255} << shift;
    need -= pick->above;
    const bool whole_bin = pick->bin == need;  // every key of the digit is kept: keep key >= prefix
    __syncthreads();
    if (whole_bin) break;  // (keys are distinct: at the last level the bin is one key)
  }
  return prefix;
}

// 0 marks an entry that is not there (-inf, or past the end of the row).
__device__ __forceinline__ uint32_t present_key(float f) { return f == -INFINITY ? 0u : order_key(f); }

// The dense rows' logit as the chain sees it: the stored value times the scale a link deferred
// (ABI 1.4 dense_scale; 1 when none): the same rounded multiply temperature would have stored.
__device__ __forceinline__ float owed(float v, float s) { return __fmul_rn(v, s); }

// The chunk's entries, one row's 4096 at a time: thread t holds ids 16t .. 16t + 15 (a blocked
// layout: the tie ranks of the radix select run in id order), read four at a time where the row
// is 16-byte aligned (the four loads of a warp cover 2 KiB together: every sector is read once).
// Keys are those of the scaled logits (times s).
__device__ __forceinline__ void load_chunk_keys(const float* __restrict__ r, int64_t first_id, int valid_here,
                                                float s, uint32_t (&key)[kItems]) {
  if (valid_here == kItems && reinterpret_cast<uintptr_t>(r + first_id) % 16 == 0) {
    const auto* r4 = reinterpret_cast<const float4*>(r + first_id);
#pragma unroll
    for (int q = 0; q < kItems / 4; ++q) {
      const float4 f = r4[q];
      key[4 * q] = present_key(owed(f.x, s));
      key[4 * q + 1] = present_key(owed(f.y, s));
      key[4 * q + 2] = present_key(owed(f.z, s));
      key[4 * q + 3] = present_key(owed(f.w, s));
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) key[i] = i < valid_here ? present_key(owed(r[first_id + i], s)) : 0u;
  }
}

// The chunk's exact k best (fewer when it holds fewer finite entries), in no particular order,
// to out_v/out_id from `base`, by a radix select of the k-th largest order key (four 8-bit digit
// histograms), ties at it taken by id. Returns how many. Every thread of the block calls it.
__device__ unsigned chunk_radix_best(const uint32_t (&key)[kItems], int64_t first_id, const float* __restrict__ r,
                                     float s, int k, float* __restrict__ out_v, int32_t* __restrict__ out_id, int64_t base) {
  using Scan = cub::BlockScan<unsigned, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ unsigned hist[256];
  __shared__ Pick pick;
  uint32_t prefix = 0, mask = 0;
  unsigned need = 0;
  bool exact = false;  // prefix is the k-th key itself (all four digits chosen)
  for (int level = 0; level < 4; ++level) {
    const int shift = 24 - 8 * level;
    for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
    __syncthreads();
    for (int i = 0; i < kItems; ++i)
      warp_hist_add(hist, (key[i] >> shift) & 255u, key[i] != 0 && (key[i] & mask) == prefix);
    __syncthreads();
    if (level == 0) {
      pick_digit(hist, 0, &pick);  // the total only
      __syncthreads();
      need = min(pick.total, static_cast<unsigned>(k));
      if (need == 0) break;
      __syncthreads();
    }
    pick_digit(hist, need, &pick);
    __syncthreads();
    prefix |= static_cast<uint32_t>(pick.digit) << shift;
    mask |= 255u << shift;
    need -= pick.above;
    const bool whole_bin = pick.bin == need;
    __syncthreads();
    if (whole_bin) break;  // every entry of the bin is kept: keep key >= prefix
    if (level == 3) exact = true;
  }
  // Kept: key > prefix, and key == prefix for the first `take` of them by id (all of them
  // unless the last digit split the ties).
  const unsigned take = exact ? need : 0xffffffffu;
  unsigned gt = 0, eq = 0;
  for (int i = 0; i < kItems; ++i) {
    gt += key[i] != 0 && key[i] > prefix;
    eq += key[i] != 0 && key[i] == prefix;
  }
  unsigned packed = 0, total = 0;
  Scan(scan_tmp).ExclusiveSum((gt << 16) | eq, packed, total);  // counts <= 4096 fit 16 bits
  unsigned gt_rank = packed >> 16, eq_rank = packed & 0xffffu;
  const unsigned gt_total = total >> 16, eq_total = total & 0xffffu;
  const unsigned eq_taken = min(eq_total, take);
  for (int i = 0; i < kItems; ++i) {
    if (key[i] == 0) continue;
    int64_t slot = -1;
    if (key[i] > prefix) {
      slot = gt_rank++;
    } else if (key[i] == prefix) {
      if (eq_rank < eq_taken) slot = gt_total + eq_rank;
      ++eq_rank;
    }
    if (slot >= 0) {
      out_v[base + slot] = owed(r[first_id + i], s);  // (a -0.0 stays -0.0)
      out_id[base + slot] = static_cast<int32_t>(first_id + i);
    }
  }
  return gt_total + eq_taken;
}

// Stage 1 for large k: the k best entries of each chunk into out_v/out_id [rows, chunks, k],
// their number into out_n [rows, chunks].
__global__ void __launch_bounds__(kThreads)
chunk_best_kernel(const float* __restrict__ x, int64_t vocab, float s, int k, float* __restrict__ out_v,
                  int32_t* __restrict__ out_id, int32_t* __restrict__ out_n) {
  wait_for_previous_kernel();
  allow_next_kernel();
  const int64_t row = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x;
  const int64_t begin = chunk * kChunk;
  const float* r = x + row * vocab;
  const int64_t first_id = begin + threadIdx.x * kItems;
  uint32_t key[kItems];
  load_chunk_keys(r, first_id, static_cast<int>(max64(0, min64(kItems, vocab - first_id))), s, key);
  const unsigned kept = chunk_radix_best(key, first_id, r, s, k, out_v, out_id, (row * chunks + chunk) * k);
  if (threadIdx.x == 0) out_n[row * chunks + chunk] = static_cast<int32_t>(kept);
}

// top-k for k <= kFastK in one kernel (one block per chunk of a row; the last block of a row to
// finish also selects the row's k best):
//  1. a bound B below which no kept entry of the chunk lies: every warp's m = ceil(k / 8)-th
//     largest thread maximum, the least of those over the warps (8m >= k threads reach it, so at
//     least k entries do). The entries >= B (about 1.5 k for smooth rows) go to scratch, up to
//     `cap` of them; a chunk with more (crowds of equal logits) gives its exact k best instead
//     (chunk_radix_best).
//  2. the row's last block bounds the row the same way over every chunk's entries (B2), ranks the
//     entries >= B2 among themselves by the composite key (logit desc, id asc: distinct) and
//     writes the k best, in that order, as the row's candidates.
constexpr int kFastK = 128;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kRowCand = 3072;  // row entries the last block keeps in shared memory
inline int fast_cap(int64_t k) { return static_cast<int>(2 * k + 64); }

// A bound that at least k of the block's values reach: over the first `full` warps (those whose
// every lane holds a value), each warp's m-th largest value with m = ceil(k / full) (each round
// one lane holding the warp's largest gives it up, so equal values count once each), and the
// least of those; full * m >= k lanes reach it. 0 when that cannot be had (fewer than k values
// in full warps, or a full warp with fewer than m non-zero values): the caller keeps everything.
__device__ uint32_t block_bound(uint32_t val, int k, int full, uint32_t* s_warp) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int m = full > 0 ? (k + full - 1) / full : 33;
  uint32_t top = 0;
  if (m <= 32)
    for (int i = 0; i < m; ++i) {
      top = __reduce_max_sync(0xffffffffu, val);
      if (lane == __ffs(__ballot_sync(0xffffffffu, val == top)) - 1) val = 0;
    }
  if (lane == 0) s_warp[warp] = m <= 32 && warp < full ? top : 0xffffffffu;
  __syncthreads();
  uint32_t b = m <= 32 ? 0xffffffffu : 0u;
  for (int w = 0; w < kWarps; ++w) b = min(b, s_warp[w]);
  __syncthreads();  // s_warp may be reused
  return b == 0xffffffffu ? 0u : b;
}

__global__ void __launch_bounds__(kThreads)
top_k_fast_kernel(const float* __restrict__ x, int64_t vocab, float s, int k, int cap, float* __restrict__ out_v,
                  int32_t* __restrict__ out_id, int32_t* __restrict__ out_n, unsigned* __restrict__ done,
                  float* __restrict__ cand_v, int32_t* __restrict__ cand_id, int32_t* __restrict__ cand_n,
                  int64_t capacity) {
  wait_for_previous_kernel();
  allow_next_kernel();
  const int64_t row = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x;
  const float* r = x + row * vocab;
  const int64_t first_id = chunk * kChunk + threadIdx.x * kItems;
  const int64_t base = (row * chunks + chunk) * cap;
  __shared__ uint32_t s_warp[kWarps];
  __shared__ unsigned s_count;
  __shared__ bool s_last;
  uint32_t key[kItems];
  load_chunk_keys(r, first_id, static_cast<int>(max64(0, min64(kItems, vocab - first_id))), s, key);
  if (threadIdx.x == 0) s_count = 0;
  uint32_t tmax = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) tmax = max(tmax, key[i]);
  const int64_t valid = max64(0, min64(kChunk, vocab - chunk * kChunk));
  const int full = static_cast<int>(valid / (32 * kItems));  // warps whose every thread has 16 entries
  const uint32_t bound = max(1u, block_bound(tmax, k, full, s_warp));
  unsigned mine = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) mine += key[i] >= bound;
  unsigned at = mine != 0 ? atomicAdd(&s_count, mine) : 0u;  // any order: stage 2 ranks
#pragma unroll
  for (int i = 0; i < kItems; ++i)
    if (key[i] >= bound) {
      if (at < static_cast<unsigned>(cap)) {
        out_v[base + at] = owed(r[first_id + i], s);
        out_id[base + at] = static_cast<int32_t>(first_id + i);
      }
      ++at;
    }
  __syncthreads();
  unsigned kept = s_count;
  if (kept > static_cast<unsigned>(cap)) kept = chunk_radix_best(key, first_id, r, s, k, out_v, out_id, base);
  // Publish the chunk (the block's writes, ordered before thread 0's by the barrier; its fence
  // releases them all), then let the row's last block go on.
  __syncthreads();
  if (threadIdx.x == 0) {
    out_n[row * chunks + chunk] = static_cast<int32_t>(kept);
    __threadfence();
    s_last = atomicAdd(&done[row], 1u) == static_cast<unsigned>(chunks) - 1;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();

  // ---- stage 2, the row's last block: the other blocks' entries are read from L2 (__ldcg) ----
  __shared__ int s_n[kMaxChunks], s_off[kMaxChunks + 1];
  __shared__ uint32_t s_key[kRowCand], s_id[kRowCand];  // the row's entries, when they fit
  __shared__ int16_t s_cand[kRowCand];                  // those >= B2
  if (threadIdx.x == 0) {
    done[row] = 0;  // for the next call
    s_count = 0;
  }
  for (int c = threadIdx.x; c < chunks; c += kThreads) s_n[c] = __ldcg(out_n + row * chunks + c);
  __syncthreads();
  if (threadIdx.x == 0) {
    s_off[0] = 0;
    for (int c = 0; c < chunks; ++c) s_off[c + 1] = s_off[c] + s_n[c];
  }
  __syncthreads();
  const int total = s_off[chunks];
  const float* rv = out_v + row * chunks * cap;
  const int32_t* rid = out_id + row * chunks * cap;
  // The row's entries spread evenly over the threads: entry e is slot e - off[c] of chunk c.
  auto slot_of = [&](int e) {
    int lo = 0, hi = chunks - 1;  // the last chunk c with off[c] <= e
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (s_off[mid] <= e) lo = mid;
      else hi = mid - 1;
    }
    return lo * cap + (e - s_off[lo]);
  };
  const unsigned K = min(static_cast<unsigned>(total), static_cast<unsigned>(k));
  if (total <= static_cast<int>(kRowCand)) {
    // Every entry into shared memory, the loads of a thread all in flight at once; then the
    // entries >= B2 listed in s_cand.
    constexpr int kPer = kRowCand / kThreads;
    uint32_t key_here[kPer], id_here[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = static_cast<int>(threadIdx.x) + i * kThreads;
      if (e < total) {
        const int at = slot_of(e);
        key_here[i] = present_key(__ldcg(rv + at));
        id_here[i] = static_cast<uint32_t>(__ldcg(rid + at));
      }
    }
    uint32_t rmax = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = static_cast<int>(threadIdx.x) + i * kThreads;
      if (e < total) {
        s_key[e] = key_here[i];
        s_id[e] = id_here[i];
        rmax = max(rmax, key_here[i]);
      }
    }
    const uint32_t row_bound = max(1u, block_bound(rmax, k, min(total, kThreads) / 32, s_warp));  // (syncs)
    for (int e = threadIdx.x; e < total; e += kThreads)
      if (s_key[e] >= row_bound) s_cand[atomicAdd(&s_count, 1u)] = static_cast<int16_t>(e);
  } else {
    // More entries than fit (large k with loose chunk bounds): B2 from a pass over them, then
    // only the entries >= B2 into shared memory (s_cand[j] = j).
    uint32_t rmax = 0;
    for (int e = threadIdx.x; e < total; e += kThreads) rmax = max(rmax, present_key(__ldcg(rv + slot_of(e))));
    const uint32_t row_bound = max(1u, block_bound(rmax, k, min(total, kThreads) / 32, s_warp));
    for (int e = threadIdx.x; e < total; e += kThreads) {
      const int at = slot_of(e);
      const uint32_t key = present_key(__ldcg(rv + at));
      if (key < row_bound) continue;
      const unsigned j = atomicAdd(&s_count, 1u);
      if (j < kRowCand) {
        s_key[j] = key;
        s_id[j] = static_cast<uint32_t>(__ldcg(rid + at));
        s_cand[j] = static_cast<int16_t>(j);
      }
    }
  }
  __syncthreads();
  const unsigned n = s_count;
  auto comp_at = [&](int e) { return (static_cast<uint64_t>(s_key[e]) << 32) | (0xFFFFFFFFu - s_id[e]); };
  if (n <= kRowCand) {
    for (unsigned j = threadIdx.x; j < n; j += kThreads) {
      const uint64_t c = comp_at(s_cand[j]);
      unsigned place = 0;
#pragma unroll 8
      for (unsigned o = 0; o < n; ++o) place += comp_at(s_cand[o]) > c;
      if (place < K) {
        const uint32_t id = s_id[s_cand[j]];
        cand_v[row * capacity + place] = owed(r[id], s);
        cand_id[row * capacity + place] = static_cast<int32_t>(id);
      }
    }
  } else {
    // (Crowds of equal logits: more than kRowCand entries reach B2.) A radix select of the K-th
    // largest composite over the row's entries >= B2, read again at each level; then those >= it
    // (exactly K) are ranked among themselves.
    __shared__ unsigned hist[256];
    __shared__ Pick pick;
    uint32_t rmax = 0;
    for (int e = threadIdx.x; e < total; e += kThreads) rmax = max(rmax, present_key(__ldcg(rv + slot_of(e))));
    const uint32_t row_bound = max(1u, block_bound(rmax, k, min(total, kThreads) / 32, s_warp));
    auto comp_of = [&](int e, bool& ok) {
      ok = false;
      if (e >= total) return uint64_t{0};
      const int at = slot_of(e);
      const float v = __ldcg(rv + at);
      ok = present_key(v) >= row_bound;
      return composite(v, __ldcg(rid + at));
    };
    const uint64_t prefix = select_kth64(total, K, comp_of, hist, &pick);
    if (threadIdx.x == 0) s_count = 0;
    __syncthreads();
    for (int e = threadIdx.x; e < total; e += kThreads) {
      bool ok = false;
      const uint64_t comp = comp_of(e, ok);
      if (!ok || comp < prefix) continue;
      const unsigned at = atomicAdd(&s_count, 1u);  // < K <= kFastK
      s_key[at] = static_cast<uint32_t>(comp >> 32);
      s_id[at] = 0xFFFFFFFFu - static_cast<uint32_t>(comp);
    }
    __syncthreads();
    const unsigned kept = min(s_count, K);
    for (unsigned j = threadIdx.x; j < kept; j += kThreads) {
      const uint64_t c = comp_at(static_cast<int>(j));
      unsigned place = 0;
      for (unsigned o = 0; o < kept; ++o) place += comp_at(static_cast<int>(o)) > c;
      cand_v[row * capacity + place] = owed(r[s_id[j]], s);
      cand_id[row * capacity + place] = static_cast<int32_t>(s_id[j]);
    }
  }
  if (threadIdx.x == 0) cand_n[row] = static_cast<int32_t>(K);
}

// Stage 2 for large k: the row's k best among its chunks' entries, in (logit desc, id asc) order,
// into the candidates.
__global__ void __launch_bounds__(kMergeThreads)
merge_best_kernel(const float* __restrict__ in_v, const int32_t* __restrict__ in_id, const int32_t* __restrict__ in_n,
                  int chunks, int k, float* __restrict__ cand_v, int32_t* __restrict__ cand_id,
                  int32_t* __restrict__ cand_n, int64_t capacity) {
  wait_for_previous_kernel();
  allow_next_kernel();
  const int64_t row = blockIdx.x;
  __shared__ int s_n[kMaxChunks];
  __shared__ unsigned hist[256];
  __shared__ Pick pick;
  __shared__ unsigned s_total, s_kept;
  __shared__ uint64_t s_comp[kMaxK];
  __shared__ float s_v[kMaxK];
  __shared__ int32_t s_id[kMaxK];
  if (threadIdx.x == 0) {
    s_total = 0;
    s_kept = 0;
  }
  __syncthreads();
  for (int c = threadIdx.x; c < chunks; c += kMergeThreads) {
    s_n[c] = in_n[row * chunks + c];
    atomicAdd(&s_total, static_cast<unsigned>(s_n[c]));
  }
  __syncthreads();
  const unsigned K = min(s_total, static_cast<unsigned>(k));
  const int64_t span = static_cast<int64_t>(chunks) * k;
  const float* rv = in_v + row * span;
  const int32_t* rid = in_id + row * span;
  // Entry e's composite, when e holds one (a chunk may have fewer than k entries).
  auto entry = [&](int64_t e, bool& ok) -> uint64_t {
    ok = false;
    if (e >= span) return 0;
    const int c = static_cast<int>(e / k);
    if (e - int64_t{c} * k >= s_n[c]) return 0;
    ok = true;
    return composite(rv[e], rid[e]);
  };
  const uint64_t prefix = select_kth64(span, K, entry, hist, &pick);
  // The K entries with composite >= prefix, gathered, then placed by rank.
  if (K > 0)
    for (int64_t e = threadIdx.x; e < span; e += kMergeThreads) {
      bool ok = false;
      const uint64_t comp = entry(e, ok);
      if (ok && comp >= prefix) {
        const unsigned at = atomicAdd(&s_kept, 1u);
        if (at < kMaxK) {
          s_comp[at] = comp;
          s_v[at] = rv[e];
          s_id[at] = rid[e];
        }
      }
    }
  __syncthreads();
  const unsigned n = min(s_kept, K);
  for (unsigned i = threadIdx.x; i < n; i += kMergeThreads) {
    const uint64_t c = s_comp[i];
    unsigned rank = 0;
    for (unsigned j = 0; j < n; ++j) rank += s_comp[j] > c;
    cand_v[row * capacity + rank] = s_v[i];
    cand_id[row * capacity + rank] = s_id[i];
  }
  if (threadIdx.x == 0) cand_n[row] = static_cast<int32_t>(n);
}

// top-k over candidates already in order: the first k.
__global__ void truncate_kernel(int32_t* __restrict__ cand_n, int64_t rows, int64_t k) {
  wait_for_previous_kernel();
  allow_next_kernel();
  const int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (r < rows && cand_n[r] > k) cand_n[r] = static_cast<int32_t>(k);
}

// temperature over candidates: the CPU's float multiply. Rounding may make two neighbours equal;
// then their ids must ascend, which one thread restores (rare; rows are short).
__global__ void __launch_bounds__(kRowThreads)
scale_kernel(float* __restrict__ cand_v, int32_t* __restrict__ cand_id, const int32_t* __restrict__ cand_n,
             int64_t capacity, float inv) {
  wait_for_previous_kernel();
  allow_next_kernel();
  const int64_t row = blockIdx.x;
  const int n = cand_n[row];
  float* v = cand_v + row * capacity;
  int32_t* id = cand_id + row * capacity;
  for (int i = threadIdx.x; i < n; i += kRowThreads) v[i] = __fmul_rn(v[i], inv);
  __syncthreads();
  int disorder = 0;
  for (int i = threadIdx.x; i + 1 < n; i += kRowThreads) disorder |= v[i] == v[i + 1] && id[i] > id[i + 1];
  if (!__syncthreads_or(disorder) || threadIdx.x != 0) return;
  for (int i = 1; i < n; ++i) {  // insertion sort by (value desc, id asc); values are already descending
    const float kv = v[i];
    const int32_t kid = id[i];
    int j = i - 1;
    while (j >= 0 && (v[j] < kv || (v[j] == kv && id[j] > kid))) {
      v[j + 1] = v[j];
      id[j + 1] = id[j];
      --j;
    }
    v[j + 1] = kv;
    id[j + 1] = kid;
  }
}

// The row's candidates loaded into shared memory with their weights exp(x - max), and each
// entry's place in id order (order[place] = entry), for the sums that must run in the CPU's
// order. max is the first candidate's logit (the rows are in descending order).
struct RowWeights {
  double w[kMaxK];        // candidate order
  double w_by_id[kMaxK];  // id order; -1 for a -inf entry (it weighs 0 and is never drawn)
  int32_t id[kMaxK];
  int16_t by_id[kMaxK];   // id order -> entry
};
__device__ int load_row_weights(const float* __restrict__ v, const int32_t* __restrict__ id, int n, RowWeights& s) {
  const float mx = v[0];
  for (int i = threadIdx.x; i < n; i += kRowThreads) {
    s.w[i] = weight(v[i], mx);
    s.id[i] = id[i];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kRowThreads) {
    const int32_t mine = s.id[i];
    int place = 0;
    for (int j = 0; j < n; ++j) place += s.id[j] < mine;
    s.by_id[place] = static_cast<int16_t>(i);
    s.w_by_id[place] = v[i] == -INFINITY ? -1.0 : s.w[i];
  }
  __syncthreads();
  return n;
}
// The sum of the weights in id order, as the CPU adds them (one thread).
__device__ double total_in_id_order(const RowWeights& s, int n) {
  double total = 0.0;
#pragma unroll 8
  for (int i = 0; i < n; ++i) total += s.w_by_id[i] < 0.0 ? 0.0 : s.w_by_id[i];
  return total;
}

// top-p over candidates: the CPU's weights, its total (summed in id order) and its nucleus
// (summed in candidate order, which is the CPU's order: logit desc, id asc).
__global__ void __launch_bounds__(kRowThreads)
top_p_kernel(const float* __restrict__ cand_v, const int32_t* __restrict__ cand_id, int32_t* __restrict__ cand_n,
             int64_t capacity, double p, int64_t min_keep) {
  wait_for_previous_kernel();
  allow_next_kernel();
  const int64_t row = blockIdx.x;
  const int n = min(cand_n[row], kMaxK);
  if (n == 0) return;
  __shared__ RowWeights s;
  load_row_weights(cand_v + row * capacity, cand_id + row * capacity, n, s);
  if (threadIdx.x != 0) return;
  const double target = p * total_in_id_order(s, n);
  double cum = 0.0;
  int keep = n;  // rounding: keep everything
  for (int i = 0; i < n; ++i) {
    cum += s.w[i];
    if (cum >= target && i + 1 >= min_keep) {
      keep = i + 1;
      break;
    }
  }
  cand_n[row] = keep;
}

// min-p over candidates: keep x >= max + log_p (in double); a prefix of the row.
__global__ void __launch_bounds__(kRowThreads)
min_p_kernel(const float* __restrict__ cand_v, int32_t* __restrict__ cand_n, int64_t capacity, double log_p) {
  wait_for_previous_kernel();
  allow_next_kernel();
  const int64_t row = blockIdx.x;
  const int n = cand_n[row];
  if (n == 0) return;
  const float* v = cand_v + row * capacity;
  const double threshold = __dadd_rn(static_cast<double>(v[0]), log_p);
  __shared__ int first;
  if (threadIdx.x == 0) first = n;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kRowThreads)
    if (static_cast<double>(v[i]) < threshold) atomicMin(&first, i);
  __syncthreads();
  if (threadIdx.x == 0) cand_n[row] = first;
}

// dist over candidates: the CPU's draw (draw_row): total in id order, u * total, then the walk in
// id order to the first token whose cumulative weight exceeds it. -1 for an empty row.
__global__ void __launch_bounds__(kRowThreads)
dist_kernel(const float* __restrict__ cand_v, const int32_t* __restrict__ cand_id, const int32_t* __restrict__ cand_n,
            int64_t capacity, const float* __restrict__ u_ptr, const __grid_constant__ UniformParams up,
            int32_t* __restrict__ tokens, float* __restrict__ logprobs) {
  wait_for_previous_kernel();
  allow_next_kernel();
  const int64_t row = blockIdx.x;
  const int n = min(cand_n[row], kMaxK);
  if (n == 0) {
    if (threadIdx.x == 0) tokens[row] = -1;
    return;
  }
  __shared__ RowWeights s;
  const float* v = cand_v + row * capacity;
  load_row_weights(v, cand_id + row * capacity, n, s);
  if (threadIdx.x != 0) return;
  const double total = total_in_id_order(s, n);
  const double target = static_cast<double>(u_ptr != nullptr ? u_ptr[row] : up.u[row]) * total;
  double cum = 0.0;
  int chosen_place = -1;
  for (int i = 0; i < n; ++i) {
    const double w = s.w_by_id[i];
    if (w < 0.0) continue;
    cum += w;
    chosen_place = i;  // the last finite token absorbs rounding when target ~ total
    if (cum > target) break;
  }
  const int chosen = chosen_place < 0 ? -1 : s.by_id[chosen_place];
  tokens[row] = chosen < 0 ? -1 : s.id[chosen];
  if (logprobs != nullptr && chosen >= 0)
    logprobs[row] = static_cast<float>(__dsub_rn(log_weight(v[chosen], v[0]), log(total)));
}

}  // namespace

bool candidates_top_k_fits(int64_t rows, int64_t vocab, int64_t k, int64_t capacity) {
  return k >= 1 && k <= kMaxK && k <= capacity && chunks_of(vocab) <= kMaxChunks && rows <= 65535;
}

size_t candidates_top_k_scratch_bytes(int64_t rows, int64_t vocab, int64_t k) {
  const size_t n = static_cast<size_t>(rows * chunks_of(vocab));
  const size_t slots = static_cast<size_t>(k <= kFastK ? fast_cap(k) : k);
  return 2 * align256(sizeof(float) * n * slots) + align256(sizeof(int32_t) * n) +
         align256(sizeof(unsigned) * static_cast<size_t>(rows));
}

int candidates_top_k(const float* x, int64_t rows, int64_t vocab, float scale, int64_t k, const CandidateRows& c,
                     void* scratch, bool zero, void* stream) {
  if (rows == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  const int64_t chunks = chunks_of(vocab);
  const size_t n = static_cast<size_t>(rows * chunks);
  const size_t slots = static_cast<size_t>(k <= kFastK ? fast_cap(k) : k);
  char* base = static_cast<char*>(scratch);
  auto* v = reinterpret_cast<float*>(base);
  base += align256(sizeof(float) * n * slots);
  auto* id = reinterpret_cast<int32_t*>(base);
  base += align256(sizeof(int32_t) * n * slots);
  auto* cnt = reinterpret_cast<int32_t*>(base);
  base += align256(sizeof(int32_t) * n);
  auto* done = reinterpret_cast<unsigned*>(base);  // zero between calls (the last block resets it)
  if (zero)
    if (cudaError_t e = cudaMemsetAsync(done, 0, sizeof(unsigned) * static_cast<size_t>(rows), st); e != cudaSuccess)
      return static_cast<int>(e);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(rows));
  if (k <= kFastK) {
    if (cudaError_t e = launch_after(top_k_fast_kernel, grid, dim3(kThreads), st, x, vocab, scale, static_cast<int>(k), fast_cap(k),
                                     v, id, cnt, done, c.values, c.ids, c.count, c.capacity);
        e != cudaSuccess)
      return static_cast<int>(e);
  } else {
    if (cudaError_t e = launch_after(chunk_best_kernel, grid, dim3(kThreads), st, x, vocab, scale, static_cast<int>(k), v, id, cnt);
        e != cudaSuccess)
      return static_cast<int>(e);
    if (cudaError_t e = launch_after(merge_best_kernel, dim3(static_cast<unsigned>(rows)), dim3(kMergeThreads), st,
                                     static_cast<const float*>(v), static_cast<const int32_t*>(id),
                                     static_cast<const int32_t*>(cnt), static_cast<int>(chunks), static_cast<int>(k),
                                     c.values, c.ids, c.count, c.capacity);
        e != cudaSuccess)
      return static_cast<int>(e);
  }
  return static_cast<int>(cudaGetLastError());
}

int candidates_truncate(const CandidateRows& c, int64_t rows, int64_t k, void* stream) {
  if (rows == 0) return 0;
  return static_cast<int>(launch_after(truncate_kernel, dim3(static_cast<unsigned>((rows + 255) / 256)), dim3(256),
                                       static_cast<cudaStream_t>(stream), c.count, rows, k));
}

int candidates_scale(const CandidateRows& c, int64_t rows, float inv, void* stream) {
  if (rows == 0) return 0;
  return static_cast<int>(launch_after(scale_kernel, dim3(static_cast<unsigned>(rows)), dim3(kRowThreads),
                                       static_cast<cudaStream_t>(stream), c.values, c.ids,
                                       static_cast<const int32_t*>(c.count), c.capacity, inv));
}

int candidates_top_p(const CandidateRows& c, int64_t rows, double p, int64_t min_keep, void* stream) {
  if (rows == 0) return 0;
  return static_cast<int>(launch_after(top_p_kernel, dim3(static_cast<unsigned>(rows)), dim3(kRowThreads),
                                       static_cast<cudaStream_t>(stream), static_cast<const float*>(c.values),
                                       static_cast<const int32_t*>(c.ids), c.count, c.capacity, p, min_keep));
}

int candidates_min_p(const CandidateRows& c, int64_t rows, double log_p, void* stream) {
  if (rows == 0) return 0;
  return static_cast<int>(launch_after(min_p_kernel, dim3(static_cast<unsigned>(rows)), dim3(kRowThreads),
                                       static_cast<cudaStream_t>(stream), static_cast<const float*>(c.values), c.count,
                                       c.capacity, log_p));
}

size_t candidates_dist_scratch_bytes(int64_t rows) {
  return align256(sizeof(float) * static_cast<size_t>(rows)) + align256(sizeof(int32_t) * static_cast<size_t>(rows)) +
         align256(sizeof(float) * static_cast<size_t>(rows));
}

int candidates_dist(const CandidateRows& c, int64_t rows, const float* u, void* scratch, Staging*& staging,
                    int32_t* tokens_device, int32_t* tokens_host, float* logprobs_host, void* stream) {
  if (rows == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  char* base = static_cast<char*>(scratch);
  auto* du = reinterpret_cast<float*>(base);
  base += align256(sizeof(float) * static_cast<size_t>(rows));
  auto* dtok = reinterpret_cast<int32_t*>(base);
  base += align256(sizeof(int32_t) * static_cast<size_t>(rows));
  auto* dlp = reinterpret_cast<float*>(base);
  static thread_local UniformParams up;
  cudaError_t staged = cudaSuccess;
  const float* u_ptr = stage_uniforms(u, rows, du, staging, st, up, &staged);
  if (staged != cudaSuccess) return static_cast<int>(staged);
  // Tokens stay on the device unless the host wants them (or log-probabilities) here.
  const bool to_host = tokens_device == nullptr || logprobs_host != nullptr;
  int32_t* out = to_host ? dtok : tokens_device;
  if (cudaError_t e = launch_after(dist_kernel, dim3(static_cast<unsigned>(rows)), dim3(kRowThreads), st,
                                   static_cast<const float*>(c.values), static_cast<const int32_t*>(c.ids),
                                   static_cast<const int32_t*>(c.count), c.capacity, u_ptr, up, out,
                                   logprobs_host != nullptr ? dlp : nullptr);
      e != cudaSuccess)
    return static_cast<int>(e);
  if (!to_host) return 0;
  const size_t bytes = sizeof(int32_t) * static_cast<size_t>(rows);
  if (cudaError_t e = cudaMemcpyAsync(tokens_host, dtok, bytes, cudaMemcpyDeviceToHost, st); e != cudaSuccess)
    return static_cast<int>(e);
  if (logprobs_host != nullptr)
    if (cudaError_t e = cudaMemcpyAsync(logprobs_host, dlp, sizeof(float) * static_cast<size_t>(rows),
                                        cudaMemcpyDeviceToHost, st);
        e != cudaSuccess)
      return static_cast<int>(e);
  return static_cast<int>(cudaStreamSynchronize(st));
}

}  // namespace loomp::samplers::cuda
