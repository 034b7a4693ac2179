// Flash: attention for batches of one new token per sequence (decode), flash-decoding style.
//
// Work split. A CTA (4 warps) takes one token, G query heads of one KV group (G = the largest
// power of two dividing H/Hkv, at most 4: more heads would not fit their accumulators in
// registers; the other CTAs of the group read the same K/V rows, mostly from L2) and one split
// of the token's visible keys. A key row (D elements, 16 bytes per lane) is read by D/8 lanes, so
// one load of K and V serves all G heads; each group of D/8 lanes keeps its own online softmax
// over the keys it reads, and the groups are merged through shared memory at the end. Decode is
// bound by reading the cache, so CUDA cores suffice; tensor cores would idle on a single query
// row per head.
//
// The decode kernel also appends the batch's k/v to the cache (no separate launch: at batch 1
// every launch costs about as much as the attention itself).
//
// Splits. With few tokens (batch 1) the grid would be a handful of CTAs, so a token's keys are
// cut into n_splits chunks, each CTA writes an unnormalised partial (row, max, sum) into scratch,
// and the last CTA of the (token, head group) to arrive merges them (a second launch cost about
// as much as the merge at batch 1). The host picks n_splits from T, the table width and the
// scratch size only; each CTA computes its chunk from the actual key range on the device (a split
// past the end writes an empty partial), so the launch is the same whatever the lengths are.
#include <cmath>

#include "flash_device.cuh"

