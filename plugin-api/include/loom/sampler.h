/* Sampler kind: logits -> next token, as one link of an ordered chain.
 *
 * A chain (the manifest's [[sampler]] tables, in order) runs over a batch of rows, one row per
 * sequence being decoded. Each link reads and rewrites the logits in place: a filter masks
 * tokens with -INFINITY (top-k, top-p, grammar), a transform rescales them (temperature,
 * penalties), and the last link selects: it writes tokens_out. Rows live on the device the
 * logits live on, so the common chains run on the GPU without copying rows to the host.
 *
 * Per-sequence state (mirostat's mu, a grammar's parse stack, penalty windows) is keyed by
 * seq_id; the host calls accept() with the chosen token, fork() when a sequence is split
 * (beam search, n > 1) and release() when it ends.
 *
 * Randomness is counter-based: a row's random numbers are a pure function of
 * (rng_key[row], rng_counter[row]), e.g. Philox-4x32-10, so that a seed reproduces a run on
 * CPU and on CUDA alike. The host advances counters; samplers never keep a private RNG.
 */
#ifndef LOOM_SAMPLER_H
#define LOOM_SAMPLER_H

#include "loom/plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct loom_sampling_batch {
  uint32_t struct_size;
  int32_t n_rows;
  int32_t vocab_size;
  /* [n_rows, vocab_size] float32, row-major, on the pipeline's device; rewritten in place. */
  DLTensor *logits;
  /* [n_rows] host memory: the sequence each row belongs to. */
  const int64_t *seq_ids;
  /* [n_rows] host memory: the token history of each row (prompt then generated tokens), for
   * penalties and n-gram rules. history[r] has history_len[r] entries. */
  const int32_t *const *history;
  const int32_t *history_len;
  /* [n_rows] host memory: counter-based RNG key and counter of each row. */
  const uint64_t *rng_key;
  const uint64_t *rng_counter;
  /* [n_rows] host memory: written by the selecting link; -1 before selection. */
  int32_t *tokens_out;
  /* [n_rows] host memory, optional (NULL): log-probability of the selected token, written by
   * the selecting link when present. */
  float *logprobs_out;
  /* ABI 1.2 (check LOOM_HAS_FIELD), optional (NULL): [n_rows] int32 on the logits' device. When
   * set, a selecting link flagged LOOM_SAMPLER_DEVICE_TOKENS that ran on the device writes the
   * selected tokens here instead of tokens_out (which it leaves at -1), ordered on the host's
   * current stream, without waiting for the device. The
   * host reads them back itself, after it has queued the next decode step behind the sampler. */
  DLTensor *tokens_device;
} loom_sampling_batch;

/* loom_sampler_vtable.flags */
enum {
  LOOM_SAMPLER_SELECTS = 1u << 0,       /* writes tokens_out: must be last in a chain */
  LOOM_SAMPLER_USES_HISTORY = 1u << 1,  /* reads history/history_len */
  LOOM_SAMPLER_RUNS_ON_CUDA = 1u << 2,  /* apply() accepts logits on kDLCUDA */
  LOOM_SAMPLER_USES_RNG = 1u << 3,      /* reads rng_key/rng_counter */
  LOOM_SAMPLER_DEVICE_TOKENS = 1u << 4  /* ABI 1.2: may write tokens_device instead of tokens_out */
};

typedef struct loom_sampler_vtable {
  uint32_t struct_size;
  loom_lifecycle life;
  uint32_t flags;
  /* Rewrites batch->logits (and, when SELECTS, writes tokens_out). The batch and everything it
   * points to is owned by the host and valid for the call. [serial per instance unless the
   * component is CONCURRENT] */
  loom_status (*apply)(void *instance, const loom_sampling_batch *batch);
  /* Tells the link which token sequence `seq_id` received. Optional (NULL). */
  loom_status (*accept)(void *instance, int64_t seq_id, int32_t token);
  /* Copies the per-sequence state of src_seq to a new dst_seq. Optional (NULL). */
  loom_status (*fork)(void *instance, int64_t src_seq, int64_t dst_seq);
  /* Forgets the state of seq_id; -1 forgets every sequence. Optional (NULL). */
  void (*release)(void *instance, int64_t seq_id);
} loom_sampler_vtable;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_SAMPLER_H */
