#include "cpu_backend.hpp"
#include "pipeline_stages.hpp"
#include "tensor_shards.hpp"

#include "adapter_sites.hpp"
#include "adapter_weights.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <set>
#include <iostream>
#include <memory>
#include <type_traits>

#include "loom/core/error.hpp"
#include "loom/core/host_buffer.hpp"
#include "loom/core/safetensors_writer.hpp"
#include "loom/core/reference_model.hpp"
#include "host_tensor.hpp"
#include "transformer_ops.hpp"

#include <nlohmann/json.hpp>

namespace loom {

using detail::HostTensor;

namespace {

// ---- The linear kernel ----------------------------------------------------------------------
//
// y[r, o] = sum_i x[r, i] * W[o, i] (+ b[o]) for a block of rows and output features. Every
// output has its own 8 float32 lanes: lane k sums the products of the indices i = k (mod 8) of
// the first in - in % 8 inputs in increasing i; the lanes are then added in a fixed tree, the
// remaining inputs one by one, and the bias last. Tiles (R rows x O outputs at a time, so that a
// weight row is loaded once for R rows and an input row once for O outputs) only change which
// outputs are computed together, never that order: every output comes out the same whatever the
// tile, the thread or the number of rows in the batch. The 8 lanes are a GCC/clang vector
// extension (one AVX register, or two SSE registers), which compiles to SIMD on every target
// without intrinsics; the plain scalar-array spelling of the same loop vectorised erratically
// with GCC 12 (2-7x apart between tile shapes). bfloat16 weights widen to float32 by a 16-bit
// shift inside the loop.

#define LOOM_ALWAYS_INLINE inline __attribute__((always_inline))
#define LOOM_UNROLL _Pragma("GCC unroll 16")

typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

template <class W> LOOM_ALWAYS_INLINE float widen(W w) {
  if constexpr (sizeof(W) == 4) return w;
  else return ops::bf16_to_float(w);
}

template <class W> LOOM_ALWAYS_INLINE void load8(f32x8 &out, const W *p) {
  if constexpr (sizeof(W) == 4) {
    std::memcpy(&out, p, sizeof out);
  } else {
    u16x8 h;
    std::memcpy(&h, p, sizeof h);
    u32x8 u = __builtin_convertvector(h, u32x8) << 16;
    std::memcpy(&out, &u, sizeof out);
  }
}

// R rows of x (row stride `in`) against O weight rows (row stride `in`).
template <int R, int O, class W>
LOOM_ALWAYS_INLINE void tile(const float *x, int64_t in, const W *w, const float *bias, float *y, int64_t ldy) {
  f32x8 acc[R][O];
  LOOM_UNROLL for (int r = 0; r < R; ++r) LOOM_UNROLL for (int o = 0; o < O; ++o) acc[r][o] = f32x8{};
  const int64_t body = in - in % 8;
  for (int64_t i = 0; i < body; i += 8) {
    f32x8 xv[R];
    LOOM_UNROLL for (int r = 0; r < R; ++r) load8(xv[r], x + r * in + i);
    LOOM_UNROLL for (int o = 0; o < O; ++o) {
      f32x8 wv;
      load8(wv, w + o * in + i);
      LOOM_UNROLL for (int r = 0; r < R; ++r) acc[r][o] += xv[r] * wv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int o = 0; o < O; ++o) {
      const f32x8 a = acc[r][o];
      float s = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
      for (int64_t i = body; i < in; ++i) s += x[r * in + i] * widen(w[o * in + i]);
      y[r * ldy + o] = bias ? s + bias[o] : s;
    }
}

// Rows [r0, r1) x outputs [o0, o1): output blocks sized to stay in L2 while the rows stream
// through them, RM x OM tiles, then single rows in 1 x OS tiles, then single outputs.
template <int RM, int OM, int OS, class W>
LOOM_ALWAYS_INLINE void block(const float *x, int64_t in, const W *w, const float *bias, float *y, int64_t ldy,
                              int64_t r0, int64_t r1, int64_t o0, int64_t o1) {
  const int64_t chunk = std::max<int64_t>(OM * OS, (int64_t{128} << 10) / (in * static_cast<int64_t>(sizeof(W))) / (OM * OS) * (OM * OS));
  for (int64_t c0 = o0; c0 < o1; c0 += chunk) {
    const int64_t c1 = std::min(o1, c0 + chunk);
    int64_t r = r0;
    for (; r + RM <= r1; r += RM) {
      int64_t o = c0;
      for (; o + OM <= c1; o += OM) tile<RM, OM>(x + r * in, in, w + o * in, bias ? bias + o : nullptr, y + r * ldy + o, ldy);
      for (; o < c1; ++o) tile<RM, 1>(x + r * in, in, w + o * in, bias ? bias + o : nullptr, y + r * ldy + o, ldy);
    }
    for (; r < r1; ++r) {
      int64_t o = c0;
      for (; o + OS <= c1; o += OS) tile<1, OS>(x + r * in, in, w + o * in, bias ? bias + o : nullptr, y + r * ldy + o, ldy);
      for (; o < c1; ++o) tile<1, 1>(x + r * in, in, w + o * in, bias ? bias + o : nullptr, y + r * ldy + o, ldy);
    }
  }
}

template <class W>
using BlockFn = void (*)(const float *, int64_t, const W *, const float *, float *, int64_t, int64_t, int64_t, int64_t,
                         int64_t);

// Baseline build (SSE2 on x86-64): 16 vector registers of 4 lanes, so smaller tiles.
template <class W>
void block_generic(const float *x, int64_t in, const W *w, const float *bias, float *y, int64_t ldy, int64_t r0,
                   int64_t r1, int64_t o0, int64_t o1) {
  block<2, 3, 4>(x, in, w, bias, y, ldy, r0, r1, o0, o1);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOOM_HAVE_AVX2_KERNEL 1
// The same loops for AVX2 (8 lanes per register). ISO C++ mode does not contract a * b + c into
// an FMA, so both builds give the same numbers.
template <class W>
__attribute__((target("avx2"))) void block_avx2(const float *x, int64_t in, const W *w, const float *bias, float *y,
                                                int64_t ldy, int64_t r0, int64_t r1, int64_t o0, int64_t o1) {
  block<4, 3, 8>(x, in, w, bias, y, ldy, r0, r1, o0, o1);
}
#endif

template <class W> BlockFn<W> pick_block() {
#ifdef LOOM_HAVE_AVX2_KERNEL
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) return &block_avx2<W>;
#endif
  return &block_generic<W>;
}

const BlockFn<float> kBlockF32 = pick_block<float>();
const BlockFn<uint16_t> kBlockBF16 = pick_block<uint16_t>();

// Work below this many multiply-adds stays on one thread: waking a worker costs about as much.
constexpr int64_t kMinTaskMacs = int64_t{1} << 15;
constexpr int64_t kRowBlock = 32; // rows per task of a large batch

// ---- DLTensor views -------------------------------------------------------------------------

using detail::View;  // a DLTensor over memory owned elsewhere (host_tensor.hpp)

constexpr DLDataType kF32{kDLFloat, 32, 1};
constexpr DLDataType kI32{kDLInt, 32, 1};

} // namespace

// ---- Construction -----------------------------------------------------------------------------

CpuBackend::CpuBackend(const ModelConfig &config, ModelWeights weights, Pipeline &pipeline, const CpuBackendOptions &options)
    : config_(config), pipeline_(pipeline), options_(options), pool_(options.threads) {
  if (options.tensor && options.tensor->size() > 1) {
    tensor_ = options.tensor.get();
    for (loom_kind kind : {LOOM_KIND_ADAPTER, LOOM_KIND_QUANTIZER})
      if (!pipeline.list(kind).empty())
        throw runtime_error(options.source_name + ": tensor parallel inference with adapters or a quantizer is not supported yet");
    if (!options.calibration.empty()) throw runtime_error(options.source_name + ": calibration under tensor parallelism");
  }
  if (options.pipeline && options.pipeline->stages() > 1) {
    stages_ = options.pipeline.get();
    first_layer_ = stages_->trainer_stage().first;
    for (loom_kind kind : {LOOM_KIND_ADAPTER, LOOM_KIND_QUANTIZER})
      if (!pipeline.list(kind).empty())
        throw runtime_error(options.source_name + ": pipeline parallel inference with adapters or a quantizer is not supported yet");
    if (!options.calibration.empty()) throw runtime_error(options.source_name + ": calibration under pipeline parallelism");
  }
  build(std::move(weights));
}

CpuBackend::~CpuBackend() {
  if (!ready_) return; // installed nothing
  // Under the step lock: a swap in flight either finished with the hooks or sees none.
  auto guard = pipeline_.begin_step();
  pipeline_.set_activate_hook(LOOM_KIND_ATTENTION, {});
  pipeline_.set_activate_hook(LOOM_KIND_QUANTIZER, {});
  pipeline_.set_activate_hook(LOOM_KIND_ADAPTER, {});
  pipeline_.set_membership_hooks(LOOM_KIND_ADAPTER, {});
  if (quantizer_) {
    std::vector<loom_qweight *> weights;
    for (Linear *l : linears_) weights.push_back(l->qweight);
    free_qweights(*quantizer_, weights);
  }
}

std::string CpuBackend::describe() const {
  std::string out = "cpu ";
  out += options_.dtype == ComputeDtype::bfloat16 ? "bfloat16" : "float32";
  out += " x";
  out += std::to_string(pool_.size());
  out += pool_.size() == 1 ? " thread" : " threads";
  if (tensor_) out += ", tensor parallel rank " + std::to_string(tensor_->rank()) + " of " + std::to_string(tensor_->size());
  if (stages_) out += ", pipeline stage " + std::to_string(stages_->stage()) + " of " + std::to_string(stages_->stages());
  return out;
}

template <class T> CpuBackend::Values<T> CpuBackend::owned(std::vector<T> values) {
  bytes_copied_ += values.size() * sizeof(T);
  return Values<T>(std::move(values));
}

template <class T> CpuBackend::Values<T> CpuBackend::adopt(ModelWeights &weights, const std::string &name, bool optional) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, uint16_t>);
  if (optional && !weights.contains(name)) return {};
  constexpr SafetensorsDtype wanted = std::is_same_v<T, float> ? SafetensorsDtype::F32 : SafetensorsDtype::BF16;
  if (const StoredWeight *s = weights.stored(name);
      s && s->dtype == wanted && reinterpret_cast<uintptr_t>(s->bytes.data()) % alignof(T) == 0) {
    // Used as stored. The address is aligned for T and the bytes were checked to be numel * sizeof(T)
    // inside the mapping at open(); the mapping is held for as long as the backend lives.
    if (std::find(mappings_.begin(), mappings_.end(), s->mapping) == mappings_.end()) mappings_.push_back(s->mapping);
    bytes_in_place_ += s->bytes.size();
    return Values<T>(reinterpret_cast<const T *>(s->bytes.data()), s->bytes.size() / sizeof(T));
  }
  // Another dtype, a misaligned tensor (converted through memcpy reads) or one made in memory.
  std::vector<float> values = weights.take(name).values;
  if constexpr (std::is_same_v<T, float>) {
    return owned(std::move(values));
  } else {
    // Exact for bfloat16 values; float16 and float32 ones are rounded (to nearest even).
    std::vector<uint16_t> bits(values.size());
    for (size_t i = 0; i < values.size(); ++i) bits[i] = ops::float_to_bf16(values[i]);
    return owned(std::move(bits));
  }
}

