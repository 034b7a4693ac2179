#include "model_decoder.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <numbers>
#include <random>

#include "loom/core/error.hpp"
#include "loom/core/chat_template.hpp"
#include "loom/core/host_buffer.hpp"
#include "loom/core/reference_model.hpp"
#include "transformer_ops.hpp"

namespace loom {

using detail::HostTensor;

namespace {

} // namespace

namespace {

// A Llama-shaped config from the [run] geometry, for runs without a [model].
ModelConfig synthetic_config(const RunSpec &run) {
  ModelConfig c;
  c.architecture = Architecture::llama;
  c.architecture_name = "LlamaForCausalLM";
  c.vocab_size = run.vocab_size;
  c.hidden_size = run.hidden_size;
  c.intermediate_size = 2 * run.hidden_size;
  c.n_layers = run.n_layers;
  c.n_heads = run.n_heads;
  c.n_kv_heads = run.n_kv_heads;
  c.head_dim = run.hidden_size / run.n_heads;
  c.max_positions = int64_t{1} << 20;
  return c;
}

// Seeded random weights of every tensor the config needs: norms 1, the rest uniform in
// +-1/sqrt(fan-in).
ModelWeights synthetic_weights(const ModelConfig &config, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::map<std::string, HostWeight, std::less<>> w;
  for (const auto &[name, shape] : expected_weights(config)) {
    HostWeight hw{shape, std::vector<float>(static_cast<size_t>(shape.size() == 2 ? shape[0] * shape[1] : shape[0]))};
    if (name.find("norm") != std::string::npos) {
      std::fill(hw.values.begin(), hw.values.end(), 1.0f);
    } else {
      float bound = shape.size() == 2 && name.find("embed") == std::string::npos ? 1.0f / std::sqrt(static_cast<float>(shape[1])) : 1.0f;
      std::uniform_real_distribution<float> dist(-bound, bound);
      for (float &v : hw.values) v = dist(rng);
    }
    w.emplace(name, std::move(hw));
  }
  return ModelWeights::from_map(std::move(w));
}

} // namespace

ModelDecoder::ModelDecoder(const Manifest &manifest, Pipeline &pipeline, const std::atomic<bool> &cancelled)
    : manifest_(manifest), pipeline_(pipeline), cancelled_(cancelled) {
  if (manifest.model_path.empty()) {
    config_ = synthetic_config(manifest.run);
    build(synthetic_weights(config_, manifest.seed));
  } else {
    config_ = load_model_config(manifest.model_path);
    build(ModelWeights::load(config_, SafetensorsIndex::open_model_dir(manifest.model_path)));
  }
  const RunSpec &run = manifest.run;
  // A tokenizer Loom cannot read (an NFC normalizer, say) matters only when text is needed.
  std::string tokenizer_error;
  if (!manifest.model_path.empty()) {
    try {
      tokenizer_ = Tokenizer::load(manifest.model_path);
    } catch (const Error &e) {
      tokenizer_error = std::string(" (") + e.what() + ")";
    }
  }
  if (!run.messages.empty()) {
    if (!tokenizer_)
      throw manifest_error(manifest.source_name + ": run.messages: a conversation needs a model with a tokenizer" +
                           tokenizer_error);
    ChatFamily family = run.chat_template == "auto" ? detect_chat_family(manifest.model_path)
                                                    : *chat_family_from_name(run.chat_template);
    std::vector<ChatMessage> messages;
    for (const auto &[role, content] : run.messages) messages.push_back({role, content});
    try {
      prompt_ = encode_chat(*tokenizer_, render_chat(family, messages, /*add_generation_prompt=*/true));
    } catch (const Error &e) {
      throw manifest_error(manifest.source_name + ": run.messages (" + chat_family_name(family) + " template): " + e.what());
    }
  } else if (!run.prompt_text.empty()) {
    if (!tokenizer_)
      throw manifest_error(manifest.source_name + ": run.prompt: text needs a model with a tokenizer (tokenizer.model or "
                           "tokenizer.json); give token ids instead" + tokenizer_error);
    prompt_ = tokenizer_->encode(run.prompt_text, /*add_bos=*/true);
  } else {
    prompt_ = run.prompt;
  }
  if (prompt_.empty()) throw manifest_error(manifest.source_name + ": run.prompt: encodes to no tokens");
  for (int32_t token : prompt_)
    if (token < 0 || token >= config_.vocab_size)
      throw manifest_error(manifest.source_name + ": run.prompt: token " + std::to_string(token) +
                           " is outside the model's vocabulary of " + std::to_string(config_.vocab_size));
  if (!run.stop.empty() && !tokenizer_)
    throw manifest_error(manifest.source_name + ": run.stop: stop strings need a model with a tokenizer; use stop_tokens" +
                         tokenizer_error);
  stop_tokens_ = run.stop_tokens_set ? run.stop_tokens : config_.eos_token_ids;
  if (manifest.model_path.empty() && !run.stop_tokens_set) stop_tokens_.clear(); // random weights: run all steps
}

bool ModelDecoder::generated_text(const std::vector<int32_t> &generated, std::string *text) const {
  // Decoded after the prompt, so that pieces keep the spacing they have in context.
  // Stop tokens end the text; they are not part of it (a BPE tokenizer would write
  // "<|endoftext|>").
  std::vector<int32_t> all = prompt_;
  for (int32_t id : generated)
    if (std::find(stop_tokens_.begin(), stop_tokens_.end(), id) == stop_tokens_.end()) all.push_back(id);
  std::string before = tokenizer_->decode(prompt_), whole = tokenizer_->decode(all);
  *text = whole.compare(0, before.size(), before) == 0 ? whole.substr(before.size())
                                                       : tokenizer_->decode(std::vector<int32_t>(all.begin() + static_cast<std::ptrdiff_t>(prompt_.size()), all.end()));
  // A stop string ends the text where it begins (it is not part of the output).
  size_t cut = std::string::npos;
  for (const auto &stop : manifest_.run.stop) cut = std::min(cut, text->find(stop));
  if (cut == std::string::npos) return false;
  text->resize(cut);
  return true;
}

std::optional<std::string> ModelDecoder::decode(const std::vector<int32_t> &ids) const {
  if (!tokenizer_) return std::nullopt;
  return tokenizer_->decode(ids);
}

ModelDecoder::~ModelDecoder() {
  // Under the step lock: a swap in flight either finished with the hooks or sees none.
  auto guard = pipeline_.begin_step();
  pipeline_.set_activate_hook(LOOM_KIND_ATTENTION, {});
  pipeline_.set_activate_hook(LOOM_KIND_QUANTIZER, {});
  pipeline_.set_activate_hook(LOOM_KIND_ADAPTER, {});
  if (quantizer_) {
    std::vector<loom_qweight *> weights;
    for (Linear *l : linears_) weights.push_back(l->qweight);
    free_qweights(*quantizer_, weights);
  }
}

void ModelDecoder::build(ModelWeights weights) {
  const ModelConfig &c = config_;
  const int64_t H = c.hidden_size;
  // Tensors are moved out of `weights`, not copied: peak memory stays one float32 model.
  auto values = [&](const std::string &name) { return weights.take(name).values; };
  auto maybe = [&](const std::string &name) { return weights.contains(name) ? weights.take(name).values : std::vector<float>{}; };
  auto with_bias = [](Linear &l, std::vector<float> bias) {
    if (bias.empty()) return;
    l.bias = HostTensor<float>({static_cast<int64_t>(bias.size())});
    l.bias.values() = std::move(bias);
  };
  // A linear from a [out, in] weight, or from a GPT-2 Conv1D [in, out] weight's columns
  // [col0, col0 + out), transposed.
  auto make = [&](std::string name, HostWeight w, std::vector<float> bias) {
    auto l = std::make_unique<Linear>();
    l->name = std::move(name);
    l->weight = HostTensor<float>({w.shape[0], w.shape[1]});
    l->weight.values() = std::move(w.values);
    with_bias(*l, std::move(bias));
    return l;
  };
  auto conv = [&](std::string name, const HostWeight &w, const std::vector<float> &b, int64_t col0, int64_t out) {
    const int64_t in = w.shape[0], cols = w.shape[1];
    auto l = std::make_unique<Linear>();
    l->name = std::move(name);
    l->weight = HostTensor<float>({out, in});
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i)
        l->weight.values()[static_cast<size_t>(o * in + i)] = w.values[static_cast<size_t>(i * cols + col0 + o)];
    l->bias = HostTensor<float>({out}); // (copied in place: a temporary vector here trips GCC 12's
                                        // false -Wfree-nonheap-object at -O3)
    std::copy(b.begin() + col0, b.begin() + col0 + out, l->bias.data());
    return l;
  };
  const bool gpt2 = c.architecture == Architecture::gpt2;
  embedding_ = values(gpt2 ? "wte.weight" : "model.embed_tokens.weight");
  if (gpt2) positions_ = values("wpe.weight");
  for (int64_t i = 0; i < c.n_layers; ++i) {
    Layer layer;
    if (gpt2) {
      std::string p = "h." + std::to_string(i) + ".";
      const auto &ca = weights.at(p + "attn.c_attn.weight");
      auto cab = values(p + "attn.c_attn.bias");
      layer.q = conv(p + "attn.c_attn.q", ca, cab, 0, H);
      layer.k = conv(p + "attn.c_attn.k", ca, cab, H, H);
      layer.v = conv(p + "attn.c_attn.v", ca, cab, 2 * H, H);
      layer.o = conv(p + "attn.c_proj", weights.at(p + "attn.c_proj.weight"), values(p + "attn.c_proj.bias"), 0, H);
      layer.up = conv(p + "mlp.c_fc", weights.at(p + "mlp.c_fc.weight"), values(p + "mlp.c_fc.bias"), 0, c.intermediate_size);
      layer.down = conv(p + "mlp.c_proj", weights.at(p + "mlp.c_proj.weight"), values(p + "mlp.c_proj.bias"), 0, H);
      layer.norm1 = values(p + "ln_1.weight");
      layer.norm1_bias = values(p + "ln_1.bias");
      layer.norm2 = values(p + "ln_2.weight");
      layer.norm2_bias = values(p + "ln_2.bias");
    } else {
      std::string p = "model.layers." + std::to_string(i) + ".";
      auto lin = [&](const std::string &m) { return make(p + m, weights.take(p + m + ".weight"), maybe(p + m + ".bias")); };
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
  final_norm_ = values(gpt2 ? "ln_f.weight" : "model.norm.weight");
  if (gpt2) final_norm_bias_ = values("ln_f.bias");
  // Tied: the head is a second copy of the embedding (the Linear owns what quantizers read).
  lm_head_ = make("lm_head", c.tie_word_embeddings ? HostWeight{{c.vocab_size, H}, embedding_} : weights.take("lm_head.weight"), {});
  for (auto &layer : layers_)
    for (Linear *l : {layer.q.get(), layer.k.get(), layer.v.get(), layer.o.get(), layer.gate.get(), layer.up.get(),
                      layer.down.get()})
      if (l) linears_.push_back(l);
  linears_.push_back(lm_head_.get());
  if (!gpt2) inv_freq_ = rope_inv_freq(c);
}

loom_attention_config ModelDecoder::attention_config() const {
  loom_attention_config c{};
  c.struct_size = sizeof(c);
  c.n_layers = static_cast<int32_t>(config_.n_layers);
  c.n_heads = static_cast<int32_t>(config_.n_heads);
  c.n_kv_heads = static_cast<int32_t>(config_.n_kv_heads);
  c.head_dim = static_cast<int32_t>(config_.head_dim);
  c.max_positions = static_cast<int32_t>(max_positions_);
  c.sliding_window = static_cast<int32_t>(config_.sliding_window);
  c.softmax_scale = 1.0f / std::sqrt(static_cast<float>(config_.head_dim));
  c.dtype = {kDLFloat, 32, 1};
  c.device = {kDLCPU, 0};
  return c;
}

loom_kv_layout ModelDecoder::prepare_attention(Instance &attention) const {
  loom_attention_config config = attention_config();
  loom_kv_layout layout{};
  layout.struct_size = sizeof(layout);
  attention.check(attention.vtable<loom_attention_vtable>()->prepare(attention.handle(), &config, &layout), "prepare");
  if (layout.block_size < 0 || layout.block_size > (1 << 20) || (layout.block_size > 0 && layout.bytes_per_block == 0) ||
      layout.bytes_per_block > (uint64_t{1} << 32))
    throw runtime_error(attention.slot() + " (" + attention.desc().name + "): prepare reported an absurd KV layout");
  return layout;
}

void ModelDecoder::allocate_kv(const loom_kv_layout &layout) {
  layout_ = layout;
  kv_pools_.clear();
  if (layout.block_size == 0) return;
  int64_t blocks = (max_positions_ + layout.block_size - 1) / layout.block_size;
  for (int64_t i = 0; i < config_.n_layers; ++i)
    kv_pools_.emplace_back(std::vector<int64_t>{blocks, static_cast<int64_t>(layout.bytes_per_block)});
  block_table_ = HostTensor<int32_t>({1, blocks});
  for (int64_t b = 0; b < blocks; ++b) block_table_.data()[b] = static_cast<int32_t>(b);
}

std::vector<loom_qweight *> ModelDecoder::quantize_all(Instance &quantizer) {
  std::vector<loom_qweight *> out;
  auto vt = quantizer.vtable<loom_quantizer_vtable>();
  auto one = [&](Linear &l) {
    loom_quantize_request req{};
    req.struct_size = sizeof(req);
    req.module_name = l.name.c_str();
    req.weight = l.weight.dl();
    req.calibration = nullptr;
    req.target_device = {kDLCPU, 0};
    loom_qweight *q = nullptr;
    loom_status s = vt->quantize(quantizer.handle(), &req, &q);
    if (s != LOOM_OK) {
      free_qweights(quantizer, out);
      quantizer.check(s, ("quantize " + l.name).c_str());
    }
    out.push_back(q);
  };
  for (Linear *l : linears_) one(*l);
  return out;
}

void ModelDecoder::free_qweights(Instance &quantizer, const std::vector<loom_qweight *> &weights) {
  auto vt = quantizer.vtable<loom_quantizer_vtable>();
  for (loom_qweight *q : weights)
    if (q) vt->free_weight(quantizer.handle(), q);
}

std::vector<loom_adapter_site *> ModelDecoder::attach_all(Instance &adapter) {
  auto vt = adapter.vtable<loom_adapter_vtable>();
  std::vector<loom_adapter_site *> sites;
  auto one = [&](Linear &l) {
    loom_adapter_site *site = nullptr;
    if (vt->targets(adapter.handle(), l.name.c_str())) {
      loom_adapter_module m{};
      m.struct_size = sizeof(m);
      m.module_name = l.name.c_str();
      m.out_features = l.weight.dim(0);
      m.in_features = l.weight.dim(1);
      m.dtype = {kDLFloat, 32, 1};
      m.device = {kDLCPU, 0};
      adapter.check(vt->attach(adapter.handle(), &m, &site), ("attach " + l.name).c_str());
    }
    sites.push_back(site);
  };
  for (Linear *l : linears_) one(*l);
  return sites;
}

void ModelDecoder::install_hooks() {
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
  pipeline_.set_activate_hook(LOOM_KIND_ADAPTER, [this, linears](Instance &fresh, Instance &old) -> std::function<void()> {
    auto sites = attach_all(fresh);
    const Instance *old_ptr = &old, *fresh_ptr = &fresh;
    return [linears, sites, old_ptr, fresh_ptr] {
      auto all = linears();
      for (size_t i = 0; i < all.size(); ++i) {
        auto &list = all[i]->sites;
        std::erase_if(list, [&](const auto &p) { return p.first == old_ptr; });
        if (sites[i]) list.emplace_back(fresh_ptr, sites[i]);
      }
    };
  });
}

void ModelDecoder::linear(Linear &lin, HostTensor<float> &x, HostTensor<float> &y) {
  int64_t out = lin.weight.dim(0), in = lin.weight.dim(1), n = x.dim(0);
  const bool has_bias = lin.bias.numel() > 0;
  if (quantizer_ && lin.qweight) {
    quantizer_->check(quantizer_->vtable<loom_quantizer_vtable>()->linear(quantizer_->handle(), lin.qweight, x.dl(),
                                                                          has_bias ? lin.bias.dl() : nullptr, y.dl()),
                      "linear");
  } else {
    ops::linear(x.data(), n, lin.weight.data(), out, in, has_bias ? lin.bias.data() : nullptr, y.data());
  }
  for (auto &[instance, site] : lin.sites) {
    loom_adapter_io io{};
    io.struct_size = sizeof(io);
    io.x = x.dl();
    io.y = y.dl();
    io.row_mask = nullptr;
    io.training = 0;
    instance->check(instance->vtable<loom_adapter_vtable>()->forward(instance->handle(), site, &io), "forward");
  }
}

// RMSNorm (w, no bias) or LayerNorm (w and b), over one hidden vector.
void ModelDecoder::norm(const std::vector<float> &w, const std::vector<float> &b, const float *x, float *y) const {
  if (b.empty()) ops::rms_norm(x, w.data(), config_.hidden_size, config_.norm_eps, y);
  else ops::layer_norm(x, w.data(), b.data(), config_.hidden_size, config_.norm_eps, y);
}

HostTensor<float> ModelDecoder::forward(int32_t token, int32_t pos) {
  const ModelConfig &c = config_;
  const int64_t H = c.hidden_size, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads;
  const bool gpt2 = c.architecture == Architecture::gpt2;
  if (pos >= c.max_positions || pos >= max_positions_)
    throw runtime_error(manifest_.source_name + ": position " + std::to_string(pos) + " is past the model's " +
                        std::to_string(c.max_positions) + " positions or the KV cache's " + std::to_string(max_positions_));
  HostTensor<float> x({1, H}); // the residual stream
  for (int64_t i = 0; i < H; ++i)
    x.data()[i] = embedding_[static_cast<size_t>(token * H + i)] + (gpt2 ? positions_[static_cast<size_t>(pos * H + i)] : 0.0f);
  std::shared_ptr<Instance> attention = pipeline_.list(LOOM_KIND_ATTENTION).front();
  auto avt = attention->vtable<loom_attention_vtable>();
  HostTensor<int32_t> offsets({2}), positions({1});
  offsets.data()[0] = 0;
  offsets.data()[1] = 1;
  positions.data()[0] = pos;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    Layer &layer = layers_[static_cast<size_t>(l)];
    HostTensor<float> h({1, H});
    norm(layer.norm1, layer.norm1_bias, x.data(), h.data());
    // q, k, v as [T = 1, heads, D]: the attention plugin's layout, the same memory as [1, heads * D].
    HostTensor<float> q({1, Hq * D}), k({1, Hkv * D}), v({1, Hkv * D});
    linear(*layer.q, h, q);
    linear(*layer.k, h, k);
    linear(*layer.v, h, v);
    if (!gpt2) {
      ops::rope(q.data(), Hq, D, pos, inv_freq_);
      ops::rope(k.data(), Hkv, D, pos, inv_freq_);
    }
    HostTensor<float> q3({1, Hq, D}), k3({1, Hkv, D}), v3({1, Hkv, D}), out3({1, Hq, D});
    q3.values() = q.values();
    k3.values() = k.values();
    v3.values() = v.values();
    loom_attention_batch b{};
    b.struct_size = sizeof(b);
    b.layer = static_cast<int32_t>(l);
    b.n_seqs = 1;
    b.n_tokens = 1;
    b.q = q3.dl();
    b.k = k3.dl();
    b.v = v3.dl();
    b.out = out3.dl();
    b.seq_offsets = offsets.dl();
    b.seq_positions = positions.dl();
    b.block_table = layout_.block_size > 0 ? block_table_.dl() : nullptr;
    b.kv_pool = layout_.block_size > 0 ? kv_pools_[static_cast<size_t>(l)].dl() : nullptr;
    b.causal = 1;
    attention->check(avt->forward(attention->handle(), &b), "forward");
    HostTensor<float> attn({1, Hq * D}), proj({1, H});
    attn.values() = out3.values();
    linear(*layer.o, attn, proj);
    for (int64_t i = 0; i < H; ++i) x.data()[i] += proj.data()[i];

    norm(layer.norm2, layer.norm2_bias, x.data(), h.data());
    const int64_t I = c.intermediate_size;
    HostTensor<float> up({1, I}), mlp({1, H});
    linear(*layer.up, h, up);
    if (layer.gate) { // SwiGLU: down(silu(gate(h)) * up(h))
      HostTensor<float> gate({1, I});
      linear(*layer.gate, h, gate);
      for (int64_t i = 0; i < I; ++i) up.data()[i] *= ops::silu(gate.data()[i]);
    } else { // GPT-2: c_proj(gelu_new(c_fc(h)))
      for (int64_t i = 0; i < I; ++i) up.data()[i] = ops::gelu_new(up.data()[i]);
    }
    linear(*layer.down, up, mlp);
    for (int64_t i = 0; i < H; ++i) x.data()[i] += mlp.data()[i];
  }
  HostTensor<float> h({1, H}), logits({1, c.vocab_size});
  norm(final_norm_, final_norm_bias_, x.data(), h.data());
  linear(*lm_head_, h, logits);
  auto parallel = pipeline_.list(LOOM_KIND_PARALLEL);
  if (!parallel.empty()) {
    // Every rank holds the same replicated logits; averaging keeps them and checks the collective.
    auto &p = *parallel.front();
    p.check(p.vtable<loom_parallel_vtable>()->all_reduce(p.handle(), LOOM_GROUP_WORLD, logits.dl(), LOOM_REDUCE_AVG),
            "all_reduce");
  }
  return logits;
}

int32_t ModelDecoder::sample(HostTensor<float> &logits, const std::vector<int32_t> &history, uint64_t step) {
  auto chain = pipeline_.list(LOOM_KIND_SAMPLER);
  if (chain.empty()) throw runtime_error(manifest_.source_name + ": the pipeline has no [[sampler]]: add one such as greedy");
  int64_t seq_id = 0;
  const int32_t *hist = history.data();
  int32_t hist_len = static_cast<int32_t>(history.size());
  uint64_t key = manifest_.seed, counter = step;
  int32_t token = -1;
  loom_sampling_batch b{};
  b.struct_size = sizeof(b);
  b.n_rows = 1;
  b.vocab_size = static_cast<int32_t>(config_.vocab_size);
  b.logits = logits.dl();
  b.seq_ids = &seq_id;
  b.history = &hist;
  b.history_len = &hist_len;
  b.rng_key = &key;
  b.rng_counter = &counter;
  b.tokens_out = &token;
  b.logprobs_out = nullptr;
  for (auto &s : chain) {
    if (token != -1)
      throw runtime_error(s->slot() + " (" + s->desc().name + "): follows a sampler that already selected a token; "
                          "selecting samplers (greedy, dist) must come last");
    s->check(s->vtable<loom_sampler_vtable>()->apply(s->handle(), &b), "apply");
  }
  if (token < 0 || token >= config_.vocab_size)
    throw runtime_error(chain.back()->slot() + " (" + chain.back()->desc().name + "): the sampler chain selected no valid token"
                        " (got " + std::to_string(token) + "); end the chain with a selecting sampler such as greedy or dist");
  for (auto &s : chain)
    if (auto accept = s->vtable<loom_sampler_vtable>()->accept) s->check(accept(s->handle(), seq_id, token), "accept");
  return token;
}

void ModelDecoder::ensure_ready(int64_t max_positions) {
  auto attention = pipeline_.list(LOOM_KIND_ATTENTION);
  if (attention.empty())
    throw runtime_error(manifest_.source_name + ": the pipeline has no [attention]: add one such as use = \"sdpa\"");
  if (ready_ && max_positions <= max_positions_) return;
  if (max_positions > (int64_t{1} << 24))
    throw runtime_error(manifest_.source_name + ": a run of " + std::to_string(max_positions) + " positions is too long");
  max_positions_ = max_positions;
  // The geometry changed (first run, or a longer one): prepare again and size the cache.
  loom_kv_layout layout = prepare_attention(*attention.front());
  if (layout.block_size > 0) {
    uint64_t blocks = static_cast<uint64_t>((max_positions_ + layout.block_size - 1) / layout.block_size);
    if (layout.bytes_per_block > (uint64_t{8} << 30) / blocks / static_cast<uint64_t>(config_.n_layers))
      throw runtime_error(attention.front()->slot() + " (" + attention.front()->desc().name +
                          "): its KV layout needs more than 8 GiB for this run");
  }
  allocate_kv(layout);
  if (ready_) return;
  // Everything is made first and committed only when all of it succeeded, so that a failure
  // (a quantizer or adapter refusing a module) leaves nothing half-installed for the next run.
  auto quantizers = pipeline_.list(LOOM_KIND_QUANTIZER);
  std::vector<loom_qweight *> weights;
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
    for (size_t i = 0; i < linears_.size(); ++i)
      if (sites[i]) linears_[i]->sites.emplace_back(adapter.get(), sites[i]);
  install_hooks();
  ready_ = true;
}

void ModelDecoder::generate(int64_t steps, const TokenCallback &on_token, RunResult &result) {
  const auto &prompt = prompt_;
  result.prompt = prompt_;
  std::vector<int32_t> history(prompt.begin(), prompt.end());
  int32_t pos = 0;
  HostTensor<float> logits;
  std::chrono::steady_clock::time_point prefill_start;
  if (static_cast<int64_t>(prompt.size()) + steps > config_.max_positions)
    throw runtime_error(manifest_.source_name + ": run.steps: the prompt's " + std::to_string(prompt.size()) + " tokens and " +
                        std::to_string(steps) + " steps exceed the model's " + std::to_string(config_.max_positions) +
                        " positions");
  {
    auto guard = pipeline_.begin_step();
    ensure_ready(static_cast<int64_t>(prompt.size()) + steps); // one-time work is not prefill
    prefill_start = std::chrono::steady_clock::now();
    for (int32_t t : prompt) logits = forward(t, pos++);
  }
  auto decode_start = std::chrono::steady_clock::now();
  result.prefill_seconds = std::chrono::duration<double>(decode_start - prefill_start).count();
  bool stopped_by_string = false;
  for (int64_t step = 0; step < steps; ++step) {
    if (cancelled_.load()) {
      result.cancelled = true;
      break;
    }
    int32_t token;
    {
      auto guard = pipeline_.begin_step();
      token = sample(logits, history, static_cast<uint64_t>(step));
      history.push_back(token);
      result.tokens.push_back(token);
      if (step + 1 < steps) logits = forward(token, pos++);
    }
    if (on_token && !on_token(static_cast<int32_t>(step), token)) break;
    if (std::find(stop_tokens_.begin(), stop_tokens_.end(), token) != stop_tokens_.end()) {
      result.stopped = true;
      break;
    }
    if (!manifest_.run.stop.empty() && generated_text(result.tokens, &result.text)) {
      result.stopped = stopped_by_string = true;
      break;
    }
  }
  result.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - decode_start).count();
  if (tokenizer_ && !stopped_by_string) generated_text(result.tokens, &result.text);
  // The sequence is over: samplers forget its state.
  auto guard = pipeline_.begin_step();
  for (auto &s : pipeline_.list(LOOM_KIND_SAMPLER))
    if (auto release = s->vtable<loom_sampler_vtable>()->release) release(s->handle(), -1);
}

