/* ABI probe: a small shared library whose exported functions mention every type of the plugin
 * ABI (plugin-api/include/loom/\*.h), so that its DWARF, read by abidw, describes the whole ABI.
 * check_abi.sh compares that description with the committed baseline (loom_abi_v1.xml).
 *
 * One function per type, taking a pointer to it. Add one here for every new type in the headers:
 * check_abi.sh fails when a loom_* typedef of the headers is missing from the probe's DWARF.
 *
 * Enum constants of anonymous enums are not types and do not appear in DWARF; their values are
 * pinned below with static assertions for ABI major 1 instead. */
#include "loom/loom_plugin_api.h"

#if defined(__GNUC__)
#define PROBE __attribute__((visibility("default")))
#else
#define PROBE
#endif

#define PROBE_TYPE(type) \
  PROBE void loom_abi_probe_##type(const type *p); \
  void loom_abi_probe_##type(const type *p) { (void)p; }

/* abi.h */
PROBE_TYPE(loom_status)
PROBE_TYPE(loom_kind)
PROBE_TYPE(loom_log_level)
PROBE_TYPE(loom_host_ctx)
PROBE_TYPE(loom_buffer)
/* host.h */
PROBE_TYPE(loom_value_type)
PROBE_TYPE(loom_host_api)
/* host_kernels.h */
PROBE_TYPE(loom_host_kernels)
PROBE_TYPE(loom_host_vocab)
PROBE_TYPE(loom_host_models)
PROBE_TYPE(loom_model_batch)
PROBE_TYPE(loom_host_model)
/* plugin.h */
PROBE_TYPE(loom_param_desc)
PROBE_TYPE(loom_lifecycle)
PROBE_TYPE(loom_threading)
PROBE_TYPE(loom_component_desc)
PROBE_TYPE(loom_plugin_desc)
PROBE_TYPE(loom_plugin_entry_fn)
/* tensor.h */
PROBE_TYPE(loom_named_tensor)
PROBE_TYPE(loom_tensor_sink)
/* attention.h */
PROBE_TYPE(loom_attention_config)
PROBE_TYPE(loom_kv_layout)
PROBE_TYPE(loom_attention_batch)
PROBE_TYPE(loom_attention_backward_batch)
PROBE_TYPE(loom_attention_vtable)
/* quantizer.h */
PROBE_TYPE(loom_qweight)
PROBE_TYPE(loom_quantize_request)
PROBE_TYPE(loom_quantizer_vtable)
/* quantizer_fused.h */
PROBE_TYPE(loom_linear_input)
PROBE_TYPE(loom_linear_output)
PROBE_TYPE(loom_linear_fusion)
PROBE_TYPE(loom_quantizer_fused)
/* adapter.h */
PROBE_TYPE(loom_adapter_site)
PROBE_TYPE(loom_adapter_module)
PROBE_TYPE(loom_adapter_io)
PROBE_TYPE(loom_adapter_grad_io)
PROBE_TYPE(loom_adapter_vtable)
PROBE_TYPE(loom_adapter_site_kind)
PROBE_TYPE(loom_adapter_prefix_ext)
PROBE_TYPE(loom_adapter_group)
PROBE_TYPE(loom_adapter_gathered_ext)
/* sampler.h */
PROBE_TYPE(loom_sampling_batch)
PROBE_TYPE(loom_sampler_vtable)
PROBE_TYPE(loom_sampler_beams)
PROBE_TYPE(loom_sampling_candidates)
/* parallel.h */
PROBE_TYPE(loom_reduce_op)
PROBE_TYPE(loom_group)
PROBE_TYPE(loom_parallel_topology)
PROBE_TYPE(loom_shard)
PROBE_TYPE(loom_parallel_vtable)
PROBE_TYPE(loom_parallel_training)
PROBE_TYPE(loom_parallel_training_ext)
/* retriever.h */
PROBE_TYPE(loom_score_kind)
PROBE_TYPE(loom_document)
PROBE_TYPE(loom_query)
PROBE_TYPE(loom_passage)
PROBE_TYPE(loom_passage_fn)
PROBE_TYPE(loom_retriever_vtable)
/* tool.h */
PROBE_TYPE(loom_tool_info)
PROBE_TYPE(loom_tool_result)
PROBE_TYPE(loom_tool_vtable)
/* drafter.h (ABI 1.9) */
PROBE_TYPE(loom_draft_batch)
PROBE_TYPE(loom_drafter_vtable)

