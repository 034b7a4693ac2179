// DecoderTrainer: the forward pass with saved activations, its backward pass, AdamW and clipping
// (see decoder_trainer.hpp).
#include "decoder_trainer.hpp"

#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>

#include "adapter_sites.hpp"
#include "adapter_weights.hpp"
#include "grad_ops.hpp"
#include "host_tensor.hpp"
#include "model_backend.hpp"
#include "loom/core/error.hpp"
#include "loom/core/reference_model.hpp"
#include "loom/loom_plugin_api.h"

namespace loom {

namespace {
constexpr size_t kNone = SIZE_MAX;
}

// What the backward pass needs from the forward pass of one sequence of n tokens.
template <class T>
struct DecoderTrainer<T>::Acts {
  struct PerLayer {
    std::vector<T> x_in, r1, mean1, h1, q, k, v, p, a, x_mid, r2, mean2, h2, g, u, m;
    std::vector<T> attn_out, mlp_out;  // the blocks' outputs before block-site adapters (when attached)
    // Activation recomputation: everything but the layer's input is dropped after the forward
    // pass and recomputed from it in the backward pass.
    void keep_input_only() {
      for (auto *each : {&r1, &mean1, &h1, &q, &k, &v, &p, &a, &x_mid, &r2, &mean2, &h2, &g, &u, &m, &attn_out, &mlp_out})
        std::vector<T>().swap(*each);
    }
    bool dropped() const { return x_mid.empty(); }
  };
  std::vector<PerLayer> layers;
  std::vector<T> x_final, r_final, mean_final, h_final, logits;
  int64_t n = 0;                  // positions
  std::vector<int32_t> tokens;    // kept for the backward pass (stage_forward)
  std::vector<T> dlogits;         // the last stage's, kept for the backward pass
  std::vector<T> d_input;         // a stage without the embedding: its input's gradient
};


template <class T>
DecoderTrainer<T>::DecoderTrainer(const ModelConfig &config, const ModelWeights &weights, Stage stage)
    : config_(config), stage_(stage) {
  const bool gpt2 = config_.architecture == Architecture::gpt2, tied = gpt2 || config_.tie_word_embeddings;
  for (const auto &[name, shape] : expected_weights(config_)) {
    if (!stage_holds(name, stage_.first, stage_.end, stage_.embedding, stage_.head, tied)) continue;
    const HostWeight &w = weights.at(name);
    TrainParam<T> p;
    p.name = name;
    p.shape = shape;
    p.value.assign(w.values.begin(), w.values.end());
    p.grad.assign(p.value.size(), T(0));
    index_.emplace(name, params_.size());
    params_.push_back(std::move(p));
  }
  layers_ = decoder_layer_params(config_, [&](const std::string &name) { return find(name); },
                                 [&](const std::string &name) { return need(name); }, stage_.first, stage_.end);
  const std::string embedding = gpt2 ? "wte.weight" : "model.embed_tokens.weight";
  if (stage_.embedding || (stage_.head && tied)) embed_ = need(embedding);
  if (stage_.head) head_ = tied ? embed_ : need("lm_head.weight");
  if (gpt2) {
    if (stage_.embedding) positions_ = need("wpe.weight");
    if (stage_.head) {
      final_norm_ = need("ln_f.weight");
      final_norm_b_ = need("ln_f.bias");
    }
    return;
  }
  if (stage_.head) final_norm_ = need("model.norm.weight");
  inv_freq_ = rope_inv_freq(config_);
}

template <class T>
size_t DecoderTrainer<T>::find(const std::string &name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? kNone : it->second;
}

template <class T>
size_t DecoderTrainer<T>::need(const std::string &name) const {
  const size_t i = find(name);
  if (i == kNone) throw runtime_error("training: the model has no tensor " + name);
  return i;
}

template <class T>
TrainParam<T> &DecoderTrainer<T>::param(std::string_view name) {
  const auto it = index_.find(name);
  if (it == index_.end()) throw runtime_error("training: no parameter " + std::string(name));
  return params_[it->second];
}

template <class T>
void DecoderTrainer<T>::set_threads(int32_t threads) {
  const int32_t n = detail::ThreadPool::resolve(threads);
  pool_ = n > 1 ? std::make_unique<detail::ThreadPool>(n) : nullptr;
}

template <class T>
void DecoderTrainer<T>::zero_grad() {
  for (auto &p : params_) std::fill(p.grad.begin(), p.grad.end(), T(0));
}

template <class T>
void DecoderTrainer<T>::forward(const std::vector<int32_t> &tokens, Acts &acts, const std::vector<T> *x_in) {
  const ModelConfig &c = config_;
  if (!stage_.embedding && (x_in == nullptr || x_in->empty() || x_in->size() % static_cast<size_t>(c.hidden_size) != 0))
    throw runtime_error("training: a pipeline stage after the first needs the previous stage's output");
  const int64_t n = stage_.embedding ? static_cast<int64_t>(tokens.size()) : static_cast<int64_t>(x_in->size()) / c.hidden_size;
  acts.n = n;
  if (n + prefix_tokens_ > c.max_positions)
    throw runtime_error("training: a sequence of " + std::to_string(n) + " tokens" +
                        (prefix_tokens_ ? " after " + std::to_string(prefix_tokens_) + " virtual tokens" : std::string()) +
                        " exceeds the model's " +
                        std::to_string(c.max_positions) + " positions");
  const int64_t vocab = tensor_parallel() ? tensor_.vocab_full : c.vocab_size;
  for (const int32_t id : tokens)
    if (id < 0 || id >= vocab) throw runtime_error("training: token " + std::to_string(id) + " is outside the vocabulary");
  // The embedding (GPT-2 adds learned positions), the layers, the final norm (GPT-2's LayerNorm
  // keeps its mean too), the head. GPT-2's layer: x += c_proj(attention(split(c_attn(ln_1(x))))),
  // x += c_proj(gelu(c_fc(ln_2(x)))), with q, k and v the thirds of c_attn's output (no RoPE) in
  // acts.q/k/v, c_fc's output in g and its GELU in m.
  const bool gpt2 = c.architecture == Architecture::gpt2;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  std::vector<T> x(static_cast<size_t>(n * H));
  if (!stage_.embedding) x = *x_in;
  for (int64_t t = 0; t < (stage_.embedding ? n : 0); ++t) {
    const int64_t row = tokens[static_cast<size_t>(t)] - tensor_.vocab_begin;  // tensor parallel: this rank's rows only
    if (row >= 0 && row < V) std::copy_n(value(embed_) + row * H, H, x.begin() + t * H);
  }
  if (stage_.embedding) tensor_sum(x);
  for (int64_t t = 0; t < (stage_.embedding && gpt2 ? n : 0); ++t)  // GPT-2's positions, once (after the sum)
    for (int64_t i = 0; i < H; ++i) x[static_cast<size_t>(t * H + i)] += value(positions_)[t * H + i];
  acts.layers.assign(layers_.size(), {});
  for (size_t l = 0; l < layers_.size(); ++l) {
    acts.layers[l].x_in = x;
    if (gpt2) layer_forward_gpt2(l, x, acts.layers[l]);
    else layer_forward_llama(l, x, acts.layers[l]);
    if (recompute_) acts.layers[l].keep_input_only();
  }
  acts.x_final = x;
  if (!stage_.head) return;  // the output (x_final) goes to the next stage
  acts.r_final.resize(static_cast<size_t>(n));
  acts.mean_final.resize(gpt2 ? static_cast<size_t>(n) : 0);
  acts.h_final.resize(x.size());
  for (int64_t t = 0; t < n; ++t) {
    T *h = acts.h_final.data() + t * H;
    acts.r_final[static_cast<size_t>(t)] =
        gpt2 ? ops::layer_norm(x.data() + t * H, value(final_norm_), value(final_norm_b_), H, c.norm_eps, h,
                               &acts.mean_final[static_cast<size_t>(t)])
             : ops::rms_norm(x.data() + t * H, value(final_norm_), H, c.norm_eps, h);
  }
  acts.logits.resize(static_cast<size_t>(n * V));
  grad::linear(acts.h_final.data(), n, value(head_), V, H, static_cast<const T *>(nullptr), acts.logits.data(), pool_.get());
}

// One Llama layer on the residual stream x (updated in place), its activations into A (whose
// x_in the caller has set to x).
template <class T>
template <class PerLayer>
void DecoderTrainer<T>::layer_forward_llama(size_t l, std::vector<T> &x, PerLayer &A) {
  const ModelConfig &c = config_;
  const int64_t n = static_cast<int64_t>(x.size()) / c.hidden_size, H = c.hidden_size, D = c.head_dim, Hq = c.n_heads,
                Hkv = c.n_kv_heads, I = c.intermediate_size;
  std::vector<T> tmp;
  const Layer &L = layers_[l];
  A.r1.resize(static_cast<size_t>(n));
  A.h1.resize(x.size());
  for (int64_t t = 0; t < n; ++t)
    A.r1[static_cast<size_t>(t)] = ops::rms_norm(x.data() + t * H, value(L.norm1), H, c.norm_eps, A.h1.data() + t * H);
  // With a prefix adapter, k and v hold its P virtual tokens first and the sequence sits at
  // positions P, P + 1, ... (prefix_tokens_ is 0 without one).
  const int64_t P = prefix_tokens_, kv = Hkv * D;
  A.q.resize(static_cast<size_t>(n * Hq * D));
  A.k.resize(static_cast<size_t>((P + n) * kv));
  A.v.resize(A.k.size());
  project(L.q, L.q_b, A.h1.data(), n, Hq * D, H, A.q.data());
  project(L.k, L.k_b, A.h1.data(), n, kv, H, A.k.data() + P * kv);
  project(L.v, L.v_b, A.h1.data(), n, kv, H, A.v.data() + P * kv);
  for (int64_t t = 0; t < n; ++t) {
    ops::rope(A.q.data() + t * Hq * D, Hq, D, P + t, inv_freq_);
    ops::rope(A.k.data() + (P + t) * kv, Hkv, D, P + t, inv_freq_);
  }
  if (P > 0) prefix_forward(l, A.k, A.v);
  A.a.resize(A.q.size());
  attend(l, A.q.data(), A.k.data(), A.v.data(), n, Hq, Hkv, D, c.sliding_window, P, A.a.data(), A.p);
  tmp.resize(x.size());
  project(L.o, L.o_b, A.a.data(), n, H, Hq * D, tmp.data());
  tensor_sum(tmp);
  block_adapters(l, 0, tmp, A.attn_out);
  for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];
  A.x_mid = x;
  A.r2.resize(static_cast<size_t>(n));
  A.h2.resize(x.size());
  for (int64_t t = 0; t < n; ++t)
    A.r2[static_cast<size_t>(t)] = ops::rms_norm(x.data() + t * H, value(L.norm2), H, c.norm_eps, A.h2.data() + t * H);
  A.g.resize(static_cast<size_t>(n * I));
  A.u.resize(A.g.size());
  A.m.resize(A.g.size());
  project(L.gate, L.gate_b, A.h2.data(), n, I, H, A.g.data());
  project(L.up, L.up_b, A.h2.data(), n, I, H, A.u.data());
  grad::swiglu(A.g.data(), A.u.data(), n * I, A.m.data());
  project(L.down, L.down_b, A.m.data(), n, H, I, tmp.data());
  tensor_sum(tmp);
  block_adapters(l, 1, tmp, A.mlp_out);
  for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];
}

