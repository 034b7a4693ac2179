// Small helpers shared by Loom's builtin plugins (header-only, C++20, plugin-api only).
//
// Why: every vtable function must turn C++ failures into a loom_status plus a host error
// message, and every plugin validates DLTensors the same way. Keeping that in one place keeps
// each plugin file about its own job. Nothing here touches core/: a third-party plugin could
// copy this header unchanged.
#ifndef LOOM_PLUGINS_COMMON_UTIL_HPP
#define LOOM_PLUGINS_COMMON_UTIL_HPP

#include <cstddef>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "loom/loom_plugin_api.h"

namespace loomp {

// A failure with the status the ABI call should return. Thrown inside plugin code, caught by
// guard() at the ABI edge. `key`, when not empty, is the config key (a path as the host's config
// getters take it) whose value caused the failure, so the host can point at it in the manifest.
class Fail : public std::runtime_error {
 public:
  Fail(loom_status s, const std::string& msg, std::string config_key = {})
      : std::runtime_error(msg), status(s), key(std::move(config_key)) {}
  loom_status status;
  std::string key;
};

[[noreturn]] inline void fail(loom_status s, const std::string& msg) { throw Fail(s, msg); }
[[noreturn]] inline void invalid(const std::string& msg) { fail(LOOM_ERR_INVALID_ARGUMENT, msg); }
[[noreturn]] inline void unsupported(const std::string& msg) { fail(LOOM_ERR_UNSUPPORTED, msg); }
// The value of config key `key` is wrong (out of range, unreadable file, bad grammar...): the
// host reports `msg` at that value's file:line:col, labelled slot.key. For create().
[[noreturn]] inline void invalid_param(const std::string& key, const std::string& msg) {
  throw Fail(LOOM_ERR_INVALID_ARGUMENT, msg, key);
}

// Runs f() and converts any exception into set_error + status, so nothing crosses the ABI. A
// Fail with a key goes through set_config_error where the host has it (ABI 1.3; an older host's
// table ends before it, so check struct_size first) and through set_error elsewhere.
template <class F>
loom_status guard(const loom_host_api* host, loom_host_ctx* ctx, F&& f) noexcept {
  auto report = [&](const char* msg) noexcept {
    if (host != nullptr && host->set_error != nullptr) host->set_error(ctx, msg);
  };
  try {
    f();
    return LOOM_OK;
  } catch (const Fail& e) {
    if (!e.key.empty() && LOOM_HAS_FIELD(host, loom_host_api, set_config_error) && host->set_config_error != nullptr)
      host->set_config_error(ctx, e.key.c_str(), e.what());
    else
      report(e.what());
    return e.status;
  } catch (const std::bad_alloc&) {
    report("out of memory");
    return LOOM_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    report(e.what());
    return LOOM_ERR_INTERNAL;
  } catch (...) {
    report("unknown internal error");
    return LOOM_ERR_INTERNAL;
  }
}

// ---- configuration (the instance's manifest table) ----

// The lifecycle's create/destroy for a component class C constructed from (host, ctx).
template <class C>
loom_status create_instance(const loom_host_api* host, loom_host_ctx* ctx, void** out) {
  return guard(host, ctx, [&] {
    if (out == nullptr) invalid("out_instance is NULL");
    auto inst = std::make_unique<C>(host, ctx);
    *out = inst.release();
  });
}
template <class C>
void destroy_instance(void* inst) {
  delete static_cast<C*>(inst);
}

inline void check_cfg(loom_status s, const char* key, const char* what) {
  if (s != LOOM_OK) invalid_param(key, std::string("config key '") + key + "': cannot read as " + what);
}
inline int64_t cfg_int(const loom_host_api* h, loom_host_ctx* c, const char* key) {
  int64_t v = 0;
  check_cfg(h->config_get_int(c, key, &v), key, "int");
  return v;
}
inline double cfg_float(const loom_host_api* h, loom_host_ctx* c, const char* key) {
  double v = 0;
  check_cfg(h->config_get_float(c, key, &v), key, "float");
  return v;
}
inline bool cfg_bool(const loom_host_api* h, loom_host_ctx* c, const char* key) {
  int32_t v = 0;
  check_cfg(h->config_get_bool(c, key, &v), key, "bool");
  return v != 0;
}
inline std::string cfg_string(const loom_host_api* h, loom_host_ctx* c, const char* key) {
  const char* v = nullptr;
  check_cfg(h->config_get_string(c, key, &v), key, "string");
  return v != nullptr ? std::string(v) : std::string();
}
// An array of strings, read element-wise as "key[i]".
inline std::vector<std::string> cfg_string_array(const loom_host_api* h, loom_host_ctx* c,
                                                 const char* key) {
  uint32_t n = 0;
  check_cfg(h->config_get_array_size(c, key, &n), key, "array");
  std::vector<std::string> out;
  for (uint32_t i = 0; i < n; ++i) {
    std::string k = std::string(key) + "[" + std::to_string(i) + "]";
    out.push_back(cfg_string(h, c, k.c_str()));
  }
  return out;
}

// ---- tools ----

// A tool's outcome written into the host's result buffer (`who` names the tool in errors).
inline void write_tool_result(const loom_host_api* host, loom_tool_result* result, const std::string& text, bool is_error,
                              const std::string& who) {
  host->buffer_clear(result->content);
  const loom_status s = host->buffer_append(result->content, text.data(), text.size());
  if (s != LOOM_OK) fail(s, who + ": could not write the result");
  result->is_error = is_error ? 1 : 0;
}

// ---- DLTensor helpers ----

inline bool is_dtype(DLDataType t, uint8_t code, uint8_t bits) {
  return t.code == code && t.bits == bits && t.lanes == 1;
}
inline bool is_f32(DLDataType t) { return is_dtype(t, kDLFloat, 32); }
inline bool is_i32(DLDataType t) { return is_dtype(t, kDLInt, 32); }

inline int64_t numel(const DLTensor& t) {
  int64_t n = 1;
  for (int32_t i = 0; i < t.ndim; ++i) n *= t.shape[i];
  return n;
}
inline bool is_contiguous(const DLTensor& t) {
  if (t.strides == nullptr) return true;
  int64_t expect = 1;
  for (int32_t i = t.ndim - 1; i >= 0; --i) {
    if (t.shape[i] != 1 && t.strides[i] != expect) return false;
    expect *= t.shape[i];
  }
  return true;
}
inline std::string shape_str(const DLTensor& t) {
  std::string s = "[";
  for (int32_t i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + "]";
}
inline std::string shape_str(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

template <class T>
inline T* data_of(const DLTensor& t) {
  return reinterpret_cast<T*>(static_cast<char*>(t.data) + t.byte_offset);
}

// Checks a tensor is present, on the CPU, of the given dtype, contiguous and (where the
// expected extent is >= 0) of the given shape. Wrong device -> UNSUPPORTED; anything else ->
// INVALID_ARGUMENT. `name` is the field named in the message.
inline void check_cpu_tensor(const DLTensor* t, const char* name, uint8_t code, uint8_t bits,
                             const std::vector<int64_t>& shape) {
  if (t == nullptr) invalid(std::string(name) + " is NULL");
  if (t->device.device_type != kDLCPU)
    unsupported(std::string(name) + ": only CPU tensors are supported by this component");
  if (!is_dtype(t->dtype, code, bits)) {
    const char* kind = code == kDLFloat ? "float" : code == kDLInt ? "int" : "uint";
    invalid(std::string(name) + ": expected dtype " + kind + std::to_string(bits));
  }
  if (t->ndim != static_cast<int32_t>(shape.size()))
    invalid(std::string(name) + ": expected " + std::to_string(shape.size()) + "-D tensor, got " +
            std::to_string(t->ndim) + "-D " + shape_str(*t));
  for (std::size_t i = 0; i < shape.size(); ++i)
    if (shape[i] >= 0 && t->shape[i] != shape[i])
      invalid(std::string(name) + ": expected shape " + shape_str(shape) + " (-1 = any), got " +
              shape_str(*t));
  for (std::size_t i = 0; i < shape.size(); ++i)
    if (t->shape[i] < 0) invalid(std::string(name) + ": negative extent in " + shape_str(*t));
  if (!is_contiguous(*t)) invalid(std::string(name) + ": must be contiguous row-major");
  if (t->data == nullptr && numel(*t) > 0) invalid(std::string(name) + ": data is NULL");
}
inline void check_f32(const DLTensor* t, const char* name, const std::vector<int64_t>& shape) {
  check_cpu_tensor(t, name, kDLFloat, 32, shape);
}
inline void check_i32(const DLTensor* t, const char* name, const std::vector<int64_t>& shape) {
  check_cpu_tensor(t, name, kDLInt, 32, shape);
}

// A DLTensor view over plugin-owned host memory; keeps its own shape array alive.
struct OwnedView {
  std::vector<int64_t> shape;
  DLTensor t{};
  OwnedView(void* data, DLDataType dtype, std::vector<int64_t> s) : shape(std::move(s)) {
    t.data = data;
    t.device = DLDevice{kDLCPU, 0};
    t.ndim = static_cast<int32_t>(shape.size());
    t.dtype = dtype;
    t.shape = shape.data();
    t.strides = nullptr;
    t.byte_offset = 0;
  }
  OwnedView(const OwnedView&) = delete;
  OwnedView& operator=(const OwnedView&) = delete;
};

inline constexpr DLDataType kF32{kDLFloat, 32, 1};
inline constexpr DLDataType kI32{kDLInt, 32, 1};
inline constexpr DLDataType kI8{kDLInt, 8, 1};

}  // namespace loomp

#endif
