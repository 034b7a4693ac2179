// Retriever component `dense`: nearest neighbours of embeddings in an HNSW graph (hnswlib).
//
// The plugin does not embed text: documents and queries carry their embeddings
// (loom_document.embedding, loom_query.embedding), which the host makes with its model when
// the manifest has an [embedding] table (DESIGN.md, "Embeddings"), or which an embedding
// application supplies itself. A document or query without one is refused with a message that
// says so. Filters: plugins/common/loom_metadata_filter.hpp, evaluated on each document's
// metadata (exactly over the matching documents when at most `exact_below` match).
#include <algorithm>
#include <cmath>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dense_documents.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"

namespace loomp::dense {
namespace {

struct Dense {
  const loom_host_api *host;
  loom_host_ctx *ctx;
  DenseIndex index;

  Dense(const loom_host_api *h, loom_host_ctx *c) : host(h), ctx(c), index(read_options(h, c)) {}

  void add(const loom_document *docs, uint32_t count) {
    int32_t dim = 0;
    std::vector<NewDocument> batch = checked_documents(index, docs, count, "dense", &dim);
    if (index.dim() == 0 && count > 0) index.set_dim(dim);
    index.add(std::move(batch));
  }

  void search(const loom_query &q, loom_passage_fn emit, void *user) {
    if (emit == nullptr) invalid("dense: emit is NULL");
    if (q.top_k < 0) invalid("dense: top_k must be >= 0");
    const auto clauses = loomp::filter::parse(q.filter ? q.filter : "", "dense");
    if (q.top_k == 0 || index.count() == 0) return;
    const std::vector<float> v = checked_embedding(index, q.embedding, q.embedding_dim, "dense: the query");
    const loom_score_kind kind = index.metric() == Metric::cosine ? LOOM_SCORE_COSINE
                                 : index.metric() == Metric::ip   ? LOOM_SCORE_INNER_PRODUCT
                                                                  : LOOM_SCORE_L2;
    for (const Hit &h : index.search(v.data(), static_cast<size_t>(q.top_k), clauses)) {
      const StoredDocument &d = index.doc(h.slot);
      loom_passage p{};
      p.struct_size = sizeof(loom_passage);
      p.doc_id = d.id.c_str();
      p.score = index.score(h);
      p.score_kind = kind;
      p.text = d.text.c_str();
      p.offset_begin = -1;
      p.offset_end = -1;
      p.metadata_json = d.metadata.empty() ? nullptr : d.metadata.c_str();
      const loom_status s = emit(user, &p);
      if (s != LOOM_OK) fail(s, "dense: search stopped by the caller");
    }
  }
};

Dense &self(void *inst) { return *static_cast<Dense *>(inst); }

loom_status create_fn(const loom_host_api *host, loom_host_ctx *ctx, void **out) {
  return guard(host, ctx, [&] {
    if (out == nullptr) invalid("out_instance is NULL");
    *out = std::make_unique<Dense>(host, ctx).release();
  });
}
void destroy_fn(void *inst) { delete static_cast<Dense *>(inst); }
loom_status add_fn(void *inst, const loom_document *docs, uint32_t count) {
  return guard(self(inst).host, self(inst).ctx, [&] { self(inst).add(docs, count); });
}
loom_status remove_fn(void *inst, const char *id) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (id == nullptr) invalid("dense: doc_id is NULL");
    if (!self(inst).index.remove(id)) fail(LOOM_ERR_NOT_FOUND, std::string("dense: no document '") + id + "'");
  });
}
loom_status count_fn(void *inst, uint64_t *out) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (out == nullptr) invalid("dense: out is NULL");
    *out = self(inst).index.count();
  });
}
loom_status search_fn(void *inst, const loom_query *q, loom_passage_fn emit, void *user) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (q == nullptr) invalid("dense: query is NULL");
    if (!LOOM_HAS_FIELD(q, loom_query, filter)) invalid("dense: query struct_size too small");
    self(inst).search(*q, emit, user);
  });
}
loom_status save_fn(void *inst, const char *dir) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (dir == nullptr) invalid("dense: directory is NULL");
    self(inst).index.save(dir);
  });
}
loom_status load_fn(void *inst, const char *dir) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (dir == nullptr) invalid("dense: directory is NULL");
    self(inst).index.load(dir);
  });
}

constexpr loom_retriever_vtable kVtable = {
    sizeof(loom_retriever_vtable),
    {&create_fn, &destroy_fn, nullptr, nullptr, nullptr},
    &add_fn, &remove_fn, &count_fn, &search_fn, &save_fn, &load_fn,
};
constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "metric", LOOM_VALUE_STRING, 0, "\"cosine\"",
     "\"cosine\" (score: cosine similarity), \"ip\" (inner product) or \"l2\" (Euclidean distance, smaller is closer)"},
    {sizeof(loom_param_desc), "dim", LOOM_VALUE_INT, 0, "0", "embedding dimension; 0: the first document's"},
    {sizeof(loom_param_desc), "m", LOOM_VALUE_INT, 0, "16", "HNSW graph degree (links per node)"},
    {sizeof(loom_param_desc), "ef_construction", LOOM_VALUE_INT, 0, "200", "HNSW candidates while inserting"},
    {sizeof(loom_param_desc), "ef_search", LOOM_VALUE_INT, 0, "128",
     "HNSW candidates while searching (at least top_k): higher is slower and closer to exact"},
    {sizeof(loom_param_desc), "exact_below", LOOM_VALUE_INT, 0, "20000",
     "a filtered search over at most this many matching documents is exact"},
};
constexpr loom_component_desc kDense = {
    sizeof(loom_component_desc), LOOM_KIND_RETRIEVER, "dense", "1.0.0",
    "Dense retrieval: nearest embeddings in an HNSW graph (hnswlib), metadata filters, persisted index",
    kParams, 6, LOOM_THREADING_SERIAL, &kVtable};
const loom_component_desc *const kComponents[] = {&kDense};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-retriever-dense", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::dense

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc *loom_plugin_entry(void) { return &loomp::dense::kPlugin; }
