/* Retriever kind: query -> ranked passages with scores and metadata.
 *
 * A result is {doc_id (stable), score, score_kind, text or offsets, metadata as JSON}; a query
 * carries text, an optional embedding, top_k and a filter expression (DESIGN.md). Hybrid fusion
 * is reciprocal rank fusion with k = 60 over 1-based ranks.
 */
#ifndef LOOM_RETRIEVER_H
#define LOOM_RETRIEVER_H

#include "loom/plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef int32_t loom_score_kind;
enum {
  LOOM_SCORE_BM25 = 1,
  LOOM_SCORE_COSINE = 2,
  LOOM_SCORE_INNER_PRODUCT = 3,
  LOOM_SCORE_L2 = 4, /* smaller is closer */
  LOOM_SCORE_RRF = 5,
  LOOM_SCORE_RERANK = 6
};

/* Passed in arrays: frozen for ABI major 1. */
typedef struct loom_document {
  uint32_t struct_size;
  const char *doc_id;        /* stable id chosen by the caller; re-adding an id replaces it */
  const char *text;
  const char *metadata_json; /* a JSON object, or NULL */
  const float *embedding;    /* optional, [embedding_dim] host memory */
  int32_t embedding_dim;
} loom_document;

typedef struct loom_query {
  uint32_t struct_size;
  const char *text;
  const float *embedding; /* optional, [embedding_dim] host memory */
  int32_t embedding_dim;
  int32_t top_k;
  /* Optional metadata filter, NULL for none: a conjunction of comparisons on metadata fields,
   * `field == "value" && year >= 2020`; a retriever that cannot evaluate it returns
   * LOOM_ERR_UNSUPPORTED, never unfiltered results. */
  const char *filter;
} loom_query;

typedef struct loom_passage {
  uint32_t struct_size;
  const char *doc_id;
  double score;
  loom_score_kind score_kind;
  const char *text;           /* the passage, or NULL when only offsets are known */
  int64_t offset_begin;       /* byte offsets of the passage in its document, -1 if unknown */
  int64_t offset_end;
  const char *metadata_json;  /* a JSON object, or NULL */
} loom_passage;

/* Receives results best first. The passage and its strings are the plugin's and valid during
 * the callback only. A non-zero return stops the search, which then returns that status. */
typedef loom_status (*loom_passage_fn)(void *user, const loom_passage *passage);

typedef struct loom_retriever_vtable {
  uint32_t struct_size;
  loom_lifecycle life;
  /* Adds or replaces documents. The caller owns `docs`; the plugin copies what it keeps. */
  loom_status (*add)(void *instance, const loom_document *docs, uint32_t count);
  loom_status (*remove)(void *instance, const char *doc_id);
  loom_status (*count)(void *instance, uint64_t *out);
  /* At most query->top_k passages, best first. [CONCURRENT components: concurrent searches are
   * allowed, never concurrently with add/remove] */
  loom_status (*search)(void *instance, const loom_query *query, loom_passage_fn emit, void *user);
  /* Persist to and reload from a directory (optional, NULL when the index lives only in memory). */
  loom_status (*save)(void *instance, const char *directory);
  loom_status (*load)(void *instance, const char *directory);
} loom_retriever_vtable;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_RETRIEVER_H */
