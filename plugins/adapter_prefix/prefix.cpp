// Adapter component `prefix` (prefix tuning, Li & Liang 2021, as peft runs it): p virtual
// tokens whose keys and values every layer's attention sees before the sequence's own, on the
// attention-prefix sites of adapter ABI 1.6. CPU float32.
//   per layer (site) with kv = 2 * n_kv_heads * head_dim:
//     direct:      kv_values [p, kv], trained as they are
//     projection:  (the reparameterisation, shared by every layer) a = tanh(E W1^T + b1) with
//                  E [p, H], W1 [m, H], b1 [m]; then per layer kv = a W2^T + b2, W2 [kv, m]
//   init:  E and the direct values ~ U(-sqrt 3, sqrt 3) (unit variance); W1 ~ U(+-1/sqrt H),
//          W2 ~ U(+-1/sqrt m); biases 0
//   names: base_model.model.<layer>.self_attn.prefix_kv.weight (direct);
//          base_model.model.prefix_encoder.{embedding.weight, transform.0.weight, transform.0.bias}
//          and base_model.model.<layer>.self_attn.prefix_encoder.out.{weight, bias} (projection)
// A trained projection can be kept for inference (its MLP costs p x (H m + m kv) per layer and
// step) or the table can switch to direct values written from it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "loom/loom_plugin_api.h"
#include "loom_adapter_glue.hpp"
#include "loom_counter_rng.hpp"
#include "loom_plugin_util.hpp"

struct loom_adapter_site {
  std::string module;
  int64_t kv = 0;
  std::vector<float> values, d_values;  // direct: [p, kv]
  std::vector<float> w2, b2, d_w2, d_b2;  // projection: [kv, m], [kv]
};

namespace loomp::prefix {
namespace {

constexpr const char* kPrefix = "base_model.model.";

struct Prefix {
  static constexpr const char* kName = "prefix";
  const loom_host_api* host;
  loom_host_ctx* ctx;
  int64_t p, hidden_m;
  bool projection;
  uint64_t seed;
  loom_adapter_prefix_ext ext{};
  int64_t width = 0;                                  // H, fixed by the first attach
  std::vector<float> e, w1, b1, d_e, d_w1, d_b1;      // projection's shared part
  std::vector<std::unique_ptr<loom_adapter_site>> sites;