std::unique_ptr<CpuBackend::Linear> CpuBackend::make_linear(std::string name, ModelWeights &weights, const std::string &weight,
                                                            Values<float> bias) {
  auto l = std::make_unique<Linear>();
  l->name = std::move(name);
  if (const QuantizedCheckpoint *q = checkpoint_quantization_.get()) {
    auto it = q->modules.find(l->name);
    if (it != q->modules.end()) {
      l->imported = &it->second;
      l->out = it->second.shape[0];
      l->in = it->second.shape[1];
      l->bias = std::move(bias);
      if (!weights.contains(weight)) return l; // a tied head keeps the embedding, below
    }
  }
  const StoredWeight *s = weights.stored(weight); // (at() of a stored weight would convert it)
  const std::vector<int64_t> shape = s ? s->shape : weights.at(weight).shape;
  l->out = shape[0];
  l->in = shape[1];
  if (options_.dtype == ComputeDtype::bfloat16) l->w16 = adopt<uint16_t>(weights, weight);
  else l->w32 = adopt<float>(weights, weight);
  l->bias = std::move(bias);
  return l;
}

std::unique_ptr<CpuBackend::Linear> CpuBackend::make_linear(std::string name, int64_t out, int64_t in,
                                                            std::vector<float> weight, Values<float> bias) {
  auto l = std::make_unique<Linear>();
  l->name = std::move(name);
  l->out = out;
  l->in = in;
  if (options_.dtype == ComputeDtype::bfloat16) {
    std::vector<uint16_t> bits(weight.size());
    for (size_t i = 0; i < weight.size(); ++i) bits[i] = ops::float_to_bf16(weight[i]);
    weight = {};
    l->w16 = owned(std::move(bits));
  } else {
    l->w32 = owned(std::move(weight));
  }
  l->bias = std::move(bias);
  return l;
}

void CpuBackend::build(ModelWeights weights) {
  const ModelConfig &c = config_;
  if (weights.quantized()) checkpoint_quantization_ = std::make_shared<QuantizedCheckpoint>(*weights.quantized());
  const int64_t H = c.hidden_size;
  // Tensors are used in place or moved out of `weights` as they are converted, never converted
  // all at once: peak memory stays the copies the backend keeps, plus one float32 tensor.
  auto values = [&](const std::string &name) { return adopt<float>(weights, name); };
  auto maybe = [&](const std::string &name) { return adopt<float>(weights, name, true); };
  // A linear from a GPT-2 Conv1D [in, out] weight's columns [col0, col0 + out), transposed.
  auto conv = [&](std::string name, const HostWeight &w, const std::vector<float> &b, int64_t col0, int64_t out) {
    const int64_t in = w.shape[0], cols = w.shape[1];
    std::vector<float> t(static_cast<size_t>(out * in));
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) t[static_cast<size_t>(o * in + i)] = w.values[static_cast<size_t>(i * cols + col0 + o)];
    std::vector<float> bias(static_cast<size_t>(out)); // (filled in place: a temporary vector from
                                                       // iterators trips GCC 12's false
                                                       // -Wfree-nonheap-object at -O3)
    std::copy(b.begin() + col0, b.begin() + col0 + out, bias.data());
    return make_linear(std::move(name), out, in, std::move(t), owned(std::move(bias)));
  };
  const bool gpt2 = c.architecture == Architecture::gpt2;
  // A pipeline stage holds its layers, the embedding on the first stage, the head on the last.
  const bool has_embedding = !stages_ || stages_->first(), has_head = !stages_ || stages_->last();
  const int64_t end_layer = stages_ ? stages_->trainer_stage().end : c.n_layers;
  if (gpt2 && has_embedding) positions_ = values("wpe.weight");
  for (int64_t i = first_layer_; i < end_layer; ++i) {
    Layer layer;
    if (gpt2) {
      std::string p = "h." + std::to_string(i) + ".";
      // Conv1D weights are [in, out]: transposed copies (the biases split with them).
      auto take = [&](const std::string &name) { return weights.take(p + name); };
      // AW: the attention's width (H; a tensor parallel rank's share of the heads). The
      // row-parallel c_proj biases are added by tensor rank 0 alone: the group's sum counts them once.
      const int64_t AW = c.n_heads * c.head_dim;
      const auto row_bias = [&](const std::string &name) {
        HostWeight b = take(name);
        if (tensor_ && tensor_->rank() != 0) std::fill(b.values.begin(), b.values.end(), 0.0f);
        return b.values;
      };
      HostWeight ca = take("attn.c_attn.weight"), cab = take("attn.c_attn.bias");
      layer.q = conv(p + "attn.c_attn.q", ca, cab.values, 0, AW);
      layer.k = conv(p + "attn.c_attn.k", ca, cab.values, AW, AW);
      layer.v = conv(p + "attn.c_attn.v", ca, cab.values, 2 * AW, AW);
      layer.o = conv(p + "attn.c_proj", take("attn.c_proj.weight"), row_bias("attn.c_proj.bias"), 0, H);
      layer.up = conv(p + "mlp.c_fc", take("mlp.c_fc.weight"), take("mlp.c_fc.bias").values, 0, c.intermediate_size);
      layer.down = conv(p + "mlp.c_proj", take("mlp.c_proj.weight"), row_bias("mlp.c_proj.bias"), 0, H);
      layer.norm1 = values(p + "ln_1.weight");
      layer.norm1_bias = values(p + "ln_1.bias");
      layer.norm2 = values(p + "ln_2.weight");
      layer.norm2_bias = values(p + "ln_2.bias");
    } else {
      std::string p = "model.layers." + std::to_string(i) + ".";
      auto lin = [&](const std::string &m) { return make_linear(p + m, weights, p + m + ".weight", maybe(p + m + ".bias")); };
      layer.q = lin("self_attn.q_proj");
      layer.k = lin("self_attn.k_proj");
      layer.v = lin("self_attn.v_proj");
      layer.o = lin("self_attn.o_proj");
      layer.gate = lin("mlp.gate_proj");
      layer.up = lin("mlp.up_proj");
      layer.down = lin("mlp.down_proj");
      layer.norm1 = values(p + "input_layernorm.weight");
      layer.norm2 = values(p + "post_attention_layernorm.weight");
    }
    layers_.push_back(std::move(layer));
  }
  if (has_head) {
    final_norm_ = values(gpt2 ? "ln_f.weight" : "model.norm.weight");
    if (gpt2) final_norm_bias_ = values("ln_f.bias");
  }
  // Tied: the head's weight is the embedding, stored once (lookups read the head's rows; the
  // quantizer and adapters see the head as its own module, as before).
  const std::string embedding = gpt2 ? "wte.weight" : "model.embed_tokens.weight";
  if (c.tie_word_embeddings) {
    if (has_embedding || has_head) lm_head_ = make_linear("lm_head", weights, embedding, {});
  } else {
    if (has_embedding) embedding_ = make_linear("embed_tokens", weights, embedding, {});
    if (has_head) lm_head_ = make_linear("lm_head", weights, "lm_head.weight", {});
  }
  for (auto &layer : layers_)
    for (Linear *l : {layer.q.get(), layer.k.get(), layer.v.get(), layer.o.get(), layer.gate.get(), layer.up.get(),
                      layer.down.get()})
      if (l) linears_.push_back(l);
  if (lm_head_) linears_.push_back(lm_head_.get());
  for (size_t i = 0; i < linears_.size(); ++i) linears_[i]->index = static_cast<int32_t>(i);
  sited_ = linears_;
  for (int64_t i = first_layer_; i < end_layer; ++i) {
    Layer &layer = layers_[static_cast<size_t>(i - first_layer_)];
    const std::string p = gpt2 ? "h." + std::to_string(i) + "." : "model.layers." + std::to_string(i) + ".";
    for (auto [slot, name] : {std::pair{&layer.attn_block, gpt2 ? "attn" : "self_attn"}, std::pair{&layer.mlp_block, "mlp"}}) {
      *slot = std::make_unique<Linear>();
      (*slot)->name = p + name;
      (*slot)->in = (*slot)->out = H;
      (*slot)->block = true;
      sited_.push_back(slot->get());
    }
    if (!gpt2) {
      layer.attn_prefix = std::make_unique<Linear>();
      layer.attn_prefix->name = p + "self_attn";
      layer.attn_prefix->in = H;
      layer.attn_prefix->out = 2 * c.n_kv_heads * c.head_dim;
      layer.attn_prefix->prefix = true;
      sited_.push_back(layer.attn_prefix.get());
    }
  }
  for (auto &layer : layers_) { // linears fed the same rows in a forward
    layer.k->same_input = layer.q.get();
    layer.v->same_input = layer.q.get();
    if (layer.gate) layer.gate->same_input = layer.up.get();
  }
  if (!gpt2) inv_freq_ = rope_inv_freq(c);
}