/* The values of the ABI's enum constants and string ids are part of ABI major 1. A major bump
 * may change them (update this block with the new baseline). */
#if LOOM_ABI_MAJOR == 1
/* A C99 static assertion: an array of negative size does not compile. */
#define PIN_CAT2(a, b) a##b
#define PIN_CAT(a, b) PIN_CAT2(a, b)
#define PIN(expr) typedef char PIN_CAT(loom_abi_pinned_value_, __LINE__)[(expr) ? 1 : -1]
PIN(LOOM_OK == 0);
PIN(LOOM_ERR_INVALID_ARGUMENT == 1);
PIN(LOOM_ERR_OUT_OF_MEMORY == 2);
PIN(LOOM_ERR_UNSUPPORTED == 3);
PIN(LOOM_ERR_NOT_FOUND == 4);
PIN(LOOM_ERR_CANCELLED == 5);
PIN(LOOM_ERR_BUFFER_TOO_SMALL == 6);
PIN(LOOM_ERR_IO == 7);
PIN(LOOM_ERR_DEVICE == 8);
PIN(LOOM_ERR_INTERNAL == 9);
PIN(LOOM_KIND_ATTENTION == 1);
PIN(LOOM_KIND_QUANTIZER == 2);
PIN(LOOM_KIND_ADAPTER == 3);
PIN(LOOM_KIND_SAMPLER == 4);
PIN(LOOM_KIND_PARALLEL == 5);
PIN(LOOM_KIND_RETRIEVER == 6);
PIN(LOOM_KIND_TOOL == 7);
PIN(LOOM_KIND_DRAFTER == 8);
PIN(LOOM_LOG_DEBUG == 0 && LOOM_LOG_INFO == 1 && LOOM_LOG_WARN == 2 && LOOM_LOG_ERROR == 3);
PIN(LOOM_VALUE_NONE == 0 && LOOM_VALUE_BOOL == 1 && LOOM_VALUE_INT == 2);
PIN(LOOM_VALUE_FLOAT == 3 && LOOM_VALUE_STRING == 4 && LOOM_VALUE_ARRAY == 5);
PIN(LOOM_VALUE_TABLE == 6);
PIN(LOOM_THREADING_SERIAL == 0 && LOOM_THREADING_CONCURRENT == 1);
PIN(LOOM_SAMPLER_SELECTS == 1 && LOOM_SAMPLER_USES_HISTORY == 2);
PIN(LOOM_SAMPLER_RUNS_ON_CUDA == 4 && LOOM_SAMPLER_USES_RNG == 8);
PIN(LOOM_SAMPLER_DEVICE_TOKENS == 16 && LOOM_SAMPLER_BEAMS == 32);
PIN(LOOM_SAMPLER_CANDIDATES == 64 && LOOM_SAMPLER_DENSE_SCALE == 128);
PIN(LOOM_REDUCE_SUM == 0 && LOOM_REDUCE_MAX == 1 && LOOM_REDUCE_MIN == 2 && LOOM_REDUCE_AVG == 3);
PIN(LOOM_GROUP_WORLD == 0 && LOOM_GROUP_TENSOR == 1 && LOOM_GROUP_DATA == 2);
PIN(LOOM_GROUP_PIPELINE == 3);
PIN(LOOM_SCORE_BM25 == 1 && LOOM_SCORE_COSINE == 2 && LOOM_SCORE_INNER_PRODUCT == 3);
PIN(LOOM_SCORE_L2 == 4 && LOOM_SCORE_RRF == 5 && LOOM_SCORE_RERANK == 6);
PIN(sizeof(LOOM_PLUGIN_ENTRY_SYMBOL) == sizeof("loom_plugin_entry"));
PIN(sizeof(LOOM_HOST_KERNELS_EXTENSION) == sizeof("loom.host.kernels/1"));
PIN(sizeof(LOOM_SAMPLER_BEAMS_EXTENSION) == sizeof("loom.sampler.beams/1"));
#undef PIN
#undef PIN_CAT
#undef PIN_CAT2
#endif
