// Helpers for the builtin plugin suites: host tensors with DLTensor views, and a runtime made
// from a manifest string on the CPU, so tests reach plugins exactly as the host does.
#pragma once

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "loom/core/error.hpp"
#include "loom/core/host_buffer.hpp"
#include "loom/core/instance.hpp"
#include "loom/core/runtime.hpp"
#include "loom/loom_plugin_api.h"

namespace bt {

template <class T> constexpr DLDataType dtype_of();
template <> constexpr DLDataType dtype_of<float>() { return {kDLFloat, 32, 1}; }
template <> constexpr DLDataType dtype_of<int32_t>() { return {kDLInt, 32, 1}; }
template <> constexpr DLDataType dtype_of<int8_t>() { return {kDLInt, 8, 1}; }
template <> constexpr DLDataType dtype_of<uint8_t>() { return {kDLUInt, 8, 1}; }

// A host tensor: owns shape and data; dl() returns a DLTensor view refreshed on each call.
template <class T> struct Tensor {
  std::vector<int64_t> shape;
  std::vector<T> v;
  DLTensor t{};
  explicit Tensor(std::vector<int64_t> s, std::vector<T> init = {}) : shape(std::move(s)) {
    size_t n = 1;
    for (auto d : shape) n *= static_cast<size_t>(d);
    v = init.empty() ? std::vector<T>(n, T{}) : std::move(init);
  }
  DLTensor *dl() {
    t.data = v.data();
    t.device = DLDevice{kDLCPU, 0};
    t.ndim = static_cast<int32_t>(shape.size());
    t.dtype = dtype_of<T>();
    t.shape = shape.data();
    t.strides = nullptr;
    t.byte_offset = 0;
    return &t;
  }
};

inline std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> out(n);
  for (auto &x : out) x = d(g);
  return out;
}

// A tensor a plugin exported (quantizers' export_weight): shape, dtype and bytes, editable by
// tests that corrupt it before importing it back.
struct StoredTensor {
  std::vector<int64_t> shape;
  DLDataType dtype{};
  std::vector<uint8_t> bytes;
  // A DLTensor over this entry (valid while it lives and is not resized).
  DLTensor view() {
    DLTensor t{};
    t.data = bytes.data();
    t.device = DLDevice{kDLCPU, 0};
    t.ndim = static_cast<int32_t>(shape.size());
    t.dtype = dtype;
    t.shape = shape.data();
    return t;
  }
};
using StoredTensors = std::map<std::string, StoredTensor>;

// A loom_tensor_sink callback that copies each tensor into the StoredTensors at `user`.
inline loom_status store_tensor(void *user, const char *name, DLTensor *t, DLTensor *grad) {
  if (grad != nullptr) return LOOM_ERR_INTERNAL;
  size_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= static_cast<size_t>(t->shape[i]);
  StoredTensor s{std::vector<int64_t>(t->shape, t->shape + t->ndim), t->dtype, std::vector<uint8_t>(n * t->dtype.bits / 8)};
  std::memcpy(s.bytes.data(), static_cast<char *>(t->data) + t->byte_offset, s.bytes.size());
  (*static_cast<StoredTensors *>(user))[name] = std::move(s);
  return LOOM_OK;
}

// Quantizer calls as the host makes them, for the quantizer suites: `quantize` of `weight` (a
// request naming `module`) for `target`, and `import_weight` of (name, tensor) pairs.
inline loom_status quantize(loom::Instance &q, const DLTensor *weight, const char *module, DLDevice target,
                            loom_qweight **out, const DLTensor *calibration = nullptr) {
  loom_quantize_request r{};
  r.struct_size = sizeof(r);
  r.module_name = module;
  r.weight = weight;
  r.calibration = calibration;
  r.target_device = target;
  return q.vtable<loom_quantizer_vtable>()->quantize(q.handle(), &r, out);
}
inline loom_status import_tensors(loom::Instance &q, std::vector<std::pair<std::string, DLTensor>> tensors,
                                  const std::string &metadata, loom_qweight **out, DLDevice target = {kDLCPU, 0}) {
  std::vector<loom_named_tensor> named;
  for (auto &[n, t] : tensors) named.push_back({sizeof(loom_named_tensor), n.c_str(), &t});
  return q.vtable<loom_quantizer_vtable>()->import_weight(q.handle(), named.data(), static_cast<uint32_t>(named.size()),
                                                          metadata.c_str(), target, out);
}
// Every stored tensor as a (name, view) pair for import_tensors (views into `stored`).
inline std::vector<std::pair<std::string, DLTensor>> views_of(StoredTensors &stored) {
  std::vector<std::pair<std::string, DLTensor>> out;
  for (auto &[n, t] : stored) out.emplace_back(n, t.view());
  return out;
}

// A runtime on the CPU from component tables (TOML text).
inline std::unique_ptr<loom::Runtime> runtime(const std::string &components_toml) {
  return loom::Runtime::from_string("[loom]\ndevice = \"cpu\"\n\n" + components_toml, "<test>");
}

// The message of the loom::Error that building `components_toml` throws, or "" if it does not.
inline std::string build_error(const std::string &components_toml) {
  try {
    runtime(components_toml);
  } catch (const loom::Error &e) {
    return e.what();
  }
  return "";
}

// A causal attention batch of layer 0 over the given tensors (views that outlive the call).
inline loom_attention_batch causal_batch(DLTensor *q, DLTensor *k, DLTensor *v, DLTensor *out, DLTensor *seq_offsets,
                                         DLTensor *seq_positions, DLTensor *block_table, DLTensor *kv_pool,
                                         int64_t n_seqs, int64_t n_tokens) {
  loom_attention_batch b{};
  b.struct_size = sizeof(b);
  b.n_seqs = static_cast<int32_t>(n_seqs);
  b.n_tokens = static_cast<int32_t>(n_tokens);
  b.q = q;
  b.k = k;
  b.v = v;
  b.out = out;
  b.seq_offsets = seq_offsets;
  b.seq_positions = seq_positions;
  b.block_table = block_table;
  b.kv_pool = kv_pool;
  b.causal = 1;
  return b;
}

} // namespace bt