const void *CpuBackend::weight_data(std::string_view module) const {
  auto data = [](const Linear &l) -> const void * { return l.w32.empty() ? static_cast<const void *>(l.w16.data) : l.w32.data; };
  if (embedding_ && module == embedding_->name) return data(*embedding_);
  for (const Linear *l : linears_)
    if (module == l->name) return data(*l);
  return nullptr;
}

// ---- Attention and the KV cache ---------------------------------------------------------------

loom_attention_config CpuBackend::attention_config() const {
  return attention_config_for(config_, max_positions_, kF32, DLDevice{kDLCPU, 0});
}

loom_kv_layout CpuBackend::prepare_attention(Instance &attention) const {
  return prepare_attention_layout(attention, attention_config());
}

void CpuBackend::reserve(int32_t max_seqs, int64_t max_positions) {
  if (ready_ && !paged_ && max_seqs <= max_seqs_ && max_positions <= max_positions_ &&
      (layout_.block_size == 0 || kv_pools_.size() == layers_.size()))
    return;
  size_cache(max_seqs, max_positions, false, 0, 0);
}

ModelBackend::BlockPool CpuBackend::reserve_blocks(int32_t max_seqs, int64_t max_positions, int64_t n_blocks,
                                                   uint64_t kv_bytes) {
  // The same pool again (the next run of a runtime): keep it.
  if (ready_ && paged_ && max_seqs <= max_seqs_ && max_positions <= max_positions_ && n_blocks == pool_request_.first &&
      kv_bytes == pool_request_.second)
    return {layout_.block_size, pool_blocks_, layout_.window};
  size_cache(max_seqs, max_positions, true, n_blocks, kv_bytes);
  pool_request_ = {n_blocks, kv_bytes};
  return {layout_.block_size, pool_blocks_, layout_.window};
}

void CpuBackend::copy_blocks(const std::vector<std::pair<int32_t, int32_t>> &src_dst) {
  check_block_copies(src_dst, paged_, pool_blocks_, options_.source_name);
  for (const auto &[src, dst] : src_dst) {
    const size_t bytes = layout_.bytes_per_block;
    for (auto &pool : kv_pools_)
      std::memcpy(pool.data() + static_cast<size_t>(dst) * bytes, pool.data() + static_cast<size_t>(src) * bytes, bytes);
  }
}

void CpuBackend::size_cache(int32_t max_seqs, int64_t max_positions, bool paged, int64_t n_blocks, uint64_t kv_bytes) {
  auto attention = pipeline_.list(LOOM_KIND_ATTENTION);
  if (attention.empty())
    throw runtime_error(options_.source_name + ": the pipeline has no [attention]: add one such as use = \"sdpa\"");
  if (max_seqs < 1 || max_seqs > 4096 || max_positions < 1 || max_positions > (int64_t{1} << 24))
    throw runtime_error(options_.source_name + ": a batch of " + std::to_string(max_seqs) + " sequences of " +
                        std::to_string(max_positions) + " positions is outside what the CPU backend sizes");
  // Grow-only: a shorter run reuses the larger cache. Nothing changes unless all succeeds.
  const int32_t seqs = std::max(max_seqs, max_seqs_);
  int64_t positions = std::max(max_positions, max_positions_);
  // The first sizing before a calibrated quantization holds the longest calibration sequence
  // (calibration runs through this cache, before the run that asked for it).
  if (!ready_ && !options_.calibration.empty() && !pipeline_.list(LOOM_KIND_QUANTIZER).empty())
    for (const auto &seq : options_.calibration)
      positions = std::max(positions, std::min<int64_t>(static_cast<int64_t>(seq.size()), config_.max_positions));
  loom_kv_layout layout = layout_;
  std::vector<HostTensor<uint8_t>> pools;
  const int64_t before = max_positions_;
  try {
    if (!ready_ || positions > max_positions_) {
      // The geometry changed (first run, or a longer one): prepare again. More sequences only
      // need a larger pool.
      max_positions_ = positions; // what attention_config() reports
      layout = prepare_attention(*attention.front());
    }
    if (paged && layout.block_size <= 0)
      throw runtime_error(attention.front()->slot() + " (" + attention.front()->desc().name +
                          "): keeps no KV cache in blocks, so it cannot serve a paged (scheduled) run");
    if (layout.block_size > 0) {
      uint64_t blocks = static_cast<uint64_t>((positions + layout.block_size - 1) / layout.block_size) *
                        static_cast<uint64_t>(seqs);
      if (paged) {
        // kv_bytes 0: what max_seqs whole sequences need (as the slot layout), at most 1 GiB.
        const uint64_t per_block = layout.bytes_per_block * static_cast<uint64_t>(config_.n_layers);
        blocks = paged_pool_blocks(layout, config_.n_layers, positions, n_blocks, kv_bytes,
                                   std::min<uint64_t>(blocks, (uint64_t{1} << 30) / per_block),
                                   attention.front()->slot() + " (" + attention.front()->desc().name + ")");
      }
      if (layout.bytes_per_block > (uint64_t{8} << 30) / blocks / static_cast<uint64_t>(config_.n_layers))
        throw runtime_error(attention.front()->slot() + " (" + attention.front()->desc().name +
                            "): its KV layout needs more than 8 GiB for " + std::to_string(seqs) + " sequences of " +
                            std::to_string(positions) + " positions");
      kv_pools_.clear(); // (freed before the larger pools are made; forward() refuses to run without)
      // This stage's layers (all of them without stages); the block count above is the whole
      // model's, so that every stage's scheduler makes the same decisions.
      for (size_t i = 0; i < layers_.size(); ++i)
        pools.emplace_back(std::vector<int64_t>{static_cast<int64_t>(blocks), static_cast<int64_t>(layout.bytes_per_block)});
    }
  } catch (...) {
    max_positions_ = before;
    throw;
  }
  kv_pools_ = std::move(pools);
  layout_ = layout;
  blocks_per_seq_ = layout.block_size > 0 ? (positions + layout.block_size - 1) / layout.block_size : 0;
  pool_blocks_ = kv_pools_.empty() ? 0 : kv_pools_.front().dim(0);
  paged_ = paged;
  max_seqs_ = seqs;
  max_positions_ = positions;
  if (ready_) return;
  // Everything is made first and committed only when all of it succeeded, so that a failure
  // (a quantizer or adapter refusing a module) leaves nothing half-installed for the next run.
  auto quantizers = pipeline_.list(LOOM_KIND_QUANTIZER);
  std::vector<loom_qweight *> weights;
  if (checkpoint_quantization_ && quantizers.empty())
    throw runtime_error(options_.source_name + ": [model] path holds weights quantized by '" +
                        checkpoint_quantization_->quantizer + "' (" + checkpoint_quantization_->source + "); add [quantizer] use = \"" +
                        checkpoint_quantization_->quantizer + "\" to load them");
  if (!quantizers.empty() && !options_.calibration.empty() && captured_.empty() && !checkpoint_quantization_)
    capture_calibration();
  if (!quantizers.empty()) weights = quantize_all(*quantizers.front());
  std::vector<std::pair<std::shared_ptr<Instance>, std::vector<loom_adapter_site *>>> attached;
  try {
    for (auto &adapter : pipeline_.list(LOOM_KIND_ADAPTER)) attached.emplace_back(adapter, attach_all(*adapter));
  } catch (...) {
    if (!quantizers.empty()) free_qweights(*quantizers.front(), weights);
    throw; // sites already attached belong to their adapter instances, which free them
  }
  if (!quantizers.empty()) {
    quantizer_ = quantizers.front();
    for (size_t i = 0; i < linears_.size(); ++i) linears_[i]->qweight = weights[i];
  }
  for (auto &[adapter, sites] : attached)
    for (size_t i = 0; i < sited_.size(); ++i)
      if (sites[i]) sited_[i]->sites.emplace_back(adapter.get(), sites[i]);
  install_hooks();
  ready_ = true;
}

