// CUDA paths of temperature, penalties, min-p, top-k, top-p and dist (see samplers_cuda.hpp).
//
// Layout: a row of `vocab` logits is cut into chunks of kChunk entries; streaming passes run one
// block per (chunk, row), so a batch of 32 rows of 128256 keeps every SM busy while the rows sit
// in L2 after the lm_head. Per-row decisions (a threshold, a digit, a token) are made by one
// block per row over the chunks' partial results.
//
// Exactness: temperature, penalties and min-p use the CPU's float and double operations
// (explicit _rn intrinsics, so nvcc contracts nothing into an FMA). top-k and top-p order tokens
// by a 64-bit composite key, (order-preserving uint32 of the float) << 32 | ~id, i.e. (logit
// desc, id asc) as the CPU does, and find the last kept composite by a radix descent: a digit
// histogram per level (12 bits, then 11 bits, ...) of the entries that share the digits chosen so
// far, counting entries (top-k) or also summing their weights exp(x - max) in double (top-p).
// The first two levels are split passes over the whole batch (the second also gathers the
// entries of the first level's bin); the rows that need more (a boundary among ties or
// near-ties) finish over those candidates in one block per row. top-p's sums run in another
// order than the CPU's sequential ones: at an exact boundary the two may keep one token apart.
// dist sums weights per chunk with a block scan, then walks chunks and entries in id order.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "samplers_cuda.hpp"
#include "samplers_device.cuh"

namespace loomp::samplers::cuda {
namespace {

constexpr int kChunk = 4096;         // entries of a row per streaming block
constexpr int kStreamThreads = 256;  // threads of a streaming block
constexpr int kRowThreads = 1024;    // threads of a per-row block
constexpr int kTopBins = 4096;       // level 0: the composite's top 12 bits
constexpr int kBins = 2048;          // later levels: 11 bits
constexpr int kLevels = 6;
// Digit of level L: bits [kShift[L], kShift[L] + kWidth[L]) of the composite.
__constant__ int kShift[kLevels] = {52, 41, 30, 19, 8, 0};
__constant__ int kWidth[kLevels] = {12, 11, 11, 11, 11, 8};

inline int64_t chunks_of(int64_t vocab) { return (vocab + kChunk - 1) / kChunk; }
inline size_t align256(size_t b) { return (b + 255) / 256 * 256; }

// ---- elementwise ----

__global__ void scale_kernel(float* __restrict__ x, int64_t n, float inv) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    x[i] = __fmul_rn(x[i], inv);
}
// The same over 16-byte aligned rows, four floats a load (n4 groups of four).
__global__ void scale4_kernel(float4* __restrict__ x, int64_t n4, float inv) {
  wait_for_previous_kernel();
  allow_next_kernel();
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n4; i += int64_t{gridDim.x} * blockDim.x) {
    float4 v = x[i];
    v.x = __fmul_rn(v.x, inv);
    v.y = __fmul_rn(v.y, inv);
    v.z = __fmul_rn(v.z, inv);
    v.w = __fmul_rn(v.w, inv);
    x[i] = v;
  }
}

__device__ __forceinline__ void penalise(float* __restrict__ x, int64_t vocab, const int32_t* pairs, int64_t n,
                                         int64_t i, float repetition, float frequency, float presence) {
  float& v = x[pairs[i] * vocab + pairs[n + i]];
  const float c = static_cast<float>(pairs[2 * n + i]);
  const float a = v > 0.0f ? __fdiv_rn(v, repetition) : __fmul_rn(v, repetition);
  v = __fsub_rn(a, __fadd_rn(__fmul_rn(frequency, c), presence));
}

__global__ void penalties_kernel(float* __restrict__ x, int64_t vocab, const int32_t* __restrict__ pairs, int64_t n,
                                 float repetition, float frequency, float presence) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i < n) penalise(x, vocab, pairs, n, i, repetition, frequency, presence);
}

// Up to kParamPairs pairs travel in the launch itself (kernel parameters up to 32 KiB: Volta and
// later, CUDA 12.1 and later), so no copy precedes the kernel.
constexpr int kParamPairs = 2560;
struct PairParams {
  int32_t v[3 * kParamPairs];  // rows[n], tokens[n], counts[n]
};
__global__ void penalties_param_kernel(float* __restrict__ x, int64_t vocab, const __grid_constant__ PairParams p,
                                       int64_t n, float repetition, float frequency, float presence) {
  wait_for_previous_kernel();
  allow_next_kernel();
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i < n) penalise(x, vocab, p.v, n, i, repetition, frequency, presence);
}

// ---- row maxima ----

