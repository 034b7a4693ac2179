// Adapter component `lora` (Hu et al. 2021, PEFT conventions), CPU float32.
//   per targeted module with W [out, in]: A [r, in], B [out, r]
//   forward:  y += s * (drop(x) A^T) B^T,   s = alpha / r   (alpha / sqrt(r) with use_rslora)
//   init:     A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5)) bound),
//             B = 0, so a fresh adapter changes nothing.
//   names:    base_model.model.<module>.lora_A.weight / .lora_B.weight (PEFT layout)
// Dropout (training only) is inverted dropout on x with a counter-based mask; the mask of the
// last training forward of each site is kept for its backward.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "loom_counter_rng.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_adapter_glue.hpp"
#include "loom_plugin_util.hpp"

struct loom_adapter_site {
  std::string module;
  int64_t in = 0, out = 0;
  std::vector<float> A, B;    // [r, in], [out, r]
  std::vector<float> dA, dB;  // gradients, same shapes, accumulated by backward
  std::vector<float> mask;    // [n, in] dropout multipliers of the last training forward
  uint64_t dropout_calls = 0; // advances the dropout stream per training forward
};

namespace loomp::lora {
namespace {

constexpr const char* kPrefix = "base_model.model.";

struct Lora {
  static constexpr const char* kName = "lora";
  const loom_host_api* host;
  loom_host_ctx* ctx;
  int64_t r;
  float alpha, dropout, scale;
  uint64_t seed;
  bool rslora;
  std::vector<std::string> targets;
  std::vector<std::unique_ptr<loom_adapter_site>> sites;  // attach order

  Lora(const loom_host_api* h, loom_host_ctx* c)
      : host(h), ctx(c), r(cfg_int(h, c, "r")), alpha(static_cast<float>(cfg_float(h, c, "alpha"))),
        dropout(static_cast<float>(cfg_float(h, c, "dropout"))), scale(0.0f),
        seed(static_cast<uint64_t>(cfg_int(h, c, "seed"))), rslora(cfg_bool(h, c, "use_rslora")),
        targets(cfg_string_array(h, c, "target_modules")) {
    if (r <= 0 || r > 65536) invalid_param("r", "lora: r must be in [1, 65536], got " + std::to_string(r));
    if (!std::isfinite(alpha)) invalid_param("alpha", "lora: alpha must be finite");
    if (!(dropout >= 0.0f && dropout < 1.0f)) invalid_param("dropout", "lora: dropout must be in [0, 1)");
    if (targets.empty())
      invalid_param("target_modules", "lora: target_modules is empty; the adapter would apply nowhere");
    const float rf = static_cast<float>(r);
    scale = rslora ? alpha / std::sqrt(rf) : alpha / rf;
  }

  bool matches(const std::string& name) const {
    const auto dot = name.rfind('.');
    const std::string last = dot == std::string::npos ? name : name.substr(dot + 1);
    return std::any_of(targets.begin(), targets.end(),
                       [&](const std::string& t) { return t == last || t == name; });
  }