namespace {

struct PassageSink {
  RunResult *result;
  std::string slot;
};

// Receives one passage from a retriever; the passage's strings are valid during the call only.
loom_status collect_passage(void *user, const loom_passage *p) {
  try {
    auto *sink = static_cast<PassageSink *>(user);
    static const char *kinds[] = {"?", "bm25", "cosine", "inner-product", "l2", "rrf", "rerank"};
    PassageResult pr;
    pr.retriever_slot = sink->slot;
    pr.doc_id = p->doc_id ? p->doc_id : "";
    pr.score = p->score;
    pr.score_kind = p->score_kind >= 1 && p->score_kind <= 6 ? kinds[p->score_kind] : "?";
    pr.text = p->text ? p->text : "";
    sink->result->passages.push_back(std::move(pr));
    return LOOM_OK;
  } catch (...) { // never unwind through the plugin's frames
    return LOOM_ERR_OUT_OF_MEMORY;
  }
}

} // namespace

void ModelDecoder::retrieve(RunResult &result) {
  const RunSpec &run = manifest_.run;
  if (run.query.empty()) return;
  for (auto &r : pipeline_.list(LOOM_KIND_RETRIEVER)) {
    loom_query q{};
    q.struct_size = sizeof(q);
    q.text = run.query.c_str();
    q.top_k = static_cast<int32_t>(run.top_k);
    PassageSink sink{&result, r->slot()};
    auto guard = pipeline_.begin_step(); // no swap of this retriever while it searches
    auto current = pipeline_.get(r->slot());
    current->check(current->vtable<loom_retriever_vtable>()->search(current->handle(), &q, collect_passage, &sink),
                   "search");
  }
}