// ---- Quantizer and adapters -------------------------------------------------------------------

void CpuBackend::capture_calibration() {
  const int64_t bs = layout_.block_size;
  int64_t longest = std::min<int64_t>(max_positions_, config_.max_positions);
  if (paged_ && bs > 0) longest = std::min(longest, pool_blocks_ * bs);
  captured_.assign(linears_.size(), nullptr);
  for (const Linear *l : linears_)
    if (!l->same_input) captured_[static_cast<size_t>(l->index)] = std::make_shared<std::vector<float>>();
  for (const Linear *l : linears_)
    if (l->same_input) captured_[static_cast<size_t>(l->index)] = captured_[static_cast<size_t>(l->same_input->index)];
  capturing_ = true;
  struct Reset {
    CpuBackend &b;
    bool done = false;
    ~Reset() {
      b.capturing_ = false;
      if (!done) b.captured_.clear(); // a failed capture leaves nothing half-recorded behind
    }
  } reset{*this};
  // One sequence at a time in slot 0 (or the pool's first blocks): nothing else runs yet.
  for (const auto &seq : options_.calibration) {
    const auto n = static_cast<int32_t>(std::min<int64_t>(static_cast<int64_t>(seq.size()), longest));
    if (n < 1) continue;
    StepBatch b;
    b.tokens.assign(seq.begin(), seq.begin() + n);
    b.seq_offsets = {0, n};
    b.seq_positions = {0};
    if (paged_) {
      b.table_cols = static_cast<int32_t>((n + bs - 1) / bs);
      for (int32_t j = 0; j < b.table_cols; ++j) b.block_tables.push_back(j);
    } else {
      b.seq_slots = {0};
    }
    forward(b);
  }
  reset.done = true;
}

void CpuBackend::capture(const Linear &lin, const float *x, int64_t n) {
  if (lin.same_input) return; // its buffer is the one the linear it shares rows with fills
  auto &buffer = *captured_[static_cast<size_t>(lin.index)];
  buffer.insert(buffer.end(), x, x + n * lin.in);
}

loom_qweight *CpuBackend::import_linear(Instance &quantizer, const Linear &lin) {
  return import_quantized_module(quantizer, *lin.imported, lin.name, checkpoint_quantization_->quantizer, DLDevice{kDLCPU, 0},
                                 options_.source_name);
}

QuantizationError CpuBackend::measure(Instance &quantizer, const Linear &lin, const loom_qweight *q, const float *w) {
  QuantizationError e;
  e.module = lin.name;
  std::vector<float> wq(static_cast<size_t>(lin.out * lin.in));
  View out(wq.data(), kF32, {lin.out, lin.in});
  quantizer.check(quantizer.vtable<loom_quantizer_vtable>()->dequantize(quantizer.handle(), q, out.dl()),
                  ("dequantize " + lin.name).c_str());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < wq.size(); ++i) {
    const double d = static_cast<double>(w[i]) - wq[i];
    diff += d * d;
    norm += static_cast<double>(w[i]) * w[i];
  }
  e.weight_error = norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
  const auto &x = lin.index >= 0 && static_cast<size_t>(lin.index) < captured_.size() ? captured_[static_cast<size_t>(lin.index)]
                                                                                      : nullptr;
  if (x && !x->empty()) {
    const int64_t total = static_cast<int64_t>(x->size()) / lin.in;
    e.rows = std::min(total, kErrorRows);
    double out_diff = 0, out_norm = 0;
    for (int64_t k = 0; k < e.rows; ++k) {
      const float *row = x->data() + (k * total / e.rows) * lin.in; // evenly spaced rows
      for (int64_t o = 0; o < lin.out; ++o) {
        double exact = 0, approx = 0;
        for (int64_t i = 0; i < lin.in; ++i) {
          exact += static_cast<double>(row[i]) * w[o * lin.in + i];
          approx += static_cast<double>(row[i]) * wq[static_cast<size_t>(o * lin.in + i)];
        }
        out_diff += (exact - approx) * (exact - approx);
        out_norm += exact * exact;
      }
    }
    e.output_error = out_norm > 0 ? std::sqrt(out_diff / out_norm) : std::sqrt(out_diff);
  }
  char line[160];
  if (e.rows > 0)
    std::snprintf(line, sizeof line, "weight error %.3e, output error %.3e (relative; %lld calibration rows)",
                  e.weight_error, e.output_error, static_cast<long long>(e.rows));
  else
    std::snprintf(line, sizeof line, "weight error %.3e (relative)", e.weight_error);
  if (std::getenv("LOOM_DEBUG"))
    std::cerr << "[debug] " << quantizer.slot() << " (" << quantizer.desc().name << "): " << lin.name << ": " << line << "\n";
  return e;
}

std::vector<loom_qweight *> CpuBackend::quantize_all(Instance &quantizer) {
  std::vector<loom_qweight *> out;
  std::vector<QuantizationError> errors;
  auto vt = quantizer.vtable<loom_quantizer_vtable>();
  std::vector<float> widened; // a bfloat16 weight as float32: quantizers quantize from float32
  auto one = [&](Linear &l) {
    if (l.imported) {
      try {
        out.push_back(import_linear(quantizer, l));
      } catch (...) {
        free_qweights(quantizer, out); // the ones made so far
        throw;
      }
      return;
    }
    const float *w = l.w32.data;
    if (l.w32.empty()) {
      widened.resize(l.w16.size);
      for (size_t i = 0; i < l.w16.size; ++i) widened[i] = ops::bf16_to_float(l.w16[i]);
      w = widened.data();
    }
    View weight(w, kF32, {l.out, l.in});
    const auto &x = captured_.empty() ? nullptr : captured_[static_cast<size_t>(l.index)];
    View calibration(x ? x->data() : nullptr, kF32, {x ? static_cast<int64_t>(x->size()) / l.in : 0, l.in});
    loom_quantize_request req{};
    req.struct_size = sizeof(req);
    req.module_name = l.name.c_str();
    req.weight = weight.dl();
    req.calibration = x && !x->empty() ? calibration.dl() : nullptr;
    req.target_device = {kDLCPU, 0};
    loom_qweight *q = nullptr;
    loom_status s = vt->quantize(quantizer.handle(), &req, &q);
    if (s != LOOM_OK) {
      free_qweights(quantizer, out);
      quantizer.check(s, ("quantize " + l.name).c_str());
    }
    out.push_back(q);
    try {
      errors.push_back(measure(quantizer, l, q, w));
    } catch (...) {
      free_qweights(quantizer, out);
      throw;
    }
  };
  for (Linear *l : linears_) one(*l);
  // One line for the whole model; each linear's with LOOM_DEBUG=1.
  size_t worst = 0;
  double weight_sum = 0, output_sum = 0;
  for (size_t i = 0; i < errors.size(); ++i) {
    weight_sum += errors[i].weight_error;
    output_sum += errors[i].output_error;
    if (errors[i].weight_error > errors[worst].weight_error) worst = i;
  }
  if (checkpoint_quantization_)
    std::cerr << "[info] " << quantizer.slot() << " (" << quantizer.desc().name << "): "
              << checkpoint_quantization_->modules.size() << " linears imported from the checkpoint\n";
  if (!errors.empty()) {
    const double n = static_cast<double>(errors.size());
    char line[256];
    std::snprintf(line, sizeof line, "%zu linears, relative weight error mean %.3e, max %.3e (%s)", errors.size(),
                  weight_sum / n, errors[worst].weight_error, errors[worst].module.c_str());
    std::cerr << "[info] " << quantizer.slot() << " (" << quantizer.desc().name << "): " << line;
    if (errors.front().rows > 0) std::fprintf(stderr, ", output error mean %.3e on calibration rows", output_sum / n);
    std::cerr << " (each linear's with LOOM_DEBUG=1)\n";
  }
  quantization_errors_ = std::move(errors);
  return out;
}

void CpuBackend::free_qweights(Instance &quantizer, const std::vector<loom_qweight *> &weights) {
  auto vt = quantizer.vtable<loom_quantizer_vtable>();
  for (loom_qweight *q : weights)
    if (q) vt->free_weight(quantizer.handle(), q);
}

