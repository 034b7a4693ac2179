#include "synthetic_decoder.hpp"

#include <cmath>
#include <cstring>
#include <random>

#include "loom/core/error.hpp"
#include "loom/core/host_buffer.hpp"

namespace loom {

using detail::HostTensor;

namespace {

void rms_norm(const float *x, float *y, int64_t n) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
  float scale = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(n) + 1e-5));
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale;
}

// y[n, out] = x[n, in] W[out, in]^T
void dense(const HostTensor<float> &w, int64_t out, int64_t in, const float *x, float *y, int64_t n) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t o = 0; o < out; ++o) {
      const float *wr = w.data() + o * in;
      const float *xr = x + r * in;
      float acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += wr[i] * xr[i];
      y[r * out + o] = acc;
    }
}

} // namespace

SyntheticDecoder::SyntheticDecoder(const Manifest &manifest, Pipeline &pipeline, const std::atomic<bool> &cancelled)
    : manifest_(manifest), pipeline_(pipeline), cancelled_(cancelled) {
  const RunSpec &run = manifest.run;
  vocab_ = run.vocab_size;
  hidden_ = run.hidden_size;
  heads_ = run.n_heads;
  kv_heads_ = run.n_kv_heads;
  head_dim_ = hidden_ / heads_;
  n_layers_ = run.n_layers;
  max_positions_ = 0; // set by generate()
  build_weights();
}

SyntheticDecoder::~SyntheticDecoder() {
  // Under the step lock: a swap in flight either finished with the hooks or sees none.
  auto guard = pipeline_.begin_step();
  pipeline_.set_activate_hook(LOOM_KIND_ATTENTION, {});
  pipeline_.set_activate_hook(LOOM_KIND_QUANTIZER, {});
  pipeline_.set_activate_hook(LOOM_KIND_ADAPTER, {});
  if (quantizer_) {
    std::vector<loom_qweight *> weights;
    for (auto &layer : layers_)
      for (Linear *l : {layer.q.get(), layer.k.get(), layer.v.get(), layer.o.get()}) weights.push_back(l->qweight);
    weights.push_back(lm_head_->qweight);
    free_qweights(*quantizer_, weights);
  }
}

void SyntheticDecoder::build_weights() {
  std::mt19937_64 rng(manifest_.seed);
  auto fill = [&](HostTensor<float> &t, float bound) {
    std::uniform_real_distribution<float> dist(-bound, bound);
    for (float &v : t.values()) v = dist(rng);
  };
  embedding_ = HostTensor<float>({vocab_, hidden_});
  fill(embedding_, 1.0f);
  auto make = [&](std::string name, int64_t out, int64_t in) {
    auto l = std::make_unique<Linear>();
    l->name = std::move(name);
    l->weight = HostTensor<float>({out, in});
    fill(l->weight, 1.0f / std::sqrt(static_cast<float>(in)));
    return l;
  };
  for (int64_t i = 0; i < n_layers_; ++i) {
    std::string p = "model.layers." + std::to_string(i) + ".self_attn.";
    Layer layer;
    layer.q = make(p + "q_proj", heads_ * head_dim_, hidden_);
    layer.k = make(p + "k_proj", kv_heads_ * head_dim_, hidden_);
    layer.v = make(p + "v_proj", kv_heads_ * head_dim_, hidden_);
    layer.o = make(p + "o_proj", hidden_, heads_ * head_dim_);
    layers_.push_back(std::move(layer));
  }
  lm_head_ = make("lm_head", vocab_, hidden_);
}

loom_attention_config SyntheticDecoder::attention_config() const {
  loom_attention_config c{};
  c.struct_size = sizeof(c);
  c.n_layers = static_cast<int32_t>(n_layers_);
  c.n_heads = static_cast<int32_t>(heads_);
  c.n_kv_heads = static_cast<int32_t>(kv_heads_);
  c.head_dim = static_cast<int32_t>(head_dim_);
  c.max_positions = static_cast<int32_t>(max_positions_);
  c.sliding_window = 0;
  c.softmax_scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
  c.dtype = {kDLFloat, 32, 1};
  c.device = {kDLCPU, 0};
  return c;
}