// One GPT-2 layer on the residual stream x (updated in place), its activations into A.
template <class T>
template <class PerLayer>
void DecoderTrainer<T>::layer_forward_gpt2(size_t l, std::vector<T> &x, PerLayer &A) {
  // AW: the attention's width, Hh heads of D (H, except on a tensor parallel rank, which holds
  // its share of the heads and of the MLP's width; the c_proj outputs are then summed over the
  // group, their biases added by one rank).
  const ModelConfig &c = config_;
  const int64_t n = static_cast<int64_t>(x.size()) / c.hidden_size, H = c.hidden_size, D = c.head_dim, Hh = c.n_heads,
                I = c.intermediate_size, AW = Hh * D;
  std::vector<T> tmp, qkv(static_cast<size_t>(n * 3 * AW));
  const Layer &L = layers_[l];
  A.r1.resize(static_cast<size_t>(n));
  A.mean1.resize(static_cast<size_t>(n));
  A.h1.resize(x.size());
  for (int64_t t = 0; t < n; ++t)
    A.r1[static_cast<size_t>(t)] = ops::layer_norm(x.data() + t * H, value(L.norm1), value(L.norm1_b), H, c.norm_eps,
                                                    A.h1.data() + t * H, &A.mean1[static_cast<size_t>(t)]);
  grad::conv1d(A.h1.data(), n, value(L.q), H, 3 * AW, value(L.q_b), qkv.data(), pool_.get());
  A.q.resize(static_cast<size_t>(n * AW));
  A.k.resize(A.q.size());
  A.v.resize(A.q.size());
  for (int64_t t = 0; t < n; ++t) {
    std::copy_n(qkv.begin() + t * 3 * AW, AW, A.q.begin() + t * AW);
    std::copy_n(qkv.begin() + t * 3 * AW + AW, AW, A.k.begin() + t * AW);
    std::copy_n(qkv.begin() + t * 3 * AW + 2 * AW, AW, A.v.begin() + t * AW);
  }
  A.a.resize(A.q.size());
  attend(l, A.q.data(), A.k.data(), A.v.data(), n, Hh, Hh, D, int64_t{0}, int64_t{0}, A.a.data(), A.p);
  tmp.resize(x.size());
  grad::conv1d(A.a.data(), n, value(L.o), AW, H, row_bias(L.o_b), tmp.data(), pool_.get());
  tensor_sum(tmp);
  for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];
  A.x_mid = x;
  A.r2.resize(static_cast<size_t>(n));
  A.mean2.resize(static_cast<size_t>(n));
  A.h2.resize(x.size());
  for (int64_t t = 0; t < n; ++t)
    A.r2[static_cast<size_t>(t)] = ops::layer_norm(x.data() + t * H, value(L.norm2), value(L.norm2_b), H, c.norm_eps,
                                                    A.h2.data() + t * H, &A.mean2[static_cast<size_t>(t)]);
  A.g.resize(static_cast<size_t>(n * I));
  A.m.resize(A.g.size());
  grad::conv1d(A.h2.data(), n, value(L.up), H, I, value(L.up_b), A.g.data(), pool_.get());
  for (size_t i = 0; i < A.g.size(); ++i) A.m[i] = ops::gelu_new(A.g[i]);
  grad::conv1d(A.m.data(), n, value(L.down), I, H, row_bias(L.down_b), tmp.data(), pool_.get());
  tensor_sum(tmp);
  for (size_t i = 0; i < x.size(); ++i) x[i] += tmp[i];
}

