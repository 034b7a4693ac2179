// Attention component `flash`: the plugin descriptor and the C ABI edge. Everything the
// component does lives in FlashAttention (flash_attention.hpp); this file turns ABI calls into
// member calls and C++ failures into a status and a host error message (guard()).
//
// The descriptor, its parameter list and its vtable are static constant data, readable from any
// thread while the library is loaded.
#include "flash_attention.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_attention_glue.hpp"
#include "loom_plugin_util.hpp"

namespace loomp::flash {
namespace {

loom_status prepare_fn(void* inst, const loom_attention_config* c, loom_kv_layout* layout) {
  auto* a = static_cast<FlashAttention*>(inst);
  return attention_prepare(*a, a->host(), a->ctx(), "flash", c, layout);
}

loom_status forward_fn(void* inst, const loom_attention_batch* b) {
  auto* a = static_cast<FlashAttention*>(inst);
  return attention_forward(*a, a->host(), a->ctx(), "flash", b);
}

constexpr loom_attention_vtable kVtable = {
    sizeof(loom_attention_vtable),
    {&create_instance<FlashAttention>, &destroy_instance<FlashAttention>, nullptr, nullptr, nullptr},
    &prepare_fn,
    &forward_fn,
    nullptr,  // backward: not yet
};
constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "block_size", LOOM_VALUE_INT, 0, "16",
     "tokens per KV cache block, a power of two in [1, 1024]"},
    {sizeof(loom_param_desc), "kv_dtype", LOOM_VALUE_STRING, 0, "\"auto\"",
     "KV cache storage: \"auto\" (the compute dtype), \"bf16\", \"int8\" or \"fp8\" (E4M3; sdpa's block format, "
     "a float32 scale per row)"},
    {sizeof(loom_param_desc), "sliding_window", LOOM_VALUE_INT, 0, "0",
     "attend to the last N positions only (Mistral-style, on the paged cache); 0: the model's own window"},
};
constexpr loom_component_desc kFlash = {
    sizeof(loom_component_desc), LOOM_KIND_ATTENTION, "flash", "1.0.0",
    "FlashAttention-2-style CUDA attention (tensor-core prefill, split-key decode) over a paged "
    "bfloat16/float16 KV cache; head_dim 64 or 128",
    kParams, 3, LOOM_THREADING_SERIAL, &kVtable};
const loom_component_desc* const kComponents[] = {&kFlash};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-attention-flash", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::flash

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::flash::kPlugin; }
