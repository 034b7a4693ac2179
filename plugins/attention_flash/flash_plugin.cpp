// Attention component `flash`: the plugin descriptor and the C ABI edge. Everything the
// component does lives in FlashAttention (flash_attention.hpp); this file turns ABI calls into
// member calls and C++ failures into a status and a host error message (guard()).
//
// The descriptor, its parameter list and its vtable are static constant data, readable from any
// thread while the library is loaded.
#include <memory>

#include "flash_attention.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"

namespace loomp::flash {
namespace {

loom_status create_fn(const loom_host_api* host, loom_host_ctx* ctx, void** out) {
  return guard(host, ctx, [&] {
    if (out == nullptr) invalid("out_instance is NULL");
    *out = std::make_unique<FlashAttention>(host, ctx).release();
  });
}

void destroy_fn(void* inst) { delete static_cast<FlashAttention*>(inst); }

loom_status prepare_fn(void* inst, const loom_attention_config* c, loom_kv_layout* layout) {
  auto* a = static_cast<FlashAttention*>(inst);
  return guard(a->host(), a->ctx(), [&] {
    if (c == nullptr || layout == nullptr) invalid("flash: config and layout_out must not be NULL");
    if (!LOOM_HAS_FIELD(c, loom_attention_config, device)) invalid("flash: attention config struct_size too small");
    if (layout->struct_size < sizeof(loom_kv_layout)) invalid("flash: layout_out struct_size too small");
    loom_kv_layout l{};
    l.struct_size = sizeof(loom_kv_layout);
    a->prepare(*c, l);
    *layout = l;
  });
}

loom_status forward_fn(void* inst, const loom_attention_batch* b) {
  auto* a = static_cast<FlashAttention*>(inst);
  return guard(a->host(), a->ctx(), [&] {
    if (b == nullptr) invalid("flash: batch is NULL");
    if (!LOOM_HAS_FIELD(b, loom_attention_batch, causal)) invalid("flash: batch struct_size too small");
    a->forward(*b);
  });
}

constexpr loom_attention_vtable kVtable = {
    sizeof(loom_attention_vtable),
    {&create_fn, &destroy_fn, nullptr, nullptr, nullptr},
    &prepare_fn,
    &forward_fn,
    nullptr,  // backward: not yet
};
constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "block_size", LOOM_VALUE_INT, 0, "16",
     "tokens per KV cache block, a power of two in [1, 1024]"},
};
constexpr loom_component_desc kFlash = {
    sizeof(loom_component_desc), LOOM_KIND_ATTENTION, "flash", "1.0.0",
    "FlashAttention-2-style CUDA attention (tensor-core prefill, split-key decode) over a paged "
    "bfloat16/float16 KV cache; head_dim 64 or 128",
    kParams, 1, LOOM_THREADING_SERIAL, &kVtable};
const loom_component_desc* const kComponents[] = {&kFlash};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-attention-flash", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::flash

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::flash::kPlugin; }