// partial[row, chunk] = max over the chunk.
__global__ void __launch_bounds__(kStreamThreads)
max_partials_kernel(const float* __restrict__ x, int64_t vocab, float* __restrict__ partial) {
  const int64_t row = blockIdx.y, chunk = blockIdx.x;
  const float* r = x + row * vocab;
  const int64_t end = min64(vocab, (chunk + 1) * kChunk);
  float m = -INFINITY;
  for (int64_t i = chunk * kChunk + threadIdx.x; i < end; i += kStreamThreads) m = fmaxf(m, r[i]);
  using Reduce = cub::BlockReduce<float, kStreamThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const float b = Reduce(tmp).Reduce(m, [](float a, float c) { return fmaxf(a, c); });
  if (threadIdx.x == 0) partial[row * gridDim.x + chunk] = b;
}

// The row's max from its chunks' partials (every thread gets it).
__device__ float row_max(const float* __restrict__ partial, int64_t row, int64_t chunks) {
  __shared__ float s_max;
  if (threadIdx.x < 32) {
    float m = -INFINITY;
    for (int64_t c = threadIdx.x; c < chunks; c += 32) m = fmaxf(m, partial[row * chunks + c]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (threadIdx.x == 0) s_max = m;
  }
  __syncthreads();
  return s_max;
}

__global__ void __launch_bounds__(kStreamThreads)
min_p_kernel(float* __restrict__ x, int64_t vocab, const float* __restrict__ partial, double log_p) {
  const int64_t row = blockIdx.y, chunk = blockIdx.x;
  const double threshold = __dadd_rn(static_cast<double>(row_max(partial, row, gridDim.x)), log_p);
  float* r = x + row * vocab;
  const int64_t end = min64(vocab, (chunk + 1) * kChunk);
  for (int64_t i = chunk * kChunk + threadIdx.x; i < end; i += kStreamThreads) {
    const float v = r[i];
    if (v != -INFINITY && static_cast<double>(v) < threshold) r[i] = -INFINITY;
  }
}

// ---- top-k / top-p: radix descent over the composite key ----

struct Select {
  uint64_t prefix;       // digits chosen so far (lower bits 0)
  uint64_t above_count;  // entries strictly before the current bin, in composite order
  double above_mass;     // their weight
  double target;         // top-p: p * total weight
  float max;             // top-p: the row's max logit
  int done;              // prefix is the threshold: keep composite >= prefix
};

struct Rule {
  int64_t keep_count;  // k (top-k) or min_keep (top-p)
  double p;            // top-p only
  bool mass;
};

// Does entry e match the digits chosen before level L?
__device__ __forceinline__ bool matches(uint64_t comp, uint64_t prefix, int level) {
  if (level == 0) return true;
  const int above = kShift[level - 1];
  return (comp >> above) == (prefix >> above);
}

// A finite entry of level 0's bin: its composite key and (top-p) weight.
struct Candidate {
  uint64_t comp;
  double w;
};
constexpr unsigned kCandidates = 4096;  // per row; more (a crowd of ties) finish over the row

// Level L's digit histogram over one chunk, merged into the row's global histogram. Dynamic
// shared memory: NB counts, then (Mass) NB sums, 48 KiB for the top level of top-p.
// Levels 0 and 1 only (see the masked entries below).
template <int NB, bool Mass>
__global__ void __launch_bounds__(kStreamThreads)
hist_kernel(const float* __restrict__ x, int64_t vocab, int level, const float* __restrict__ partial,
            const Select* __restrict__ sel, unsigned* __restrict__ g_count, double* __restrict__ g_mass,
            unsigned* __restrict__ cand_count, Candidate* __restrict__ cand) {
  const int64_t row = blockIdx.y, chunk = blockIdx.x;
  const Select s = sel[row];
  if (level > 0 && s.done) return;
  extern __shared__ double hist_smem[];
  double* mass = hist_smem;
  auto* count = reinterpret_cast<unsigned*>(hist_smem + (Mass ? NB : 0));
  for (int b = threadIdx.x; b < NB; b += kStreamThreads) {
    count[b] = 0;
    if constexpr (Mass) mass[b] = 0.0;
  }
  // top-p: every thread reads the row's max from the chunks' partials (level 0) or the state.
  float mx = s.max;
  if (Mass && level == 0) {
    mx = -INFINITY;
    for (int64_t c = 0; c < int64_t{gridDim.x}; ++c) mx = fmaxf(mx, partial[row * gridDim.x + c]);
  }
  __syncthreads();
  const float* r = x + row * vocab;
  const int64_t end = min64(vocab, (chunk + 1) * kChunk);
  const int shift = kShift[level];
  const uint64_t digit_mask = (uint64_t{1} << kWidth[level]) - 1;
  // Masked entries (most of a row after top-k) share one digit at levels 0 and 1 (their ids
  // only reach the lower 32 bits) and weigh nothing: counted in registers, added once a warp,
  // instead of every thread hitting one shared counter.
  const uint64_t inf_comp = composite(-INFINITY, 0);
  const bool inf_matches = matches(inf_comp, s.prefix, level);
  const int inf_digit = static_cast<int>((inf_comp >> shift) & digit_mask);
  // Level 1 also gathers the finite entries it counts (those of level 0's bin, usually a few
  // hundred) into the row's candidate list, so that a row not decided after level 1 finishes
  // over them instead of over the whole row.
  unsigned n_inf = 0;
  for (int64_t i = chunk * kChunk + threadIdx.x; i < end; i += kStreamThreads) {
    const float v = r[i];
    if (v == -INFINITY) {
      ++n_inf;
      continue;
    }
    const uint64_t comp = composite(v, i);
    if (!matches(comp, s.prefix, level)) continue;
    const int d = static_cast<int>((comp >> shift) & digit_mask);
    atomicAdd(&count[d], 1u);
    double w = 0.0;
    if constexpr (Mass) {
      w = weight(v, mx);
      atomicAdd(&mass[d], w);
    }
    if (level == 1) {
      const unsigned at = atomicAdd(&cand_count[row], 1u);
      if (at < kCandidates) cand[row * kCandidates + at] = Candidate{comp, w};
    }
  }
  (void)mx;
  n_inf = __reduce_add_sync(0xffffffffu, n_inf);
  if (inf_matches && n_inf != 0 && (threadIdx.x & 31) == 0) atomicAdd(&count[inf_digit], n_inf);
  __syncthreads();
  for (int b = threadIdx.x; b < NB; b += kStreamThreads)
    if (count[b] != 0) {
      atomicAdd(&g_count[row * NB + b], count[b]);
      if constexpr (Mass) atomicAdd(&g_mass[row * NB + b], mass[b]);
    }
}
template <int NB, bool Mass>
constexpr size_t hist_smem_bytes() {
  return NB * (sizeof(unsigned) + (Mass ? sizeof(double) : 0));
}

// One block of kRowThreads picks level L's digit from the row's histogram (count, mass: NB bins,
// shared or global) and updates s (the block's shared copy of the row's state).
template <int NB, bool Mass>
__device__ void choose_digit(const unsigned* count, const double* mass, int level, const Rule& rule, Select& s) {
  constexpr int P = NB / kRowThreads;  // bins per thread, taken from the top digit down
  using ScanU = cub::BlockScan<unsigned long long, kRowThreads>;
  using ScanD = cub::BlockScan<double, kRowThreads>;
  using ReduceI = cub::BlockReduce<int, kRowThreads>;
  __shared__ union {
    typename ScanU::TempStorage u;
    typename ScanD::TempStorage d;
    typename ReduceI::TempStorage r;
  } tmp;
  __shared__ int s_j;
  __shared__ unsigned long long s_excl_c, s_cnt;
  __shared__ double s_excl_m, s_total;
  const int t = threadIdx.x;
  unsigned long long c[P];
  double m[P];
  unsigned long long local_c = 0;
  double local_m = 0.0;
  for (int i = 0; i < P; ++i) {
    const int bin = NB - 1 - (t * P + i);
    c[i] = count[bin];
    m[i] = Mass ? mass[bin] : 0.0;
    local_c += c[i];
    local_m += m[i];
  }
  unsigned long long pre_c = 0;
  double pre_m = 0.0;
  ScanU(tmp.u).ExclusiveSum(local_c, pre_c);
  __syncthreads();
  if constexpr (Mass) {
    double total = 0.0;
    ScanD(tmp.d).ExclusiveSum(local_m, pre_m, total);
    __syncthreads();
    if (t == 0) s_total = total;
  }
  __syncthreads();
  if (Mass && level == 0) {
    if (t == 0) s.target = rule.p * s_total;
    __syncthreads();
  }
  const uint64_t need = static_cast<uint64_t>(rule.keep_count);
  const double target = s.target;
  // The first bin (from the top) at which the rule holds.
  int first = 0x7fffffff, last_nonempty = -1;
  unsigned long long ic = pre_c;
  double im = pre_m;
  for (int i = 0; i < P; ++i) {
    ic += c[i];
    im += m[i];
    const bool ok = s.above_count + ic >= need && (!Mass || s.above_mass + im >= target);
    if (ok && first == 0x7fffffff) first = t * P + i;
    if (c[i] != 0) last_nonempty = t * P + i;
  }
  const int j_first = ReduceI(tmp.r).Reduce(first, [](int a, int b) { return min(a, b); });
  __syncthreads();
  const int j_last = ReduceI(tmp.r).Reduce(last_nonempty, [](int a, int b) { return max(a, b); });
  if (t == 0) s_j = j_first == 0x7fffffff ? -(j_last + 2) : j_first;  // < 0: rounding, keep all
  __syncthreads();
  const bool keep_all = s_j < 0;
  const int j = keep_all ? -(s_j + 2) : s_j;
  if (j >= 0 && j / P == t) {
    unsigned long long ec = pre_c;
    double em = pre_m;
    for (int i = 0; i < j - t * P; ++i) {
      ec += c[i];
      em += m[i];
    }
    s_excl_c = ec;
    s_excl_m = em;
    s_cnt = c[j - t * P];
  }
  __syncthreads();
  if (t == 0) {
    if (j < 0) {
      s.done = 1;  // nothing matched (cannot happen for a non-empty row): keep what matched
    } else {
      const int d = NB - 1 - j;
      s.prefix |= static_cast<uint64_t>(d) << kShift[level];
      s.above_count += s_excl_c;
      s.above_mass += s_excl_m;
      const bool whole_bin = !Mass && s.above_count + s_cnt == need;
      if (keep_all || s_cnt <= 1 || whole_bin || level == kLevels - 1) s.done = 1;
    }
  }
  __syncthreads();
}

template <bool Mass>
__device__ void finish_row(const float* __restrict__ r, int64_t vocab, const Candidate* __restrict__ cand,
                           unsigned n_cand, const Rule& rule, Select& s);

// Level L's choice for each row from the global histogram, which it zeroes for the next call;
// after level 1, a row not done yet is finished here (finish_row).
template <int NB, bool Mass>
__global__ void __launch_bounds__(kRowThreads)
choose_kernel(const float* __restrict__ x, int64_t vocab, int level, Rule rule, const float* __restrict__ partial,
              int64_t chunks, Select* __restrict__ sel, unsigned* __restrict__ g_count, double* __restrict__ g_mass,
              unsigned* __restrict__ cand_count, const Candidate* __restrict__ cand) {
  const int64_t row = blockIdx.x;
  __shared__ Select s;
  float mx = 0.0f;
  if (Mass && level == 0) mx = row_max(partial, row, chunks);
  if (threadIdx.x == 0) {
    if (level == 0) {
      s = Select{0, 0, 0.0, 0.0, mx, 0};
    } else {
      s = sel[row];
    }
  }
  __syncthreads();
  if (s.done) return;
  unsigned* cnt = g_count + row * NB;
  double* mass = Mass ? g_mass + row * NB : nullptr;
  choose_digit<NB, Mass>(cnt, mass, level, rule, s);
  for (int b = threadIdx.x; b < NB; b += kRowThreads) {
    cnt[b] = 0;
    if constexpr (Mass) mass[b] = 0.0;
  }
  if (level == 1) {
    const unsigned n_cand = cand_count[row];
    if (!s.done) finish_row<Mass>(x + row * vocab, vocab, cand + row * kCandidates, n_cand, rule, s);
    __syncthreads();
    if (threadIdx.x == 0) cand_count[row] = 0;  // zero for the next call
  }
  if (threadIdx.x == 0) sel[row] = s;
}

// Levels 2.. for a row not done after level 1 (its boundary bin holds several entries): the
// block of that row goes on, one level at a time, with its histogram in shared memory, over the
// row's candidates (n <= kCandidates: every finite entry of level 0's bin, which holds all that
// match deeper) or else over the whole row. Masked entries can only matter where the boundary
// is among them (more kept than finite entries), and then the row is scanned.
template <bool Mass>
__device__ void finish_row(const float* __restrict__ r, int64_t vocab, const Candidate* __restrict__ cand,
                           unsigned n_cand, const Rule& rule, Select& s) {
  __shared__ unsigned count[kBins];
  __shared__ double mass[Mass ? kBins : 1];
  const bool from_candidates = n_cand <= kCandidates && (s.prefix >> kShift[0]) != (composite(-INFINITY, 0) >> kShift[0]);
  for (int level = 2; level < kLevels && !s.done; ++level) {
    for (int b = threadIdx.x; b < kBins; b += kRowThreads) {
      count[b] = 0;
      if constexpr (Mass) mass[b] = 0.0;
    }
    __syncthreads();
    const int shift = kShift[level];
    const uint64_t digit_mask = (uint64_t{1} << kWidth[level]) - 1;
    if (from_candidates) {
      for (unsigned i = threadIdx.x; i < n_cand; i += kRowThreads) {
        const Candidate c = cand[i];
        if (!matches(c.comp, s.prefix, level)) continue;
        const int d = static_cast<int>((c.comp >> shift) & digit_mask);
        atomicAdd(&count[d], 1u);
        if constexpr (Mass) atomicAdd(&mass[d], c.w);
      }
    } else {
      for (int64_t i = threadIdx.x; i < vocab; i += kRowThreads) {
        const float v = r[i];
        const uint64_t comp = composite(v, i);
        if (!matches(comp, s.prefix, level)) continue;
        const int d = static_cast<int>((comp >> shift) & digit_mask);
        atomicAdd(&count[d], 1u);
        if constexpr (Mass) atomicAdd(&mass[d], weight(v, s.max));
      }
    }
    __syncthreads();
    choose_digit<kBins, Mass>(count, mass, level, rule, s);
  }
}

__global__ void __launch_bounds__(kStreamThreads)
mask_below_kernel(float* __restrict__ x, int64_t vocab, const Select* __restrict__ sel) {
  const int64_t row = blockIdx.y, chunk = blockIdx.x;
  const uint64_t threshold = sel[row].prefix;
  float* r = x + row * vocab;
  const int64_t end = min64(vocab, (chunk + 1) * kChunk);
  for (int64_t i = chunk * kChunk + threadIdx.x; i < end; i += kStreamThreads) {
    const float v = r[i];
    if (v != -INFINITY && composite(v, i) < threshold) r[i] = -INFINITY;
  }
}

// ---- dist ----

constexpr int kDistThreads = 256;
constexpr int kDistItems = kChunk / kDistThreads;  // 16 entries a thread, in id order

// The weights of thread t's entries of a chunk and their inclusive scan over the chunk (a fixed
// reduction order, so that the partial pass and the search see the same sums).
struct ChunkScan {
  double incl[kDistItems];
  double aggregate;
};
__device__ void scan_chunk(const float* __restrict__ r, int64_t begin, int64_t vocab, float mx, ChunkScan& out) {
  using Scan = cub::BlockScan<double, kDistThreads>;
  __shared__ typename Scan::TempStorage tmp;
  double local = 0.0;
  for (int i = 0; i < kDistItems; ++i) {
    const int64_t id = begin + threadIdx.x * kDistItems + i;
    const double w = id < vocab ? weight(r[id], mx) : 0.0;
    local += w;
    out.incl[i] = local;
  }
  double pre = 0.0;
  Scan(tmp).ExclusiveSum(local, pre, out.aggregate);
  for (int i = 0; i < kDistItems; ++i) out.incl[i] += pre;
  __syncthreads();
}

// sums[row, chunk] = the chunk's weight; last[row, chunk] = its last finite id, or -1.
__global__ void __launch_bounds__(kDistThreads)
dist_sums_kernel(const float* __restrict__ x, int64_t vocab, const float* __restrict__ partial,
                 double* __restrict__ sums, int64_t* __restrict__ last) {
  const int64_t row = blockIdx.y, chunk = blockIdx.x;
  const float* r = x + row * vocab;
  int finite = 0;
  for (int i = 0; i < kDistItems; ++i) {
    const int64_t id = chunk * kChunk + threadIdx.x * kDistItems + i;
    finite |= id < vocab && r[id] != -INFINITY;
  }
  if (!__syncthreads_or(finite)) {  // a masked chunk (most of them after top-k) weighs nothing
    if (threadIdx.x == 0) {
      sums[row * gridDim.x + chunk] = 0.0;
      last[row * gridDim.x + chunk] = -1;
    }
    return;
  }
  const float mx = row_max(partial, row, gridDim.x);
  ChunkScan cs;
  scan_chunk(r, chunk * kChunk, vocab, mx, cs);
  int64_t my_last = -1;
  for (int i = 0; i < kDistItems; ++i) {
    const int64_t id = chunk * kChunk + threadIdx.x * kDistItems + i;
    if (id < vocab && r[id] != -INFINITY) my_last = id;
  }
  using Reduce = cub::BlockReduce<long long, kDistThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const long long l = Reduce(tmp).Reduce(static_cast<long long>(my_last), [](long long a, long long b) {
    return a > b ? a : b;
  });
  if (threadIdx.x == 0) {
    sums[row * gridDim.x + chunk] = cs.aggregate;
    last[row * gridDim.x + chunk] = l;
  }
}

__global__ void __launch_bounds__(kDistThreads)
dist_pick_kernel(const float* __restrict__ x, int64_t vocab, int64_t chunks, const float* __restrict__ partial,
                 const double* __restrict__ sums, const int64_t* __restrict__ last, const float* __restrict__ u_ptr,
                 const __grid_constant__ UniformParams up, int32_t* __restrict__ tokens) {
  const int64_t row = blockIdx.x;
  const float mx = row_max(partial, row, chunks);
  __shared__ int64_t s_chunk, s_token;
  __shared__ double s_before, s_target;
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += sums[row * chunks + c];
    const double target = static_cast<double>(u_ptr != nullptr ? u_ptr[row] : up.u[row]) * total;
    double cum = 0.0;
    int64_t chosen = -1;
    for (int64_t c = 0; c < chunks; ++c) {
      if (cum + sums[row * chunks + c] > target) {
        chosen = c;
        break;
      }
      cum += sums[row * chunks + c];
    }
    int64_t last_finite = -1;
    for (int64_t c = 0; c < chunks; ++c) last_finite = max64(last_finite, last[row * chunks + c]);
    s_chunk = chosen;
    s_token = last_finite;  // the last finite token absorbs rounding when target ~ total
    s_before = cum;
    s_target = target;
  }
  __syncthreads();
  const int64_t c = s_chunk;
  if (c >= 0) {
    const float* r = x + row * vocab;
    ChunkScan cs;
    scan_chunk(r, c * kChunk, vocab, mx, cs);
    __shared__ int64_t s_first;
    if (threadIdx.x == 0) s_first = INT64_MAX;
    __syncthreads();
    for (int i = 0; i < kDistItems; ++i) {
      const int64_t id = c * kChunk + threadIdx.x * kDistItems + i;
      if (id < vocab && r[id] != -INFINITY && s_before + cs.incl[i] > s_target) {
        atomicMin(reinterpret_cast<unsigned long long*>(&s_first), static_cast<unsigned long long>(id));
        break;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      if (s_first != INT64_MAX) {
        s_token = s_first;
      } else {
        const int64_t lc = last[row * chunks + c];
        if (lc >= 0) s_token = lc;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) tokens[row] = static_cast<int32_t>(s_token);
}

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 8192 ? (blocks < 1 ? 1 : blocks) : 8192);
}

struct SelectLayout {
  size_t partial, sel, cand, count0, count1, mass0, mass1, cand_count, total;
};
SelectLayout select_layout(int64_t rows, int64_t vocab, bool mass) {
  SelectLayout l{};
  size_t at = 0;
  l.partial = at;
  at += align256(sizeof(float) * static_cast<size_t>(rows * chunks_of(vocab)));
  l.sel = at;
  at += align256(sizeof(Select) * static_cast<size_t>(rows));
  l.cand = at;
  at += align256(sizeof(Candidate) * kCandidates * static_cast<size_t>(rows));
  l.count0 = at;  // histograms and candidate counts: zero between calls
  at += align256(sizeof(unsigned) * static_cast<size_t>(rows) * kTopBins);
  l.count1 = at;
  at += align256(sizeof(unsigned) * static_cast<size_t>(rows) * kBins);
  l.mass0 = at;
  if (mass) at += align256(sizeof(double) * static_cast<size_t>(rows) * kTopBins);
  l.mass1 = at;
  if (mass) at += align256(sizeof(double) * static_cast<size_t>(rows) * kBins);
  l.cand_count = at;
  at += align256(sizeof(unsigned) * static_cast<size_t>(rows));
  l.total = at;
  return l;
}

template <bool Mass>
int run_select(float* x, int64_t rows, int64_t vocab, const Rule& rule, void* scratch, bool zero, cudaStream_t st) {
  const SelectLayout l = select_layout(rows, vocab, Mass);
  char* base = static_cast<char*>(scratch);
  auto* partial = reinterpret_cast<float*>(base + l.partial);
  auto* sel = reinterpret_cast<Select*>(base + l.sel);
  auto* count0 = reinterpret_cast<unsigned*>(base + l.count0);
  auto* count1 = reinterpret_cast<unsigned*>(base + l.count1);
  auto* mass0 = Mass ? reinterpret_cast<double*>(base + l.mass0) : nullptr;
  auto* mass1 = Mass ? reinterpret_cast<double*>(base + l.mass1) : nullptr;
  auto* cand = reinterpret_cast<Candidate*>(base + l.cand);
  auto* cand_count = reinterpret_cast<unsigned*>(base + l.cand_count);
  if (zero)
    if (cudaError_t e = cudaMemsetAsync(base + l.count0, 0, l.total - l.count0, st); e != cudaSuccess)
      return static_cast<int>(e);
  const int64_t chunks = chunks_of(vocab);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(rows));
  if (Mass) max_partials_kernel<<<grid, kStreamThreads, 0, st>>>(x, vocab, partial);
  hist_kernel<kTopBins, Mass><<<grid, kStreamThreads, hist_smem_bytes<kTopBins, Mass>(), st>>>(x, vocab, 0, partial,
                                                                                               sel, count0, mass0,
                                                                                               cand_count, cand);
  choose_kernel<kTopBins, Mass><<<static_cast<unsigned>(rows), kRowThreads, 0, st>>>(x, vocab, 0, rule, partial,
                                                                                    chunks, sel, count0, mass0,
                                                                                    cand_count, cand);
  hist_kernel<kBins, Mass><<<grid, kStreamThreads, hist_smem_bytes<kBins, Mass>(), st>>>(x, vocab, 1, partial, sel,
                                                                                         count1, mass1, cand_count,
                                                                                         cand);
  choose_kernel<kBins, Mass><<<static_cast<unsigned>(rows), kRowThreads, 0, st>>>(x, vocab, 1, rule, partial,
                                                                                 chunks, sel, count1, mass1,
                                                                                 cand_count, cand);
  mask_below_kernel<<<grid, kStreamThreads, 0, st>>>(x, vocab, sel);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

struct Staging {
  void* pinned = nullptr;
  size_t bytes = 0;
  cudaEvent_t done = nullptr;
};

void staging_delete(Staging* s) {
  if (s == nullptr) return;
  if (s->done != nullptr) {
    cudaEventSynchronize(s->done);
    cudaEventDestroy(s->done);
  }
  if (s->pinned != nullptr) cudaFreeHost(s->pinned);
  delete s;
}

cudaError_t upload(Staging*& s, void* dst, const void* src, size_t bytes, cudaStream_t st) {
  if (s == nullptr) {
    s = new Staging;
    if (cudaError_t e = cudaEventCreateWithFlags(&s->done, cudaEventDisableTiming); e != cudaSuccess) return e;
  } else if (cudaError_t e = cudaEventSynchronize(s->done); e != cudaSuccess) {
    return e;  // the previous upload (normally long done)
  }
  if (bytes > s->bytes) {
    if (s->pinned != nullptr) cudaFreeHost(s->pinned);
    s->pinned = nullptr;
    s->bytes = 0;
    const size_t grown = bytes + bytes / 2 + 1024;
    if (cudaError_t e = cudaMallocHost(&s->pinned, grown); e != cudaSuccess) return e;
    s->bytes = grown;
  }
  std::memcpy(s->pinned, src, bytes);
  if (cudaError_t e = cudaMemcpyAsync(dst, s->pinned, bytes, cudaMemcpyHostToDevice, st); e != cudaSuccess) return e;
  return cudaEventRecord(s->done, st);
}

bool programmatic_launch() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  static int major[64] = {};  // per device: 0 unknown, else the compute capability's major
  if (device < 0 || device >= 64) return false;
  if (major[device] == 0 && cudaDeviceGetAttribute(&major[device], cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major[device] >= 9;
}

bool is_device_memory(const void* p, int device) {
  // Every link of a chain asks about the same logits buffer at every step, and the host keeps
  // that buffer: the driver is asked once per (pointer, device) and thread, not per link and step.
  thread_local const void* known_ptr = nullptr;
  thread_local int known_device = -1;
  if (p == known_ptr && device == known_device) return true;
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it for the caller's next check
    return false;
  }
  const bool ok = (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged) && a.device == device;
  if (ok) {
    known_ptr = p;
    known_device = device;
  }
  return ok;
}

int scale(float* x, int64_t n, float inv, void* stream) {
  if (n == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    const int64_t n4 = n / 4;
    if (n4 > 0)
      if (cudaError_t e = launch_after(scale4_kernel, dim3(grid_for(n4, 256)), dim3(256), st, reinterpret_cast<float4*>(x), n4, inv);
          e != cudaSuccess)
        return static_cast<int>(e);
    if (n % 4 != 0) scale_kernel<<<1, 32, 0, st>>>(x + 4 * n4, n % 4, inv);
  } else {
    scale_kernel<<<grid_for(n, 256), 256, 0, st>>>(x, n, inv);
  }
  return static_cast<int>(cudaGetLastError());
}

int penalties(float* x, int64_t vocab, const int32_t* pairs, int64_t n_pairs, void* scratch, Staging*& staging,
              float repetition, float frequency, float presence, void* stream) {
  if (n_pairs == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  if (n_pairs <= kParamPairs) {
    static thread_local PairParams p;
    std::memcpy(p.v, pairs, sizeof(int32_t) * 3 * static_cast<size_t>(n_pairs));
    return static_cast<int>(launch_after(penalties_param_kernel, dim3(grid_for(n_pairs, 256)), dim3(256), st, x, vocab, p,
                                         n_pairs, repetition, frequency, presence));
  }
  if (cudaError_t e = upload(staging, scratch, pairs, sizeof(int32_t) * 3 * static_cast<size_t>(n_pairs), st);
      e != cudaSuccess)
    return static_cast<int>(e);
  penalties_kernel<<<grid_for(n_pairs, 256), 256, 0, st>>>(x, vocab, static_cast<const int32_t*>(scratch), n_pairs,
                                                           repetition, frequency, presence);
  return static_cast<int>(cudaGetLastError());
}

size_t min_p_scratch_bytes(int64_t rows, int64_t vocab) {
  return align256(sizeof(float) * static_cast<size_t>(rows * chunks_of(vocab)));
}

int min_p(float* x, int64_t rows, int64_t vocab, double log_p, void* scratch, void* stream) {
  if (rows == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(chunks_of(vocab)), static_cast<unsigned>(rows));
  auto* partial = static_cast<float*>(scratch);
  max_partials_kernel<<<grid, kStreamThreads, 0, st>>>(x, vocab, partial);
  min_p_kernel<<<grid, kStreamThreads, 0, st>>>(x, vocab, partial, log_p);
  return static_cast<int>(cudaGetLastError());
}

size_t select_scratch_bytes(int64_t rows, int64_t vocab, bool mass) { return select_layout(rows, vocab, mass).total; }

int top_k(float* x, int64_t rows, int64_t vocab, int64_t k, void* scratch, bool zero, void* stream) {
  if (rows == 0) return 0;
  return run_select<false>(x, rows, vocab, Rule{k, 0.0, false}, scratch, zero, static_cast<cudaStream_t>(stream));
}

int top_p(float* x, int64_t rows, int64_t vocab, double p, int64_t min_keep, void* scratch, bool zero, void* stream) {
  if (rows == 0) return 0;
  return run_select<true>(x, rows, vocab, Rule{min_keep, p, true}, scratch, zero, static_cast<cudaStream_t>(stream));
}

size_t dist_scratch_bytes(int64_t rows, int64_t vocab) {
  const size_t n = static_cast<size_t>(rows * chunks_of(vocab));
  return align256(sizeof(float) * n) + align256(sizeof(double) * n) + align256(sizeof(int64_t) * n) +
         align256(sizeof(float) * static_cast<size_t>(rows)) + align256(sizeof(int32_t) * static_cast<size_t>(rows));
}

int dist(const float* x, int64_t rows, int64_t vocab, const float* u, void* scratch, Staging*& staging,
         int32_t* tokens_device, int32_t* tokens_host, void* stream) {
  if (rows == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  const int64_t chunks = chunks_of(vocab);
  const size_t n = static_cast<size_t>(rows * chunks);
  char* base = static_cast<char*>(scratch);
  auto* partial = reinterpret_cast<float*>(base);
  base += align256(sizeof(float) * n);
  auto* sums = reinterpret_cast<double*>(base);
  base += align256(sizeof(double) * n);
  auto* last = reinterpret_cast<int64_t*>(base);
  base += align256(sizeof(int64_t) * n);
  auto* du = reinterpret_cast<float*>(base);
  base += align256(sizeof(float) * static_cast<size_t>(rows));
  auto* dtok = reinterpret_cast<int32_t*>(base);
  static thread_local UniformParams up;
  cudaError_t staged = cudaSuccess;
  const float* u_ptr = stage_uniforms(u, rows, du, staging, st, up, &staged);
  if (staged != cudaSuccess) return static_cast<int>(staged);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(rows));
  max_partials_kernel<<<grid, kStreamThreads, 0, st>>>(x, vocab, partial);
  dist_sums_kernel<<<grid, kDistThreads, 0, st>>>(x, vocab, partial, sums, last);
  int32_t* out = tokens_device != nullptr ? tokens_device : dtok;
  dist_pick_kernel<<<static_cast<unsigned>(rows), kDistThreads, 0, st>>>(x, vocab, chunks, partial, sums, last, u_ptr,
                                                                        up, out);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return static_cast<int>(e);
  if (tokens_device == nullptr) {
    if (cudaError_t e = cudaMemcpyAsync(tokens_host, dtok, sizeof(int32_t) * static_cast<size_t>(rows),
                                        cudaMemcpyDeviceToHost, st);
        e != cudaSuccess)
      return static_cast<int>(e);
    return static_cast<int>(cudaStreamSynchronize(st));
  }
  return 0;
}

}  // namespace loomp::samplers::cuda
