// Attention component `sdpa`: the reference for scaled dot-product attention over a paged KV
// cache, on the CPU (float32) and, in builds with CUDA, on a CUDA device (float32 or bfloat16;
// sdpa_cuda.cpp). Clear over fast: every other attention plugin is checked against this one.
//
// The cache may be stored in another type than the compute dtype (`kv_dtype`: bf16, or int8 /
// fp8 E4M3 with a float32 scale per (token, kv head) row): k and v are quantized as they are
// written into the cache and dequantized as attention reads them. The block layout, scales
// included, is in loom_kv_format.hpp; a sequence's token at position p lives in pool block
// block_table[s, p / B], slot p % B.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "loom/loom_plugin_api.h"
#include "loom_device_tensor.hpp"
#include "loom_attention_glue.hpp"
#include "loom_plugin_util.hpp"
#include "loom_kv_format.hpp"
#if LOOM_SDPA_CUDA
#include "sdpa_cuda.hpp"
#endif

namespace loomp::sdpa {
using namespace loomp::kvcache;  // the block format flash shares (loom_kv_format.hpp)
namespace {

struct Sdpa {
  const loom_host_api* host;
  loom_host_ctx* ctx;
  int64_t block_size;
  KvDtype kv_dtype;  // kAuto is resolved against config.dtype at prepare()
  int64_t own_window;  // sliding_window: 0 applies the model's (config.sliding_window)
  bool prepared = false;
  loom_attention_config cfg{};
  KvGeometry kv{};  // the cache's block format, fixed at prepare()

  Sdpa(const loom_host_api* h, loom_host_ctx* c)
      : host(h), ctx(c), block_size(cfg_int(h, c, "block_size")), kv_dtype(parse_kv_dtype("sdpa", cfg_string(h, c, "kv_dtype"))),
        own_window(parse_sliding_window("sdpa", cfg_int(h, c, "sliding_window"))) {
    if (block_size < 1 || block_size > 1024 || (block_size & (block_size - 1)) != 0)
      invalid_param("block_size",
                    "sdpa: block_size must be a power of two in [1, 1024], got " + std::to_string(block_size));
  }

  void prepare(const loom_attention_config& c, loom_kv_layout& out) {
    if (c.n_heads <= 0 || c.n_kv_heads <= 0 || c.head_dim <= 0)
      invalid("sdpa: n_heads, n_kv_heads and head_dim must be positive");
    if (c.n_heads % c.n_kv_heads != 0)
      invalid("sdpa: n_heads (" + std::to_string(c.n_heads) + ") must be a multiple of n_kv_heads (" +
              std::to_string(c.n_kv_heads) + ")");
    if (c.sliding_window < 0) invalid("sdpa: sliding_window must be >= 0");
    if (c.device.device_type == kDLCUDA) {
#if LOOM_SDPA_CUDA
      if (!is_f32(c.dtype) && !is_bf16(c.dtype))
        unsupported("sdpa: on CUDA only float32 and bfloat16 are supported (config.dtype is " + dtype_name(c.dtype) +
                    ")");
#else
      unsupported("sdpa: this build of Loom has no CUDA support (config.device is " + device_name(c.device) + ")");
#endif
    } else {
      if (!is_f32(c.dtype)) unsupported("sdpa: only float32 is supported on the CPU (config.dtype)");
      if (c.device.device_type != kDLCPU)
        unsupported("sdpa: only the CPU and CUDA devices are supported (config.device is " + device_name(c.device) +
                    ")");
    }
    if (!std::isfinite(c.softmax_scale)) invalid("sdpa: softmax_scale is not finite");
    const KvFormat format = kv_format_of(kv_dtype, is_bf16(c.dtype) ? KvFormat::bf16 : KvFormat::f32);
    cfg = c;
    if (own_window > 0) cfg.sliding_window = static_cast<int32_t>(own_window);  // its own window over the model's
    kv = KvGeometry{block_size, c.n_kv_heads, c.head_dim, format};
    prepared = true;
    out.block_size = static_cast<int32_t>(block_size);
    out.cache_dtype = kv_cache_dtype(format);
    out.bytes_per_block = static_cast<uint64_t>(kv.bytes_per_block());
    out.window = cfg.sliding_window;  // a host before ABI 1.4 does not get it back (the glue)
  }