template <class T>
std::vector<T> DecoderTrainer<T>::logits(const std::vector<int32_t> &tokens) {
  Acts acts;
  forward(tokens, acts);
  return std::move(acts.logits);
}

template <class T>
double DecoderTrainer<T>::loss(const std::vector<int32_t> &tokens, bool backward, double grad_scale) {
  if (!stage_.embedding || !stage_.head) throw runtime_error("training: loss() needs the whole model (stage_forward on a stage)");
  constexpr int64_t kWhole = -1;
  double value = 0;
  stage_forward(kWhole, tokens, nullptr, backward, grad_scale, &value);
  if (backward) stage_backward(kWhole, nullptr);
  return value;
}

template <class T>
std::vector<T> DecoderTrainer<T>::stage_forward(int64_t id, const std::vector<int32_t> &tokens, const std::vector<T> *x_in,
                                                bool backward, double grad_scale, double *loss) {
  if (stage_.head && tokens.size() < 2) throw runtime_error("training: a sequence needs at least two tokens");
  if (backward && in_flight_.count(id)) throw runtime_error("training: micro-batch " + std::to_string(id) + " is already in flight");
  auto acts = std::make_unique<Acts>();
  forward(tokens, *acts, x_in);
  std::vector<T> out;
  if (!stage_.head) {
    out = std::move(acts->x_final);
  } else {
    const int64_t n = acts->n, V = config_.vocab_size;
    if (static_cast<int64_t>(tokens.size()) != n) throw runtime_error("training: the last stage's tokens do not match its input");
    std::vector<int32_t> targets(tokens.begin() + 1, tokens.end());
    targets.push_back(-1);  // the last position predicts nothing
    std::vector<T> dlogits(backward ? acts->logits.size() : 0);
    int64_t scored = 0;
    const double total =
        tensor_parallel()
            ? tensor_cross_entropy(acts->logits, targets, backward ? dlogits.data() : nullptr, grad_scale, &scored)
            : grad::cross_entropy(acts->logits.data(), targets.data(), n, V, backward ? dlogits.data() : nullptr, grad_scale,
                                  &scored);
    if (loss != nullptr) *loss = total / static_cast<double>(scored);
    acts->dlogits = std::move(dlogits);
    std::vector<T>().swap(acts->logits);
  }
  if (backward) {
    if (stage_.embedding) acts->tokens = tokens;
    in_flight_.emplace(id, std::move(acts));
  }
  return out;
}

template <class T>
std::vector<T> DecoderTrainer<T>::stage_backward(int64_t id, const std::vector<T> *d_out) {
  const auto it = in_flight_.find(id);
  if (it == in_flight_.end()) throw runtime_error("training: micro-batch " + std::to_string(id) + " has no forward pass in flight");
  Acts &acts = *it->second;
  if (!stage_.head && (d_out == nullptr || d_out->size() != static_cast<size_t>(acts.n * config_.hidden_size)))
    throw runtime_error("training: a pipeline stage before the last needs the next stage's input gradient");
  const std::vector<T> &dtop = stage_.head ? acts.dlogits : *d_out;
  if (config_.architecture == Architecture::gpt2) backward_gpt2(acts.tokens, acts, dtop);
  else backward_llama(acts.tokens, acts, dtop);
  std::vector<T> d_in = std::move(acts.d_input);
  in_flight_.erase(it);
  if (layer_done_) layer_done_(-1);
  return d_in;
}

template <class T>
void DecoderTrainer<T>::drop(int64_t id) {
  in_flight_.erase(id);
}

template <class T>
void DecoderTrainer<T>::set_tensor_group(TensorGroup group) {
  if (!sites_.empty() || prefix_tokens_ > 0 || !block_sites_.empty() || quantizer_)
    throw runtime_error("training: tensor parallel training of adapters is not supported yet");
  if (group.vocab_begin < 0 || group.vocab_begin + config_.vocab_size > group.vocab_full)
    throw runtime_error("training: the tensor-parallel vocabulary share lies outside the vocabulary");
  tensor_ = std::move(group);
}

template <class T>
double DecoderTrainer<T>::tensor_cross_entropy(const std::vector<T> &logits, const std::vector<int32_t> &targets, T *dlogits,
                                               double grad_scale, int64_t *count) {
  // Each rank holds the logits of its vocabulary share: the row maxima, the sums of exponentials
  // and the target's logit are summed (the maxima maximised) over the tensor group.
  const int64_t n = static_cast<int64_t>(targets.size()), V = config_.vocab_size, begin = tensor_.vocab_begin;
  int64_t scored = 0;
  for (const int32_t t : targets) scored += t >= 0;
  *count = scored;
  std::vector<T> max(static_cast<size_t>(n)), sum(max.size()), picked(max.size(), T(0));
  for (int64_t r = 0; r < n; ++r) max[static_cast<size_t>(r)] = *std::max_element(logits.begin() + r * V, logits.begin() + (r + 1) * V);
  tensor_.reduce(max.data(), max.size(), true);
  for (int64_t r = 0; r < n; ++r) {
    double s = 0;
    for (int64_t c = 0; c < V; ++c) s += std::exp(static_cast<double>(logits[static_cast<size_t>(r * V + c)] - max[static_cast<size_t>(r)]));
    sum[static_cast<size_t>(r)] = static_cast<T>(s);
    const int64_t local = targets[static_cast<size_t>(r)] - begin;
    if (targets[static_cast<size_t>(r)] >= 0 && local >= 0 && local < V) picked[static_cast<size_t>(r)] = logits[static_cast<size_t>(r * V + local)];
  }
  tensor_.reduce(sum.data(), sum.size(), false);
  tensor_.reduce(picked.data(), picked.size(), false);
  double total = 0;
  for (int64_t r = 0; r < n; ++r) {
    T *drow = dlogits ? dlogits + r * V : nullptr;
    if (targets[static_cast<size_t>(r)] < 0) {
      if (drow) std::fill(drow, drow + V, T(0));
      continue;
    }
    const double lse = std::log(static_cast<double>(sum[static_cast<size_t>(r)])) + static_cast<double>(max[static_cast<size_t>(r)]);
    total += lse - static_cast<double>(picked[static_cast<size_t>(r)]);
    if (drow) {
      const double w = grad_scale / static_cast<double>(scored);
      for (int64_t c = 0; c < V; ++c) drow[c] = static_cast<T>(std::exp(static_cast<double>(logits[static_cast<size_t>(r * V + c)]) - lse) * w);
      const int64_t local = targets[static_cast<size_t>(r)] - begin;
      if (local >= 0 && local < V) drow[local] -= static_cast<T>(w);
    }
  }
  return total;
}

