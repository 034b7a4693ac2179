/* libloom: Loom's C API for applications that embed the runtime.
 *
 * One entry point: a manifest (a TOML file or string) becomes a runtime; the application runs
 * it, swaps components while it runs, and destroys it.
 *
 * Errors: every call returns a loom_status (loom/abi.h); on failure, loom_last_error() gives a
 * one-line message naming the file, key or component concerned. LOOM_ERR_INVALID_ARGUMENT: a bad
 * manifest or argument; LOOM_ERR_NOT_FOUND: a plugin, component or slot that does not exist; a
 * plugin's own status when a plugin call failed; LOOM_ERR_CANCELLED: the run was cancelled.
 * Ownership: a loom_runtime is owned by the caller from create until loom_runtime_destroy.
 * Strings passed in are copied; strings returned are owned by the library (see each call).
 * Thread-safety: calls on different runtimes are independent. On one runtime, loom_runtime_run
 * (and generate, chat, embed) run on the calling thread; loom_runtime_swap and loom_runtime_cancel
 * may be called from other threads while they run (a swap lands between two steps).
 * loom_runtime_destroy must not race with any other call on the same runtime.
 * Stability: the plugin ABI's rules (DESIGN.md): functions and struct fields are only added
 * (structs carry struct_size), never changed or removed within a major version.
 */
#ifndef LOOM_LOOM_H
#define LOOM_LOOM_H

#include <stddef.h>
#include <stdint.h>

#include "loom/abi.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(LOOM_BUILDING_LIBLOOM)
#define LOOM_API __attribute__((visibility("default")))
#else
#define LOOM_API
#endif

typedef struct loom_runtime loom_runtime;

/* The message of the last failed call on this thread; "" when none. Valid until the next libloom
 * call on this thread. */
LOOM_API const char *loom_last_error(void);

/* Creates a runtime from a manifest file. `overrides` holds `count` "key.path=value" strings
 * (like the CLI's --set); it may be NULL when count is 0. */
LOOM_API loom_status loom_runtime_create_from_file(const char *path, const char *const *overrides, size_t count,
                                                   loom_runtime **out);

/* Creates a runtime from manifest text; `source_name` names it in error messages (may be NULL);
 * relative paths in it resolve against the current directory. */
LOOM_API loom_status loom_runtime_create_from_string(const char *toml_text, const char *source_name,
                                                     const char *const *overrides, size_t count, loom_runtime **out);

/* Called after each generated token (of the first sequence, with run.prompts); return non-zero
 * to stop the run early. */
typedef int32_t (*loom_token_fn)(void *user, int32_t step, int32_t token);

/* Runs the manifest's [run] section; `steps` > 0 overrides its length. `on_token` may be NULL.
 * `tokens_out`, when not NULL, receives up to `tokens_capacity` generated tokens and
 * `*tokens_written` their number (of the first sequence, with run.prompts; the others through
 * loom_runtime_sequence_tokens). */
LOOM_API loom_status loom_runtime_run(loom_runtime *runtime, int64_t steps, loom_token_fn on_token, void *user,
                                      int32_t *tokens_out, size_t tokens_capacity, size_t *tokens_written);

/* The number of sequences of the last completed loom_runtime_run: the length of run.prompts, or 1
 * (0 before the first run). */
LOOM_API loom_status loom_runtime_sequence_count(loom_runtime *runtime, size_t *count);

/* The generated tokens of sequence `index` of the last run: up to `capacity` of them into
 * `tokens_out` (may be NULL when capacity is 0), their number into `*written`, and how many there
 * are into `*total` (may be NULL). LOOM_ERR_NOT_FOUND for an index past the last sequence. */
LOOM_API loom_status loom_runtime_sequence_tokens(loom_runtime *runtime, size_t index, int32_t *tokens_out,
                                                  size_t capacity, size_t *written, size_t *total);

/* The generated text of sequence `index` of the last run ("" for a model without a tokenizer),
 * and whether a stop token or string ended it (`*stopped`, may be NULL). The text is owned by the
 * runtime and valid until its next run or destroy. */
LOOM_API loom_status loom_runtime_sequence_text(loom_runtime *runtime, size_t index, const char **text_out,
                                                int32_t *stopped);

/* Replaces the component in `slot` ("attention", "sampler[1]", or a manifest `name`) by the one
 * described by a TOML table text, e.g. "use = \"top-k\"\nk = 5" or with library = "path.so".
 * On failure the old component keeps serving. */
LOOM_API loom_status loom_runtime_swap(loom_runtime *runtime, const char *slot, const char *component_toml);

/* Asks a run in progress to stop at the next step. */
LOOM_API loom_status loom_runtime_cancel(loom_runtime *runtime);

/* ---- Generation with per-call parameters (libloom 1.1) ----
 *
 * loom_runtime_generate and loom_runtime_chat run one generation through the runtime's
 * continuous-batching scheduler (the manifest's [scheduler], or its defaults), independently of
 * the manifest's [run] section. They, and loom_runtime_embed, run on the calling thread; calls
 * on one runtime from several threads run one at a time. loom_runtime_swap may be called from
 * another thread meanwhile (it lands between two steps), and loom_runtime_cancel ends the
 * generation in progress with what it has (LOOM_ERR_CANCELLED). */