  loom_adapter_site* find(const std::string& module) const {
    for (const auto& s : sites)
      if (s->module == module) return s.get();
    return nullptr;
  }
};

void check_module(const loom_adapter_module& m) {
  if (m.module_name == nullptr) invalid("lora: module_name is NULL");
  if (m.in_features <= 0 || m.out_features <= 0) invalid("lora: module features must be positive");
  if (!is_f32(m.dtype)) unsupported("lora: only float32 modules are supported");
  if (m.device.device_type != kDLCPU) unsupported("lora: only CPU modules are supported");
}

void attach(Lora& L, const loom_adapter_module* mp, loom_adapter_site** out) {
  if (LOOM_HAS_FIELD(mp, loom_adapter_module, site) && mp->site != LOOM_ADAPTER_SITE_LINEAR)
    invalid(std::string("lora: '") + mp->module_name + "' is a block's output, not a linear module; target linears (q_proj, down_proj, ...)");
  const loom_adapter_module& m = *mp;
  check_module(m);
  if (!L.matches(m.module_name)) invalid(std::string("lora: module '") + m.module_name + "' is not targeted");
  if (L.find(m.module_name)) invalid(std::string("lora: module '") + m.module_name + "' is already attached");
  auto s = std::make_unique<loom_adapter_site>();
  s->module = m.module_name;
  s->in = m.in_features;
  s->out = m.out_features;
  s->A.resize(static_cast<size_t>(L.r * s->in));
  s->B.assign(static_cast<size_t>(s->out * L.r), 0.0f);
  s->dA.assign(s->A.size(), 0.0f);
  s->dB.assign(s->B.size(), 0.0f);
  const float bound = 1.0f / std::sqrt(static_cast<float>(s->in));
  const uint64_t stream = fnv1a(s->module);
  for (size_t i = 0; i < s->A.size(); ++i) s->A[i] = (2.0f * uniform01(L.seed, stream, i) - 1.0f) * bound;
  *out = s.get();
  L.sites.push_back(std::move(s));
}

// Validates x [n, in], the optional row mask [n] and returns n.
int64_t check_io(const loom_adapter_site& s, const DLTensor* x, const DLTensor* row_mask) {
  check_f32(x, "x", {-1, s.in});
  const int64_t n = x->shape[0];
  if (row_mask != nullptr) check_i32(row_mask, "row_mask", {n});
  return n;
}
bool row_on(const DLTensor* row_mask, int64_t i) {
  return row_mask == nullptr || data_of<int32_t>(*row_mask)[i] != 0;
}

// h[n, r] = drop(x) A^T, where drop(x)[i, j] = x[i, j] * mask[i, j] when a mask is given.
void project_down(const Lora& L, const loom_adapter_site& s, const float* x, const float* mask, int64_t n,
                  const DLTensor* row_mask, std::vector<float>& h) {
  h.assign(static_cast<size_t>(n * L.r), 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    if (!row_on(row_mask, i)) continue;
    for (int64_t k = 0; k < L.r; ++k) {
      float acc = 0.0f;
      for (int64_t j = 0; j < s.in; ++j) acc += x[i * s.in + j] * (mask ? mask[i * s.in + j] : 1.0f) * s.A[k * s.in + j];
      h[i * L.r + k] = acc;
    }
  }
}

void forward(Lora& L, loom_adapter_site& s, const loom_adapter_io& io) {
  const int64_t n = check_io(s, io.x, io.row_mask);
  check_f32(io.y, "y", {n, s.out});
  const float* x = data_of<float>(*io.x);
  float* y = data_of<float>(*io.y);
  const float* mask = nullptr;
  s.mask.clear();
  if (io.training && L.dropout > 0.0f) {
    // Inverted dropout: kept inputs are scaled by 1/(1-p) so the expectation is unchanged.
    s.mask.resize(static_cast<size_t>(n * s.in));
    const uint64_t stream = fnv1a(s.module) ^ mix64(++s.dropout_calls);
    const float keep_scale = 1.0f / (1.0f - L.dropout);
    for (size_t i = 0; i < s.mask.size(); ++i)
      s.mask[i] = uniform01(L.seed + 1, stream, i) < L.dropout ? 0.0f : keep_scale;
    mask = s.mask.data();
  }
  std::vector<float> h;
  project_down(L, s, x, mask, n, io.row_mask, h);
  for (int64_t i = 0; i < n; ++i) {
    if (!row_on(io.row_mask, i)) continue;
    for (int64_t o = 0; o < s.out; ++o) {
      float acc = 0.0f;
      for (int64_t k = 0; k < L.r; ++k) acc += h[i * L.r + k] * s.B[o * L.r + k];
      y[i * s.out + o] += L.scale * acc;
    }
  }
}

// With h = drop(x) A^T and y += s h B^T:
//   dB += s d_y^T h     dh = s d_y B     dA += dh^T drop(x)     d_x += (dh A) * mask
void backward(Lora& L, loom_adapter_site& s, const loom_adapter_grad_io& io) {
  const int64_t n = check_io(s, io.x, io.row_mask);
  check_f32(io.d_y, "d_y", {n, s.out});
  check_f32(io.d_x, "d_x", {n, s.in});
  const float* mask = nullptr;
  if (!s.mask.empty()) {
    if (static_cast<int64_t>(s.mask.size()) != n * s.in)
      invalid("lora: backward's x does not match the last training forward of '" + s.module + "'");
    mask = s.mask.data();
  }
  const float* x = data_of<float>(*io.x);
  const float* dy = data_of<float>(*io.d_y);
  float* dx = data_of<float>(*io.d_x);
  std::vector<float> h, dh(static_cast<size_t>(n * L.r), 0.0f);
  project_down(L, s, x, mask, n, io.row_mask, h);
  for (int64_t i = 0; i < n; ++i) {
    if (!row_on(io.row_mask, i)) continue;
    for (int64_t o = 0; o < s.out; ++o) {
      const float g = L.scale * dy[i * s.out + o];
      for (int64_t k = 0; k < L.r; ++k) {
        s.dB[o * L.r + k] += g * h[i * L.r + k];
        dh[i * L.r + k] += g * s.B[o * L.r + k];
      }
    }
    for (int64_t k = 0; k < L.r; ++k)
      for (int64_t j = 0; j < s.in; ++j) {
        const float m = mask ? mask[i * s.in + j] : 1.0f;
        s.dA[k * s.in + j] += dh[i * L.r + k] * x[i * s.in + j] * m;
        dx[i * s.in + j] += dh[i * L.r + k] * s.A[k * s.in + j] * m;
      }
  }
}

void parameters(Lora& L, const loom_tensor_sink* sink) {
  if (sink == nullptr || sink->put == nullptr) invalid("lora: sink is NULL");
  for (auto& s : L.sites) {
    const std::string base = kPrefix + s->module;
    OwnedView a(s->A.data(), kF32, {L.r, s->in}), da(s->dA.data(), kF32, {L.r, s->in});
    OwnedView b(s->B.data(), kF32, {s->out, L.r}), db(s->dB.data(), kF32, {s->out, L.r});
    const std::string na = base + ".lora_A.weight", nb = base + ".lora_B.weight";
    loom_status st = sink->put(sink->user, na.c_str(), &a.t, &da.t);
    if (st != LOOM_OK) fail(st, "lora: the sink stopped at '" + na + "'");
    st = sink->put(sink->user, nb.c_str(), &b.t, &db.t);
    if (st != LOOM_OK) fail(st, "lora: the sink stopped at '" + nb + "'");
  }
}

// Validates every tensor first, then copies, so a bad list changes nothing.
void load(Lora& L, const loom_named_tensor* ts, uint32_t count) {
  if (ts == nullptr && count > 0) invalid("lora: tensors is NULL");
  std::vector<std::pair<std::vector<float>*, const DLTensor*>> plan;
  for (uint32_t i = 0; i < count; ++i) {
    if (ts[i].name == nullptr) invalid("lora: tensor " + std::to_string(i) + " has no name");
    const std::string name = ts[i].name;
    const std::string sa = ".lora_A.weight", sb = ".lora_B.weight";
    auto ends = [&](const std::string& suf) {
      return name.size() > suf.size() && name.compare(name.size() - suf.size(), suf.size(), suf) == 0;
    };
    const bool is_a = ends(sa), is_b = ends(sb);
    if (name.rfind(kPrefix, 0) != 0 || (!is_a && !is_b))
      fail(LOOM_ERR_NOT_FOUND, "lora: unknown parameter name '" + name +
                                   "' (expected base_model.model.<module>.lora_A.weight or .lora_B.weight)");
    const std::string module = name.substr(std::strlen(kPrefix), name.size() - std::strlen(kPrefix) - sa.size());
    loom_adapter_site* s = L.find(module);
    if (s == nullptr) fail(LOOM_ERR_NOT_FOUND, "lora: '" + name + "' names module '" + module + "', which is not attached");
    const std::vector<int64_t> shape = is_a ? std::vector<int64_t>{L.r, s->in} : std::vector<int64_t>{s->out, L.r};
    check_f32(ts[i].tensor, name.c_str(), shape);
    plan.emplace_back(is_a ? &s->A : &s->B, ts[i].tensor);
  }
  for (auto& [dst, t] : plan) std::memcpy(dst->data(), data_of<float>(*t), dst->size() * sizeof(float));
}

void merge(Lora& L, loom_adapter_site& s, DLTensor* w, int32_t sign) {
  if (sign != 1 && sign != -1) invalid("lora: merge sign must be +1 or -1");
  check_f32(w, "base_weight", {s.out, s.in});
  float* W = data_of<float>(*w);
  const float f = static_cast<float>(sign) * L.scale;
  for (int64_t o = 0; o < s.out; ++o)
    for (int64_t j = 0; j < s.in; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < L.r; ++k) acc += s.B[o * L.r + k] * s.A[k * s.in + j];
      W[o * s.in + j] += f * acc;
    }
}

// ---- ABI glue ----
using Glue = AdapterGlue<Lora, &attach, &forward, &backward, &parameters, &load, &merge>;

constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "r", LOOM_VALUE_INT, 0, "8", "rank of the low-rank update"},
    {sizeof(loom_param_desc), "alpha", LOOM_VALUE_FLOAT, 0, "16", "scaling numerator: scale = alpha / r"},
    {sizeof(loom_param_desc), "dropout", LOOM_VALUE_FLOAT, 0, "0", "dropout on the adapter input while training, in [0, 1)"},
    {sizeof(loom_param_desc), "seed", LOOM_VALUE_INT, 0, "0", "seed of the initialisation and dropout streams"},
    {sizeof(loom_param_desc), "target_modules", LOOM_VALUE_ARRAY, 0, "[\"q_proj\", \"v_proj\"]",
     "module names (last dotted component or full name) the adapter applies to"},
    {sizeof(loom_param_desc), "use_rslora", LOOM_VALUE_BOOL, 0, "false", "rank-stabilised scale alpha / sqrt(r)"},
};
constexpr loom_component_desc kLora = {
    sizeof(loom_component_desc), LOOM_KIND_ADAPTER, "lora", "1.0.0",
    "Low-rank adapter (LoRA) on named linear modules, PEFT-compatible names (CPU float32)",
    kParams, 6, LOOM_THREADING_SERIAL, &Glue::vtable};
const loom_component_desc* const kComponents[] = {&kLora};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-adapter-lora", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::lora

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::lora::kPlugin; }