template <class T>
void DecoderTrainer<T>::backward_llama(const std::vector<int32_t> &tokens, Acts &acts, const std::vector<T> &dtop) {
  const ModelConfig &c = config_;
  const int64_t n = acts.n, H = c.hidden_size, D = c.head_dim, Hq = c.n_heads, Hkv = c.n_kv_heads, I = c.intermediate_size,
                V = c.vocab_size;
  // The head, then the final norm (the last stage); a stage before it starts from its output's
  // gradient.
  std::vector<T> dh(static_cast<size_t>(n * H), T(0)), dx(dh.size(), T(0));
  if (stage_.head) {
    grad::linear_backward(dtop.data(), acts.h_final.data(), n, value(head_), V, H, dh.data(),
                          frozen_ ? static_cast<T *>(nullptr) : grad(head_), static_cast<T *>(nullptr), pool_.get());
    tensor_sum(dh);
    for (int64_t t = 0; t < n; ++t)
      grad::rms_norm_backward(dh.data() + t * H, acts.x_final.data() + t * H, value(final_norm_),
                              acts.r_final[static_cast<size_t>(t)], H, dx.data() + t * H, grad(final_norm_));
  } else {
    dx = dtop;
  }
  std::vector<T> dm, dg, du, da, dq, dk, dv, d_block;
  for (size_t l = layers_.size(); l-- > 0;) {
    const Layer &L = layers_[l];
    auto &A = acts.layers[l];
    if (A.dropped()) {  // activation recomputation: this layer's forward again, from its input
      std::vector<T> x = A.x_in;
      layer_forward_llama(l, x, A);
    }
    // MLP: x_out = x_mid + down(swiglu(gate(h2), up(h2))), h2 = norm2(x_mid).
    dm.assign(static_cast<size_t>(n * I), T(0));
    const std::vector<T> &d_mlp = block_adapters_backward(l, 1, A.mlp_out, dx, d_block);
    project_backward(L.down, L.down_b, d_mlp.data(), A.m.data(), n, H, I, dm.data());
    dg.assign(dm.size(), T(0));
    du.assign(dm.size(), T(0));
    grad::swiglu_backward(dm.data(), A.g.data(), A.u.data(), n * I, dg.data(), du.data());
    std::fill(dh.begin(), dh.end(), T(0));
    project_backward(L.gate, L.gate_b, dg.data(), A.h2.data(), n, I, H, dh.data());
    project_backward(L.up, L.up_b, du.data(), A.h2.data(), n, I, H, dh.data());
    tensor_sum(dh);
    for (int64_t t = 0; t < n; ++t)
      grad::rms_norm_backward(dh.data() + t * H, A.x_mid.data() + t * H, value(L.norm2), A.r2[static_cast<size_t>(t)], H,
                              dx.data() + t * H, grad(L.norm2));
    // Attention: x_mid = x_in + o(attention(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm1(x_in).
    da.assign(static_cast<size_t>(n * Hq * D), T(0));
    const std::vector<T> &d_attn = block_adapters_backward(l, 0, A.attn_out, dx, d_block);
    project_backward(L.o, L.o_b, d_attn.data(), A.a.data(), n, H, Hq * D, da.data());
    const int64_t P = prefix_tokens_, kv = Hkv * D;
    dq.assign(da.size(), T(0));
    dk.assign(static_cast<size_t>((P + n) * kv), T(0));
    dv.assign(dk.size(), T(0));
    attend_backward(l, da.data(), A.q.data(), A.k.data(), A.v.data(), A.a.data(), A.p.data(), n, Hq, Hkv, D, P, dq.data(),
                    dk.data(), dv.data());
    for (int64_t t = 0; t < n; ++t) {
      ops::rope(dq.data() + t * Hq * D, Hq, D, P + t, inv_freq_, true);
      ops::rope(dk.data() + (P + t) * kv, Hkv, D, P + t, inv_freq_, true);
    }
    if (P > 0) prefix_backward(l, dk, dv);
    std::fill(dh.begin(), dh.end(), T(0));
    project_backward(L.q, L.q_b, dq.data(), A.h1.data(), n, Hq * D, H, dh.data());
    project_backward(L.k, L.k_b, dk.data() + P * kv, A.h1.data(), n, kv, H, dh.data());
    project_backward(L.v, L.v_b, dv.data() + P * kv, A.h1.data(), n, kv, H, dh.data());
    tensor_sum(dh);
    for (int64_t t = 0; t < n; ++t)
      grad::rms_norm_backward(dh.data() + t * H, A.x_in.data() + t * H, value(L.norm1), A.r1[static_cast<size_t>(t)], H,
                              dx.data() + t * H, grad(L.norm1));
    if (recompute_) A.keep_input_only();
    if (layer_done_) layer_done_(stage_.first + static_cast<int64_t>(l));
  }
  if (!stage_.embedding) {
    acts.d_input = std::move(dx);
    return;
  }
  if (frozen_) return;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t local = tokens[static_cast<size_t>(t)] - tensor_.vocab_begin;  // this rank's rows only
    if (local < 0 || local >= c.vocab_size) continue;
    T *row = grad(embed_) + local * H;
    for (int64_t i = 0; i < H; ++i) row[i] += dx[static_cast<size_t>(t * H + i)];
  }
}

