#include "loom/core/reference_model.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "loom/core/error.hpp"
#include "transformer_ops.hpp"

namespace loom {

namespace {

using Matrix = std::vector<float>; // row-major, shape carried by the caller

// y[T, out] = x[T, in] W[out, in]^T (+ b[out])
Matrix linear(const Matrix &x, int64_t T, const HostWeight &W, const HostWeight *b) {
  Matrix y(static_cast<size_t>(T * W.shape[0]));
  ops::linear(x.data(), T, W.values.data(), W.shape[0], W.shape[1], b ? b->values.data() : nullptr, y.data());
  return y;
}

// GPT-2's Conv1D: y[T, out] = x[T, in] W[in, out] + b[out]
Matrix conv1d(const Matrix &x, int64_t T, const HostWeight &W, const HostWeight &b) {
  const int64_t in = W.shape[0], out = W.shape[1];
  Matrix y(static_cast<size_t>(T * out));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < out; ++o) {
      float acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += x[static_cast<size_t>(t * in + i)] * W.values[static_cast<size_t>(i * out + o)];
      y[static_cast<size_t>(t * out + o)] = acc + b.values[static_cast<size_t>(o)];
    }
  return y;
}

// x[T, H] -> x / sqrt(mean(x^2) + eps) * w
Matrix rms_norm(const Matrix &x, int64_t T, int64_t H, const HostWeight &w, double eps) {
  Matrix y(x.size());
  for (int64_t t = 0; t < T; ++t) ops::rms_norm(x.data() + t * H, w.values.data(), H, eps, y.data() + t * H);
  return y;
}

// x[T, H] -> (x - mean) / sqrt(var + eps) * w + b
Matrix layer_norm(const Matrix &x, int64_t T, int64_t H, const HostWeight &w, const HostWeight &b, double eps) {
  Matrix y(x.size());
  for (int64_t t = 0; t < T; ++t)
    ops::layer_norm(x.data() + t * H, w.values.data(), b.values.data(), H, eps, y.data() + t * H);
  return y;
}

// Rotary embedding in place on x[T, heads, D], token t at position t.
void apply_rope(Matrix &x, int64_t T, int64_t heads, int64_t D, const std::vector<double> &inv_freq) {
  for (int64_t t = 0; t < T; ++t) ops::rope(x.data() + t * heads * D, heads, D, t, inv_freq);
}

// Causal attention. q[T, Hq, D], k/v[T, Hkv, D] -> out[T, Hq, D]; key j is visible to query i
// when j <= i and, with a sliding window W > 0, i - j < W.
Matrix attention(const Matrix &q, const Matrix &k, const Matrix &v, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                 int64_t window) {
  Matrix out(static_cast<size_t>(T * Hq * D), 0.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> p(static_cast<size_t>(T));
  for (int64_t h = 0; h < Hq; ++h) {
    const int64_t kh = h / (Hq / Hkv);
    for (int64_t i = 0; i < T; ++i) {
      const int64_t first = window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
      float max = -INFINITY;
      for (int64_t j = first; j <= i; ++j) {
        float s = 0;
        for (int64_t d = 0; d < D; ++d) s += q[static_cast<size_t>((i * Hq + h) * D + d)] * k[static_cast<size_t>((j * Hkv + kh) * D + d)];
        p[static_cast<size_t>(j)] = s * scale;
        max = std::max(max, p[static_cast<size_t>(j)]);
      }
      float sum = 0;
      for (int64_t j = first; j <= i; ++j) sum += (p[static_cast<size_t>(j)] = std::exp(p[static_cast<size_t>(j)] - max));
      for (int64_t j = first; j <= i; ++j) {
        float w = p[static_cast<size_t>(j)] / sum;
        for (int64_t d = 0; d < D; ++d)
          out[static_cast<size_t>((i * Hq + h) * D + d)] += w * v[static_cast<size_t>((j * Hkv + kh) * D + d)];
      }
    }
  }
  return out;
}

void add_into(Matrix &x, const Matrix &y) {
  for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
}

} // namespace

std::vector<double> rope_inv_freq(const ModelConfig &config) {
  std::vector<double> out;
  const int64_t D = config.head_dim;
  const RopeConfig &r = config.rope;
  for (int64_t i = 0; i < D / 2; ++i) {
    // As transformers: float32 base ** (2i / D).
    float f = 1.0f / std::pow(static_cast<float>(r.theta), static_cast<float>(2 * i) / static_cast<float>(D));
    double freq = f;
    if (r.type == "llama3") {
      const double low_wavelen = static_cast<double>(r.original_max_positions) / r.low_freq_factor;
      const double high_wavelen = static_cast<double>(r.original_max_positions) / r.high_freq_factor;
      const double wavelen = 2 * std::numbers::pi / freq;
      if (wavelen > low_wavelen) {
        freq = freq / r.factor;
      } else if (wavelen >= high_wavelen) { // between the two: interpolate
        double smooth = (static_cast<double>(r.original_max_positions) / wavelen - r.low_freq_factor) /
                        (r.high_freq_factor - r.low_freq_factor);
        freq = (1 - smooth) * freq / r.factor + smooth * freq;
      }
    }
    out.push_back(static_cast<float>(freq));
  }
  return out;
}

ReferenceModel::ReferenceModel(ModelConfig config, ModelWeights weights)
    : config_(std::move(config)), weights_(std::move(weights)) {
  if (config_.architecture != Architecture::gpt2) inv_freq_ = rope_inv_freq(config_);
}

ReferenceModel ReferenceModel::load(const std::filesystem::path &model_dir) {
  ModelConfig config = load_model_config(model_dir);
  SafetensorsIndex checkpoint = SafetensorsIndex::open_model_dir(model_dir);
  ModelWeights weights = ModelWeights::load(config, checkpoint);
  return ReferenceModel(std::move(config), std::move(weights));
}

std::vector<float> ReferenceModel::forward(const std::vector<int32_t> &tokens) const {
  const ModelConfig &c = config_;
  const int64_t T = static_cast<int64_t>(tokens.size()), H = c.hidden_size, D = c.head_dim;
  if (T == 0) return {};
  if (T > c.max_positions)
    throw runtime_error(std::to_string(T) + " tokens exceed the model's " + std::to_string(c.max_positions) + " positions");
  for (int32_t t : tokens)
    if (t < 0 || t >= c.vocab_size) throw runtime_error("token " + std::to_string(t) + " is outside the vocabulary");
  auto W = [&](const std::string &name) -> const HostWeight & { return weights_.at(name); };
  auto maybe = [&](const std::string &name) -> const HostWeight * { return weights_.contains(name) ? &weights_.at(name) : nullptr; };

  Matrix x(static_cast<size_t>(T * H)); // the residual stream [T, H]
  const bool gpt2 = c.architecture == Architecture::gpt2;
  const HostWeight &embed = W(gpt2 ? "wte.weight" : "model.embed_tokens.weight");
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < H; ++i) {
      float v = embed.values[static_cast<size_t>(tokens[static_cast<size_t>(t)] * H + i)];
      if (gpt2) v += W("wpe.weight").values[static_cast<size_t>(t * H + i)];
      x[static_cast<size_t>(t * H + i)] = v;
    }

