// Private to core: what every host of adapters (the CPU and CUDA backends, the trainer) asks of
// an adapter instance in the same way: attaching it to one site, and its ABI 1.6 extensions.
// Thread-safety: as the instance's calls (the host serialises them); no state here.
#pragma once

#include <cstdint>
#include <string>

#include "loom/core/instance.hpp"
#include "loom/loom_plugin_api.h"

namespace loom {

// Attaches `adapter` to the site `name` ([n, in] -> [n, out], `kind`: linear, block or attention
// prefix) on `device` in `dtype`; returns the plugin's site. Throws loom::Error ("attach NAME")
// when the plugin refuses it.
inline loom_adapter_site *attach_adapter_site(Instance &adapter, const std::string &name, int64_t in, int64_t out,
                                              DLDataType dtype, DLDevice device, loom_adapter_site_kind kind) {
  loom_adapter_module m{};
  m.struct_size = sizeof(m);
  m.module_name = name.c_str();
  m.in_features = in;
  m.out_features = out;
  m.dtype = dtype;
  m.device = device;
  m.site = kind;
  loom_adapter_site *site = nullptr;
  adapter.check(adapter.vtable<loom_adapter_vtable>()->attach(adapter.handle(), &m, &site), ("attach " + name).c_str());
  return site;
}

// The virtual tokens a prefix adapter puts before every sequence (loom.adapter.prefix/1); 0 for
// any other adapter.
inline int64_t adapter_virtual_tokens(const Instance &adapter) {
  const auto *ext = adapter.extension<loom_adapter_prefix_ext>(LOOM_ADAPTER_PREFIX_EXTENSION);
  return LOOM_HAS_FIELD(ext, loom_adapter_prefix_ext, virtual_tokens) ? ext->virtual_tokens : 0;
}

// The gathered calls of an adapter's library (loom.adapter.gathered/1), or nullptr.
inline const loom_adapter_gathered_ext *adapter_gathered(const Instance &adapter) {
  const auto *ext = adapter.extension<loom_adapter_gathered_ext>(LOOM_ADAPTER_GATHERED_EXTENSION);
  return LOOM_HAS_FIELD(ext, loom_adapter_gathered_ext, free_group) ? ext : nullptr;
}

}  // namespace loom