  Prefix(const loom_host_api* h, loom_host_ctx* c)
      : host(h), ctx(c), p(cfg_int(h, c, "num_virtual_tokens")), hidden_m(cfg_int(h, c, "encoder_hidden_size")),
        projection(cfg_bool(h, c, "projection")), seed(static_cast<uint64_t>(cfg_int(h, c, "seed"))) {
    if (p <= 0 || p > 4096) invalid_param("num_virtual_tokens", "prefix: num_virtual_tokens must be in [1, 4096], got " + std::to_string(p));
    if (hidden_m <= 0 || hidden_m > 65536)
      invalid_param("encoder_hidden_size", "prefix: encoder_hidden_size must be in [1, 65536], got " + std::to_string(hidden_m));
    ext.struct_size = sizeof(ext);
    ext.virtual_tokens = p;
  }
  // No linear or block site: hosts offer every layer's attention-prefix site to an instance
  // that gives loom.adapter.prefix/1, without asking targets().
  bool matches(const std::string&) const { return false; }
  loom_adapter_site* find(const std::string& module) const {
    for (const auto& s : sites)
      if (s->module == module) return s.get();
    return nullptr;
  }
  // a [p, m] = tanh(E W1^T + b1).
  std::vector<float> encode() const {
    std::vector<float> a(static_cast<size_t>(p * hidden_m));
    for (int64_t t = 0; t < p; ++t)
      for (int64_t k = 0; k < hidden_m; ++k) {
        float acc = b1[static_cast<size_t>(k)];
        for (int64_t j = 0; j < width; ++j) acc += e[static_cast<size_t>(t * width + j)] * w1[static_cast<size_t>(k * width + j)];
        a[static_cast<size_t>(t * hidden_m + k)] = std::tanh(acc);
      }
    return a;
  }
};

float symmetric(uint64_t seed, uint64_t stream, uint64_t i, float bound) {
  return (2.0f * uniform01(seed, stream, i) - 1.0f) * bound;
}

void attach(Prefix& P, const loom_adapter_module* mp, loom_adapter_site** out) {
  const loom_adapter_module& m = *mp;
  const std::string name = m.module_name;
  if (!LOOM_HAS_FIELD(mp, loom_adapter_module, site) || m.site != LOOM_ADAPTER_SITE_ATTENTION_PREFIX)
    invalid("prefix: '" + name + "' is not an attention-prefix site");
  if (m.in_features <= 0 || m.out_features <= 0) invalid("prefix: site '" + name + "' needs positive features");
  if (!is_f32(m.dtype)) unsupported("prefix: only float32 sites are supported");
  if (m.device.device_type != kDLCPU) unsupported("prefix: only CPU sites are supported");
  if (P.find(name)) invalid("prefix: '" + name + "' is already attached");
  if (P.width != 0 && P.width != m.in_features) invalid("prefix: sites of different hidden sizes");
  auto s = std::make_unique<loom_adapter_site>();
  s->module = name;
  s->kv = m.out_features;
  const uint64_t stream = fnv1a(name);
  const size_t pk = static_cast<size_t>(P.p * s->kv);
  if (P.projection) {
    if (P.width == 0) {  // the shared encoder, once
      P.width = m.in_features;
      const size_t H = static_cast<size_t>(P.width), M = static_cast<size_t>(P.hidden_m), np = static_cast<size_t>(P.p);
      P.e.resize(np * H);
      P.w1.resize(M * H);
      P.b1.assign(M, 0.0f);
      for (size_t i = 0; i < P.e.size(); ++i) P.e[i] = symmetric(P.seed, fnv1a("prefix_encoder.embedding"), i, std::sqrt(3.0f));
      for (size_t i = 0; i < P.w1.size(); ++i)
        P.w1[i] = symmetric(P.seed, fnv1a("prefix_encoder.transform.0"), i, 1.0f / std::sqrt(static_cast<float>(H)));
      P.d_e.assign(P.e.size(), 0.0f);
      P.d_w1.assign(P.w1.size(), 0.0f);
      P.d_b1.assign(M, 0.0f);
    }
    s->w2.resize(static_cast<size_t>(s->kv * P.hidden_m));
    for (size_t i = 0; i < s->w2.size(); ++i)
      s->w2[i] = symmetric(P.seed, stream, i, 1.0f / std::sqrt(static_cast<float>(P.hidden_m)));
    s->b2.assign(static_cast<size_t>(s->kv), 0.0f);
    s->d_w2.assign(s->w2.size(), 0.0f);
    s->d_b2.assign(s->b2.size(), 0.0f);
  } else {
    P.width = m.in_features;
    s->values.resize(pk);
    for (size_t i = 0; i < pk; ++i) s->values[i] = symmetric(P.seed, stream, i, std::sqrt(3.0f));
    s->d_values.assign(pk, 0.0f);
  }
  *out = s.get();
  P.sites.push_back(std::move(s));
}

void forward(Prefix& P, loom_adapter_site& s, const loom_adapter_io& io) {
  check_f32(io.y, "y", {P.p, s.kv});
  float* y = data_of<float>(*io.y);
  if (!P.projection) {
    for (size_t i = 0; i < s.values.size(); ++i) y[i] += s.values[i];
    return;
  }
  const std::vector<float> a = P.encode();
  for (int64_t t = 0; t < P.p; ++t)
    for (int64_t o = 0; o < s.kv; ++o) {
      float acc = s.b2[static_cast<size_t>(o)];
      for (int64_t k = 0; k < P.hidden_m; ++k)
        acc += a[static_cast<size_t>(t * P.hidden_m + k)] * s.w2[static_cast<size_t>(o * P.hidden_m + k)];
      y[t * s.kv + o] += acc;
    }
}

// Direct: d_values += d_y. Projection (linear in d_y, so per layer and summed is exact):
// dW2 += d_y^T a, db2 += sum d_y, da = d_y W2, dpre = da (1 - a^2), dW1 += dpre^T E,
// db1 += sum dpre, dE += dpre W1.
void backward(Prefix& P, loom_adapter_site& s, const loom_adapter_grad_io& io) {
  check_f32(io.d_y, "d_y", {P.p, s.kv});
  const float* dy = data_of<float>(*io.d_y);
  if (!P.projection) {
    for (size_t i = 0; i < s.d_values.size(); ++i) s.d_values[i] += dy[i];
    return;
  }
  const std::vector<float> a = P.encode();
  const int64_t M = P.hidden_m, H = P.width;
  std::vector<float> dpre(static_cast<size_t>(P.p * M), 0.0f);
  for (int64_t t = 0; t < P.p; ++t) {
    for (int64_t o = 0; o < s.kv; ++o) {
      const float g = dy[t * s.kv + o];
      s.d_b2[static_cast<size_t>(o)] += g;
      for (int64_t k = 0; k < M; ++k) {
        s.d_w2[static_cast<size_t>(o * M + k)] += g * a[static_cast<size_t>(t * M + k)];
        dpre[static_cast<size_t>(t * M + k)] += g * s.w2[static_cast<size_t>(o * M + k)];
      }
    }
    for (int64_t k = 0; k < M; ++k) {
      const float av = a[static_cast<size_t>(t * M + k)];
      const float d = dpre[static_cast<size_t>(t * M + k)] * (1.0f - av * av);
      P.d_b1[static_cast<size_t>(k)] += d;
      for (int64_t j = 0; j < H; ++j) {
        P.d_w1[static_cast<size_t>(k * H + j)] += d * P.e[static_cast<size_t>(t * H + j)];
        P.d_e[static_cast<size_t>(t * H + j)] += d * P.w1[static_cast<size_t>(k * H + j)];
      }
    }
  }
}

// Every tensor by name: (name, values, grads, shape).
struct Named {
  std::string name;
  std::vector<float>*value, *grad;
  std::vector<int64_t> shape;
};
std::vector<Named> tensors(Prefix& P) {
  std::vector<Named> out;
  if (P.projection && P.width > 0) {
    const std::string enc = std::string(kPrefix) + "prefix_encoder.";
    out.push_back({enc + "embedding.weight", &P.e, &P.d_e, {P.p, P.width}});
    out.push_back({enc + "transform.0.weight", &P.w1, &P.d_w1, {P.hidden_m, P.width}});
    out.push_back({enc + "transform.0.bias", &P.b1, &P.d_b1, {P.hidden_m}});
  }
  for (auto& s : P.sites) {
    const std::string base = kPrefix + s->module;
    if (P.projection) {
      out.push_back({base + ".prefix_encoder.out.weight", &s->w2, &s->d_w2, {s->kv, P.hidden_m}});
      out.push_back({base + ".prefix_encoder.out.bias", &s->b2, &s->d_b2, {s->kv}});
    } else {
      out.push_back({base + ".prefix_kv.weight", &s->values, &s->d_values, {P.p, s->kv}});
    }
  }
  return out;
}

void parameters(Prefix& P, const loom_tensor_sink* sink) {
  if (sink == nullptr || sink->put == nullptr) invalid("prefix: sink is NULL");
  for (Named& t : tensors(P)) {
    OwnedView v(t.value->data(), kF32, t.shape), g(t.grad->data(), kF32, t.shape);
    const loom_status st = sink->put(sink->user, t.name.c_str(), &v.t, &g.t);
    if (st != LOOM_OK) fail(st, "prefix: the sink stopped at '" + t.name + "'");
  }
}

// Validates every tensor first, then copies, so a bad list changes nothing.
void load(Prefix& P, const loom_named_tensor* ts, uint32_t count) {
  if (ts == nullptr && count > 0) invalid("prefix: tensors is NULL");
  auto known = tensors(P);
  std::vector<std::pair<std::vector<float>*, const DLTensor*>> plan;
  for (uint32_t i = 0; i < count; ++i) {
    if (ts[i].name == nullptr) invalid("prefix: tensor " + std::to_string(i) + " has no name");
    const std::string name = ts[i].name;
    const auto it = std::find_if(known.begin(), known.end(), [&](const Named& t) { return t.name == name; });
    if (it == known.end())
      fail(LOOM_ERR_NOT_FOUND, "prefix: unknown parameter name '" + name + "' (not one of the attached layers' " +
                                   (P.projection ? "prefix_encoder tensors)" : "prefix_kv tensors)"));
    check_f32(ts[i].tensor, name.c_str(), it->shape);
    plan.emplace_back(it->value, ts[i].tensor);
  }
  for (auto& [dst, t] : plan) std::memcpy(dst->data(), data_of<float>(*t), dst->size() * sizeof(float));
}

using Glue = AdapterGlue<Prefix, &attach, &forward, &backward, &parameters, &load>;

const void* extension_fn(void* inst, const char* id) {
  if (inst == nullptr || id == nullptr || std::strcmp(id, LOOM_ADAPTER_PREFIX_EXTENSION) != 0) return nullptr;
  return &static_cast<Prefix*>(inst)->ext;
}

constexpr loom_adapter_vtable kVtable = Glue::with_extension(&extension_fn);

constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "num_virtual_tokens", LOOM_VALUE_INT, 0, "8", "virtual tokens before every sequence"},
    {sizeof(loom_param_desc), "projection", LOOM_VALUE_BOOL, 0, "false",
     "train through the reparameterisation MLP (embedding -> tanh layer -> each layer's keys and values)"},
    {sizeof(loom_param_desc), "encoder_hidden_size", LOOM_VALUE_INT, 0, "64", "the MLP's hidden width (projection)"},
    {sizeof(loom_param_desc), "seed", LOOM_VALUE_INT, 0, "0", "seed of the initialisation"},
};
constexpr loom_component_desc kPrefixComponent = {
    sizeof(loom_component_desc), LOOM_KIND_ADAPTER, "prefix", "1.0.0",
    "Prefix tuning: learned keys and values before every sequence in each layer's attention (CPU float32)",
    kParams, 4, LOOM_THREADING_SERIAL, &kVtable};
const loom_component_desc* const kComponents[] = {&kPrefixComponent};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-adapter-prefix", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::prefix

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::prefix::kPlugin; }