loom_kv_layout SyntheticDecoder::prepare_attention(Instance &attention) const {
  loom_attention_config config = attention_config();
  loom_kv_layout layout{};
  layout.struct_size = sizeof(layout);
  attention.check(attention.vtable<loom_attention_vtable>()->prepare(attention.handle(), &config, &layout), "prepare");
  if (layout.block_size < 0 || layout.block_size > (1 << 20) || (layout.block_size > 0 && layout.bytes_per_block == 0) ||
      layout.bytes_per_block > (uint64_t{1} << 32))
    throw runtime_error(attention.slot() + " (" + attention.desc().name + "): prepare reported an absurd KV layout");
  return layout;
}

void SyntheticDecoder::allocate_kv(const loom_kv_layout &layout) {
  layout_ = layout;
  kv_pools_.clear();
  if (layout.block_size == 0) return;
  int64_t blocks = (max_positions_ + layout.block_size - 1) / layout.block_size;
  for (int64_t i = 0; i < n_layers_; ++i)
    kv_pools_.emplace_back(std::vector<int64_t>{blocks, static_cast<int64_t>(layout.bytes_per_block)});
  block_table_ = HostTensor<int32_t>({1, blocks});
  for (int64_t b = 0; b < blocks; ++b) block_table_.data()[b] = static_cast<int32_t>(b);
}

std::vector<loom_qweight *> SyntheticDecoder::quantize_all(Instance &quantizer) {
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
  for (auto &layer : layers_)
    for (Linear *l : {layer.q.get(), layer.k.get(), layer.v.get(), layer.o.get()}) one(*l);
  one(*lm_head_);
  return out;
}

void SyntheticDecoder::free_qweights(Instance &quantizer, const std::vector<loom_qweight *> &weights) {
  auto vt = quantizer.vtable<loom_quantizer_vtable>();
  for (loom_qweight *q : weights)
    if (q) vt->free_weight(quantizer.handle(), q);
}

std::vector<loom_adapter_site *> SyntheticDecoder::attach_all(Instance &adapter) {
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
  for (auto &layer : layers_)
    for (Linear *l : {layer.q.get(), layer.k.get(), layer.v.get(), layer.o.get()}) one(*l);
  one(*lm_head_);
  return sites;
}

