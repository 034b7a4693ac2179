/* Adapter kind: a trainable or loaded delta on named modules (LoRA on linears, bottleneck
 * adapters on block outputs, prefix tuning's virtual keys and values in attention).
 *
 * An adapter instance is one adapter (one set of weights). The host asks which modules it
 * targets, attaches it to each (the plugin allocates that module's parameters), and then calls
 * forward/backward around the base module's own computation. Several instances over one base
 * model serve several adapters at once; rows that do not use an instance are masked out.
 */
#ifndef LOOM_ADAPTER_H
#define LOOM_ADAPTER_H

#include "loom/plugin.h"
#include "loom/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct loom_adapter_site loom_adapter_site; /* plugin-owned per-module state */

/* Where a site sits (loom_adapter_module.site, ABI 1.6). */
typedef int32_t loom_adapter_site_kind;
enum {
  /* A linear module ("model.layers.0.self_attn.q_proj"): forward's x is the linear's input
   * [n, in_features], y its output [n, out_features]. */
  LOOM_ADAPTER_SITE_LINEAR = 0,
  /* A block's output before its residual add ("model.layers.0.self_attn" after o_proj,
   * "model.layers.0.mlp" after down_proj; in_features == out_features == hidden size): x is that
   * output, y holds the same values, and the adapter's delta f(x) is added into y (bottleneck
   * adapters). In backward, d_x arrives holding d_y (the identity's share) and the adapter adds
   * its own. Hosts offer block sites only to libraries built for ABI 1.6 or later. */
  LOOM_ADAPTER_SITE_BLOCK = 1,
  /* Prefix tuning: one per layer's attention ("model.layers.0.self_attn"); in_features is the
   * model's hidden size, out_features 2 * n_kv_heads * head_dim. forward's x is NULL and y is
   * [p, out_features], zeroed by the host: the adapter adds each of its p virtual tokens' key
   * then value (used as they are: no rotary embedding is applied to them). Every query attends
   * to them, and the real tokens take positions p, p + 1, ... (as a KV cache holding them would
   * place them, which is how peft's prefix tuning runs on transformers). backward gets d_y of
   * the same shape (x and d_x NULL). Offered only to instances that give the extension below. */
  LOOM_ADAPTER_SITE_ATTENTION_PREFIX = 2
};

/* Instance extension of a prefix adapter (ABI 1.6): how many virtual tokens it puts before every
 * sequence. The table lives as long as the instance. */
#define LOOM_ADAPTER_PREFIX_EXTENSION "loom.adapter.prefix/1"
typedef struct loom_adapter_prefix_ext {
  uint32_t struct_size;
  int64_t virtual_tokens;
} loom_adapter_prefix_ext;

typedef struct loom_adapter_module {
  uint32_t struct_size;
  const char *module_name;  /* "model.layers.0.self_attn.q_proj" */
  int64_t in_features;
  int64_t out_features;
  DLDataType dtype;
  DLDevice device;
  loom_adapter_site_kind site; /* ABI 1.6; older hosts offer linear sites only */
} loom_adapter_module;

typedef struct loom_adapter_io {
  uint32_t struct_size;
  const DLTensor *x;   /* [n, in_features]: the base module's input */
  DLTensor *y;         /* [n, out_features]: the base module's output; the delta is added */
  /* [n] int32 on the device, optional (NULL = every row): non-zero rows use this adapter. */
  const DLTensor *row_mask;
  int32_t training;    /* non-zero: keep what backward needs, apply dropout */
} loom_adapter_io;

typedef struct loom_adapter_grad_io {
  uint32_t struct_size;
  const DLTensor *x;   /* as in forward */
  const DLTensor *d_y; /* [n, out_features] */
  DLTensor *d_x;       /* [n, in_features]: the adapter's contribution is added */
  const DLTensor *row_mask;
} loom_adapter_grad_io;

/* Gathered application (ABI 1.6), for serving several adapters of one library at once on a
 * device: the host groups the sites that the instances attached to one module, and one call then
 * adds to each row the delta of the adapter its index names (S-LoRA / Punica's BGMV), so a batch
 * mixing adapters costs a launch or two per module, not one per adapter. An instance extension;
 * every instance of a library returns the same table. */
#define LOOM_ADAPTER_GATHERED_EXTENSION "loom.adapter.gathered/1"
typedef struct loom_adapter_group loom_adapter_group; /* plugin-owned */
typedef struct loom_adapter_gathered_ext {
  uint32_t struct_size;
  /* `count` entries: instances[i] and its site on the module, or sites[i] NULL when instance i
   * does not target it (rows naming entry i are then left alone). Every site belongs to the same
   * module, on the same device. At most `max_rows` rows per forward_group (its workspace is
   * allocated here, through the host). *out is the library's until free_group. */
  loom_status (*create_group)(void *const *instances, loom_adapter_site *const *sites, int32_t count, int64_t max_rows,
                              loom_adapter_group **out);
  /* io->x [n, in] and io->y [n, out] (y may have a row stride larger than out: strides[0]);
   * row_adapter [n] int32 on the device: the entry whose delta row i gets, or -1. Ordered on the
   * host's current stream; it neither allocates nor synchronises, so a CUDA graph may capture it.
   * Errors are reported through the first instance of the group. */
  loom_status (*forward_group)(loom_adapter_group *group, const loom_adapter_io *io, const DLTensor *row_adapter);
  void (*free_group)(loom_adapter_group *group);
  /* forward_group for `count` groups (up to 4) over the same rows in as few launches as the
   * library can (q/k/v, or gate/up, of one layer): the same result as calling it for each in
   * order. Optional (NULL: call forward_group per group). */
  loom_status (*forward_groups)(loom_adapter_group *const *groups, const loom_adapter_io *const *ios, int32_t count,
                                const DLTensor *row_adapter);
} loom_adapter_gathered_ext;

typedef struct loom_adapter_vtable {
  uint32_t struct_size;
  loom_lifecycle life;
  /* Non-zero when the adapter applies to this module (by the manifest's target patterns). */
  int32_t (*targets)(void *instance, const char *module_name);
  /* Creates the module's parameters (initialised per the plugin's rules, or from loaded
   * weights). *out is owned by the instance. */
  loom_status (*attach)(void *instance, const loom_adapter_module *module, loom_adapter_site **out);
  loom_status (*forward)(void *instance, loom_adapter_site *site, const loom_adapter_io *io);
  /* Optional (NULL for inference-only adapters): accumulates parameter gradients and d_x. */
  loom_status (*backward)(void *instance, loom_adapter_site *site, const loom_adapter_grad_io *io);
  /* Lists every parameter (and gradient) of every attached site, named in the Hugging Face PEFT
   * layout ("base_model.model.<module>.lora_A.weight"), for optimisers and for saving. */
  loom_status (*parameters)(void *instance, const loom_tensor_sink *sink);
  /* Loads parameters by the same names; names that match no site are an error. */
  loom_status (*load)(void *instance, const loom_named_tensor *tensors, uint32_t count);
  /* Optional: folds the delta into a base weight [out, in] in place (sign +1) or takes it out
   * again (sign -1). */
  loom_status (*merge)(void *instance, loom_adapter_site *site, DLTensor *base_weight, int32_t sign);
} loom_adapter_vtable;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_ADAPTER_H */