template <class T>
void DecoderTrainer<T>::backward_gpt2(const std::vector<int32_t> &tokens, Acts &acts, const std::vector<T> &dtop) {
  const ModelConfig &c = config_;
  const int64_t n = acts.n, H = c.hidden_size, D = c.head_dim, Hh = c.n_heads, I = c.intermediate_size, V = c.vocab_size,
                AW = Hh * D;
  std::vector<T> dh(static_cast<size_t>(n * H), T(0)), dx(dh.size(), T(0));
  if (stage_.head) {
    grad::linear_backward(dtop.data(), acts.h_final.data(), n, value(head_), V, H, dh.data(), grad(head_),
                          static_cast<T *>(nullptr), pool_.get());
    tensor_sum(dh);  // a vocabulary-parallel head: each rank's share of the logits
    for (int64_t t = 0; t < n; ++t)
      grad::layer_norm_backward(dh.data() + t * H, acts.x_final.data() + t * H, value(final_norm_),
                                acts.mean_final[static_cast<size_t>(t)], acts.r_final[static_cast<size_t>(t)], H,
                                dx.data() + t * H, grad(final_norm_), grad(final_norm_b_));
  } else {
    dx = dtop;
  }
  std::vector<T> dm, dg, da, dq, dk, dv, dqkv;
  for (size_t l = layers_.size(); l-- > 0;) {
    const Layer &L = layers_[l];
    auto &A = acts.layers[l];
    if (A.dropped()) {
      std::vector<T> x = A.x_in;
      layer_forward_gpt2(l, x, A);
    }
    // MLP: x_out = x_mid + c_proj(gelu(c_fc(h2))), h2 = ln_2(x_mid).
    dm.assign(static_cast<size_t>(n * I), T(0));
    grad::conv1d_backward(dx.data(), A.m.data(), n, value(L.down), I, H, dm.data(), grad(L.down), grad(L.down_b), pool_.get());
    dg.resize(dm.size());
    for (size_t i = 0; i < dm.size(); ++i) dg[i] = dm[i] * grad::gelu_new_grad(A.g[i]);
    std::fill(dh.begin(), dh.end(), T(0));
    grad::conv1d_backward(dg.data(), A.h2.data(), n, value(L.up), H, I, dh.data(), grad(L.up), grad(L.up_b), pool_.get());
    tensor_sum(dh);
    for (int64_t t = 0; t < n; ++t)
      grad::layer_norm_backward(dh.data() + t * H, A.x_mid.data() + t * H, value(L.norm2), A.mean2[static_cast<size_t>(t)],
                                A.r2[static_cast<size_t>(t)], H, dx.data() + t * H, grad(L.norm2), grad(L.norm2_b));
    // Attention: x_mid = x_in + c_proj(attention(split(c_attn(h1)))), h1 = ln_1(x_in).
    da.assign(static_cast<size_t>(n * AW), T(0));
    grad::conv1d_backward(dx.data(), A.a.data(), n, value(L.o), AW, H, da.data(), grad(L.o), grad(L.o_b), pool_.get());
    dq.assign(da.size(), T(0));
    dk.assign(da.size(), T(0));
    dv.assign(da.size(), T(0));
    attend_backward(l, da.data(), A.q.data(), A.k.data(), A.v.data(), A.a.data(), A.p.data(), n, Hh, Hh, D, int64_t{0},
                    dq.data(), dk.data(), dv.data());
    dqkv.resize(static_cast<size_t>(n * 3 * AW));
    for (int64_t t = 0; t < n; ++t) {
      std::copy_n(dq.begin() + t * AW, AW, dqkv.begin() + t * 3 * AW);
      std::copy_n(dk.begin() + t * AW, AW, dqkv.begin() + t * 3 * AW + AW);
      std::copy_n(dv.begin() + t * AW, AW, dqkv.begin() + t * 3 * AW + 2 * AW);
    }
    std::fill(dh.begin(), dh.end(), T(0));
    grad::conv1d_backward(dqkv.data(), A.h1.data(), n, value(L.q), H, 3 * AW, dh.data(), grad(L.q), grad(L.q_b), pool_.get());
    tensor_sum(dh);
    for (int64_t t = 0; t < n; ++t)
      grad::layer_norm_backward(dh.data() + t * H, A.x_in.data() + t * H, value(L.norm1), A.mean1[static_cast<size_t>(t)],
                                A.r1[static_cast<size_t>(t)], H, dx.data() + t * H, grad(L.norm1), grad(L.norm1_b));
    if (recompute_) A.keep_input_only();
    if (layer_done_) layer_done_(stage_.first + static_cast<int64_t>(l));
  }
  if (!stage_.embedding) {
    acts.d_input = std::move(dx);
    return;
  }
  for (int64_t t = 0; t < n; ++t) {
    const int64_t local = tokens[static_cast<size_t>(t)] - tensor_.vocab_begin;  // this rank's rows only
    T *row = local >= 0 && local < V ? grad(embed_) + local * H : nullptr, *pos = grad(positions_) + t * H;
    for (int64_t i = 0; i < H; ++i) {
      if (row) row[i] += dx[static_cast<size_t>(t * H + i)];
      pos[i] += dx[static_cast<size_t>(t * H + i)];
    }
  }
}

template <class T>
void AdamW<T>::step(std::vector<TrainParam<T>> &params, double lr) {
  std::vector<ParamView<T>> views;
  for (auto &p : params) views.push_back({p.value.data(), p.grad.data(), p.value.size(), p.shape.size() >= 2});
  step(views, lr);
}

template <class T>
void AdamW<T>::step(const std::vector<ParamView<T>> &params, double lr) {
  if (m_.empty()) {
    for (size_t k = 0; k < params.size(); ++k) {
      m_.emplace_back(owns(k) ? params[k].size : 0, T(0));
      v_.emplace_back(owns(k) ? params[k].size : 0, T(0));
    }
  }
  if (m_.size() != params.size()) throw runtime_error("AdamW: the parameter list changed between steps");
  if (!owned_.empty() && owned_.size() != params.size())
    throw runtime_error("AdamW: the ZeRO ownership mask does not match the parameters");
  ++step_;
  const double b1 = options_.beta1, b2 = options_.beta2;
  const double c1 = 1.0 - std::pow(b1, static_cast<double>(step_)), c2 = 1.0 - std::pow(b2, static_cast<double>(step_));
  for (size_t k = 0; k < params.size(); ++k) {
    if (!owns(k)) continue;
    const auto &p = params[k];
    auto &m = m_[k];
    auto &v = v_[k];
    const double decay = p.decay ? options_.weight_decay : 0.0;
    for (size_t i = 0; i < p.size; ++i) {
      const double g = static_cast<double>(p.grad[i]);
      m[i] = static_cast<T>(b1 * static_cast<double>(m[i]) + (1.0 - b1) * g);
      v[i] = static_cast<T>(b2 * static_cast<double>(v[i]) + (1.0 - b2) * g * g);
      double w = static_cast<double>(p.value[i]) * (1.0 - lr * decay);
      w -= lr * (static_cast<double>(m[i]) / c1) / (std::sqrt(static_cast<double>(v[i]) / c2) + options_.eps);
      p.value[i] = static_cast<T>(w);
    }
  }
}

template <class T>
double clip_grad_norm(const std::vector<ParamView<T>> &params, double max_norm) {
  double sq = 0;
  for (const auto &p : params)
    for (size_t i = 0; i < p.size; ++i) sq += static_cast<double>(p.grad[i]) * static_cast<double>(p.grad[i]);
  const double norm = std::sqrt(sq);
  clip_to_norm(params, norm, max_norm);
  return norm;
}

template <class T>
void clip_to_norm(const std::vector<ParamView<T>> &params, double norm, double max_norm) {
  if (!(norm > max_norm && norm > 0)) return;
  const T scale = static_cast<T>(max_norm / (norm + 1e-6));
  for (const auto &p : params)
    for (size_t i = 0; i < p.size; ++i) p.grad[i] *= scale;
}

