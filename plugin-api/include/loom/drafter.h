/* Drafter kind (ABI 1.9; sampled drafts 1.10): proposes the next few tokens of a sequence for speculative decoding.
 *
 * The engine asks the drafter for up to k tokens that may follow a sequence's context, feeds the
 * context's last token and the drafts to the target model in one forward pass, and keeps the
 * drafts that the target's sampler chain would have produced itself, then one token of the
 * target's own (DESIGN.md "Speculative decoding"). A drafter only proposes: a bad draft costs
 * time, never correctness, except for one claim a drafter may make: that sampled drafts were
 * drawn from the q it gives (q_out below, ABI 1.10). The host checks that each such q row is a
 * distribution giving its draft mass (finite, >= 0, a positive sum; it renormalises), else it
 * verifies the drafts as point masses, which is exact whatever drew them; it cannot check that
 * the drafts were drawn from q, and a q that lies biases the output. Examples: prompt lookup
 * (n-gram matching against the context), a smaller model sharing the target's tokenizer
 * (through the host extension loom.host.models/1).
 *
 * Sequences: the host names each sequence with a seq_id and gives its whole context (prompt and
 * generated tokens) at every call, so a drafter may keep per-sequence state (a draft model's KV
 * cache) and compare it with the context to see what the target accepted; release() says when a
 * sequence ended. Ownership: everything the batch points to is the host's, valid for the call;
 * the drafter writes only the _out arrays.
 */
#ifndef LOOM_DRAFTER_H
#define LOOM_DRAFTER_H

#include "loom/plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct loom_draft_batch {
  uint32_t struct_size;
  int32_t n_seqs;             /* S */
  int32_t vocab_size;         /* the target model's: draft tokens must lie in [0, vocab_size) */
  const int64_t *seq_ids;     /* [S] */
  /* [S] the context of each sequence: prompt then generated tokens; the last one is the token
   * the target model reads next (its KV is not computed yet). */
  const int32_t *const *context;
  const int32_t *context_len; /* [S], each >= 1 */
  const int32_t *max_draft;   /* [S] propose at most this many tokens for sequence s (>= 1) */
  int32_t stride;             /* >= every max_draft[s] */
  /* [S * stride], written: the drafts of sequence s are draft_out[s * stride + i], i < n_out[s] */
  int32_t *draft_out;
  int32_t *n_out;             /* [S], written: 0 (no proposal) .. max_draft[s] */
  /* ---- ABI 1.10 (a drafter checks LOOM_HAS_FIELD(batch, loom_draft_batch, q_given)): sampled
   * drafts. q_out[s] is NULL, or [stride, vocab_size] float32 host memory that the host offers
   * sequence s because its sampler chain draws the token from a distribution (its selecting link
   * is flagged LOOM_SAMPLER_CATEGORICAL). A drafter that drew draft i of sequence s from a
   * distribution q_i of its own writes q_i into row i (probabilities over the target's
   * vocabulary that sum to 1, with q_i(draft i) > 0) and sets q_given[s] to 1. The host then
   * keeps draft i with probability min(1, p_i(d_i) / q_i(d_i)), p_i being the target's
   * distribution there, and at the first rejection draws the token from max(0, p_i - q_i)
   * renormalised (Leviathan et al.; Chen et al.): the output follows p exactly and keeps more
   * drafts than point-mass verification wherever q resembles p. With q_given[s] 0 (the host
   * sets 0 before the call) drafts are point masses, verified as greedy drafts are. The host
   * offers q only to drafters built for ABI 1.10 or later, and sets the first entry of rows
   * 0 .. max_draft[s] - 1 to NaN before every call: a row the drafter does not write is refused
   * (its drafts become point masses), never read as an earlier call's q. ---- */
  float *const *q_out;        /* [S] */
  int32_t *q_given;           /* [S], written */
} loom_draft_batch;

typedef struct loom_drafter_vtable {
  uint32_t struct_size;
  loom_lifecycle life;
  /* Proposes drafts for every sequence of the batch. Called on the serving thread between
   * forward passes. [serial per instance] */
  loom_status (*propose)(void *instance, const loom_draft_batch *batch);
  /* Forgets sequence seq_id (it ended); -1 forgets every sequence. Optional (NULL). */
  void (*release)(void *instance, int64_t seq_id);
} loom_drafter_vtable;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_DRAFTER_H */