void SyntheticDecoder::install_hooks() {
  auto linears = [this] {
    std::vector<Linear *> all;
    for (auto &layer : layers_)
      for (Linear *l : {layer.q.get(), layer.k.get(), layer.v.get(), layer.o.get()}) all.push_back(l);
    all.push_back(lm_head_.get());
    return all;
  };
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

void SyntheticDecoder::linear(Linear &lin, HostTensor<float> &x, HostTensor<float> &y) {
  int64_t out = lin.weight.dim(0), in = lin.weight.dim(1), n = x.dim(0);
  if (quantizer_ && lin.qweight) {
    quantizer_->check(quantizer_->vtable<loom_quantizer_vtable>()->linear(quantizer_->handle(), lin.qweight, x.dl(),
                                                                          nullptr, y.dl()),
                      "linear");
  } else {
    dense(lin.weight, out, in, x.data(), y.data(), n);
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

HostTensor<float> SyntheticDecoder::forward(int32_t token, int32_t pos) {
  HostTensor<float> x({1, hidden_});
  std::memcpy(x.data(), embedding_.data() + token * hidden_, static_cast<size_t>(hidden_) * sizeof(float));
  std::shared_ptr<Instance> attention = pipeline_.list(LOOM_KIND_ATTENTION).front();
  auto avt = attention->vtable<loom_attention_vtable>();
  HostTensor<int32_t> offsets({2}), positions({1});
  offsets.data()[0] = 0;
  offsets.data()[1] = 1;
  positions.data()[0] = pos;
  for (int64_t l = 0; l < n_layers_; ++l) {
    Layer &layer = layers_[static_cast<size_t>(l)];
    HostTensor<float> h({1, hidden_});
    rms_norm(x.data(), h.data(), hidden_);
    HostTensor<float> q({1, heads_ * head_dim_}), k({1, kv_heads_ * head_dim_}), v({1, kv_heads_ * head_dim_});
    linear(*layer.q, h, q);
    linear(*layer.k, h, k);
    linear(*layer.v, h, v);
    // The attention plugin sees [T, heads, head_dim] views of the same memory.
    HostTensor<float> q3({1, heads_, head_dim_}), k3({1, kv_heads_, head_dim_}), v3({1, kv_heads_, head_dim_}),
        out3({1, heads_, head_dim_});
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
    HostTensor<float> attn({1, heads_ * head_dim_}), proj({1, hidden_});
    attn.values() = out3.values();
    linear(*layer.o, attn, proj);
    for (int64_t i = 0; i < hidden_; ++i) x.data()[i] += proj.data()[i];
  }
  HostTensor<float> h({1, hidden_}), logits({1, vocab_});
  rms_norm(x.data(), h.data(), hidden_);
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

int32_t SyntheticDecoder::sample(HostTensor<float> &logits, const std::vector<int32_t> &history, uint64_t step) {
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
  b.vocab_size = static_cast<int32_t>(vocab_);
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
  if (token < 0 || token >= vocab_)
    throw runtime_error(chain.back()->slot() + " (" + chain.back()->desc().name + "): the sampler chain selected no valid token"
                        " (got " + std::to_string(token) + "); end the chain with a selecting sampler such as greedy or dist");
  for (auto &s : chain)
    if (auto accept = s->vtable<loom_sampler_vtable>()->accept) s->check(accept(s->handle(), seq_id, token), "accept");
  return token;
}

void SyntheticDecoder::ensure_ready(int64_t max_positions) {
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
    if (layout.bytes_per_block > (uint64_t{8} << 30) / blocks / static_cast<uint64_t>(n_layers_))
      throw runtime_error(attention.front()->slot() + " (" + attention.front()->desc().name +
                          "): its KV layout needs more than 8 GiB for this run");
  }
  allocate_kv(layout);
  if (ready_) return;
  auto quantizers = pipeline_.list(LOOM_KIND_QUANTIZER);
  if (!quantizers.empty()) {
    auto weights = quantize_all(*quantizers.front());
    quantizer_ = quantizers.front();
    size_t i = 0;
    for (auto &layer : layers_)
      for (Linear *l : {layer.q.get(), layer.k.get(), layer.v.get(), layer.o.get()}) l->qweight = weights[i++];
    lm_head_->qweight = weights[i];
  }
  for (auto &adapter : pipeline_.list(LOOM_KIND_ADAPTER)) {
    auto sites = attach_all(*adapter);
    size_t i = 0;
    for (auto &layer : layers_)
      for (Linear *l : {layer.q.get(), layer.k.get(), layer.v.get(), layer.o.get()})
        if (auto site = sites[i++]) l->sites.emplace_back(adapter.get(), site);
    if (sites[i]) lm_head_->sites.emplace_back(adapter.get(), sites[i]);
  }
  install_hooks();
  ready_ = true;
}

void SyntheticDecoder::generate(int64_t steps, const TokenCallback &on_token, RunResult &result) {
  const auto &prompt = manifest_.run.prompt;
  std::vector<int32_t> history(prompt.begin(), prompt.end());
  int32_t pos = 0;
  HostTensor<float> logits;
  {
    auto guard = pipeline_.begin_step();
    ensure_ready(static_cast<int64_t>(prompt.size()) + steps);
    for (int32_t t : prompt) logits = forward(t, pos++);
  }
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
  }
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

void SyntheticDecoder::retrieve(RunResult &result) {
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

void SyntheticDecoder::call_tools(RunResult &result) {
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