template <class T>
void clip_to_norm(std::vector<TrainParam<T>> &params, double norm, double max_norm) {
  std::vector<ParamView<T>> views;
  for (auto &p : params) views.push_back({p.value.data(), p.grad.data(), p.value.size(), false});
  clip_to_norm(views, norm, max_norm);
}

template <class T>
double clip_grad_norm(std::vector<TrainParam<T>> &params, double max_norm) {
  std::vector<ParamView<T>> views;
  for (auto &p : params) views.push_back({p.value.data(), p.grad.data(), p.value.size(), false});
  return clip_grad_norm(views, max_norm);
}

// A DLTensor over float32 host memory (the adapter ABI's view of the trainer's arrays).
struct HostView {
  int64_t shape[2];
  DLTensor t{};
  HostView(const float *data, int64_t rows, int64_t cols) : shape{rows, cols} {
    t.data = const_cast<float *>(data);
    t.device = {kDLCPU, 0};
    t.ndim = 2;
    t.dtype = {kDLFloat, 32, 1};
    t.shape = shape;
  }
};

// Each site's forward (training mode) over x [n, in] into y [n, out], and its backward.
template <class Sites>
void forward_sites(const Sites &sites, const float *x, int64_t n, int64_t in, float *y, int64_t out) {
  HostView xv(x, n, in), yv(y, n, out);
  for (const auto &s : sites) {
    loom_adapter_io io{};
    io.struct_size = sizeof(io);
    io.x = &xv.t;
    io.y = &yv.t;
    io.training = 1;
    s.adapter->check(s.adapter->template vtable<loom_adapter_vtable>()->forward(s.adapter->handle(), s.site, &io), "forward");
  }
}
template <class Sites>
void backward_sites(const Sites &sites, const float *x, const float *dy, float *dx, int64_t n, int64_t in, int64_t out) {
  HostView xv(x, n, in), dyv(dy, n, out), dxv(dx, n, in);
  for (const auto &s : sites) {
    loom_adapter_grad_io io{};
    io.struct_size = sizeof(io);
    io.x = &xv.t;
    io.d_y = &dyv.t;
    io.d_x = &dxv.t;
    s.adapter->check(s.adapter->template vtable<loom_adapter_vtable>()->backward(s.adapter->handle(), s.site, &io), "backward");
  }
}

// What a forward and a backward batch of one causal sequence of n tokens share (the two
// structs name these fields alike).
template <class Batch>
void one_sequence(Batch &b, int64_t layer, int64_t n, detail::View &q, detail::View &k, detail::View &v, detail::View &out,
                  detail::View &offsets) {
  b.struct_size = sizeof(b);
  b.layer = static_cast<int32_t>(layer);
  b.n_seqs = 1;
  b.n_tokens = static_cast<int32_t>(n);
  b.q = q.dl();
  b.k = k.dl();
  b.v = v.dl();
  b.out = out.dl();
  b.seq_offsets = offsets.dl();
  b.causal = 1;
}

template <class T>
void DecoderTrainer<T>::attach_attention(std::shared_ptr<Instance> attention) {
  if constexpr (!std::is_same_v<T, float>) {
    (void)attention;
    throw runtime_error("training: an attention component trains in float32 only");
  } else {
    const auto *vt = attention->vtable<loom_attention_vtable>();
    const std::string who = attention->slot() + " (" + attention->desc().name + ")";
    if (vt->backward == nullptr) throw runtime_error(who + ": the attention component has no backward; it cannot train");
    if (tensor_parallel()) throw runtime_error(who + ": training through an attention component with tensor parallelism is not supported yet");
    if (prefix_tokens_ > 0) throw runtime_error(who + ": training through an attention component with a prefix adapter is not supported yet");
    const loom_attention_config c = attention_config_for(config_, config_.max_positions, detail::dtype_of<float>(), {kDLCPU, 0});
    const loom_kv_layout layout = prepare_attention_layout(*attention, c);
    if (layout.block_size < 1 || layout.bytes_per_block == 0)
      throw runtime_error(who + ": the attention component keeps no KV cache; training runs its forward over one");
    if (layout.cache_dtype.code != kDLFloat || layout.cache_dtype.bits != 32)
      throw runtime_error(who + ": its KV cache does not store float32 (kv_dtype): the forward would round k and v, which "
                                "the gradient does not see");
    if (layout.window != c.sliding_window)
      throw runtime_error(who + ": its sliding window (" + std::to_string(layout.window) + ") is not the model's (" +
                          std::to_string(c.sliding_window) + "): the model would train on a window it does not run with");
    attention_ = std::move(attention);
    attention_layout_ = layout;
  }
}

template <class T>
void DecoderTrainer<T>::attend(size_t l, const T *q, const T *k, const T *v, int64_t n, int64_t Hq, int64_t Hkv, int64_t D,
                               int64_t window, int64_t P, T *out, std::vector<T> &p) {
  if constexpr (std::is_same_v<T, float>) {
    if (attention_) {  // (no prefix adapter with one: attach_attention and attach_adapters refuse)
      // The component's forward of a fresh sequence at position 0 over a scratch cache of its
      // own layout (blocks 0, 1, ... of the sequence).
      const int64_t B = attention_layout_.block_size, blocks = (n + B - 1) / B;
      attention_pool_.resize(static_cast<size_t>(blocks) * attention_layout_.bytes_per_block);
      std::vector<int32_t> table(static_cast<size_t>(blocks)), offsets{0, static_cast<int32_t>(n)}, positions{0};
      for (int64_t b = 0; b < blocks; ++b) table[static_cast<size_t>(b)] = static_cast<int32_t>(b);
      const DLDataType f32 = detail::dtype_of<float>(), i32 = detail::dtype_of<int32_t>(), u8 = detail::dtype_of<uint8_t>();
      detail::View q3(q, f32, {n, Hq, D}), k3(k, f32, {n, Hkv, D}), v3(v, f32, {n, Hkv, D}), o3(out, f32, {n, Hq, D}),
          off(offsets.data(), i32, {2}), pos(positions.data(), i32, {1}), tab(table.data(), i32, {1, blocks}),
          pool(attention_pool_.data(), u8, {blocks, static_cast<int64_t>(attention_layout_.bytes_per_block)});
      loom_attention_batch b{};
      one_sequence(b, stage_.first + static_cast<int64_t>(l), n, q3, k3, v3, o3, off);
      b.seq_positions = pos.dl();
      b.block_table = tab.dl();
      b.kv_pool = pool.dl();
      attention_->check(attention_->vtable<loom_attention_vtable>()->forward(attention_->handle(), &b), "forward");
      return;
    }
  }
  p.resize(static_cast<size_t>(Hq * n * (P + n)));
  grad::attention(q, k, v, n, Hq, Hkv, D, window, out, p.data(), pool_.get(), P);
}