std::vector<loom_adapter_site *> CpuBackend::attach_all(Instance &adapter) {
  auto vt = adapter.vtable<loom_adapter_vtable>();
  std::vector<loom_adapter_site *> sites;
  // Block sites go only to libraries built for ABI 1.6 or later (older ones cannot tell them
  // from linears).
  const bool blocks = adapter.library().descriptor().abi_minor >= 6;
  // Prefix sites go to an instance that says how many virtual tokens it adds, without asking
  // targets(); one prefix adapter per pipeline, so that every sequence has one prefix.
  const bool prefix = adapter_virtual_tokens(adapter) > 0;
  if (prefix) {
    if (config_.architecture == Architecture::gpt2 || config_.sliding_window > 0)
      throw runtime_error(adapter.slot() + " (" + adapter.desc().name + "): prefix tuning runs on Llama-family models without a sliding window");
    // (An instance in the same slot is the one a swap replaces.)
    for (const auto &other : pipeline_.list(LOOM_KIND_ADAPTER))
      if (other.get() != &adapter && other->slot() != adapter.slot() && adapter_virtual_tokens(*other) > 0)
        throw runtime_error(adapter.slot() + ": " + other->slot() + " is a prefix adapter already; one per pipeline");
  }
  auto one = [&](Linear &l) {
    // Prefix sites without asking targets(); block sites only for 1.6 libraries.
    const bool wanted = l.prefix ? prefix : (!l.block || blocks) && vt->targets(adapter.handle(), l.name.c_str());
    sites.push_back(wanted ? attach_adapter_site(adapter, l.name, l.in, l.out, kF32, {kDLCPU, 0},
                                                 l.prefix  ? LOOM_ADAPTER_SITE_ATTENTION_PREFIX
                                                 : l.block ? LOOM_ADAPTER_SITE_BLOCK
                                                           : LOOM_ADAPTER_SITE_LINEAR)
                           : nullptr);
  };
  for (Linear *l : sited_) one(*l);
  load_adapter_weights(adapter);  // [[adapter]] weights = "dir", once every site exists
  return sites;
}

void CpuBackend::install_hooks() {
  auto linears = [this] { return linears_; };
  pipeline_.set_activate_hook(LOOM_KIND_ATTENTION, [this](Instance &fresh, Instance &) -> std::function<void()> {
    loom_kv_layout layout = prepare_attention(fresh);
    if (layout.block_size != layout_.block_size || layout.bytes_per_block != layout_.bytes_per_block ||
        layout.cache_dtype.code != layout_.cache_dtype.code || layout.cache_dtype.bits != layout_.cache_dtype.bits ||
        layout.cache_dtype.lanes != layout_.cache_dtype.lanes)
      throw runtime_error("swap " + fresh.slot() + ": " + fresh.desc().name +
                          " wants another KV layout than the cache in use; swap it between runs");
    return {};
  });
  pipeline_.set_activate_hook(LOOM_KIND_QUANTIZER, [this, linears](Instance &fresh, Instance &) -> std::function<void()> {
    auto weights = quantize_all(fresh);
    return [this, linears, weights, &fresh] {
      std::vector<loom_qweight *> old;
      for (Linear *l : linears()) old.push_back(l->qweight);
      free_qweights(*quantizer_, old);
      auto all = linears();
      for (size_t i = 0; i < all.size(); ++i) all[i]->qweight = weights[i];
      quantizer_ = pipeline_.get(fresh.slot());
    };
  });
  pipeline_.set_activate_hook(LOOM_KIND_ADAPTER, [this](Instance &fresh, Instance &old) -> std::function<void()> {
    auto sites = attach_all(fresh);
    const Instance *old_ptr = &old, *fresh_ptr = &fresh;
    return [this, sites, old_ptr, fresh_ptr] {
      if (merged_ == old_ptr) unmerge_adapter(*old_ptr); // the new weights are not merged
      auto &all = sited_;
      for (size_t i = 0; i < all.size(); ++i) {
        auto &list = all[i]->sites;
        std::erase_if(list, [&](const auto &p) { return p.first == old_ptr; });
        if (sites[i]) list.emplace_back(fresh_ptr, sites[i]);
      }
    };
  });
  // Adapters loaded and unloaded while serving (Runtime::load_adapter / unload_adapter).
  Pipeline::MembershipHooks membership;
  membership.attach = [this](Instance &fresh) -> std::function<void()> {
    auto sites = attach_all(fresh);
    const Instance *fresh_ptr = &fresh;
    return [this, sites, fresh_ptr] {
      for (size_t i = 0; i < sited_.size(); ++i)
        if (sites[i]) sited_[i]->sites.emplace_back(fresh_ptr, sites[i]);
    };
  };
  membership.detach = [this](Instance &leaving) {
    if (merged_ == &leaving) unmerge_adapter(leaving);
    for (Linear *l : sited_) std::erase_if(l->sites, [&](const auto &p) { return p.first == &leaving; });
  };
  pipeline_.set_membership_hooks(LOOM_KIND_ADAPTER, std::move(membership));
}

void CpuBackend::merge_adapter(const Instance &adapter) {
  if (merged_ == &adapter) return;
  if (!ready_) reserve(1, 1); // attaches the adapters' sites
  const std::string who = adapter.slot() + " (" + adapter.desc().name + ")";
  if (merged_ != nullptr)
    throw runtime_error("merge " + who + ": " + merged_->slot() + " is merged already; unmerge it first");
  auto vt = adapter.vtable<loom_adapter_vtable>();
  if (vt->merge == nullptr) throw runtime_error("merge " + who + ": the adapter cannot merge into base weights");
  for (const Linear *l : sited_)
    if (l->block && std::any_of(l->sites.begin(), l->sites.end(), [&](const auto &p) { return p.first == &adapter; }))
      throw runtime_error("merge " + who + ": it sits on " + l->name + "'s output, which has no weight to merge into");
  // Every merged weight is made first; nothing changes unless all of them succeed.
  std::vector<std::pair<Linear *, std::vector<float>>> merged;
  for (Linear *l : linears_)
    for (auto &[instance, site] : l->sites) {
      if (instance != &adapter) continue;
      if (l->qweight != nullptr)
        throw runtime_error("merge " + who + ": " + l->name + " is quantized; a quantized base keeps the adapter unmerged");
      if (l == lm_head_.get() && !embedding_)
        throw runtime_error("merge " + who + ": the LM head shares its weight with the embedding; merging would change both");
      std::vector<float> w(static_cast<size_t>(l->out * l->in));
      if (l->w32.empty())
        for (size_t i = 0; i < w.size(); ++i) w[i] = ops::bf16_to_float(l->w16[i]);
      else
        std::copy(l->w32.data, l->w32.data + w.size(), w.begin());
      View wv(w.data(), kF32, {l->out, l->in});
      adapter.check(vt->merge(adapter.handle(), site, wv.dl(), 1), ("merge " + l->name).c_str());
      merged.emplace_back(l, std::move(w));
    }
  for (auto &[l, w] : merged) {
    if (l->w32.empty()) {
      std::vector<uint16_t> w16(w.size());
      for (size_t i = 0; i < w.size(); ++i) w16[i] = ops::float_to_bf16(w[i]);
      l->unmerged16 = std::move(l->w16);
      l->w16 = Values<uint16_t>(std::move(w16));
    } else {
      l->unmerged32 = std::move(l->w32);
      l->w32 = Values<float>(std::move(w));
    }
  }
  merged_ = &adapter;
}

void CpuBackend::unmerge_adapter(const Instance &adapter) {
  if (merged_ != &adapter) return;
  for (Linear *l : linears_) {
    if (!l->unmerged32.empty()) l->w32 = std::move(l->unmerged32);
    if (!l->unmerged16.empty()) l->w16 = std::move(l->unmerged16);
    l->unmerged32 = {};
    l->unmerged16 = {};
  }
  merged_ = nullptr;
}

// ---- Compute ----------------------------------------------------------------------------------

template <class F> void CpuBackend::rows(int64_t n, int64_t work_per_row, F &&fn) {
  const int64_t threads = pool_.size();
  if (threads == 1 || n < 2 || n * work_per_row < 4 * kMinTaskMacs) {
    for (int64_t r = 0; r < n; ++r) fn(r);
    return;
  }
  const int64_t tasks = std::min(n, 4 * threads), per = (n + tasks - 1) / tasks;
  pool_.run((n + per - 1) / per, [&](int64_t t) {
    for (int64_t r = t * per, end = std::min(n, r + per); r < end; ++r) fn(r);
  });
}

