// Adapter component `bottleneck` (Houlsby et al. 2019): a small MLP on a block's output, added
// before the residual, on the block sites of ABI 1.6 (after attention's o_proj, after the MLP's
// down_proj). CPU float32.
//   per targeted block of width H: down [m, H] + b_down [m], up [H, m] + b_up [H]
//   forward:  y += scale * (up(act(down x + b_down)) + b_up)
//   init:     down ~ U(-1/sqrt(H), 1/sqrt(H)), up = 0, biases 0: a fresh adapter is the identity
//   names:    base_model.model.<block>.adapter_down.weight / .bias, .adapter_up.weight / .bias
// It cannot be merged into base weights (the activation is not linear).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "loom/loom_plugin_api.h"
#include "loom_counter_rng.hpp"
#include "loom_adapter_glue.hpp"
#include "loom_plugin_util.hpp"

struct loom_adapter_site {
  std::string module;
  int64_t width = 0;                            // H
  std::vector<float> down, b_down, up, b_up;    // [m, H], [m], [H, m], [H]
  std::vector<float> d_down, d_b_down, d_up, d_b_up;
};

namespace loomp::bottleneck {
namespace {

constexpr const char* kPrefix = "base_model.model.";

enum class Act { relu, gelu, silu };

struct Bottleneck {
  static constexpr const char* kName = "bottleneck";
  const loom_host_api* host;
  loom_host_ctx* ctx;
  int64_t size;
  float scale;
  Act act;
  uint64_t seed;
  std::vector<std::string> targets;
  std::vector<std::unique_ptr<loom_adapter_site>> sites;

  Bottleneck(const loom_host_api* h, loom_host_ctx* c)
      : host(h), ctx(c), size(cfg_int(h, c, "size")), scale(static_cast<float>(cfg_float(h, c, "scale"))),
        act(Act::relu), seed(static_cast<uint64_t>(cfg_int(h, c, "seed"))), targets(cfg_string_array(h, c, "target_modules")) {
    if (size <= 0 || size > 65536) invalid_param("size", "bottleneck: size must be in [1, 65536], got " + std::to_string(size));
    if (!std::isfinite(scale)) invalid_param("scale", "bottleneck: scale must be finite");
    const std::string a = cfg_string(h, c, "activation");
    if (a == "relu") act = Act::relu;
    else if (a == "gelu") act = Act::gelu;
    else if (a == "silu") act = Act::silu;
    else invalid_param("activation", "bottleneck: activation must be \"relu\", \"gelu\" or \"silu\", got \"" + a + "\"");
    if (targets.empty()) invalid_param("target_modules", "bottleneck: target_modules is empty; the adapter would apply nowhere");
  }

  bool matches(const std::string& name) const {
    const auto dot = name.rfind('.');
    const std::string last = dot == std::string::npos ? name : name.substr(dot + 1);
    return std::any_of(targets.begin(), targets.end(), [&](const std::string& t) { return t == last || t == name; });
  }
  loom_adapter_site* find(const std::string& module) const {
    for (const auto& s : sites)
      if (s->module == module) return s.get();
    return nullptr;
  }