template <class T>
void DecoderTrainer<T>::attend_backward(size_t l, const T *d_out, const T *q, const T *k, const T *v, const T *out, const T *p,
                                        int64_t n, int64_t Hq, int64_t Hkv, int64_t D, int64_t P, T *dq, T *dk, T *dv) {
  if constexpr (std::is_same_v<T, float>) {
    if (attention_) {
      const DLDataType f32 = detail::dtype_of<float>(), i32 = detail::dtype_of<int32_t>();
      std::vector<int32_t> offsets{0, static_cast<int32_t>(n)};
      detail::View q3(q, f32, {n, Hq, D}), k3(k, f32, {n, Hkv, D}), v3(v, f32, {n, Hkv, D}), o3(out, f32, {n, Hq, D}),
          g3(d_out, f32, {n, Hq, D}), dq3(dq, f32, {n, Hq, D}), dk3(dk, f32, {n, Hkv, D}), dv3(dv, f32, {n, Hkv, D}),
          off(offsets.data(), i32, {2});
      loom_attention_backward_batch b{};
      one_sequence(b, stage_.first + static_cast<int64_t>(l), n, q3, k3, v3, o3, off);
      b.d_out = g3.dl();
      b.d_q = dq3.dl();
      b.d_k = dk3.dl();
      b.d_v = dv3.dl();
      attention_->check(attention_->vtable<loom_attention_vtable>()->backward(attention_->handle(), &b), "backward");
      return;
    }
  }
  (void)l;
  (void)out;
  grad::attention_backward(d_out, q, k, v, p, n, Hq, Hkv, D, dq, dk, dv, pool_.get(), P);
}

template <class T>
void DecoderTrainer<T>::attach_adapters(const std::vector<std::shared_ptr<Instance>> &adapters) {
  if constexpr (!std::is_same_v<T, float>) {
    if (!adapters.empty()) throw runtime_error("training: adapters train in float32 only");
  } else {
    if (!adapters.empty() && config_.architecture == Architecture::gpt2)
      throw runtime_error("training: adapters on GPT-2 are not supported yet (the Llama family's linears are)");
    const DLDataType f32{kDLFloat, 32, 1};
    // "model.layers.0.self_attn.o_proj.weight" -> "model.layers.0.self_attn.o_proj", and with
    // `block` the module around it ("model.layers.0.self_attn").
    auto module_of = [&](size_t w, bool block) {
      std::string name = params_[w].name.substr(0, params_[w].name.size() - std::string(".weight").size());
      return block ? name.substr(0, name.rfind('.')) : name;
    };
    block_sites_.resize(layers_.size());
    for (const auto &adapter : adapters) {
      const auto *vt = adapter->vtable<loom_adapter_vtable>();
      if (vt->backward == nullptr)
        throw runtime_error(adapter->slot() + " (" + adapter->desc().name + "): the adapter has no backward; it cannot train");
      int attached = 0;
      auto attach = [&](const std::string &module, int64_t in, int64_t out, loom_adapter_site_kind kind) {
        ++attached;
        return Site{adapter.get(), attach_adapter_site(*adapter, module, in, out, f32, {kDLCPU, 0}, kind)};
      };
      // Linear sites: the layers' projections the adapter targets.
      for (const Layer &L : layers_)
        for (const size_t w : {L.q, L.k, L.v, L.o, L.gate, L.up, L.down})
          if (const std::string module = module_of(w, false); vt->targets(adapter->handle(), module.c_str()))
            sites_[w].push_back(attach(module, params_[w].shape[1], params_[w].shape[0], LOOM_ADAPTER_SITE_LINEAR));
      // Block sites (ABI 1.6): each layer's attention and MLP outputs, offered to libraries that
      // know the site field.
      if (adapter->library().descriptor().abi_minor >= 6)
        for (size_t l = 0; l < layers_.size(); ++l)
          for (size_t b = 0; b < 2; ++b)
            if (const std::string module = module_of(b == 0 ? layers_[l].o : layers_[l].down, true);
                vt->targets(adapter->handle(), module.c_str()))
              block_sites_[l][b].push_back(attach(module, config_.hidden_size, config_.hidden_size, LOOM_ADAPTER_SITE_BLOCK));
      // Prefix sites (ABI 1.6): each layer's attention, for instances that say how many virtual
      // tokens they add (loom.adapter.prefix/1).
      if (const int64_t virtual_n = adapter_virtual_tokens(*adapter); virtual_n > 0) {
        if (prefix_tokens_ > 0) throw runtime_error(adapter->slot() + ": one prefix adapter at a time");
        if (attention_)
          throw runtime_error(adapter->slot() + " (" + adapter->desc().name + "): a prefix adapter with training through an "
                              "attention component is not supported yet");
        if (config_.sliding_window > 0)
          throw runtime_error(adapter->slot() + " (" + adapter->desc().name + "): prefix tuning on a sliding-window model is not supported");
        if (virtual_n >= config_.max_positions)
          throw runtime_error(adapter->slot() + ": " + std::to_string(virtual_n) + " virtual tokens do not fit the model's positions");
        prefix_sites_.clear();
        for (const Layer &L : layers_)
          prefix_sites_.push_back(attach(module_of(L.o, true), config_.hidden_size, 2 * config_.n_kv_heads * config_.head_dim,
                                         LOOM_ADAPTER_SITE_ATTENTION_PREFIX));
        prefix_tokens_ = virtual_n;
      }
      if (attached == 0)
        throw runtime_error(adapter->slot() + " (" + adapter->desc().name +
                            "): its target modules match none of the model's linears or blocks");
      load_adapter_weights(*adapter);  // continue training a saved adapter ([[adapter]] weights)
    }
  }
}

template <class T>
DecoderTrainer<T>::~DecoderTrainer() {
  if (!quantizer_) return;
  auto vt = quantizer_->vtable<loom_quantizer_vtable>();
  for (auto &[w, q] : qweights_) vt->free_weight(quantizer_->handle(), q);
}

template <class T>
void DecoderTrainer<T>::quantize_base(std::shared_ptr<Instance> quantizer) {
  if constexpr (!std::is_same_v<T, float>) {
    (void)quantizer;
    throw runtime_error("training: a quantized base trains in float32 only");
  } else {
    if (!frozen_) throw runtime_error("training: a quantized base is frozen (train an adapter over it)");
    if (config_.architecture == Architecture::gpt2)
      throw runtime_error("training: a quantized GPT-2 base is not supported (the Llama family's is)");
    if (quantizer_) throw runtime_error("training: the base is quantized already");
    auto vt = quantizer->vtable<loom_quantizer_vtable>();
    if (vt->dequantize == nullptr)
      throw runtime_error(quantizer->slot() + " (" + quantizer->desc().name + "): the quantizer cannot dequantize, which the backward pass needs");
    quantizer_ = quantizer;
    for (const Layer &L : layers_)
      for (const size_t w : {L.q, L.k, L.v, L.o, L.gate, L.up, L.down}) {
        TrainParam<T> &p = params_[w];
        const std::string module = p.name.substr(0, p.name.size() - std::string(".weight").size());
        HostView weight(p.value.data(), p.shape[0], p.shape[1]);
        loom_quantize_request r{};
        r.struct_size = sizeof(r);
        r.module_name = module.c_str();
        r.weight = &weight.t;
        r.calibration = nullptr;
        r.target_device = {kDLCPU, 0};
        loom_qweight *q = nullptr;
        quantizer->check(vt->quantize(quantizer->handle(), &r, &q), ("quantize " + module).c_str());
        qweights_[w] = q;
        // The float copy goes: what QLoRA saves. (The shape stays for the adapters' sites.)
        std::vector<T>().swap(p.value);
        std::vector<T>().swap(p.grad);
      }
  }
}