void CpuBackend::matmul(const Linear &lin, const float *x, int64_t n, float *y) {
  const int64_t out = lin.out, in = lin.in;
  const float *bias = lin.bias.empty() ? nullptr : lin.bias.data;
  const int64_t row_blocks = (n + kRowBlock - 1) / kRowBlock;
  const int64_t threads = pool_.size();
  // Output features split into chunks (multiples of 24, every kernel's tile width divides it)
  // so that there are a few tasks per thread when the work allows.
  const int64_t macs = n * out * in;
  const int64_t want = threads == 1 ? 1 : std::clamp<int64_t>(macs / kMinTaskMacs, 1, 4 * threads);
  int64_t out_chunks = std::clamp<int64_t>(want / row_blocks, 1, (out + 23) / 24);
  const int64_t chunk = ((out + out_chunks - 1) / out_chunks + 23) / 24 * 24;
  out_chunks = (out + chunk - 1) / chunk;
  auto task = [&](int64_t t) {
    const int64_t rb = t / out_chunks, oc = t % out_chunks;
    const int64_t r0 = rb * kRowBlock, r1 = std::min(n, r0 + kRowBlock);
    const int64_t o0 = oc * chunk, o1 = std::min(out, o0 + chunk);
    if (lin.w32.empty()) kBlockBF16(x, in, lin.w16.data, bias, y, out, r0, r1, o0, o1);
    else kBlockF32(x, in, lin.w32.data, bias, y, out, r0, r1, o0, o1);
  };
  pool_.run(row_blocks * out_chunks, task);
}

void CpuBackend::linear(Linear &lin, float *x, int64_t n, float *y) {
  if (capturing_ && &lin != lm_head_.get()) capture(lin, x, n); // the head's rows: forward()
  View xv(x, kF32, {n, lin.in}), yv(y, kF32, {n, lin.out});
  if (quantizer_ && lin.qweight) {
    View bias(lin.bias.data, kF32, {lin.out});
    quantizer_->check(quantizer_->vtable<loom_quantizer_vtable>()->linear(quantizer_->handle(), lin.qweight, xv.dl(),
                                                                          lin.bias.empty() ? nullptr : bias.dl(), yv.dl()),
                      "linear");
  } else {
    matmul(lin, x, n, y);
  }
  if (!lin.sites.empty()) apply_adapters(lin, x, n, y);
}

void CpuBackend::apply_adapters(Linear &lin, float *x, int64_t n, float *y) {
  View xv(x, kF32, {n, lin.in}), yv(y, kF32, {n, lin.out});
  const bool head = &lin == lm_head_.get();
  for (auto &[instance, site] : lin.sites) {
    const AdapterRows *rows = nullptr;
    for (const AdapterRows &r : adapter_rows_)
      if (r.instance == instance) rows = &r;
    const bool any = rows == nullptr || (head ? rows->seqs_any : rows->tokens_any);
    const bool all = rows == nullptr || (head ? rows->seqs_all : rows->tokens_all);
    const std::vector<int32_t> *mask = rows == nullptr ? nullptr : head ? &rows->seqs : &rows->tokens;
    auto vt = instance->vtable<loom_adapter_vtable>();
    loom_adapter_io io{};
    io.struct_size = sizeof(io);
    io.x = xv.dl();
    io.training = 0;
    if (instance != merged_) {
      if (!any) continue;
      View mv(all ? nullptr : mask->data(), kI32, {n});
      io.y = yv.dl();
      io.row_mask = all ? nullptr : mv.dl();
      instance->check(vt->forward(instance->handle(), site, &io), "forward");
      continue;
    }
    // Merged: the weights carry the delta; the rows that do not use the adapter lose it again.
    if (all) continue;
    std::vector<int32_t> off(static_cast<size_t>(n), 1);
    if (mask)
      for (int64_t i = 0; i < n; ++i) off[static_cast<size_t>(i)] = (*mask)[static_cast<size_t>(i)] ? 0 : 1;
    delta_.assign(static_cast<size_t>(n * lin.out), 0.0f);
    View dv(delta_.data(), kF32, {n, lin.out}), mv(off.data(), kI32, {n});
    io.y = dv.dl();
    io.row_mask = mv.dl();
    instance->check(vt->forward(instance->handle(), site, &io), "forward");
    for (size_t i = 0; i < delta_.size(); ++i) y[i] -= delta_[i];
  }
}

void CpuBackend::block_adapters(Linear &block, float *out, int64_t n) {
  block_in_.assign(out, out + n * block.in);
  apply_adapters(block, block_in_.data(), n, out);
}

void CpuBackend::prefix_rows(Layer &layer, float *k, float *v) {
  const int64_t kv = layer.attn_prefix->out / 2;
  for (auto &[instance, site] : layer.attn_prefix->sites) {
    const int64_t P = adapter_virtual_tokens(*instance);
    std::vector<float> y(static_cast<size_t>(P * 2 * kv), 0.0f);
    View yv(y.data(), kF32, {P, 2 * kv});
    loom_adapter_io io{};
    io.struct_size = sizeof(io);
    io.y = yv.dl();
    instance->check(instance->vtable<loom_adapter_vtable>()->forward(instance->handle(), site, &io), "forward");
    for (const VirtualRow &r : virtual_rows_) {
      if (r.adapter != instance) continue;
      std::memcpy(k + r.row * kv, y.data() + r.position * 2 * kv, static_cast<size_t>(kv) * sizeof(float));
      std::memcpy(v + r.row * kv, y.data() + r.position * 2 * kv + kv, static_cast<size_t>(kv) * sizeof(float));
    }
  }
}

void CpuBackend::plan_adapter_rows(const StepBatch &batch) {
  adapter_rows_.clear();
  virtual_rows_.clear();
  // Prefix tuning: the rows whose positions are below their sequence's prefix adapter's
  // virtual tokens (the decoder put placeholders there) take its keys and values.
  const auto adapters = pipeline_.list(LOOM_KIND_ADAPTER); // StepBatch::seq_adapters' order
  const Instance *prefix = nullptr;
  int32_t prefix_index = -1;
  if (!layers_.empty() && layers_[0].attn_prefix && !layers_[0].attn_prefix->sites.empty()) {
    prefix = layers_[0].attn_prefix->sites.front().first;
    for (size_t k = 0; k < adapters.size(); ++k)
      if (adapters[k].get() == prefix) prefix_index = static_cast<int32_t>(k);
  }
  if (prefix != nullptr) {
    const int64_t P = adapter_virtual_tokens(*prefix);
    for (int64_t s = 0; s < batch.n_seqs(); ++s) {
      const int32_t choice = batch.seq_adapters.empty() ? StepBatch::kEveryAdapter : batch.seq_adapters[static_cast<size_t>(s)];
      if (choice != StepBatch::kEveryAdapter && choice != prefix_index) continue;
      const int32_t p0 = batch.seq_positions[static_cast<size_t>(s)];
      for (int32_t t = batch.seq_offsets[static_cast<size_t>(s)]; t < batch.seq_offsets[static_cast<size_t>(s) + 1]; ++t)
        if (p0 + (t - batch.seq_offsets[static_cast<size_t>(s)]) < P)
          virtual_rows_.push_back({t, p0 + (t - batch.seq_offsets[static_cast<size_t>(s)]), prefix});
    }
  }
  if (batch.seq_adapters.empty()) return;
  const int64_t S = batch.n_seqs(), T = batch.n_tokens();
  if (batch.seq_adapters.size() != static_cast<size_t>(S))
    throw runtime_error(options_.source_name + ": a step batch with " + std::to_string(batch.seq_adapters.size()) +
                        " adapter choices for " + std::to_string(S) + " sequences");
  for (size_t k = 0; k < adapters.size(); ++k) {
    AdapterRows r;
    r.instance = adapters[k].get();
    r.tokens.assign(static_cast<size_t>(T), 0);
    r.seqs.assign(static_cast<size_t>(S), 0);
    for (int64_t s = 0; s < S; ++s) {
      const int32_t choice = batch.seq_adapters[static_cast<size_t>(s)];
      if (choice < StepBatch::kNoAdapter || choice >= static_cast<int32_t>(adapters.size()))
        throw runtime_error(options_.source_name + ": step batch sequence " + std::to_string(s) + " names adapter " +
                            std::to_string(choice) + " of " + std::to_string(adapters.size()));
      const bool on = choice == StepBatch::kEveryAdapter || choice == static_cast<int32_t>(k);
      if (!on) continue;
      r.seqs[static_cast<size_t>(s)] = 1;
      for (int32_t t = batch.seq_offsets[static_cast<size_t>(s)]; t < batch.seq_offsets[static_cast<size_t>(s) + 1]; ++t)
        r.tokens[static_cast<size_t>(t)] = 1;
    }
    auto summarise = [](const std::vector<int32_t> &m, bool &any, bool &all) {
      any = std::find(m.begin(), m.end(), 1) != m.end();
      all = std::find(m.begin(), m.end(), 0) == m.end();
    };
    summarise(r.tokens, r.tokens_any, r.tokens_all);
    summarise(r.seqs, r.seqs_any, r.seqs_all);
    adapter_rows_.push_back(std::move(r));
  }
}

// RMSNorm (w, no bias) or LayerNorm (w and b), over one hidden vector.
void CpuBackend::norm(const Values<float> &w, const Values<float> &b, const float *x, float *y) const {
  if (b.empty()) ops::rms_norm(x, w.data, config_.hidden_size, config_.norm_eps, y);
  else ops::layer_norm(x, w.data, b.data, config_.hidden_size, config_.norm_eps, y);
}

