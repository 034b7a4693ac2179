/* Host extension "loom.host.vocab/1": the tokenizer's vocabulary, offered to plugins that must
 * know what each token id spells (constrained decoding: grammar and JSON-schema samplers).
 *
 * Obtained with host->get_extension(ctx, LOOM_HOST_VOCAB_EXTENSION); NULL when the host does not
 * offer it (no tokenizer loaded). The table is static or lives as long as the host table.
 * Ownership: every pointer returned through it is owned by the host and stays valid, unchanged,
 * until the instance's destroy() returns; plugins copy nothing they do not want to.
 * Thread-safety: any thread, concurrently. The vocabulary never changes while an instance lives.
 */
#ifndef LOOM_HOST_VOCAB_H
#define LOOM_HOST_VOCAB_H

#include "loom/host.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LOOM_HOST_VOCAB_EXTENSION "loom.host.vocab/1"

typedef struct loom_host_vocab {
  uint32_t struct_size;
  /* Number of token ids the tokenizer defines (ids 0 .. n-1). May be smaller than a sampling
   * batch's vocab_size (padded logits); ids beyond it have no text. */
  int32_t (*vocab_size)(loom_host_ctx *ctx);
  /* The bytes token `id` contributes to the detokenized output when decoded on its own (byte-level
   * BPE mapped back to raw bytes, SentencePiece's U+2581 as a space, <0xNN> byte tokens as the
   * byte). Not NUL-terminated; may be a partial UTF-8 sequence. LOOM_ERR_NOT_FOUND for an id that
   * has no text (special and control tokens such as <|im_start|>, unused ids);
   * LOOM_ERR_INVALID_ARGUMENT for an id outside [0, vocab_size). */
  loom_status (*token_bytes)(loom_host_ctx *ctx, int32_t id, const char **bytes, size_t *len);
  /* The ids that end generation (EOS, EOT, <|im_end|>, ...): *ids points to *count entries owned
   * by the host; *count may be 0. */
  loom_status (*end_tokens)(loom_host_ctx *ctx, const int32_t **ids, size_t *count);
} loom_host_vocab;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_HOST_VOCAB_H */
