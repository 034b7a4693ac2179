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
#include "loom_retriever_glue.hpp"

namespace loomp::dense {
namespace {

struct Dense {
  static constexpr const char *kName = "dense";
  const loom_host_api *host;
  loom_host_ctx *ctx;
  DenseIndex index;

  Dense(const loom_host_api *h, loom_host_ctx *c) : host(h), ctx(c), index(read_options(h, c)) {}

  void add(const loom_document *docs, uint32_t count) {
    int32_t dim = 0;
    std::vector<NewDocument> batch = checked_documents(index, docs, count, kName, &dim);
    if (index.dim() == 0 && count > 0) index.set_dim(dim);
    index.add(std::move(batch));
  }
  bool erase(const std::string &id) { return index.remove(id); }
  uint64_t count() { return index.count(); }
  void save(const std::string &dir) { index.save(dir); }
  void load(const std::string &dir) { index.load(dir); }

  void search(const loom_query &q, loom_passage_fn emit, void *user) {
    const auto clauses = loomp::filter::parse(q.filter ? q.filter : "", kName);
    if (q.top_k == 0 || index.count() == 0) return;
    const std::vector<float> v = checked_embedding(index, q.embedding, q.embedding_dim, "dense: the query");
    const loom_score_kind kind = index.metric() == Metric::cosine ? LOOM_SCORE_COSINE
                                 : index.metric() == Metric::ip   ? LOOM_SCORE_INNER_PRODUCT
                                                                  : LOOM_SCORE_L2;
    for (const Hit &h : index.search(v.data(), static_cast<size_t>(q.top_k), clauses)) {
      const StoredDocument &d = index.doc(h.slot);
      emit_passage(emit, user, d.id, index.score(h), kind, d.text, d.metadata, kName);
    }
  }
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
    kParams, 6, LOOM_THREADING_SERIAL, &RetrieverGlue<Dense>::kVtable};
const loom_component_desc *const kComponents[] = {&kDense};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-retriever-dense", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::dense

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc *loom_plugin_entry(void) { return &loomp::dense::kPlugin; }