void CpuBackend::embed_row(int32_t token, float *out) const {
  const Linear &e = embedding_ ? *embedding_ : *lm_head_;
  const int64_t H = config_.hidden_size;
  const size_t at = static_cast<size_t>(token) * static_cast<size_t>(H);
  if (e.w32.empty())
    for (int64_t i = 0; i < H; ++i) out[i] = ops::bf16_to_float(e.w16[at + static_cast<size_t>(i)]);
  else
    std::memcpy(out, e.w32.data + at, static_cast<size_t>(H) * sizeof(float));
}

void CpuBackend::copy_slot(int32_t src_slot, int32_t dst_slot, int64_t positions) {
  if (paged_) throw runtime_error(options_.source_name + ": copy_slot in paged mode (copy blocks instead)");
  const SlotCopy c =
      plan_slot_copy(src_slot, dst_slot, positions, max_seqs_, max_positions_, blocks_per_seq_, layout_, options_.source_name);
  if (c.bytes == 0) return;
  for (auto &pool : kv_pools_) std::memcpy(pool.data() + c.dst_offset, pool.data() + c.src_offset, c.bytes);
}

DLTensor *CpuBackend::forward(const StepBatch &batch) {
  const ModelConfig &c = config_;
  const int64_t T = batch.n_tokens(), S = batch.n_seqs();
  const int64_t H = c.hidden_size, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads, I = c.intermediate_size,
                V = c.vocab_size;
  // Tensor parallel: V is this rank's share of the vocabulary, starting at vocab_begin.
  const int64_t vocab = tensor_ ? V * tensor_->size() : V, vocab_begin = tensor_ ? tensor_->vocab_begin() : 0;
  const auto tensor_sum = [&](float *data, int64_t count) {
    if (tensor_) tensor_->all_reduce(data, static_cast<size_t>(count));
  };
  const bool gpt2 = c.architecture == Architecture::gpt2;
  if ((!ready_ && !capturing_) || (layout_.block_size > 0 && kv_pools_.size() != layers_.size()))
    throw runtime_error(options_.source_name + ": the CPU backend ran without a KV cache (reserve() first)");
  const bool tables = batch.table_cols > 0;
  if (tables != paged_)
    throw runtime_error(options_.source_name + (paged_ ? ": a step batch without block tables in paged mode"
                                                       : ": a step batch with block tables outside paged mode"));
  if (T < 1 || S < 1 || batch.seq_offsets.size() != static_cast<size_t>(S) + 1 ||
      (!tables && batch.seq_slots.size() != static_cast<size_t>(S)) ||
      batch.seq_offsets[0] != 0 || batch.seq_offsets[static_cast<size_t>(S)] != T)
    throw runtime_error(options_.source_name + ": a malformed step batch (" + std::to_string(T) + " tokens, " +
                        std::to_string(S) + " sequences)");
  if (batch.tokens_fed) throw runtime_error(options_.source_name + ": the CPU backend takes its tokens from the host");
  // Each token's position; every sequence has tokens, fits the cache and owns its own slot.
  token_pos_.resize(static_cast<size_t>(T));
  std::vector<bool> slot_used(static_cast<size_t>(max_seqs_), false);
  for (int64_t s = 0; s < S; ++s) {
    const int32_t begin = batch.seq_offsets[static_cast<size_t>(s)], end = batch.seq_offsets[static_cast<size_t>(s) + 1];
    const int32_t p0 = batch.seq_positions[static_cast<size_t>(s)], slot = tables ? 0 : batch.seq_slots[static_cast<size_t>(s)];
    const int64_t last = static_cast<int64_t>(p0) + (end - begin);
    if (end <= begin || p0 < 0 || slot < 0 || slot >= max_seqs_ || (!tables && slot_used[static_cast<size_t>(slot)]))
      throw runtime_error(options_.source_name + ": step batch sequence " + std::to_string(s) +
                          " has no tokens, a negative position, or a KV slot outside the cache or shared");
    if (last > max_positions_ || last > c.max_positions)
      throw runtime_error(options_.source_name + ": position " + std::to_string(last - 1) + " is past the model's " +
                          std::to_string(c.max_positions) + " positions or the KV cache's " + std::to_string(max_positions_));
    slot_used[static_cast<size_t>(slot)] = true;
    for (int32_t t = begin; t < end; ++t) token_pos_[static_cast<size_t>(t)] = p0 + (t - begin);
  }
  for (int32_t token : batch.tokens)
    if (token < 0 || token >= vocab)
      throw runtime_error(options_.source_name + ": token " + std::to_string(token) + " is outside the model's vocabulary of " +
                          std::to_string(vocab));

  plan_adapter_rows(batch);
  // The attention plugin's int32 metadata.
  offsets_ = HostTensor<int32_t>({S + 1});
  std::copy(batch.seq_offsets.begin(), batch.seq_offsets.end(), offsets_.data());
  seq_positions_ = HostTensor<int32_t>({S});
  std::copy(batch.seq_positions.begin(), batch.seq_positions.end(), seq_positions_.data());
  if (layout_.block_size > 0) {
    block_table_ = HostTensor<int32_t>({S, blocks_per_seq_});
    fill_block_table(batch, blocks_per_seq_, pool_blocks_, layout_.block_size, block_table_.data(), options_.source_name);
  }

  auto sized = [](std::vector<float> &v, int64_t n) {
    v.resize(static_cast<size_t>(n));
    return v.data();
  };
  float *x = sized(x_, T * H), *h = sized(h_, T * H), *q = sized(q_, T * Hq * D), *k = sized(k_, T * Hkv * D),
        *v = sized(v_, T * Hkv * D), *attn = sized(attn_, T * Hq * D), *proj = sized(proj_, T * H),
        *up = sized(up_, T * I), *gate = sized(gate_, layers_.empty() || !layers_[0].gate ? 0 : T * I);
  const int32_t *tokens = batch.tokens.data();
  const int32_t *pos = token_pos_.data();

  if (stages_ && !stages_->first()) {
    stages_->receive_into(x_.data(), x_.size(), stages_->stage() - 1);  // the previous stage's output (x_ holds T * H)
  } else {
    rows(T, H, [&](int64_t t) {
      const int64_t row = tokens[t] - vocab_begin;  // tensor parallel: this rank's rows, zeros for the others'
      if (row >= 0 && row < V) embed_row(static_cast<int32_t>(row), x + t * H);
      else std::fill(x + t * H, x + (t + 1) * H, 0.0f);
    });
    tensor_sum(x, T * H);
    if (gpt2)  // the learned positions, once (after the vocabulary shares are summed)
      rows(T, H, [&](int64_t t) {
        for (int64_t i = 0; i < H; ++i) x[t * H + i] += positions_[static_cast<size_t>(pos[t] * H + i)];
      });
  }
  std::shared_ptr<Instance> attention = pipeline_.list(LOOM_KIND_ATTENTION).front();
  auto avt = attention->vtable<loom_attention_vtable>();
  for (int64_t l = 0; l < static_cast<int64_t>(layers_.size()); ++l) {  // this stage's layers: the model's first_layer_ + l
    Layer &layer = layers_[static_cast<size_t>(l)];
    rows(T, 4 * H, [&](int64_t t) { norm(layer.norm1, layer.norm1_bias, x + t * H, h + t * H); });
    linear(*layer.q, h, T, q);
    linear(*layer.k, h, T, k);
    linear(*layer.v, h, T, v);
    if (!gpt2)
      rows(T, 8 * (Hq + Hkv) * D, [&](int64_t t) {
        ops::rope(q + t * Hq * D, Hq, D, pos[t], inv_freq_);
        ops::rope(k + t * Hkv * D, Hkv, D, pos[t], inv_freq_);
      });
    if (!virtual_rows_.empty()) prefix_rows(layer, k, v);
    // q, k, v as [T, heads, D]: the attention plugin's layout, the same memory as [T, heads * D].
    View q3(q, kF32, {T, Hq, D}), k3(k, kF32, {T, Hkv, D}), v3(v, kF32, {T, Hkv, D}), out3(attn, kF32, {T, Hq, D});
    loom_attention_batch b{};
    b.struct_size = sizeof(b);
    b.layer = static_cast<int32_t>(first_layer_ + l);
    b.n_seqs = static_cast<int32_t>(S);
    b.n_tokens = static_cast<int32_t>(T);
    b.q = q3.dl();
    b.k = k3.dl();
    b.v = v3.dl();
    b.out = out3.dl();
    b.seq_offsets = offsets_.dl();
    b.seq_positions = seq_positions_.dl();
    b.block_table = layout_.block_size > 0 ? block_table_.dl() : nullptr;
    b.kv_pool = layout_.block_size > 0 ? kv_pools_[static_cast<size_t>(l)].dl() : nullptr;
    b.causal = 1;
    b.shared_blocks = batch.shared_blocks ? 1 : 0;
    attention->check(avt->forward(attention->handle(), &b), "forward");
    linear(*layer.o, attn, T, proj);
    tensor_sum(proj, T * H);
    if (!layer.attn_block->sites.empty()) block_adapters(*layer.attn_block, proj, T);
    rows(T, H, [&](int64_t t) {
      for (int64_t i = 0; i < H; ++i) x[t * H + i] += proj[t * H + i];
      norm(layer.norm2, layer.norm2_bias, x + t * H, h + t * H);
    });
    linear(*layer.up, h, T, up);
    if (layer.gate) { // SwiGLU: down(silu(gate(h)) * up(h))
      linear(*layer.gate, h, T, gate);
      rows(T, 8 * I, [&](int64_t t) {
        for (int64_t i = t * I; i < (t + 1) * I; ++i) up[i] *= ops::silu(gate[i]);
      });
    } else { // GPT-2: c_proj(gelu_new(c_fc(h)))
      rows(T, 8 * I, [&](int64_t t) {
        for (int64_t i = t * I; i < (t + 1) * I; ++i) up[i] = ops::gelu_new(up[i]);
      });
    }
    linear(*layer.down, up, T, proj);
    tensor_sum(proj, T * H);
    if (!layer.mlp_block->sites.empty()) block_adapters(*layer.mlp_block, proj, T);
    rows(T, H, [&](int64_t t) {
      for (int64_t i = 0; i < H; ++i) x[t * H + i] += proj[t * H + i];
    });
  }
  if (stages_ && !stages_->last()) {
    // The output goes on to the next stage; the logits come back from the last.
    stages_->send(x_, stages_->stage() + 1);
    if (logits_.numel() != static_cast<size_t>(S * vocab)) logits_ = HostTensor<float>({S, vocab});
    stages_->broadcast(logits_.values(), stages_->stages() - 1);
    return logits_.dl();
  }
  if (embedding_pass_) { // embed(): the final norm's output pooled per sequence; no head
    embedded_.assign(static_cast<size_t>(S * H), 0.0f);
    rows(S, 4 * H * (T / S + 1), [&](int64_t s) {
      const int32_t begin = batch.seq_offsets[static_cast<size_t>(s)], end = batch.seq_offsets[static_cast<size_t>(s) + 1];
      float *out = embedded_.data() + s * H;
      if (!embed_mean_) {
        norm(final_norm_, final_norm_bias_, x + (end - 1) * H, out);
        return;
      }
      std::vector<float> normed(static_cast<size_t>(H));
      for (int32_t t = begin; t < end; ++t) {
        norm(final_norm_, final_norm_bias_, x + t * H, normed.data());
        for (int64_t i = 0; i < H; ++i) out[i] += normed[static_cast<size_t>(i)];
      }
      for (int64_t i = 0; i < H; ++i) out[i] /= static_cast<float>(end - begin);
    });
    return nullptr;
  }
  if (capturing_) { // the head's calibration rows: every token's, not only the last ones
    std::vector<float> normed(static_cast<size_t>(T * H));
    rows(T, 4 * H, [&](int64_t t) { norm(final_norm_, final_norm_bias_, x + t * H, normed.data() + t * H); });
    capture(*lm_head_, normed.data(), T);
  }
  // Only each sequence's last token goes through the final norm and the head.
  float *last = sized(last_, S * H), *last_h = sized(last_h_, S * H);
  for (int64_t s = 0; s < S; ++s)
    std::memcpy(last + s * H, x + (batch.seq_offsets[static_cast<size_t>(s) + 1] - 1) * H, static_cast<size_t>(H) * sizeof(float));
  rows(S, 4 * H, [&](int64_t s) { norm(final_norm_, final_norm_bias_, last + s * H, last_h + s * H); });
  if (logits_.numel() != static_cast<size_t>(S * vocab)) logits_ = HostTensor<float>({S, vocab});
  if (!tensor_) {
    linear(*lm_head_, last_h, S, logits_.data());
    if (stages_) stages_->broadcast(logits_.values(), stages_->stages() - 1);  // to the other stages
    return logits_.dl();
  }
  // Each rank's columns of the vocabulary, gathered into every rank's whole rows.
  float *mine = sized(local_logits_, S * V);
  linear(*lm_head_, last_h, S, mine);
  tensor_->gather_columns(mine, S, V, logits_.data());
  return logits_.dl();
}