  void forward(const loom_attention_batch& b) {
    if (!prepared) invalid("sdpa: forward called before prepare");
    const int64_t H = cfg.n_heads, Hkv = cfg.n_kv_heads, D = cfg.head_dim, B = block_size;
    const int64_t T = b.n_tokens, S = b.n_seqs;
    if (T < 0 || S < 0) invalid("sdpa: n_tokens and n_seqs must be >= 0");
    if (cfg.n_layers > 0 && (b.layer < 0 || b.layer >= cfg.n_layers))
      invalid("sdpa: layer " + std::to_string(b.layer) + " out of range");
#if LOOM_SDPA_CUDA
    if (cfg.device.device_type == kDLCUDA) return forward_cuda(host, ctx, cfg, kv, b);
#endif
    for (const DLTensor* t : {b.q, b.k, b.v, b.out})
      if (t != nullptr && (t->device.device_type != kDLCPU || !is_f32(t->dtype)))
        unsupported("sdpa: q, k, v and out must be float32 on the CPU");
    check_f32(b.q, "q", {T, H, D});
    check_f32(b.k, "k", {T, Hkv, D});
    check_f32(b.v, "v", {T, Hkv, D});
    check_f32(b.out, "out", {T, H, D});
    check_i32(b.seq_offsets, "seq_offsets", {S + 1});
    check_i32(b.seq_positions, "seq_positions", {S});
    check_i32(b.block_table, "block_table", {S, -1});
    check_cpu_tensor(b.kv_pool, "kv_pool", kDLUInt, 8, {-1, kv.bytes_per_block()});
    const int32_t* off = data_of<int32_t>(*b.seq_offsets);
    const int32_t* pos = data_of<int32_t>(*b.seq_positions);
    const int32_t* table = data_of<int32_t>(*b.block_table);
    const int64_t M = b.block_table->shape[1], N = b.kv_pool->shape[0];
    if (off[0] != 0 || off[S] != T) invalid("seq_offsets: must start at 0 and end at n_tokens");
    for (int64_t s = 0; s < S; ++s) {
      if (off[s + 1] < off[s]) invalid("seq_offsets: must be non-decreasing (sequence " + std::to_string(s) + ")");
      if (pos[s] < 0) invalid("seq_positions[" + std::to_string(s) + "] is negative");
      const int64_t end = static_cast<int64_t>(pos[s]) + (off[s + 1] - off[s]);
      if (cfg.max_positions > 0 && end > cfg.max_positions)
        invalid("seq_positions[" + std::to_string(s) + "]: sequence runs past max_positions");
      const int64_t blocks = (end + B - 1) / B;
      if (blocks > M)
        invalid("block_table: sequence " + std::to_string(s) + " needs " + std::to_string(blocks) +
                " blocks but the table has " + std::to_string(M) + " columns");
      for (int64_t j = 0; j < blocks; ++j) {
        const int32_t blk = table[s * M + j];
        if (blk < 0 || blk >= N)
          invalid("block_table[" + std::to_string(s) + ", " + std::to_string(j) + "] = " + std::to_string(blk) +
                  " is outside the pool [0, " + std::to_string(N) + ")");
      }
    }

    uint8_t* pool = data_of<uint8_t>(*b.kv_pool);
    const KvFormat format = kv.format;
    // The block holding position p of sequence s, and the cache row of (p, kv head h, which):
    // which = 0 for the key, 1 for the value.
    const int64_t block_bytes = kv.bytes_per_block();
    auto block_of = [&](int64_t s, int64_t p) { return pool + table[s * M + p / B] * block_bytes; };
    auto row_of = [&](int64_t p, int64_t h, int which) { return kv.row(which, p % B, h); };
    // Row (s, p, h, which) read back as float into `dst` [D].
    auto load_row = [&](int64_t s, int64_t p, int64_t h, int which, float* dst) {
      uint8_t* block = block_of(s, p);
      const int64_t r = row_of(p, h, which);
      const float scale = kv_quantized(format) ? *kv.row_scale(block, r) : 0.0f;
      const uint8_t* src = kv.row_data(block, r);
      for (int64_t d = 0; d < D; ++d) dst[d] = kv_load(src, d, scale, format);
    };
    // Stores a new row [D], quantizing it with its own scale where the format has scales.
    auto store_row = [&](int64_t s, int64_t p, int64_t h, int which, const float* src) {
      uint8_t* block = block_of(s, p);
      const int64_t r = row_of(p, h, which);
      float scale = 0.0f;
      if (kv_quantized(format)) {
        float absmax = 0.0f;
        for (int64_t d = 0; d < D; ++d) absmax = std::max(absmax, std::fabs(src[d]));
        scale = kv_scale(absmax, format);
        *kv.row_scale(block, r) = scale;
      }
      uint8_t* dst = kv.row_data(block, r);
      for (int64_t d = 0; d < D; ++d) kv_store(dst, d, src[d], scale, format);
    };
    const float* q = data_of<float>(*b.q);
    const float* k = data_of<float>(*b.k);
    const float* v = data_of<float>(*b.v);
    float* out = data_of<float>(*b.out);
    const int64_t group = H / Hkv;
    const int64_t window = cfg.sliding_window;
    std::vector<float> scores, row(static_cast<size_t>(D));

    for (int64_t s = 0; s < S; ++s) {
      if (host->is_cancelled && host->is_cancelled(ctx)) fail(LOOM_ERR_CANCELLED, "sdpa: cancelled");
      const int64_t n_new = off[s + 1] - off[s], p0 = pos[s], total = p0 + n_new;
      // 1. Append the new keys and values to the cache (quantized there for int8/fp8).
      for (int64_t i = 0; i < n_new; ++i)
        for (int64_t h = 0; h < Hkv; ++h) {
          const int64_t src = ((off[s] + i) * Hkv + h) * D;
          store_row(s, p0 + i, h, 0, k + src);
          store_row(s, p0 + i, h, 1, v + src);
        }
      // 2. Each new token attends to cached positions [lo, hi]: causal stops at its own
      //    position; the sliding window keeps keys with position > p - window. lo <= p <= hi,
      //    so the range is never empty. Keys and values are read back from the cache, so the
      //    new tokens see their own stored (possibly quantized) rows like every later token.
      scores.resize(static_cast<size_t>(total));
      for (int64_t i = 0; i < n_new; ++i) {
        const int64_t p = p0 + i;
        const int64_t hi = b.causal ? p : total - 1;
        const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t kvh = h / group;
          const float* qr = q + ((off[s] + i) * H + h) * D;
          float mx = -INFINITY;
          for (int64_t j = lo; j <= hi; ++j) {
            load_row(s, j, kvh, 0, row.data());
            float dot = 0.0f;
            for (int64_t d = 0; d < D; ++d) dot += qr[d] * row[d];
            scores[j] = dot * cfg.softmax_scale;
            mx = std::max(mx, scores[j]);
          }
          float denom = 0.0f;
          for (int64_t j = lo; j <= hi; ++j) {
            scores[j] = std::exp(scores[j] - mx);  // max subtraction keeps exp() in range
            denom += scores[j];
          }
          float* o = out + ((off[s] + i) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
          for (int64_t j = lo; j <= hi; ++j) {
            const float w = scores[j] / denom;
            load_row(s, j, kvh, 1, row.data());
            for (int64_t d = 0; d < D; ++d) o[d] += w * row[d];
          }
        }
      }
    }
  }

