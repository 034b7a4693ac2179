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
 * runs on the calling thread; loom_runtime_swap and loom_runtime_cancel may be called from other
 * threads while it runs (a swap lands between two steps). loom_runtime_destroy must not race
 * with any other call on the same runtime.
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

/* Destroys the runtime: instances in reverse order, then their libraries. NULL is a no-op. */
LOOM_API void loom_runtime_destroy(loom_runtime *runtime);

#ifdef __cplusplus
}
#endif
#endif /* LOOM_LOOM_H */