template <class T>
void DecoderTrainer<T>::prefix_forward(size_t l, std::vector<T> &k, std::vector<T> &v) {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t P = prefix_tokens_, kv = config_.n_kv_heads * config_.head_dim;
    std::vector<float> y(static_cast<size_t>(P * 2 * kv), 0.0f);
    HostView yv(y.data(), P, 2 * kv);
    loom_adapter_io io{};
    io.struct_size = sizeof(io);
    io.x = nullptr;
    io.y = &yv.t;
    io.training = 1;
    Instance *a = prefix_sites_[l].adapter;
    a->check(a->vtable<loom_adapter_vtable>()->forward(a->handle(), prefix_sites_[l].site, &io), "forward");
    for (int64_t t = 0; t < P; ++t) {  // row t: its key, then its value
      std::copy_n(y.begin() + t * 2 * kv, kv, k.begin() + t * kv);
      std::copy_n(y.begin() + t * 2 * kv + kv, kv, v.begin() + t * kv);
    }
  } else {
    (void)l, (void)k, (void)v;
  }
}

template <class T>
void DecoderTrainer<T>::prefix_backward(size_t l, const std::vector<T> &dk, const std::vector<T> &dv) {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t P = prefix_tokens_, kv = config_.n_kv_heads * config_.head_dim;
    std::vector<float> dy(static_cast<size_t>(P * 2 * kv));
    for (int64_t t = 0; t < P; ++t) {
      std::copy_n(dk.begin() + t * kv, kv, dy.begin() + t * 2 * kv);
      std::copy_n(dv.begin() + t * kv, kv, dy.begin() + t * 2 * kv + kv);
    }
    HostView dyv(dy.data(), P, 2 * kv);
    loom_adapter_grad_io io{};
    io.struct_size = sizeof(io);
    io.d_y = &dyv.t;
    Instance *a = prefix_sites_[l].adapter;
    a->check(a->vtable<loom_adapter_vtable>()->backward(a->handle(), prefix_sites_[l].site, &io), "backward");
  } else {
    (void)l, (void)dk, (void)dv;
  }
}

template <class T>
void DecoderTrainer<T>::block_adapters(size_t l, int block, std::vector<T> &out, std::vector<T> &kept) {
  if constexpr (std::is_same_v<T, float>) {
    if (block_sites_.empty() || block_sites_[l][static_cast<size_t>(block)].empty()) return;
    kept = out;  // the block's own output: every adapter's input, and the backward's
    const int64_t H = config_.hidden_size, n = static_cast<int64_t>(out.size()) / H;
    forward_sites(block_sites_[l][static_cast<size_t>(block)], kept.data(), n, H, out.data(), H);
  } else {
    (void)l, (void)block, (void)out, (void)kept;
  }
}

template <class T>
const std::vector<T> &DecoderTrainer<T>::block_adapters_backward(size_t l, int block, const std::vector<T> &kept,
                                                                 const std::vector<T> &d_out, std::vector<T> &d_block) {
  if constexpr (std::is_same_v<T, float>) {
    if (block_sites_.empty() || block_sites_[l][static_cast<size_t>(block)].empty()) return d_out;
    d_block = d_out;  // the identity's share; each adapter adds its own
    const int64_t H = config_.hidden_size, n = static_cast<int64_t>(d_out.size()) / H;
    backward_sites(block_sites_[l][static_cast<size_t>(block)], kept.data(), d_out.data(), d_block.data(), n, H, H);
    return d_block;
  } else {
    (void)l, (void)block, (void)kept, (void)d_block;
    return d_out;
  }
}

template <class T>
void DecoderTrainer<T>::project(size_t w, size_t b, const T *x, int64_t n, int64_t out, int64_t in, T *y) {
  if constexpr (std::is_same_v<T, float>) {
    if (const auto q = qweights_.find(w); q != qweights_.end()) {
      HostView xv(x, n, in), yv(y, n, out);
      int64_t bias_shape[1] = {out};
      DLTensor bias{};
      if (b != kNone) {
        bias.data = value(b);
        bias.device = {kDLCPU, 0};
        bias.ndim = 1;
        bias.dtype = {kDLFloat, 32, 1};
        bias.shape = bias_shape;
      }
      quantizer_->check(quantizer_->vtable<loom_quantizer_vtable>()->linear(quantizer_->handle(), q->second, &xv.t,
                                                                            b == kNone ? nullptr : &bias, &yv.t),
                        "linear");
    } else {
      grad::linear(x, n, value(w), out, in, b == kNone ? nullptr : value(b), y, pool_.get());
    }
  } else {
    grad::linear(x, n, value(w), out, in, b == kNone ? nullptr : value(b), y, pool_.get());
  }
  if constexpr (std::is_same_v<T, float>) {
    if (const auto it = sites_.find(w); it != sites_.end()) forward_sites(it->second, x, n, in, y, out);
  }
}

template <class T>
void DecoderTrainer<T>::project_backward(size_t w, size_t b, const T *dy, const T *x, int64_t n, int64_t out, int64_t in,
                                         T *dx) {
  const T *weight = value(w);
  if constexpr (std::is_same_v<T, float>) {
    if (const auto q = qweights_.find(w); q != qweights_.end()) {
      dequantized_.resize(static_cast<size_t>(out * in));
      HostView wv(dequantized_.data(), out, in);
      quantizer_->check(quantizer_->vtable<loom_quantizer_vtable>()->dequantize(quantizer_->handle(), q->second, &wv.t),
                        "dequantize");
      weight = dequantized_.data();
    }
  }
  grad::linear_backward(dy, x, n, weight, out, in, dx, frozen_ ? nullptr : grad(w),
                        frozen_ || b == kNone ? nullptr : grad(b), pool_.get());
  if constexpr (std::is_same_v<T, float>) {
    if (const auto it = sites_.find(w); it != sites_.end()) backward_sites(it->second, x, dy, dx, n, in, out);
  }
}

template class DecoderTrainer<float>;
template class DecoderTrainer<double>;
template class AdamW<float>;
template class AdamW<double>;
template double clip_grad_norm<float>(std::vector<TrainParam<float>> &, double);
template double clip_grad_norm<double>(std::vector<TrainParam<double>> &, double);
template double clip_grad_norm<float>(const std::vector<ParamView<float>> &, double);
template void clip_to_norm<float>(std::vector<TrainParam<float>> &, double, double);

}  // namespace loom
