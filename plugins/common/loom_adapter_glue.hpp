// The adapter vtable's C entry points over a builtin adapter's C++ functions, so that each
// adapter plugin (lora, bottleneck) writes its maths and not the ABI edge: argument and
// struct_size checks, exceptions turned into statuses through guard(), the instance cast.
//
// A is the instance type: constructible from (host, ctx), with `host`, `ctx` members, a
// `matches(name)` predicate and `static constexpr const char* kName`. The free functions take
// the instance first; attach gets the module checked for NULL and for the fields up to
// `device`, and decides about `site` itself (LOOM_HAS_FIELD).
// Ownership: create() returns a heap instance that destroy() deletes. Thread-safety: as the
// component declares (the builtin adapters are SERIAL).
#ifndef LOOM_PLUGINS_COMMON_ADAPTER_GLUE_HPP
#define LOOM_PLUGINS_COMMON_ADAPTER_GLUE_HPP

#include <memory>
#include <string>

#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"

namespace loomp {

template <class A, void (*Attach)(A&, const loom_adapter_module*, loom_adapter_site**),
          void (*Forward)(A&, loom_adapter_site&, const loom_adapter_io&),
          void (*Backward)(A&, loom_adapter_site&, const loom_adapter_grad_io&),
          void (*Parameters)(A&, const loom_tensor_sink*), void (*Load)(A&, const loom_named_tensor*, uint32_t),
          void (*Merge)(A&, loom_adapter_site&, DLTensor*, int32_t) = nullptr>
struct AdapterGlue {
  static A& self(void* inst) { return *static_cast<A*>(inst); }
  static std::string who() { return std::string(A::kName) + ": "; }

  static loom_status create(const loom_host_api* host, loom_host_ctx* ctx, void** out) {
    return guard(host, ctx, [&] {
      if (out == nullptr) invalid("out_instance is NULL");
      *out = std::make_unique<A>(host, ctx).release();
    });
  }
  static void destroy(void* inst) { delete static_cast<A*>(inst); }
  static int32_t targets(void* inst, const char* name) {
    try {
      return name != nullptr && self(inst).matches(name) ? 1 : 0;
    } catch (...) {
      return 0;
    }
  }
  static loom_status attach(void* inst, const loom_adapter_module* m, loom_adapter_site** out) {
    A& a = self(inst);
    return guard(a.host, a.ctx, [&] {
      if (m == nullptr || out == nullptr) invalid(who() + "module and out must not be NULL");
      if (!LOOM_HAS_FIELD(m, loom_adapter_module, device)) invalid(who() + "module struct_size too small");
      if (m->module_name == nullptr) invalid(who() + "module_name is NULL");
      Attach(a, m, out);
    });
  }
  static loom_status forward(void* inst, loom_adapter_site* s, const loom_adapter_io* io) {
    A& a = self(inst);
    return guard(a.host, a.ctx, [&] {
      if (s == nullptr || io == nullptr) invalid(who() + "site and io must not be NULL");
      if (!LOOM_HAS_FIELD(io, loom_adapter_io, training)) invalid(who() + "io struct_size too small");
      Forward(a, *s, *io);
    });
  }
  static loom_status backward(void* inst, loom_adapter_site* s, const loom_adapter_grad_io* io) {
    A& a = self(inst);
    return guard(a.host, a.ctx, [&] {
      if (s == nullptr || io == nullptr) invalid(who() + "site and io must not be NULL");
      if (!LOOM_HAS_FIELD(io, loom_adapter_grad_io, row_mask)) invalid(who() + "grad io struct_size too small");
      Backward(a, *s, *io);
    });
  }
  static loom_status parameters(void* inst, const loom_tensor_sink* sink) {
    A& a = self(inst);
    return guard(a.host, a.ctx, [&] { Parameters(a, sink); });
  }
  static loom_status load(void* inst, const loom_named_tensor* ts, uint32_t count) {
    A& a = self(inst);
    return guard(a.host, a.ctx, [&] { Load(a, ts, count); });
  }
  static loom_status merge(void* inst, loom_adapter_site* s, DLTensor* w, int32_t sign) {
    A& a = self(inst);
    return guard(a.host, a.ctx, [&] {
      if (s == nullptr) invalid(who() + "site is NULL");
      Merge(a, *s, w, sign);
    });
  }

  // The vtable with an instance extension lookup (lifecycle get_extension).
  static constexpr loom_adapter_vtable with_extension(const void* (*extension)(void*, const char*)) {
    loom_adapter_vtable v = vtable;
    v.life.get_extension = extension;
    return v;
  }

  static constexpr loom_adapter_vtable vtable = {
      sizeof(loom_adapter_vtable),
      {&create, &destroy, nullptr, nullptr, nullptr},
      &targets, &attach, &forward, &backward, &parameters, &load, Merge == nullptr ? nullptr : &merge,
  };
};

}  // namespace loomp

#endif