void ModelDecoder::call_tools(RunResult &result) {
  for (const auto &call : manifest_.run.tool_calls) {
    auto guard = pipeline_.begin_step(); // no swap of a tool while it runs
    auto tools = pipeline_.list(LOOM_KIND_TOOL);
    std::shared_ptr<Instance> owner;
    std::string available;
    for (auto &t : tools) {
      auto vt = t->vtable<loom_tool_vtable>();
      uint32_t n = 0;
      t->check(vt->tool_count(t->handle(), &n), "tool_count");
      for (uint32_t i = 0; i < n && !owner; ++i) {
        loom_tool_info info{};
        info.struct_size = sizeof(info);
        t->check(vt->tool_info(t->handle(), i, &info), "tool_info");
        if (info.name && call.tool == info.name) owner = t;
        if (info.name) available += std::string(available.empty() ? "" : ", ") + info.name;
      }
    }
    if (!owner)
      throw runtime_error(manifest_.source_name + ": run.tool_calls: no tool named '" + call.tool + "' (tools: " +
                          (available.empty() ? "none" : available) + ")");
    HostBuffer content;
    loom_tool_result r{};
    r.struct_size = sizeof(r);
    r.content = content.abi();
    owner->check(owner->vtable<loom_tool_vtable>()->call(owner->handle(), call.tool.c_str(), call.arguments_json.c_str(), &r),
                 "call");
    result.tool_results.push_back({call.tool, std::string(content.view()), r.is_error != 0});
  }
}

} // namespace loom