std::vector<float> CpuBackend::embed(const StepBatch &batch, bool mean_pool) {
  if (tensor_ || stages_)
    throw runtime_error(options_.source_name + ": embeddings are not computed under tensor or pipeline parallelism");
  embedding_pass_ = true;
  embed_mean_ = mean_pool;
  struct Reset {
    bool &flag;
    ~Reset() { flag = false; }
  } reset{embedding_pass_};
  forward(batch);
  return std::move(embedded_);
}

// ---- loom quantize ----------------------------------------------------------------------------

namespace {

struct ExportedTensor {
  std::string name;
  SafetensorsDtype dtype;
  std::vector<int64_t> shape;
  std::vector<std::byte> bytes;
};

struct ExportSink {
  std::string module;
  std::vector<ExportedTensor> *out;
  std::string error; // why put() refused a tensor (no exception crosses back into the plugin)
  static loom_status put(void *user, const char *name, DLTensor *t, DLTensor *) noexcept {
    auto &self = *static_cast<ExportSink *>(user);
    try {
      if (name == nullptr || t == nullptr || t->device.device_type != kDLCPU || t->strides != nullptr || t->ndim < 0 ||
          t->ndim > 8)
        throw runtime_error("loom quantize: " + self.module + ": the quantizer exported a tensor that is not a dense host tensor");
      ExportedTensor e;
      e.name = self.module + "." + name;
      const std::optional<SafetensorsDtype> dtype = safetensors_dtype(t->dtype);
      if (!dtype) throw runtime_error("loom quantize: " + e.name + ": the quantizer exported a dtype safetensors cannot hold here");
      e.dtype = *dtype;
      e.shape.assign(t->shape, t->shape + t->ndim);
      size_t n = 1;
      for (int64_t d : e.shape) {
        if (d < 0 || d > (int64_t{1} << 40)) throw runtime_error("loom quantize: " + e.name + ": a bad dimension");
        n *= static_cast<size_t>(d);
      }
      if (n > 0 && t->data == nullptr) throw runtime_error("loom quantize: " + e.name + ": no data");
      const auto *p = static_cast<const std::byte *>(t->data) + t->byte_offset;
      e.bytes.assign(p, p + n * dtype_size(e.dtype));
      self.out->push_back(std::move(e));
      return LOOM_OK;
    } catch (const std::exception &e) {
      self.error = e.what();
      return LOOM_ERR_INVALID_ARGUMENT;
    }
  }
};

} // namespace

void CpuBackend::export_quantized(const SafetensorsIndex &source, const std::filesystem::path &out_dir) {
  if (config_.architecture == Architecture::gpt2)
    throw runtime_error(options_.source_name + ": loom quantize: GPT-2 checkpoints are not supported (Llama-family only)");
  if (pipeline_.list(LOOM_KIND_QUANTIZER).empty())
    throw runtime_error(options_.source_name + ": loom quantize: the manifest has no [quantizer]");
  if (!ready_) reserve(1, 1); // quantizes (with the calibration, when the manifest has one)
  auto vt = quantizer_->vtable<loom_quantizer_vtable>();
  std::vector<ExportedTensor> exported;
  nlohmann::json modules = nlohmann::json::object();
  std::set<std::string> replaced; // source tensors the exported ones stand for
  for (const Linear *l : linears_) {
    ExportSink sink{l->name, &exported, {}};
    loom_tensor_sink abi{sizeof(loom_tensor_sink), &sink, &ExportSink::put};
    HostBuffer meta;
    const loom_status status = vt->export_weight(quantizer_->handle(), l->qweight, &abi, meta.abi());
    if (!sink.error.empty()) throw runtime_error(sink.error);
    quantizer_->check(status, ("export " + l->name).c_str());
    nlohmann::json m;
    try {
      m = nlohmann::json::parse(meta.view());
    } catch (const nlohmann::json::exception &) {
      throw runtime_error("loom quantize: " + l->name + ": the quantizer's metadata is not JSON");
    }
    modules[l->name] = {{"shape", {l->out, l->in}}, {"metadata", m}};
    replaced.insert(l->name + ".weight");
  }
  // A tied head's weight is the embedding, which lookups still read.
  if (config_.tie_word_embeddings) replaced.erase("lm_head.weight");
  std::vector<TensorToWrite> tensors;
  for (const auto &[file, shard] : source.shards())
    for (const auto &t : shard.tensors()) {
      // (a quantized source's module tensors are re-exported above)
      if (replaced.count(t.name) || (checkpoint_quantization_ && !checkpoint_quantization_->module_of(t.name).empty())) continue;
      tensors.push_back({t.name, t.dtype, t.shape, std::span<const std::byte>(t.data, static_cast<size_t>(t.nbytes))});
    }
  for (const auto &e : exported) tensors.push_back({e.name, e.dtype, e.shape, e.bytes});
  const nlohmann::json header = {{"quantizer", quantizer_->desc().name},
                                 {"version", quantizer_->desc().version},
                                 {"modules", modules}};
  std::filesystem::create_directories(out_dir);
  write_safetensors(out_dir / SafetensorsIndex::kSingleName, tensors,
                    {{"format", "pt"}, {QuantizedCheckpoint::kMetadataKey, header.dump()}});
  copy_model_files(source.path().parent_path(), out_dir); // its config and tokenizer
}

} // namespace loom