  for (int64_t l = 0; l < c.n_layers; ++l) {
    if (gpt2) {
      const std::string p = "h." + std::to_string(l) + ".";
      Matrix h = layer_norm(x, T, H, W(p + "ln_1.weight"), W(p + "ln_1.bias"), c.norm_eps);
      Matrix qkv = conv1d(h, T, W(p + "attn.c_attn.weight"), W(p + "attn.c_attn.bias")); // [T, 3H]
      Matrix q(static_cast<size_t>(T * H)), k(q.size()), v(q.size());
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < H; ++i) {
          q[static_cast<size_t>(t * H + i)] = qkv[static_cast<size_t>(t * 3 * H + i)];
          k[static_cast<size_t>(t * H + i)] = qkv[static_cast<size_t>(t * 3 * H + H + i)];
          v[static_cast<size_t>(t * H + i)] = qkv[static_cast<size_t>(t * 3 * H + 2 * H + i)];
        }
      Matrix a = attention(q, k, v, T, c.n_heads, c.n_heads, D, 0);
      add_into(x, conv1d(a, T, W(p + "attn.c_proj.weight"), W(p + "attn.c_proj.bias")));
      h = layer_norm(x, T, H, W(p + "ln_2.weight"), W(p + "ln_2.bias"), c.norm_eps);
      Matrix f = conv1d(h, T, W(p + "mlp.c_fc.weight"), W(p + "mlp.c_fc.bias"));
      for (float &e : f) e = ops::gelu_new(e);
      add_into(x, conv1d(f, T, W(p + "mlp.c_proj.weight"), W(p + "mlp.c_proj.bias")));
      continue;
    }
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Matrix h = rms_norm(x, T, H, W(p + "input_layernorm.weight"), c.norm_eps);
    Matrix q = linear(h, T, W(p + "self_attn.q_proj.weight"), maybe(p + "self_attn.q_proj.bias"));
    Matrix k = linear(h, T, W(p + "self_attn.k_proj.weight"), maybe(p + "self_attn.k_proj.bias"));
    Matrix v = linear(h, T, W(p + "self_attn.v_proj.weight"), maybe(p + "self_attn.v_proj.bias"));
    apply_rope(q, T, c.n_heads, D, inv_freq_);
    apply_rope(k, T, c.n_kv_heads, D, inv_freq_);
    Matrix a = attention(q, k, v, T, c.n_heads, c.n_kv_heads, D, c.sliding_window);
    add_into(x, linear(a, T, W(p + "self_attn.o_proj.weight"), maybe(p + "self_attn.o_proj.bias")));
    h = rms_norm(x, T, H, W(p + "post_attention_layernorm.weight"), c.norm_eps);
    Matrix g = linear(h, T, W(p + "mlp.gate_proj.weight"), maybe(p + "mlp.gate_proj.bias"));
    Matrix u = linear(h, T, W(p + "mlp.up_proj.weight"), maybe(p + "mlp.up_proj.bias"));
    for (size_t i = 0; i < g.size(); ++i) g[i] = ops::silu(g[i]) * u[i];
    add_into(x, linear(g, T, W(p + "mlp.down_proj.weight"), maybe(p + "mlp.down_proj.bias")));
  }
  Matrix h = gpt2 ? layer_norm(x, T, H, W("ln_f.weight"), W("ln_f.bias"), c.norm_eps)
                  : rms_norm(x, T, H, W("model.norm.weight"), c.norm_eps);
  const HostWeight &head = c.tie_word_embeddings ? embed : W("lm_head.weight");
  return linear(h, T, head, nullptr);
}

std::vector<int32_t> ReferenceModel::greedy(const std::vector<int32_t> &prompt, int n) const {
  std::vector<int32_t> seq = prompt, out;
  for (int i = 0; i < n; ++i) {
    std::vector<float> logits = forward(seq);
    const float *last = logits.data() + (seq.size() - 1) * static_cast<size_t>(config_.vocab_size);
    int32_t token = static_cast<int32_t>(std::max_element(last, last + config_.vocab_size) - last);
    seq.push_back(token);
    out.push_back(token);
  }
  return out;
}

} // namespace loom
