// Adapter component `lora` (Hu et al. 2021, PEFT conventions): CPU float32, and on CUDA (when
// built with it) as bfloat16 copies of A and B applied through the gathered extension
// (loom.adapter.gathered/1: several adapters' rows in one pair of launches, lora_gathered.cu).
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
#ifdef LOOM_LORA_CUDA
#include "lora_gathered.hpp"
#include "loom_kv_format.hpp"  // bf16_bits()
#include "loom_quant_cuda.hpp"  // upload()
#endif

struct loom_adapter_site {
  std::string module;
  int64_t in = 0, out = 0;
  std::vector<float> A, B;    // [r, in], [out, r]
  std::vector<float> dA, dB;  // gradients, same shapes, accumulated by backward
  std::vector<float> mask;    // [n, in] dropout multipliers of the last training forward
  uint64_t dropout_calls = 0; // advances the dropout stream per training forward
  DLDevice device{kDLCPU, 0}; // a CUDA site keeps bfloat16 copies of A and B there
  void* dev_a = nullptr;
  void* dev_b = nullptr;
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

  ~Lora() {
    for (auto& s : sites) {
      if (s->dev_a) host->device_free(ctx, s->device, s->dev_a);
      if (s->dev_b) host->device_free(ctx, s->device, s->dev_b);
    }
  }
  Lora(const Lora&) = delete;
  Lora& operator=(const Lora&) = delete;

  // A CUDA site's device copies of A and B (bfloat16), allocated once, rewritten after a load.
  void upload(loom_adapter_site& s) {
#ifdef LOOM_LORA_CUDA
    auto put = [&](const std::vector<float>& v, void*& dst, const char* what) {
      std::vector<uint16_t> bits(v.size());
      for (size_t i = 0; i < v.size(); ++i) bits[i] = kvcache::bf16_bits(v[i]);
      const size_t bytes = bits.size() * sizeof(uint16_t);
      if (dst == nullptr && host->device_alloc(ctx, s.device, bytes, 256, &dst) != LOOM_OK)
        fail(LOOM_ERR_OUT_OF_MEMORY, "lora: cannot allocate " + std::string(what) + " of '" + s.module + "' on the device");
      if (host->memcpy(ctx, dst, s.device, bits.data(), DLDevice{kDLCPU, 0}, bytes) != LOOM_OK ||
          host->stream_synchronize(ctx, s.device) != LOOM_OK)
        fail(LOOM_ERR_DEVICE, "lora: cannot copy " + std::string(what) + " of '" + s.module + "' to the device");
    };
    put(s.A, s.dev_a, "A");
    put(s.B, s.dev_b, "B");
#else
    (void)s;
#endif
  }
};

#ifdef LOOM_LORA_CUDA
constexpr bool kCudaBuilt = true;
#else
constexpr bool kCudaBuilt = false;
#endif

void check_module(const loom_adapter_module& m) {  // (the glue checked module_name)
  if (m.in_features <= 0 || m.out_features <= 0) invalid("lora: module features must be positive");
  const bool cuda = m.device.device_type == kDLCUDA;
  if (m.device.device_type != kDLCPU && !(cuda && kCudaBuilt))
    unsupported(kCudaBuilt ? "lora: only CPU and CUDA modules are supported" : "lora: only CPU modules are supported (built without CUDA)");
  if (!is_f32(m.dtype) && !(cuda && m.dtype.code == kDLBfloat && m.dtype.bits == 16))
    unsupported("lora: only float32 modules (and bfloat16 ones on CUDA) are supported");
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
  s->device = m.device;
  if (s->device.device_type == kDLCUDA) L.upload(*s);
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

[[noreturn]] void refuse_device_site(const loom_adapter_site& s) {
  unsupported("lora: '" + s.module + "' is on CUDA, where it runs through the gathered extension (" +
              LOOM_ADAPTER_GATHERED_EXTENSION + "); training on CUDA is not supported");
}

void forward(Lora& L, loom_adapter_site& s, const loom_adapter_io& io) {
  if (s.device.device_type != kDLCPU) refuse_device_site(s);
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
  if (s.device.device_type != kDLCPU) refuse_device_site(s);
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
  for (auto& s : L.sites)
    if (s->device.device_type == kDLCUDA) L.upload(*s);
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

// ---- Gathered groups (CUDA) ----
#ifdef LOOM_LORA_CUDA
}  // namespace
}  // namespace loomp::lora

