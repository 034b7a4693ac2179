// Header-only: the ABI edge every builtin attention component shares. A component class C
// offers prepare(const loom_attention_config&, loom_kv_layout&) and forward(const
// loom_attention_batch&); these check the host's arguments and struct sizes, and turn C++
// failures into a status and a host error message (guard()). `name` prefixes the messages.
// Thread-safety: as the component's own calls (serial per instance).
#pragma once

#include <cstring>
#include <string>

#include "loom_plugin_util.hpp"

namespace loomp {

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

}  // namespace loomp
