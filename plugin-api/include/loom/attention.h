/* Attention kind: how q, k, v and the KV cache become the attention output.
 *
 * Batches are ragged ("varlen"): the new tokens of several sequences are packed along one token
 * dimension, with cumulative offsets, and each sequence's earlier keys and values sit in a
 * paged KV cache that the host allocates and the scheduler hands out in blocks. A plugin states
 * the cache layout it wants (kv_layout) and the host sizes the pool from it.
 *
 * Sequences of one batch may share blocks (ABI 1.9, speculative decoding): the host may split one
 * sequence's new tokens into several one-token sequences with the same block table at consecutive
 * positions, so that each token gets its own output row; it then sets batch->shared_blocks. A
 * plugin must then write every new key and value of the batch into the cache before any query
 * of the batch reads the cache (or process the sequences in batch order, writing each one's keys
 * before the next reads them). The host speculates only with attention components built for ABI
 * 1.9 or later.
 *
 * Shapes use T = tokens in the batch, S = sequences, H = query heads, Hkv = key/value heads,
 * D = head dim, B = block size, N = blocks in the pool, M = max blocks per sequence.
 */
#ifndef LOOM_ATTENTION_H
#define LOOM_ATTENTION_H

#include "loom/plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The model geometry an instance is prepared for. */
typedef struct loom_attention_config {
  uint32_t struct_size;
  int32_t n_layers;
  int32_t n_heads;     /* H */
  int32_t n_kv_heads;  /* Hkv; H % Hkv == 0 (grouped-query attention) */
  int32_t head_dim;    /* D */
  int32_t max_positions;
  int32_t sliding_window; /* 0: full attention; else a key is seen by queries < window ahead */
  float softmax_scale;    /* usually 1/sqrt(D) */
  DLDataType dtype;       /* dtype of q, k, v and out */
  DLDevice device;
} loom_attention_config;

/* What the plugin wants the KV pool to look like, filled by prepare(). */
typedef struct loom_kv_layout {
  uint32_t struct_size;
  int32_t block_size;          /* B tokens per block; 0 = the plugin keeps no KV cache */
  DLDataType cache_dtype;      /* element type of a stored key/value (bf16, fp8, int8) */
  /* Bytes of one block of one layer, keys and values and any scales included. */
  uint64_t bytes_per_block;
  /* ABI 1.4 (check LOOM_HAS_FIELD before writing): the sliding window the plugin applies: a
   * query at position p reads only keys at positions > p - window; 0 = every earlier position.
   * The host sets it to config->sliding_window before prepare(), so a plugin that leaves it
   * alone applies the model's window; one with its own window setting writes that. The host
   * frees the cache blocks wholly behind a sequence's window. */
  int32_t window;
} loom_kv_layout;

typedef struct loom_attention_batch {
  uint32_t struct_size;
  int32_t layer;
  int32_t n_seqs;      /* S */
  int32_t n_tokens;    /* T */
  DLTensor *q;         /* [T, H, D] */
  DLTensor *k;         /* [T, Hkv, D]: new keys; the plugin writes them into the cache */
  DLTensor *v;         /* [T, Hkv, D] */
  DLTensor *out;       /* [T, H, D], written */
  DLTensor *seq_offsets;    /* [S+1] int32 on the device: tokens of seq s are [off[s], off[s+1]) */
  DLTensor *seq_positions;  /* [S] int32 on the device: position of each sequence's first new
                               token, i.e. the number of its tokens already in the cache */
  DLTensor *block_table;    /* [S, M] int32 on the device: pool block of each logical block */
  DLTensor *kv_pool;        /* [N, bytes_per_block] uint8 for this layer, NULL when block_size 0 */
  int32_t causal;           /* non-zero for decoder self-attention */
  /* ABI 1.9 (check LOOM_HAS_FIELD): non-zero when sequences of this batch share blocks and read
   * keys other sequences of the batch write (speculative verification, above): every new key and
   * value must be in the cache before any query reads it. 0 lets a plugin fuse the append into
   * its attention kernel. */
  int32_t shared_blocks;
} loom_attention_batch;

/* Training: gradients of one layer's attention over fully materialised q, k, v (no cache): the
 * sequences start at position 0 and out is what forward wrote for them (Loom's trainer runs
 * forward over a scratch cache of the plugin's layout first, `[train] attention = "plugin"`).
 * d_q, d_k and d_v are written whole, not accumulated. Loom's host passes saved = NULL so far
 * (a plugin recomputes what it needs). */
typedef struct loom_attention_backward_batch {
  uint32_t struct_size;
  int32_t layer;
  int32_t n_seqs;
  int32_t n_tokens;
  const DLTensor *q, *k, *v, *out; /* as in the forward call */
  const DLTensor *d_out;           /* [T, H, D] */
  DLTensor *d_q, *d_k, *d_v;       /* written */
  const DLTensor *seq_offsets;
  int32_t causal;
  /* Opaque per-layer saved state from forward (e.g. log-sum-exp), NULL if not kept. */
  DLTensor *saved;
} loom_attention_backward_batch;

typedef struct loom_attention_vtable {
  uint32_t struct_size;
  loom_lifecycle life;
  /* Fixes the geometry and reports the KV layout. Called once after create() and again only
   * when the model changes. The host owns both structs. */
  loom_status (*prepare)(void *instance, const loom_attention_config *config,
                         loom_kv_layout *layout_out);
  /* One forward pass of one layer over a ragged batch. Work is ordered on the host's current
   * stream; the call may return before it finishes. [serial per instance] */
  loom_status (*forward)(void *instance, const loom_attention_batch *batch);
  /* Optional (NULL): components without it cannot be used for training. */
  loom_status (*backward)(void *instance, const loom_attention_backward_batch *batch);
} loom_attention_vtable;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_ATTENTION_H */