/* What one generation does. Zero-initialise, set struct_size = sizeof(loom_generate_options),
 * then what differs from the defaults. Later versions append fields; a caller compiled against
 * an older header passes a smaller struct_size and gets the defaults for the rest. */
typedef struct loom_generate_options {
  size_t struct_size;
  int64_t max_tokens;          /* tokens to generate at most; 0: 256 */
  int32_t use_sampling;        /* 0: the manifest's [[sampler]] chain; 1: temperature and top_p below */
  double temperature;          /* with use_sampling: 0 picks the most likely token (greedy) */
  double top_p;                /* with use_sampling: nucleus mass, (0, 1]; 0 is taken as 1 */
  int32_t use_seed;            /* 1: sample with `seed` (same seed and prompt, same text); 0: loom.seed */
  uint64_t seed;
  const char *const *stop;     /* stop strings (the text ends where one begins); may be NULL */
  size_t stop_count;
  /* Appended later (a smaller struct_size leaves them at their defaults, as zero does): */
  int32_t top_k;               /* with use_sampling: keep the k most likely tokens; 0: off */
  double min_p;                /* with use_sampling: drop tokens below min_p x the top one's probability; 0: off */
  double repetition_penalty;   /* with use_sampling: > 1 discourages tokens of the prompt and the text; 0 or 1: off */
  int32_t ignore_eos;          /* 1: the model's end tokens do not end the text (max_tokens does) */
  int64_t min_tokens;          /* the end tokens get no probability before this many tokens, and a stop
                                  string counts only where it ends in the text after them; 0: off */
} loom_generate_options;

/* Called with each new piece of text as it is generated (never a piece of a stop string); the
 * piece is not NUL-terminated and valid for the call. Return non-zero to stop the generation. */
typedef int32_t (*loom_text_fn)(void *user, const char *piece, size_t length);

/* Continues `prompt` (text, encoded by the model's tokenizer with its BOS token). `options`
 * may be NULL (the defaults); `on_text` may be NULL. On LOOM_OK (or LOOM_ERR_CANCELLED),
 * `*text_out` (may be NULL) receives the generated text, NUL-terminated, which the caller frees
 * with loom_free_string, and `*stopped` (may be NULL) whether a stop token or string ended it. */
LOOM_API loom_status loom_runtime_generate(loom_runtime *runtime, const char *prompt, const loom_generate_options *options,
                                           loom_text_fn on_text, void *user, char **text_out, int32_t *stopped);

/* One message of a conversation: role "system", "user" or "assistant", and its text. */
typedef struct loom_chat_message {
  const char *role;
  const char *content;
} loom_chat_message;

/* The assistant's reply to `messages` (rendered by the manifest's chat template, run.chat_template),
 * otherwise as loom_runtime_generate. */
LOOM_API loom_status loom_runtime_chat(loom_runtime *runtime, const loom_chat_message *messages, size_t count,
                                       const loom_generate_options *options, loom_text_fn on_text, void *user,
                                       char **text_out, int32_t *stopped);

/* Several samples of one prompt, generated together in one batch (as loom serve's `n` and run.n):
 * sample j draws with the key seed + j * 0x9e3779b97f4a7c15, seed being options->seed with
 * use_seed, else loom.seed, so sample 0 is loom_runtime_generate's text with the same options
 * and the others part from it (greedy samples all agree). n is 1 to 64. `on_text` (may be NULL)
 * gets each sample's pieces with its index, in the order they come; returning non-zero stops
 * that sample only. On LOOM_OK (or LOOM_ERR_CANCELLED), texts_out[j] (the array may be NULL;
 * else n entries, each freed with loom_free_string) receives sample j's text and stopped_out[j]
 * (may be NULL) whether a stop token or string ended it; on other errors every texts_out entry
 * is NULL (an n out of range writes nothing). */
typedef int32_t (*loom_sample_text_fn)(void *user, size_t sample, const char *piece, size_t length);
LOOM_API loom_status loom_runtime_generate_n(loom_runtime *runtime, const char *prompt, const loom_generate_options *options,
                                             size_t n, loom_sample_text_fn on_text, void *user, char **texts_out,
                                             int32_t *stopped_out);
/* The same for the assistant's reply to `messages` (see loom_runtime_chat). */
LOOM_API loom_status loom_runtime_chat_n(loom_runtime *runtime, const loom_chat_message *messages, size_t count,
                                         const loom_generate_options *options, size_t n, loom_sample_text_fn on_text,
                                         void *user, char **texts_out, int32_t *stopped_out);

/* The model's embeddings of `texts` (the manifest's [embedding] table: pooling, normalisation,
 * the document prefix): `*dim` receives the vector size, and `out` (capacity floats) the
 * count x dim floats, row by row. When capacity < count x dim (out may then be NULL), only
 * *dim is set and LOOM_ERR_INVALID_ARGUMENT returned: call again with enough room. */
LOOM_API loom_status loom_runtime_embed(loom_runtime *runtime, const char *const *texts, size_t count, float *out,
                                        size_t capacity, size_t *dim);

/* Frees a string returned by libloom (loom_runtime_generate, loom_runtime_chat). NULL is a no-op. */
LOOM_API void loom_free_string(char *text);

/* Destroys the runtime: instances in reverse order, then their libraries. NULL is a no-op. */
LOOM_API void loom_runtime_destroy(loom_runtime *runtime);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_LOOM_H */
