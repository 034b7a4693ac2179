// The C ABI side of a quantizer component, shared by the builtin quantizers (header-only,
// plugin-api only): the loom_quantizer_vtable whose functions check their pointers, run the
// component's C++ functions under guard() (no exception crosses the ABI) and place new weights on
// their target device. A component supplies a traits class Q:
//   using Instance = ...;                 // constructed from (host, ctx); members host and ctx
//   static constexpr const char* kName;   // "int8": the prefix of every message
//   static std::unique_ptr<loom_qweight> quantize(Instance&, const loom_quantize_request&);
//   static std::unique_ptr<loom_qweight> import_weight(Instance&, const loom_named_tensor*, uint32_t count,
//                                                      const char* metadata, DLDevice target);
//   static void place(Instance&, loom_qweight&, DLDevice target);   // copies to a GPU target
//   static void linear(Instance&, const loom_qweight&, const DLTensor* x, const DLTensor* bias, DLTensor* y);
//   static void dequantize(Instance&, const loom_qweight&, DLTensor* out);
//   static void export_weight(Instance&, const loom_qweight&, const loom_tensor_sink*, loom_buffer* metadata);
//   static void free_device(Instance&, loom_qweight&);              // a weight's device copies
//   static const void* extension(void* instance, const char* id);  // life.get_extension
// Ownership and thread-safety are the vtable's (loom/quantizer.h); weights are owned by the
// instance from quantize/import until free_weight.
#ifndef LOOM_PLUGINS_COMMON_QUANTIZER_GLUE_HPP
#define LOOM_PLUGINS_COMMON_QUANTIZER_GLUE_HPP

#include <memory>
#include <string>

#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"

namespace loomp {

// Deletes a weight; a template so that the delete is compiled where the plugin has defined
// struct loom_qweight (the C ABI declares it incomplete, and deleting an incomplete type would
// skip its destructor).
template <class W>
void delete_weight(W* w) {
  delete w;
}

template <class Q>
struct QuantizerGlue {
  using Instance = typename Q::Instance;
  static Instance& self(void* inst) { return *static_cast<Instance*>(inst); }
  static std::string name() { return Q::kName; }

  static loom_status quantize(void* inst, const loom_quantize_request* r, loom_qweight** out) {
    return guard(self(inst).host, self(inst).ctx, [&] {
      if (r == nullptr || out == nullptr) invalid(name() + ": request and out must not be NULL");
      if (!LOOM_HAS_FIELD(r, loom_quantize_request, target_device)) invalid(name() + ": request struct_size too small");
      auto w = Q::quantize(self(inst), *r);
      Q::place(self(inst), *w, r->target_device);
      *out = w.release();
    });
  }
  static loom_status linear(void* inst, const loom_qweight* w, const DLTensor* x, const DLTensor* bias, DLTensor* y) {
    return guard(self(inst).host, self(inst).ctx, [&] {
      if (w == nullptr) invalid(name() + ": weight is NULL");
      Q::linear(self(inst), *w, x, bias, y);
    });
  }
  static loom_status dequantize(void* inst, const loom_qweight* w, DLTensor* out) {
    return guard(self(inst).host, self(inst).ctx, [&] {
      if (w == nullptr) invalid(name() + ": weight is NULL");
      Q::dequantize(self(inst), *w, out);
    });
  }
  static loom_status export_weight(void* inst, const loom_qweight* w, const loom_tensor_sink* sink, loom_buffer* meta) {
    return guard(self(inst).host, self(inst).ctx, [&] {
      if (w == nullptr) invalid(name() + ": weight is NULL");
      if (sink == nullptr || sink->put == nullptr) invalid(name() + ": sink is NULL");
      if (meta == nullptr) invalid(name() + ": metadata buffer is NULL");
      Q::export_weight(self(inst), *w, sink, meta);
    });
  }
  static loom_status import_weight(void* inst, const loom_named_tensor* ts, uint32_t count, const char* meta,
                                   DLDevice target, loom_qweight** out) {
    return guard(self(inst).host, self(inst).ctx, [&] {
      if (out == nullptr) invalid(name() + ": out is NULL");
      if (ts == nullptr && count > 0) invalid(name() + ": tensors is NULL");
      auto w = Q::import_weight(self(inst), ts, count, meta, target);
      Q::place(self(inst), *w, target);
      *out = w.release();
    });
  }
  static void free_weight(void* inst, loom_qweight* w) {
    if (w) Q::free_device(self(inst), *w);
    delete_weight(w);
  }

  static constexpr loom_quantizer_vtable kVtable = {
      sizeof(loom_quantizer_vtable),
      {&create_instance<Instance>, &destroy_instance<Instance>, &Q::extension, nullptr, nullptr},
      &quantize, &linear, &dequantize, &export_weight, &import_weight, &free_weight,
  };
};

// Writes one exported tensor to the sink, failing with the sink's status and the tensor's name.
inline void put_tensor(const loom_tensor_sink* sink, const std::string& component, const char* name, DLTensor* t) {
  const loom_status s = sink->put(sink->user, name, t, nullptr);
  if (s != LOOM_OK) fail(s, component + ": the sink refused tensor '" + name + "'");
}

// Refuses a target device other than the CPU and, when the plugin was built with its CUDA path,
// a CUDA device.
inline void check_target_device(DLDevice d, bool cuda_built, const std::string& component) {
  if (d.device_type == kDLCPU || (cuda_built && d.device_type == kDLCUDA)) return;
  unsupported(component + ": only the CPU and CUDA target devices are supported");
}

// Frees a weight's device copies through the host that allocated them and clears the pointers.
template <class... T>
void free_device_copies(const loom_host_api* host, loom_host_ctx* ctx, DLDevice device, T*&... copies) {
  auto one = [&](auto*& p) {
    if (p) host->device_free(ctx, device, p);
    p = nullptr;
  };
  (one(copies), ...);
}

// Appends the quantization metadata JSON to `meta`, failing with the host's status.
inline void append_metadata(const loom_host_api* host, loom_buffer* meta, const std::string& json,
                            const std::string& component) {
  const loom_status s = host->buffer_append(meta, json.data(), json.size());
  if (s != LOOM_OK) fail(s, component + ": could not write the metadata");
}

}  // namespace loomp

#endif  // LOOM_PLUGINS_COMMON_QUANTIZER_GLUE_HPP
