/* Host extension "loom.host.models/1" (ABI 1.9): a plugin runs a model of its own through the
 * host's engine: a checkpoint in the Hugging Face layout, on the pipeline's device, with its own
 * KV cache and the pipeline's attention component. A draft-model drafter is the use it was made
 * for: the plugin decides what to feed, the host runs the forward passes.
 *
 * Obtained with host->get_extension(ctx, LOOM_HOST_MODELS_EXTENSION); NULL when the host does not
 * offer it. The table is static.
 * Ownership: open() gives the plugin a model handle that it must close() (before its instance is
 * destroyed). Thread-safety: one thread at a time per model handle; forward passes run on the
 * pipeline's device and stream, and return once their outputs are on the host.
 */
#ifndef LOOM_HOST_MODELS_H
#define LOOM_HOST_MODELS_H

#include "loom/host.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LOOM_HOST_MODELS_EXTENSION "loom.host.models/1"

typedef struct loom_host_model loom_host_model;

/* Errors: open() reports through open_error() (the plugin names the failure in its own words,
 * with that text); forward() through the context's error, as every host call. */

/* One forward pass over the new tokens of S sequences. Sequence s owns KV slot slots[s] (0 ..
 * max_seqs - 1) and its new tokens sit at positions [positions[s], positions[s] + n), n =
 * offsets[s+1] - offsets[s] >= 1; positions before positions[s] must hold what earlier passes
 * wrote for that slot (a later pass at a lower position overwrites: that is how a plugin rolls
 * a sequence back). */
typedef struct loom_model_batch {
  uint32_t struct_size;
  int32_t n_seqs;
  const int32_t *slots;     /* [S] */
  const int32_t *positions; /* [S] */
  const int32_t *offsets;   /* [S+1] */
  const int32_t *tokens;    /* [offsets[S]] */
  /* Outputs, host memory, each optional (NULL): float32 logits [S, vocab] of each sequence's last
   * new token, and their argmax [S]. */
  float *logits_out;
  int32_t *argmax_out;
} loom_model_batch;

typedef struct loom_host_models {
  uint32_t struct_size;
  /* Loads the model at `path` (a directory; relative to the manifest's directory) for up to
   * max_seqs sequences of up to max_positions positions each (0: the model's maximum), with a
   * fresh instance of the attention component named `attention` (NULL: the one of the runtime's
   * [attention] table, with its settings). */
  loom_status (*open)(loom_host_ctx *ctx, const char *path, const char *attention, int32_t max_seqs,
                      int32_t max_positions, loom_host_model **out);
  int32_t (*vocab_size)(loom_host_model *model);
  int32_t (*max_positions)(loom_host_model *model); /* as opened */
  loom_status (*forward)(loom_host_model *model, const loom_model_batch *batch);
  void (*close)(loom_host_model *model);
  /* Why the last open() on this context failed (a missing directory, a bad checkpoint); "" when
   * it did not. Owned by the host, valid until the next open() on the context. */
  const char *(*open_error)(loom_host_ctx *ctx);
  /* Greedy drafting in one call: runs `batch` (its outputs ignored), then steps - 1 decode passes,
   * each feeding every sequence the argmax of its previous pass, and writes the steps argmaxes of
   * sequence s to tokens_out[s * steps + i]. On a GPU the passes follow one another on the device
   * without waiting for the host. The slots then hold the batch's tokens and the first steps - 1
   * argmaxes. Every sequence needs positions[s] + n + steps - 1 <= max_positions. */
  loom_status (*greedy)(loom_host_model *model, const loom_model_batch *batch, int32_t steps, int32_t *tokens_out);
} loom_host_models;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_HOST_MODELS_H */
