// Header-only: the ABI edge every builtin attention component shares. A component class C
// offers prepare(const loom_attention_config&, loom_kv_layout&) and forward(const
// loom_attention_batch&); these check the host's arguments and struct sizes, and turn C++
// failures into a status and a host error message (guard()). `name` prefixes the messages.
// Thread-safety: as the component's own calls (serial per instance).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "loom_kv_format.hpp"
#include "loom_plugin_util.hpp"

namespace loomp {

// The settings sdpa and flash share, parsed the same way, with the same messages.
// kv_dtype: "auto" (the compute dtype's cache), "bf16", "int8" or "fp8".
enum class KvDtype { kAuto, kBf16, kInt8, kFp8 };
inline KvDtype parse_kv_dtype(const std::string& component, const std::string& v) {
  if (v == "auto") return KvDtype::kAuto;
  if (v == "bf16") return KvDtype::kBf16;
  if (v == "int8") return KvDtype::kInt8;
  if (v == "fp8") return KvDtype::kFp8;
  invalid_param("kv_dtype", component + ": kv_dtype must be \"auto\", \"bf16\", \"int8\" or \"fp8\", got \"" + v + "\"");
}
// The cache format a kv_dtype asks for; `unquantized`: the format "auto" means (the compute
// dtype's).
inline kvcache::KvFormat kv_format_of(KvDtype kv, kvcache::KvFormat unquantized) {
  switch (kv) {
    case KvDtype::kBf16: return kvcache::KvFormat::bf16;
    case KvDtype::kInt8: return kvcache::KvFormat::int8;
    case KvDtype::kFp8: return kvcache::KvFormat::fp8;
    case KvDtype::kAuto: break;
  }
  return unquantized;
}
// sliding_window: 0 applies the model's; else a window of 1 to 2^30 positions.
inline int32_t parse_sliding_window(const std::string& component, int64_t w) {
  if (w < 0 || w > (int64_t{1} << 30))
    invalid_param("sliding_window", component + ": sliding_window must be 0 (the model's) or a window of 1 to 2^30 positions, got " +
                                        std::to_string(w));
  return static_cast<int32_t>(w);
}
// The cache_dtype a layout reports for a cache in format f (int8, or DLPack 1.1's float8_e4m3fn code).
inline DLDataType kv_cache_dtype(kvcache::KvFormat f) {
  switch (f) {
    case kvcache::KvFormat::f32: return DLDataType{kDLFloat, 32, 1};
    case kvcache::KvFormat::bf16: return DLDataType{kDLBfloat, 16, 1};
    case kvcache::KvFormat::int8: return DLDataType{kDLInt, 8, 1};
    case kvcache::KvFormat::fp8: return DLDataType{kvcache::kDLFloat8E4M3fnCode, 8, 1};
  }
  return DLDataType{kDLUInt, 8, 1};
}

template <class C>
loom_status attention_prepare(C& a, const loom_host_api* host, loom_host_ctx* ctx, const char* name,
                              const loom_attention_config* c, loom_kv_layout* layout) noexcept {
  return guard(host, ctx, [&] {
    const std::string n(name);
    if (c == nullptr || layout == nullptr) invalid(n + ": config and layout_out must not be NULL");
    if (!LOOM_HAS_FIELD(c, loom_attention_config, device)) invalid(n + ": attention config struct_size too small");
    if (!LOOM_HAS_FIELD(layout, loom_kv_layout, bytes_per_block)) invalid(n + ": layout_out struct_size too small");
    // The component sees a whole current layout: what the host preset (window, ABI 1.4) where
    // its struct has it, zeros past its end; only the fields the host's struct has go back.
    const uint32_t host_size = layout->struct_size;
    const size_t shared = host_size < sizeof(loom_kv_layout) ? host_size : sizeof(loom_kv_layout);
    loom_kv_layout l{};
    std::memcpy(&l, layout, shared);
    l.struct_size = sizeof(loom_kv_layout);
    a.prepare(*c, l);
    std::memcpy(layout, &l, shared);
    layout->struct_size = host_size;
  });
}

template <class C>
loom_status attention_forward(C& a, const loom_host_api* host, loom_host_ctx* ctx, const char* name,
                              const loom_attention_batch* b) noexcept {
  return guard(host, ctx, [&] {
    const std::string n(name);
    if (b == nullptr) invalid(n + ": batch is NULL");
    if (!LOOM_HAS_FIELD(b, loom_attention_batch, causal)) invalid(n + ": batch struct_size too small");
    a.forward(*b);
  });
}

// The backward entry point: C::backward(batch).
template <class C>
loom_status attention_backward(C& a, const loom_host_api* host, loom_host_ctx* ctx, const char* name,
                               const loom_attention_backward_batch* b) noexcept {
  return guard(host, ctx, [&] {
    const std::string n(name);
    if (b == nullptr) invalid(n + ": backward batch is NULL");
    if (!LOOM_HAS_FIELD(b, loom_attention_backward_batch, saved)) invalid(n + ": backward batch struct_size too small");
    a.backward(*b);
  });
}

}  // namespace loomp
