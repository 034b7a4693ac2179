// Attention component `sdpa`: the reference for scaled dot-product attention over a paged KV
// cache, on the CPU (float32) and, in builds with CUDA, on a CUDA device (float32 or bfloat16;
// sdpa_cuda.cpp). Clear over fast: every other attention plugin is checked against this one.
//
// KV block layout in the pool (one layer), in the config dtype, B = block_size:
//   block = keys [B, Hkv, D] followed by values [B, Hkv, D]
//   bytes_per_block = 2 * B * Hkv * D * sizeof(dtype)
// A sequence's token at position p lives in pool block block_table[s, p / B], slot p % B.
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "loom/loom_plugin_api.h"
#include "loom_device_tensor.hpp"
#include "loom_attention_glue.hpp"
#include "loom_plugin_util.hpp"
#if LOOM_SDPA_CUDA
#include "sdpa_cuda.hpp"
#endif

namespace loomp::sdpa {
namespace {

struct Sdpa {
  const loom_host_api* host;
  loom_host_ctx* ctx;
  int64_t block_size;
  bool prepared = false;
  loom_attention_config cfg{};

  Sdpa(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c), block_size(cfg_int(h, c, "block_size")) {
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
    cfg = c;
    prepared = true;
    const uint64_t elem = is_bf16(c.dtype) ? 2 : sizeof(float);
    out.block_size = static_cast<int32_t>(block_size);
    out.cache_dtype = c.dtype;
    out.bytes_per_block = 2ull * static_cast<uint64_t>(block_size) * static_cast<uint64_t>(c.n_kv_heads) *
                          static_cast<uint64_t>(c.head_dim) * elem;
  }

  void forward(const loom_attention_batch& b) {
    if (!prepared) invalid("sdpa: forward called before prepare");
    const int64_t H = cfg.n_heads, Hkv = cfg.n_kv_heads, D = cfg.head_dim, B = block_size;
    const int64_t T = b.n_tokens, S = b.n_seqs;
    if (T < 0 || S < 0) invalid("sdpa: n_tokens and n_seqs must be >= 0");
    if (cfg.n_layers > 0 && (b.layer < 0 || b.layer >= cfg.n_layers))
      invalid("sdpa: layer " + std::to_string(b.layer) + " out of range");
#if LOOM_SDPA_CUDA
    if (cfg.device.device_type == kDLCUDA) return forward_cuda(host, ctx, cfg, block_size, b);
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
    check_cpu_tensor(b.kv_pool, "kv_pool", kDLUInt, 8, {-1, static_cast<int64_t>(2 * B * Hkv * D * 4)});
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
    const int64_t block_floats = 2 * B * Hkv * D;
    // Pointer to the key (which = 0) or value (which = 1) row [D] of kv head h at position p.
    auto slot = [&](int64_t s, int64_t p, int64_t h, int which) {
      float* block = reinterpret_cast<float*>(pool) + static_cast<int64_t>(table[s * M + p / B]) * block_floats;
      return block + which * B * Hkv * D + ((p % B) * Hkv + h) * D;
    };
    const float* q = data_of<float>(*b.q);
    const float* k = data_of<float>(*b.k);
    const float* v = data_of<float>(*b.v);
    float* out = data_of<float>(*b.out);
    const int64_t group = H / Hkv;
    const int64_t window = cfg.sliding_window;
    std::vector<float> scores;

    for (int64_t s = 0; s < S; ++s) {
      if (host->is_cancelled && host->is_cancelled(ctx)) fail(LOOM_ERR_CANCELLED, "sdpa: cancelled");
      const int64_t n_new = off[s + 1] - off[s], p0 = pos[s], total = p0 + n_new;
      // 1. Append the new keys and values to the cache.
      for (int64_t i = 0; i < n_new; ++i)
        for (int64_t h = 0; h < Hkv; ++h) {
          const int64_t src = ((off[s] + i) * Hkv + h) * D;
          std::memcpy(slot(s, p0 + i, h, 0), k + src, static_cast<size_t>(D) * sizeof(float));
          std::memcpy(slot(s, p0 + i, h, 1), v + src, static_cast<size_t>(D) * sizeof(float));
        }
      // 2. Each new token attends to cached positions [lo, hi]: causal stops at its own
      //    position; the sliding window keeps keys with position > p - window. lo <= p <= hi,
      //    so the range is never empty.
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
            const float* kr = slot(s, j, kvh, 0);
            float dot = 0.0f;
            for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
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
            const float* vr = slot(s, j, kvh, 1);
            for (int64_t d = 0; d < D; ++d) o[d] += w * vr[d];
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

constexpr loom_attention_vtable kVtable = {
    sizeof(loom_attention_vtable),
    {&create_instance<Sdpa>, &destroy_instance<Sdpa>, nullptr, nullptr, nullptr},
    &prepare_fn,
    &forward_fn,
    nullptr,  // backward: not yet
};
constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "block_size", LOOM_VALUE_INT, 0, "16",
     "tokens per KV cache block, a power of two in [1, 1024]"},
};
constexpr loom_component_desc kSdpa = {
    sizeof(loom_component_desc), LOOM_KIND_ATTENTION, "sdpa", "1.0.0",
    "Reference scaled dot-product attention over a paged KV cache: CPU float32, CUDA float32/bfloat16",
    kParams, 1, LOOM_THREADING_SERIAL, &kVtable};
const loom_component_desc* const kComponents[] = {&kSdpa};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-attention-sdpa", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::sdpa

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::sdpa::kPlugin; }
