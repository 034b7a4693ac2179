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
 *
 * Beam search (ABI 1.2). A selecting link with LOOM_SAMPLER_BEAMS keeps `width` hypotheses
 * (beams) per prompt. The host gives each prompt a beam group of width() adjacent rows (the
 * extension LOOM_SAMPLER_BEAMS_EXTENSION says how many) and fills the beam fields of the batch.
 * At every call the link picks, per group, the beams that go on: row r of the next step
 * continues row parents_out[r] of this batch with tokens_out[r]. The host then reorders its
 * per-row state to match (KV cache, history, and every link's per-sequence state through
 * fork()/release()). Hypotheses that end (an end token, or max_new_tokens reached) are kept by
 * the link; when a group is done the link says so in done_out, and the host takes the group's
 * best hypothesis with finish(). Links before it in the chain rewrite each row as usual.
 *
 * Candidates (ABI 1.3). After a truncating filter (top-k) a row keeps a few dozen tokens of a
 * vocabulary of 100k or more, and every later link that walks the dense row spends most of its
 * time on -inf. When the logits are on a device, the host may offer links flagged
 * LOOM_SAMPLER_CANDIDATES a second, sparse form of the rows (batch->candidates): per row, up to
 * `capacity` (token id, logit) pairs. While candidates->active is 0 the dense logits are the rows
 * and the candidates are free space a link may fill; a link that leaves its result there sets
 * active to 1, and from then on the candidates ARE the rows: row r is ids/logits [0, count[r])
 * and every token not listed is -inf; the dense logits are stale. Listed logits are finite, ids
 * are distinct and in [0, vocab_size), and a row lists its tokens by logit descending, equal
 * logits by id ascending (the order top-k and top-p keep tokens in), so that the most probable
 * token comes first. A link that rewrites active candidates keeps those rules. Before a link
 * without the flag, the host turns active candidates back into dense rows (-inf everywhere but
 * the listed tokens) and clears active; it gives such a link candidates = NULL. After the chain
 * the logits are the host's to discard, in whichever form they are.
 *
 * A deferred scale (ABI 1.4). Temperature multiplies a whole dense row by 1/t: a full pass over
 * 128k entries that a following top-k reads again. A link flagged LOOM_SAMPLER_DENSE_SCALE may
 * leave that multiply owed instead: while candidates->active is 0, row r's logit i is
 * logits[r, i] * candidates->dense_scale (one float32 multiply, rounded to nearest: the value
 * the multiply itself would have stored). The host offers dense_scale = 1. A link flagged
 * LOOM_SAMPLER_DENSE_SCALE reads dense rows with that multiply (top-k does it as it loads them),
 * may set dense_scale to s only while it is 1 (two multiplies in a row round differently from
 * their product, so a second scale is applied, not folded), and may itself apply the owed scale
 * to the dense rows and set dense_scale back to 1. A link that makes candidates active writes
 * the scaled logits there; the host then sets dense_scale to 1. Before any link without the
 * flag, and after the chain, the host applies an owed scale to the dense rows itself.
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
   * current stream, without waiting for the device. The host reads them back itself, after it
   * has queued the next decode step behind the sampler. */
  DLTensor *tokens_device;

  /* ---- ABI 1.2: beam search. The host fills these only for a chain whose selecting link has
   * LOOM_SAMPLER_BEAMS; otherwise they are NULL and 0, and every other link ignores them. A
   * reader checks LOOM_HAS_FIELD(batch, loom_sampling_batch, done_out) first. All host memory,
   * owned by the host, valid for the call. ---- */
  /* [n_rows]: the beam group (one prompt) of each row. A group's rows are adjacent and there are
   * width() of them, in beam order. A group is new at the first call that names it: its rows
   * are then identical (the prompt, in history) and only the first is expanded. The host then
   * gives the group at every call until done_out says it is done, each row's history one token
   * longer than at the previous call. */
  const int64_t *group_ids;
  /* [n_rows]: how many tokens a hypothesis of the row's group may generate after its prompt; at
   * that length every hypothesis ends and the group is done. */
  const int32_t *max_new_tokens;
  /* [n_end_tokens]: tokens that end a hypothesis (end of sequence); may be NULL when 0. */
  const int32_t *end_tokens;
  int32_t n_end_tokens;
  /* [n_rows], written: the row of this batch that row r continues (within r's group). */
  int32_t *parents_out;
  /* [n_rows], written: non-zero for every row of a group that is done after this call; those
   * rows get tokens_out and parents_out -1, the host drops them and calls finish(). */
  int32_t *done_out;
  /* ABI 1.3 (check LOOM_HAS_FIELD), optional (NULL): the rows in sparse form (see "Candidates"
   * above). Non-NULL only for a link flagged LOOM_SAMPLER_CANDIDATES, and only when the host
   * offers them (logits on a device). The buffers are the host's; the link may rewrite them and
   * candidates->active during the call. */
  struct loom_sampling_candidates *candidates;
} loom_sampling_batch;