namespace loomp::flash {
namespace {

constexpr int kThreads = 128;

struct DecodeArgs : dev::BatchArgs {
  const uint8_t* k;  // [T, Hkv, D]: the batch's new keys
  const uint8_t* v;
  int n_splits;
  float* partial_out;
  float* partial_ml;
  unsigned* arrivals;
};

// Merges the first `active` of row `row`'s n_splits partial slots into out[row] with one warp:
// rescales each split to the common max and sums. The lanes share the splits' weights through
// `s_w` ([kDecodeMaxSplits]); the output dims are spread over the lanes, the splits' rows read
// independently so that the loads overlap.
template <class T>
__device__ void combine_row(const float* partial_out, const float* partial_ml, T* out, int64_t row, int n_splits,
                            int active, int head_dim, float* s_w) {
  const int lane = threadIdx.x & 31;
  const float* ml = partial_ml + row * n_splits * 2;
  float mx = -INFINITY;
  for (int i = lane; i < active; i += 32) mx = fmaxf(mx, ml[2 * i]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float den = 0.0f;
  for (int i = lane; i < active; i += 32) {
    const float w = mx == -INFINITY ? 0.0f : exp2f(ml[2 * i] - mx);
    s_w[i] = w;
    den = fmaf(w, ml[2 * i + 1], den);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
  __syncwarp();
  const float inv = den > 0.0f ? 1.0f / den : 0.0f;
  const float* rows_in = partial_out + row * n_splits * head_dim;
  for (int d = lane; d < head_dim; d += 32) {
    // Unrolled to the bound so that every split's load is in flight at once.
    float num = 0.0f;
#pragma unroll
    for (int i = 0; i < kDecodeMaxSplits; ++i)
      if (i < active) num = fmaf(s_w[i], rows_in[static_cast<int64_t>(i) * head_dim + d], num);
    out[row * head_dim + d] = dev::Elem<T>::from_float(num * inv);
  }
}

template <class T, int D, int G>
__global__ void __launch_bounds__(kThreads, 4) decode_kernel(const DecodeArgs a) {
  using E = dev::Elem<T>;
  constexpr int kLanesPerKey = D / 8;
  constexpr int kGroups = kThreads / kLanesPerKey;  // keys read at once by the CTA
  constexpr int kUnroll = 4;                        // keys in flight per lane group
  __shared__ float s_acc[kGroups][G][D];
  __shared__ float s_m[kGroups][G];
  __shared__ float s_l[kGroups][G];

  dev::allow_next_kernel();
  dev::wait_for_previous_kernel();
  const int t = static_cast<int>(blockIdx.z);
  const int split = static_cast<int>(blockIdx.x);
  const int head0 = static_cast<int>(blockIdx.y) * G;
  const int kvh = head0 / a.group;
  const int grp = threadIdx.x / kLanesPerKey;
  const int li = threadIdx.x % kLanesPerKey;

  const int s = dev::seq_of_token(a.off, a.n_seqs, t);
  const dev::SeqSpan span = dev::seq_span(a.off, a.n_tokens, s);
  const int64_t p = dev::token_position(a.pos, a.off, s, t);
  const int64_t total = p - (t - span.begin) + span.count;
  const int64_t new_begin = total - span.count;  // position of the sequence's first new token
  const int64_t row_bytes = static_cast<int64_t>(D) * 2;

  // The cache append, fused: the first CTA of each (token, KV head) stores the token's k/v rows.
  // Nothing in this launch reads them back from the cache (new keys are read from k/v below),
  // so no reader races with these stores.
  if (split == 0 && head0 % a.group == 0 && threadIdx.x < D / 8) {
    const int64_t at = a.pool.key_offset(s, p, kvh);
    if (at >= 0) {
      const int64_t src = (static_cast<int64_t>(t) * a.pool.kv_heads + kvh) * row_bytes + threadIdx.x * 16;
      *reinterpret_cast<uint4*>(a.pool.base + at + threadIdx.x * 16) = *reinterpret_cast<const uint4*>(a.k + src);
      *reinterpret_cast<uint4*>(a.pool.base + at + a.pool.values_bytes + threadIdx.x * 16) =
          *reinterpret_cast<const uint4*>(a.v + src);
    }
  }
  const dev::KeyRange range =
      dev::key_range(p, total, a.causal, a.window, a.pool.cols << a.pool.block_shift);
  const int len = range.hi - range.lo + 1;
  const int chunk = max(kDecodeMinChunk, (len + a.n_splits - 1) / a.n_splits);
  // Splits that hold keys (at least one, so that a query with none still writes its zero row).
  // The others have nothing to add: they leave at once, and a single active split writes the
  // output itself, with no partials and no merge (short contexts, the usual batch-1 case).
  const int active = len > chunk ? (len + chunk - 1) / chunk : 1;
  if (split >= active) return;  // never split 0, which appended k/v above
  const bool direct = active == 1;
  const int64_t begin64 = range.lo + static_cast<int64_t>(split) * chunk;
  const int k_begin = static_cast<int>(min(begin64, static_cast<int64_t>(range.hi) + 1));
  const int k_end = static_cast<int>(min(static_cast<int64_t>(range.hi) + 1, static_cast<int64_t>(k_begin) + chunk));

  // This lane's D/8 slice of each head's query, pre-scaled into log2 units.
  const T* const q = static_cast<const T*>(a.q);
  float qv[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    const T* row = q + (static_cast<int64_t>(t) * a.n_heads + head0 + h) * D;
    const uint4 raw = *reinterpret_cast<const uint4*>(row + li * 8);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = E::to_float2(w[e]);
      qv[h][2 * e] = f.x * a.scale_log2;
      qv[h][2 * e + 1] = f.y * a.scale_log2;
    }
  }

  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[h][e] = 0.0f;
  }

  // The trip count is the same for every lane (the shuffles below need the whole warp). Each
  // step reads kUnroll keys per lane group and folds them into the running softmax at once: one
  // rescale of the accumulators per step instead of one per key.
  for (int base = k_begin; base < k_end; base += kGroups * kUnroll) {
    uint4 kr[kUnroll], vr[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * kGroups + grp;
      // Keys cached by earlier calls come from the pool, this batch's from k/v.
      const uint8_t* key = nullptr;
      const uint8_t* value = nullptr;
      if (j < k_end) {
        const int64_t fresh = j - new_begin;
        if (fresh >= 0) {
          if (fresh < span.count) {
            const int64_t at = ((span.begin + fresh) * a.pool.kv_heads + kvh) * row_bytes;
            key = a.k + at;
            value = a.v + at;
          }
        } else {
          const int64_t at = a.pool.key_offset(s, j, kvh);
          if (at >= 0) {
            key = a.pool.base + at;
            value = key + a.pool.values_bytes;
          }
        }
      }
      ok[u] = key != nullptr;
      kr[u] = ok[u] ? *reinterpret_cast<const uint4*>(key + li * 16) : make_uint4(0, 0, 0, 0);
      vr[u] = ok[u] ? *reinterpret_cast<const uint4*>(value + li * 16) : make_uint4(0, 0, 0, 0);
    }
    float sc[kUnroll][G];  // scores in log2 units; -inf for keys outside the split or the table
    float vf[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      const uint32_t kw[4] = {kr[u].x, kr[u].y, kr[u].z, kr[u].w};
      const uint32_t vw[4] = {vr[u].x, vr[u].y, vr[u].z, vr[u].w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 kp = E::to_float2(kw[e]);
        const float2 vp = E::to_float2(vw[e]);
        kf[2 * e] = kp.x;
        kf[2 * e + 1] = kp.y;
        vf[u][2 * e] = vp.x;
        vf[u][2 * e + 1] = vp.y;
      }
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(qv[h][e], kf[e], dot);
#pragma unroll
        for (int o = kLanesPerKey / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        sc[u][h] = ok[u] ? dot : -INFINITY;
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
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float acc_e = acc[h][e] * alpha;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) acc_e = fmaf(pw[u], vf[u][e], acc_e);
        acc[h][e] = acc_e;
      }
    }
  }