  // The activation and its derivative at h (gelu: the tanh approximation, as GPT-2's).
  float f(float h) const {
    switch (act) {
      case Act::relu: return h > 0.0f ? h : 0.0f;
      case Act::gelu: return 0.5f * h * (1.0f + std::tanh(0.7978845608f * (h + 0.044715f * h * h * h)));
      case Act::silu: return h / (1.0f + std::exp(-h));
    }
    return h;
  }
  float df(float h) const {
    switch (act) {
      case Act::relu: return h > 0.0f ? 1.0f : 0.0f;
      case Act::gelu: {
        const float u = 0.7978845608f * (h + 0.044715f * h * h * h), t = std::tanh(u);
        return 0.5f * (1.0f + t) + 0.5f * h * (1.0f - t * t) * 0.7978845608f * (1.0f + 3.0f * 0.044715f * h * h);
      }
      case Act::silu: {
        const float s = 1.0f / (1.0f + std::exp(-h));
        return s * (1.0f + h * (1.0f - s));
      }
    }
    return 1.0f;
  }
};

void attach(Bottleneck& B, const loom_adapter_module* mp, loom_adapter_site** out) {
  const loom_adapter_module& m = *mp;
  const std::string name = m.module_name;
  if (!LOOM_HAS_FIELD(mp, loom_adapter_module, site) || m.site != LOOM_ADAPTER_SITE_BLOCK)
    invalid("bottleneck: '" + name + "' is not a block's output; target blocks (self_attn, mlp)");
  if (m.in_features <= 0 || m.in_features != m.out_features)
    invalid("bottleneck: block '" + name + "' must have equal, positive in and out features");
  if (!is_f32(m.dtype)) unsupported("bottleneck: only float32 blocks are supported");
  if (m.device.device_type != kDLCPU) unsupported("bottleneck: only CPU blocks are supported");
  if (!B.matches(name)) invalid("bottleneck: block '" + name + "' is not targeted");
  if (B.find(name)) invalid("bottleneck: block '" + name + "' is already attached");
  auto s = std::make_unique<loom_adapter_site>();
  s->module = name;
  s->width = m.in_features;
  const size_t H = static_cast<size_t>(s->width), M = static_cast<size_t>(B.size);
  s->down.resize(M * H);
  s->b_down.assign(M, 0.0f);
  s->up.assign(H * M, 0.0f);
  s->b_up.assign(H, 0.0f);
  s->d_down.assign(M * H, 0.0f);
  s->d_b_down.assign(M, 0.0f);
  s->d_up.assign(H * M, 0.0f);
  s->d_b_up.assign(H, 0.0f);
  const float bound = 1.0f / std::sqrt(static_cast<float>(H));
  const uint64_t stream = fnv1a(name);
  for (size_t i = 0; i < s->down.size(); ++i) s->down[i] = (2.0f * uniform01(B.seed, stream, i) - 1.0f) * bound;
  *out = s.get();
  B.sites.push_back(std::move(s));
}

int64_t check_rows(const loom_adapter_site& s, const DLTensor* x, const DLTensor* row_mask) {
  check_f32(x, "x", {-1, s.width});
  const int64_t n = x->shape[0];
  if (row_mask != nullptr) check_i32(row_mask, "row_mask", {n});
  return n;
}
bool row_on(const DLTensor* row_mask, int64_t i) { return row_mask == nullptr || data_of<int32_t>(*row_mask)[i] != 0; }

// h = down x + b_down for one row.
void hidden(const Bottleneck& B, const loom_adapter_site& s, const float* x, float* h) {
  for (int64_t k = 0; k < B.size; ++k) {
    float acc = s.b_down[static_cast<size_t>(k)];
    const float* w = s.down.data() + k * s.width;
    for (int64_t j = 0; j < s.width; ++j) acc += w[j] * x[j];
    h[k] = acc;
  }
}

void forward(Bottleneck& B, loom_adapter_site& s, const loom_adapter_io& io) {
  const int64_t n = check_rows(s, io.x, io.row_mask);
  check_f32(io.y, "y", {n, s.width});
  const float* x = data_of<float>(*io.x);
  float* y = data_of<float>(*io.y);
  std::vector<float> h(static_cast<size_t>(B.size)), delta(static_cast<size_t>(s.width));
  for (int64_t i = 0; i < n; ++i) {
    if (!row_on(io.row_mask, i)) continue;
    hidden(B, s, x + i * s.width, h.data());
    for (auto& v : h) v = B.f(v);
    // The whole row's delta first: y may be x itself.
    for (int64_t o = 0; o < s.width; ++o) {
      float acc = s.b_up[static_cast<size_t>(o)];
      const float* w = s.up.data() + o * B.size;
      for (int64_t k = 0; k < B.size; ++k) acc += w[k] * h[static_cast<size_t>(k)];
      delta[static_cast<size_t>(o)] = B.scale * acc;
    }
    for (int64_t o = 0; o < s.width; ++o) y[i * s.width + o] += delta[static_cast<size_t>(o)];
  }
}

// g = scale d_y; d_up += g a^T; d_b_up += g; da = up^T g; dh = da * act'(h);
// d_down += dh x^T; d_b_down += dh; d_x += down^T dh.
void backward(Bottleneck& B, loom_adapter_site& s, const loom_adapter_grad_io& io) {
  const int64_t n = check_rows(s, io.x, io.row_mask);
  check_f32(io.d_y, "d_y", {n, s.width});
  check_f32(io.d_x, "d_x", {n, s.width});
  const float* x = data_of<float>(*io.x);
  const float* dy = data_of<float>(*io.d_y);
  float* dx = data_of<float>(*io.d_x);
  const size_t M = static_cast<size_t>(B.size);
  std::vector<float> h(M), a(M), dh(M);
  for (int64_t i = 0; i < n; ++i) {
    if (!row_on(io.row_mask, i)) continue;
    const float* xi = x + i * s.width;
    hidden(B, s, xi, h.data());
    for (size_t k = 0; k < M; ++k) a[k] = B.f(h[k]);
    std::fill(dh.begin(), dh.end(), 0.0f);
    for (int64_t o = 0; o < s.width; ++o) {
      const float g = B.scale * dy[i * s.width + o];
      s.d_b_up[static_cast<size_t>(o)] += g;
      float* d_up = s.d_up.data() + o * B.size;
      const float* up = s.up.data() + o * B.size;
      for (size_t k = 0; k < M; ++k) {
        d_up[k] += g * a[k];
        dh[k] += g * up[k];
      }
    }
    for (size_t k = 0; k < M; ++k) {
      const float d = dh[k] * B.df(h[k]);
      s.d_b_down[k] += d;
      float* d_down = s.d_down.data() + k * static_cast<size_t>(s.width);
      const float* down = s.down.data() + k * static_cast<size_t>(s.width);
      for (int64_t j = 0; j < s.width; ++j) {
        d_down[j] += d * xi[j];
        dx[i * s.width + j] += d * down[j];
      }
    }
  }
}

struct Tensor {
  const char* suffix;
  std::vector<float> loom_adapter_site::*value;
  std::vector<float> loom_adapter_site::*grad;
  bool matrix_down, matrix_up;  // [m, H] or [H, m]; neither: a vector
};
constexpr Tensor kTensors[] = {
    {".adapter_down.weight", &loom_adapter_site::down, &loom_adapter_site::d_down, true, false},
    {".adapter_down.bias", &loom_adapter_site::b_down, &loom_adapter_site::d_b_down, false, false},
    {".adapter_up.weight", &loom_adapter_site::up, &loom_adapter_site::d_up, false, true},
    {".adapter_up.bias", &loom_adapter_site::b_up, &loom_adapter_site::d_b_up, false, false},
};
std::vector<int64_t> shape_of(const Bottleneck& B, const loom_adapter_site& s, const Tensor& t) {
  if (t.matrix_down) return {B.size, s.width};
  if (t.matrix_up) return {s.width, B.size};
  return {static_cast<int64_t>((s.*t.value).size())};
}

void parameters(Bottleneck& B, const loom_tensor_sink* sink) {
  if (sink == nullptr || sink->put == nullptr) invalid("bottleneck: sink is NULL");
  for (auto& s : B.sites)
    for (const Tensor& t : kTensors) {
      const std::string name = kPrefix + s->module + t.suffix;
      OwnedView v((*s.*t.value).data(), kF32, shape_of(B, *s, t)), g((*s.*t.grad).data(), kF32, shape_of(B, *s, t));
      const loom_status st = sink->put(sink->user, name.c_str(), &v.t, &g.t);
      if (st != LOOM_OK) fail(st, "bottleneck: the sink stopped at '" + name + "'");
    }
}

// Validates every tensor first, then copies, so a bad list changes nothing.
void load(Bottleneck& B, const loom_named_tensor* ts, uint32_t count) {
  if (ts == nullptr && count > 0) invalid("bottleneck: tensors is NULL");
  std::vector<std::pair<std::vector<float>*, const DLTensor*>> plan;
  for (uint32_t i = 0; i < count; ++i) {
    if (ts[i].name == nullptr) invalid("bottleneck: tensor " + std::to_string(i) + " has no name");
    const std::string name = ts[i].name;
    const Tensor* kind = nullptr;
    for (const Tensor& t : kTensors) {
      const std::string suf = t.suffix;
      if (name.size() > suf.size() && name.compare(name.size() - suf.size(), suf.size(), suf) == 0) kind = &t;
    }
    if (name.rfind(kPrefix, 0) != 0 || kind == nullptr)
      fail(LOOM_ERR_NOT_FOUND, "bottleneck: unknown parameter name '" + name +
                                   "' (expected base_model.model.<block>.adapter_down/adapter_up .weight/.bias)");
    const std::string module = name.substr(std::strlen(kPrefix), name.size() - std::strlen(kPrefix) - std::strlen(kind->suffix));
    loom_adapter_site* s = B.find(module);
    if (s == nullptr) fail(LOOM_ERR_NOT_FOUND, "bottleneck: '" + name + "' names block '" + module + "', which is not attached");
    check_f32(ts[i].tensor, name.c_str(), shape_of(B, *s, *kind));
    plan.emplace_back(&(s->*(kind->value)), ts[i].tensor);
  }
  for (auto& [dst, t] : plan) std::memcpy(dst->data(), data_of<float>(*t), dst->size() * sizeof(float));
}

// ---- ABI glue ----
using Glue = AdapterGlue<Bottleneck, &attach, &forward, &backward, &parameters, &load>;

constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "size", LOOM_VALUE_INT, 0, "64", "bottleneck width m"},
    {sizeof(loom_param_desc), "activation", LOOM_VALUE_STRING, 0, "\"relu\"", "\"relu\", \"gelu\" (tanh) or \"silu\""},
    {sizeof(loom_param_desc), "scale", LOOM_VALUE_FLOAT, 0, "1.0", "factor on the adapter's output"},
    {sizeof(loom_param_desc), "seed", LOOM_VALUE_INT, 0, "0", "seed of the down projection's initialisation"},
    {sizeof(loom_param_desc), "target_modules", LOOM_VALUE_ARRAY, 0, "[\"self_attn\", \"mlp\"]",
     "blocks (last dotted component or full name) whose output the adapter follows"},
};
constexpr loom_component_desc kBottleneck = {
    sizeof(loom_component_desc), LOOM_KIND_ADAPTER, "bottleneck", "1.0.0",
    "Bottleneck adapter (Houlsby) after attention and MLP blocks (CPU float32)",
    kParams, 5, LOOM_THREADING_SERIAL, &Glue::vtable};
const loom_component_desc* const kComponents[] = {&kBottleneck};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-adapter-bottleneck", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::bottleneck

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::bottleneck::kPlugin; }