/* ABI 1.3: candidate rows (see "Candidates" above). Owned by the host; valid for the call. */
typedef struct loom_sampling_candidates {
  uint32_t struct_size;
  int32_t capacity;  /* C: entries each row can hold (>= 1) */
  DLTensor *ids;     /* [n_rows, C] int32 on the logits' device, row-major */
  DLTensor *logits;  /* [n_rows, C] float32 on the logits' device, row-major */
  DLTensor *count;   /* [n_rows] int32 on the logits' device: entries in use in each row */
  /* Host memory. 0: the dense logits are the rows (ids/logits/count hold nothing); 1: the
   * candidates are the rows. Set by the link that writes them; cleared by the host only. */
  int32_t active;
  /* ABI 1.4 (check LOOM_HAS_FIELD): the multiply the dense rows still owe (see "A deferred
   * scale" above); 1 when none. Read and written only by links flagged
   * LOOM_SAMPLER_DENSE_SCALE. */
  float dense_scale;
} loom_sampling_candidates;

/* loom_sampler_vtable.flags */
enum {
  LOOM_SAMPLER_SELECTS = 1u << 0,       /* writes tokens_out: must be last in a chain */
  LOOM_SAMPLER_USES_HISTORY = 1u << 1,  /* reads history/history_len */
  LOOM_SAMPLER_RUNS_ON_CUDA = 1u << 2,  /* apply() accepts logits on kDLCUDA */
  LOOM_SAMPLER_USES_RNG = 1u << 3,      /* reads rng_key/rng_counter */
  LOOM_SAMPLER_DEVICE_TOKENS = 1u << 4, /* ABI 1.2: may write tokens_device instead of tokens_out */
  /* ABI 1.2: selects beams: needs the beam fields of the batch (groups, parents_out, done_out)
   * and offers LOOM_SAMPLER_BEAMS_EXTENSION through life.get_extension. Also SELECTS. */
  LOOM_SAMPLER_BEAMS = 1u << 5,
  /* ABI 1.3: apply() understands batch->candidates: when they are active it reads and rewrites
   * them instead of the dense rows (a selecting link selects from them), and when they are
   * offered but not active it may leave its result there (setting active). */
  LOOM_SAMPLER_CANDIDATES = 1u << 6,
  /* ABI 1.4: with LOOM_SAMPLER_CANDIDATES: reads dense rows through candidates->dense_scale and
   * may defer a multiply there (see "A deferred scale" above). */
  LOOM_SAMPLER_DENSE_SCALE = 1u << 7,
  /* ABI 1.10: with SELECTS: draws row r's token from softmax of the row as it reaches this link
   * (masked tokens at zero), by nothing but the row's random numbers. The host may then verify
   * a drafter's sampled drafts against that distribution instead of calling this link
   * (loom_draft_batch.q_out): the tokens follow the same distribution, not the same draws. */
  LOOM_SAMPLER_CATEGORICAL = 1u << 8
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
  /* Forgets the state of seq_id; -1 forgets every sequence (and a beam link's groups).
   * Optional (NULL). */
  void (*release)(void *instance, int64_t seq_id);
} loom_sampler_vtable;

/* ABI 1.2: the instance extension of a LOOM_SAMPLER_BEAMS link, from
 * life.get_extension(instance, LOOM_SAMPLER_BEAMS_EXTENSION); lives as long as the instance. */
#define LOOM_SAMPLER_BEAMS_EXTENSION "loom.sampler.beams/1"
typedef struct loom_sampler_beams {
  uint32_t struct_size;
  /* The number of rows (beams) the host gives each group; >= 1, fixed for the instance.
   * [any thread] */
  int32_t (*width)(void *instance);
  /* The best hypothesis of a group that done_out reported: appends its generated tokens
   * (int32_t each, host byte order, an ending end token included) to `tokens` through
   * host->buffer_append, writes its score (sum of token log-probabilities divided by
   * length ** length_penalty) to *score, and forgets the group. LOOM_ERR_NOT_FOUND for a group
   * that is unknown or not done. [serial with apply()] */
  loom_status (*finish)(void *instance, int64_t group, loom_buffer *tokens, float *score);
} loom_sampler_beams;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_SAMPLER_H */