  // Training (attention.h: loom_attention_backward_batch): the gradients of this component's
  // forward over the sequences' own tokens (no earlier cache: a training sequence starts at
  // position 0), with the probabilities recomputed from q and k. P = softmax(scale q k^T) over
  // the keys a query sees (causal, the window), O = P v:
  //   d_v[j] += P_ij d_out_i,  dP_ij = d_out_i . v_j,  dS_ij = P_ij (dP_ij - d_out_i . out_i),
  //   d_q_i += scale dS_ij k_j,  d_k_j += scale dS_ij q_i  (GQA: summed over a kv head's queries).
  void backward(const loom_attention_backward_batch& b) {
    if (!prepared) invalid("sdpa: backward called before prepare");
    if (cfg.device.device_type != kDLCPU) unsupported("sdpa: backward runs on the CPU only");
    if (kv.format != KvFormat::f32)
      unsupported("sdpa: backward needs kv_dtype \"auto\" (a float32 cache: the forward of a quantized cache rounds k "
                  "and v, which the gradient would not see)");
    const int64_t H = cfg.n_heads, Hkv = cfg.n_kv_heads, D = cfg.head_dim, T = b.n_tokens, S = b.n_seqs;
    if (T < 0 || S < 0) invalid("sdpa: n_tokens and n_seqs must be >= 0");
    check_f32(b.q, "q", {T, H, D});
    check_f32(b.k, "k", {T, Hkv, D});
    check_f32(b.v, "v", {T, Hkv, D});
    check_f32(b.out, "out", {T, H, D});
    check_f32(b.d_out, "d_out", {T, H, D});
    check_f32(b.d_q, "d_q", {T, H, D});
    check_f32(b.d_k, "d_k", {T, Hkv, D});
    check_f32(b.d_v, "d_v", {T, Hkv, D});
    check_i32(b.seq_offsets, "seq_offsets", {S + 1});
    const int32_t* off = data_of<int32_t>(*b.seq_offsets);
    if (off[0] != 0 || off[S] != T) invalid("seq_offsets: must start at 0 and end at n_tokens");
    for (int64_t s = 0; s < S; ++s)
      if (off[s + 1] < off[s]) invalid("seq_offsets: must be non-decreasing (sequence " + std::to_string(s) + ")");
    const float *q = data_of<float>(*b.q), *k = data_of<float>(*b.k), *v = data_of<float>(*b.v),
                *out = data_of<float>(*b.out), *dout = data_of<float>(*b.d_out);
    float *dq = data_of<float>(*b.d_q), *dk = data_of<float>(*b.d_k), *dv = data_of<float>(*b.d_v);
    std::fill(dq, dq + T * H * D, 0.0f);
    std::fill(dk, dk + T * Hkv * D, 0.0f);
    std::fill(dv, dv + T * Hkv * D, 0.0f);
    const int64_t group = H / Hkv, window = cfg.sliding_window;
    const float scale = cfg.softmax_scale;
    std::vector<float> p;
    for (int64_t s = 0; s < S; ++s) {
      if (host->is_cancelled && host->is_cancelled(ctx)) fail(LOOM_ERR_CANCELLED, "sdpa: cancelled");
      const int64_t base = off[s], n = off[s + 1] - off[s];
      p.resize(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        const int64_t hi = b.causal ? i : n - 1;
        const int64_t lo = window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t kvh = h / group;
          const float* qi = q + ((base + i) * H + h) * D;
          const float* gi = dout + ((base + i) * H + h) * D;
          const float* oi = out + ((base + i) * H + h) * D;
          // The forward's probabilities, recomputed as it computed them.
          float mx = -INFINITY;
          for (int64_t j = lo; j <= hi; ++j) {
            const float* kj = k + ((base + j) * Hkv + kvh) * D;
            float dot = 0.0f;
            for (int64_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
            p[j] = dot * scale;
            mx = std::max(mx, p[j]);
          }
          float denom = 0.0f;
          for (int64_t j = lo; j <= hi; ++j) {
            p[j] = std::exp(p[j] - mx);
            denom += p[j];
          }
          float go = 0.0f;  // d_out_i . out_i = sum_j P_ij dP_ij
          for (int64_t d = 0; d < D; ++d) go += gi[d] * oi[d];
          float* dqi = dq + ((base + i) * H + h) * D;
          for (int64_t j = lo; j <= hi; ++j) {
            const float pij = p[j] / denom;
            const float* kj = k + ((base + j) * Hkv + kvh) * D;
            const float* vj = v + ((base + j) * Hkv + kvh) * D;
            float* dkj = dk + ((base + j) * Hkv + kvh) * D;
            float* dvj = dv + ((base + j) * Hkv + kvh) * D;
            float dp = 0.0f;
            for (int64_t d = 0; d < D; ++d) {
              dvj[d] += pij * gi[d];
              dp += gi[d] * vj[d];
            }
            const float ds = pij * (dp - go) * scale;
            for (int64_t d = 0; d < D; ++d) {
              dqi[d] += ds * kj[d];
              dkj[d] += ds * qi[d];
            }
          }
        }
      }
    }
  }
};

loom_status prepare_fn(void* inst, const loom_attention_config* c, loom_kv_layout* layout) {
  auto* a = static_cast<Sdpa*>(inst);
  return attention_prepare(*a, a->host, a->ctx, "sdpa", c, layout);
}
loom_status forward_fn(void* inst, const loom_attention_batch* b) {
  auto* a = static_cast<Sdpa*>(inst);
  return attention_forward(*a, a->host, a->ctx, "sdpa", b);
}
loom_status backward_fn(void* inst, const loom_attention_backward_batch* b) {
  auto* a = static_cast<Sdpa*>(inst);
  return attention_backward(*a, a->host, a->ctx, "sdpa", b);
}

constexpr loom_attention_vtable kVtable = {
    sizeof(loom_attention_vtable),
    {&create_instance<Sdpa>, &destroy_instance<Sdpa>, nullptr, nullptr, nullptr},
    &prepare_fn,
    &forward_fn,
    &backward_fn,  // CPU, float32 cache
};
constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "block_size", LOOM_VALUE_INT, 0, "16",
     "tokens per KV cache block, a power of two in [1, 1024]"},
    {sizeof(loom_param_desc), "kv_dtype", LOOM_VALUE_STRING, 0, "\"auto\"",
     "KV cache storage: \"auto\" (the compute dtype), \"bf16\", \"int8\" or \"fp8\" (E4M3), each int8/fp8 "
     "(token, kv head) row with its own float32 scale"},
    {sizeof(loom_param_desc), "sliding_window", LOOM_VALUE_INT, 0, "0",
     "attend to the last N positions only (Mistral-style, on the paged cache); 0: the model's own window"},
};
constexpr loom_component_desc kSdpa = {
    sizeof(loom_component_desc), LOOM_KIND_ATTENTION, "sdpa", "1.0.0",
    "Reference scaled dot-product attention over a paged KV cache: CPU float32, CUDA float32/bfloat16; "
    "KV cache in the compute dtype, bf16, int8 or fp8",
    kParams, 3, LOOM_THREADING_SERIAL, &kVtable};
const loom_component_desc* const kComponents[] = {&kSdpa};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-attention-sdpa", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::sdpa

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::sdpa::kPlugin; }