struct loom_adapter_group {
  loomp::lora::Lora* first = nullptr;  // errors, host and stream go through it
  DLDevice device{kDLCPU, 0};
  int64_t in = 0, out = 0, max_rows = 0;
  int32_t r_max = 0;
  void* entries = nullptr;  // device GatheredEntry[count]
  float* h = nullptr;       // device [max_rows, r_max]
};

namespace loomp::lora {
namespace {

void free_group(loom_adapter_group* g) {
  if (g == nullptr) return;
  if (g->entries) g->first->host->device_free(g->first->ctx, g->device, g->entries);
  if (g->h) g->first->host->device_free(g->first->ctx, g->device, g->h);
  delete g;
}

void create_group(void* const* instances, loom_adapter_site* const* sites, int32_t count, int64_t max_rows,
                  loom_adapter_group** out) {
  auto g = std::unique_ptr<loom_adapter_group, void (*)(loom_adapter_group*)>(new loom_adapter_group, &free_group);
  std::vector<GatheredEntry> entries(static_cast<size_t>(count));
  for (int32_t i = 0; i < count; ++i) {
    const loom_adapter_site* s = sites[i];
    if (s == nullptr) continue;
    Lora& L = *static_cast<Lora*>(instances[i]);
    if (g->first == nullptr) {
      g->first = &L;
      g->device = s->device;
      g->in = s->in;
      g->out = s->out;
    }
    if (s->device.device_type != kDLCUDA || s->device.device_id != g->device.device_id || s->in != g->in || s->out != g->out)
      invalid("lora: a group's sites must share one CUDA module ('" + s->module + "' does not)");
    entries[static_cast<size_t>(i)] = GatheredEntry{s->dev_a, s->dev_b, L.scale, static_cast<int32_t>(L.r)};
    g->r_max = std::max(g->r_max, static_cast<int32_t>(L.r));
  }
  if (g->first == nullptr) invalid("lora: a group needs at least one site");
  if (max_rows < 1) invalid("lora: a group's max_rows must be positive");
  g->max_rows = max_rows;
  const loom_host_api* host = g->first->host;
  loom_host_ctx* ctx = g->first->ctx;
  g->entries = upload(host, ctx, g->device, entries.data(), entries.size() * sizeof(GatheredEntry), "lora", "group table");
  void* h = nullptr;
  if (g->r_max > 64) unsupported("lora: ranks above 64 are not supported on CUDA");
  const size_t chunks = static_cast<size_t>(lora_gathered_chunks(g->in));
  if (host->device_alloc(ctx, g->device, chunks * static_cast<size_t>(max_rows) * static_cast<size_t>(g->r_max) * sizeof(float),
                         256, &h) != LOOM_OK)
    fail(LOOM_ERR_OUT_OF_MEMORY, "lora: cannot allocate a group's workspace");
  g->h = static_cast<float*>(h);
  *out = g.release();
}

GatheredLaunch launch_of(loom_adapter_group& g, const loom_adapter_io& io, const DLTensor* row_adapter) {
  const DLTensor* x = io.x;
  DLTensor* y = io.y;
  if (x == nullptr || y == nullptr || row_adapter == nullptr) invalid("lora: x, y and row_adapter must not be NULL");
  const int64_t n = x->ndim == 2 ? x->shape[0] : -1;
  auto device_float = [&](const DLTensor* t, const char* name) {
    if (t->device.device_type != kDLCUDA || t->device.device_id != g.device.device_id)
      unsupported(std::string("lora: ") + name + " must be on the group's CUDA device");
    if (!(is_f32(t->dtype) || (t->dtype.code == kDLBfloat && t->dtype.bits == 16 && t->dtype.lanes == 1)))
      invalid(std::string("lora: ") + name + " must be float32 or bfloat16");
    if (t->ndim != 2 || t->shape[0] != n) invalid(std::string("lora: ") + name + " must be [n, features]");
    if (t->strides != nullptr && t->strides[1] != 1) invalid(std::string("lora: ") + name + "'s rows must be contiguous");
  };
  device_float(x, "x");
  device_float(y, "y");
  if (x->shape[1] != g.in || y->shape[1] != g.out)
    invalid("lora: the group's module is [" + std::to_string(g.out) + ", " + std::to_string(g.in) + "], x or y disagrees");
  if (x->strides != nullptr && x->strides[0] != g.in) invalid("lora: x must be contiguous");
  if (n > g.max_rows) invalid("lora: " + std::to_string(n) + " rows, more than the group's " + std::to_string(g.max_rows));
  if (row_adapter->device.device_type != kDLCUDA || row_adapter->dtype.code != kDLInt || row_adapter->dtype.bits != 32 ||
      row_adapter->ndim != 1 || row_adapter->shape[0] != n)
    invalid("lora: row_adapter must be int32 [n] on the device");
  GatheredLaunch l;
  l.entries = static_cast<const GatheredEntry*>(g.entries);
  l.row_adapter = static_cast<const int32_t*>(row_adapter->data) + row_adapter->byte_offset / 4;
  l.x = static_cast<const char*>(x->data) + x->byte_offset;
  l.x_bf16 = !is_f32(x->dtype);
  l.in = g.in;
  l.y = static_cast<char*>(y->data) + y->byte_offset;
  l.y_bf16 = !is_f32(y->dtype);
  l.y_stride = y->strides != nullptr ? y->strides[0] : g.out;
  l.out = g.out;
  l.h = g.h;
  l.r_max = g.r_max;
  l.n = n;
  return l;
}

void launch(loom_adapter_group& g, const GatheredLaunch* launches, int count) {
  const int err = lora_gathered_cuda(launches, count, g.first->host->current_stream(g.first->ctx, g.device));
  if (err != 0) fail(LOOM_ERR_DEVICE, "lora: the gathered kernels failed to launch (CUDA error " + std::to_string(err) + ")");
}

loom_status create_group_fn(void* const* instances, loom_adapter_site* const* sites, int32_t count, int64_t max_rows,
                            loom_adapter_group** out) {
  Lora* first = nullptr;
  for (int32_t i = 0; instances != nullptr && i < count && first == nullptr; ++i)
    if (sites != nullptr && sites[i] != nullptr) first = static_cast<Lora*>(instances[i]);
  if (first == nullptr || out == nullptr) return LOOM_ERR_INVALID_ARGUMENT;
  return guard(first->host, first->ctx, [&] { create_group(instances, sites, count, max_rows, out); });
}
loom_status forward_group_fn(loom_adapter_group* g, const loom_adapter_io* io, const DLTensor* row_adapter) {
  if (g == nullptr || io == nullptr) return LOOM_ERR_INVALID_ARGUMENT;
  return guard(g->first->host, g->first->ctx, [&] {
    const GatheredLaunch l = launch_of(*g, *io, row_adapter);
    launch(*g, &l, 1);
  });
}
loom_status forward_groups_fn(loom_adapter_group* const* groups, const loom_adapter_io* const* ios, int32_t count,
                              const DLTensor* row_adapter) {
  if (groups == nullptr || ios == nullptr || count < 1 || groups[0] == nullptr) return LOOM_ERR_INVALID_ARGUMENT;
  loom_adapter_group& first = *groups[0];
  return guard(first.first->host, first.first->ctx, [&] {
    if (count > kMaxGathered) invalid("lora: at most " + std::to_string(kMaxGathered) + " groups in one call");
    GatheredLaunch launches[kMaxGathered];
    for (int32_t i = 0; i < count; ++i) {
      if (groups[i] == nullptr || ios[i] == nullptr) invalid("lora: a NULL group or io");
      if (groups[i]->device.device_id != first.device.device_id) invalid("lora: groups on different devices");
      launches[i] = launch_of(*groups[i], *ios[i], row_adapter);
      if (launches[i].n != launches[0].n) invalid("lora: groups of one call must have the same rows");
    }
    launch(first, launches, count);
  });
}
void free_group_fn(loom_adapter_group* g) { free_group(g); }

constexpr loom_adapter_gathered_ext kGathered = {sizeof(loom_adapter_gathered_ext), &create_group_fn, &forward_group_fn,
                                                 &free_group_fn, &forward_groups_fn};
const void* extension_fn(void*, const char* id) {
  return id != nullptr && std::strcmp(id, LOOM_ADAPTER_GATHERED_EXTENSION) == 0 ? &kGathered : nullptr;
}
#endif

// ---- ABI glue ----
using Glue = AdapterGlue<Lora, &attach, &forward, &backward, &parameters, &load, &merge>;
#ifdef LOOM_LORA_CUDA
constexpr loom_adapter_vtable kVtable = Glue::with_extension(&extension_fn);
#else
constexpr loom_adapter_vtable kVtable = Glue::vtable;
#endif

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
    "Low-rank adapter (LoRA) on named linear modules, PEFT-compatible names (CPU float32; CUDA serving, gathered)",
    kParams, 6, LOOM_THREADING_SERIAL, &kVtable};
const loom_component_desc* const kComponents[] = {&kLora};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-adapter-lora", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::lora

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::lora::kPlugin; }