  // Merge the lane groups of the CTA.
#pragma unroll
  for (int h = 0; h < G; ++h) {
#pragma unroll
    for (int e = 0; e < 8; ++e) s_acc[grp][h][li * 8 + e] = acc[h][e];
    if (li == 0) {
      s_m[grp][h] = m[h];
      s_l[grp][h] = l[h];
    }
  }
  __syncthreads();
  T* const out = static_cast<T*>(a.out);
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int h = i / D, d = i % D;
    float mx = -INFINITY;
    for (int gi = 0; gi < kGroups; ++gi) mx = fmaxf(mx, s_m[gi][h]);
    float num = 0.0f, den = 0.0f;
    if (mx != -INFINITY)
      for (int gi = 0; gi < kGroups; ++gi) {
        const float w = exp2f(s_m[gi][h] - mx);
        num = fmaf(w, s_acc[gi][h][d], num);
        den = fmaf(w, s_l[gi][h], den);
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
  __shared__ float s_w[kThreads / 32][kDecodeMaxSplits];
  __threadfence();  // this CTA's partials are visible before its arrival is counted
  __syncthreads();
  unsigned* counter = a.arrivals + static_cast<int64_t>(t) * gridDim.y + blockIdx.y;
  if (threadIdx.x == 0) s_last = atomicAdd(counter, 1u) == static_cast<unsigned>(active) - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();  // and the others' partials are read after their arrivals
  const int warp = threadIdx.x / 32;
  for (int h = warp; h < G; h += kThreads / 32)
    combine_row(a.partial_out, a.partial_ml, out, static_cast<int64_t>(t) * a.n_heads + head0 + h, a.n_splits, active,
                D, s_w[warp]);
  if (threadIdx.x == 0) *counter = 0;
}

template <class T, int D, int G>
cudaError_t launch(const Problem& p, const DecodePlan& plan, cudaStream_t stream) {
  DecodeArgs a;
  static_cast<dev::BatchArgs&>(a) = dev::make_batch_args(p);
  a.k = static_cast<const uint8_t*>(p.k);
  a.v = static_cast<const uint8_t*>(p.v);
  a.n_splits = plan.n_splits;
  a.partial_out = plan.partial_out;
  a.partial_ml = plan.partial_ml;
  a.arrivals = plan.arrivals;
  const dim3 grid(static_cast<unsigned>(plan.n_splits), static_cast<unsigned>(p.n_heads / G),
                  static_cast<unsigned>(p.n_tokens));
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  config.attrs = p.programmatic ? &attribute : nullptr;
  config.numAttrs = p.programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&config, decode_kernel<T, D, G>, a);
}

template <class T, int D>
cudaError_t launch_heads(const Problem& p, const DecodePlan& plan, cudaStream_t stream) {
  switch (decode_heads_per_cta(p.n_heads / p.n_kv_heads)) {
    case 1: return launch<T, D, 1>(p, plan, stream);
    case 2: return launch<T, D, 2>(p, plan, stream);
    default: return launch<T, D, 4>(p, plan, stream);
  }
}

}  // namespace

cudaError_t launch_decode(const Problem& p, const DecodePlan& plan, cudaStream_t stream) {
  if (p.n_tokens == 0) return cudaSuccess;
  if (p.dtype == Dtype::bf16)
    return p.head_dim == 64 ? launch_heads<__nv_bfloat16, 64>(p, plan, stream)
                            : launch_heads<__nv_bfloat16, 128>(p, plan, stream);
  return p.head_dim == 64 ? launch_heads<__half, 64>(p, plan, stream) : launch_heads<__half, 128>(p, plan, stream);
}

}  // namespace loomp::flash
