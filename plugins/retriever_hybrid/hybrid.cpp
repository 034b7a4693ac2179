// Retriever component `hybrid`: one component holding a lexical index (bm25_index.hpp, SQLite
// FTS5) and a dense one (dense_index.hpp, hnswlib) over the same documents; a search takes each
// index's best `depth` passages and fuses the two lists by reciprocal rank (k = 60 over 1-based
// ranks, retriever.h), score kind rrf. Documents need embeddings, as for `dense` (the host makes
// them with [embedding]); filters apply to both lists. Several separate retrievers in a
// manifest are fused the same way by the host (the RAG stage); this component keeps both
// indexes in one slot and one saved directory (bm25/ and dense/ inside it).
#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "../retriever_bm25/bm25_index.hpp"
#include "../retriever_dense/dense_documents.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"
#include "loom_retriever_glue.hpp"

namespace loomp::hybrid {
namespace {

namespace fs = std::filesystem;
using loomp::bm25::Bm25Hit;
using loomp::bm25::Bm25Index;
using loomp::dense::DenseIndex;

struct Fused {
  std::string id, text, metadata;
  double score = 0;
  size_t first_seen = 0;
};

struct Hybrid {
  static constexpr const char *kName = "hybrid";
  const loom_host_api *host;
  loom_host_ctx *ctx;
  Bm25Index lexical;
  DenseIndex dense;
  int64_t depth;

  Hybrid(const loom_host_api *h, loom_host_ctx *c) : host(h), ctx(c), dense(loomp::dense::read_options(h, c)), depth(cfg_int(h, c, "depth")) {
    if (depth < 1 || depth > 100000) invalid_param("depth", "hybrid: depth must be in [1, 100000]");
  }

  void add(const loom_document *docs, uint32_t count) {
    // The dense checks first (embeddings), then the lexical ones inside its add; a batch either
    // lands in both indexes or in neither.
    int32_t dim = 0;
    std::vector<loomp::dense::NewDocument> batch = loomp::dense::checked_documents(dense, docs, count, "hybrid", &dim);
    lexical.add(docs, count, "hybrid");
    if (dense.dim() == 0 && count > 0) dense.set_dim(dim);
    dense.add(std::move(batch));
  }

  uint64_t count() { return dense.count(); }

  bool erase(const std::string &id) {
    const bool a = lexical.erase(id), b = dense.remove(id);
    return a || b;
  }

  void search(const loom_query &q, loom_passage_fn emit, void *user) {
    const std::string filter = q.filter ? q.filter : "";
    const auto clauses = loomp::filter::parse(filter, "hybrid");
    if (q.top_k == 0 || dense.count() == 0) return;
    const std::vector<float> v = loomp::dense::checked_embedding(dense, q.embedding, q.embedding_dim, "hybrid: the query");
    const int32_t n = static_cast<int32_t>(std::max<int64_t>(depth, q.top_k));
    std::map<std::string, Fused> by_id;
    size_t seen = 0;
    const auto rank = [&](const std::string &id, const std::string &text, const std::string &metadata, size_t r) {
      auto [it, fresh] = by_id.try_emplace(id);
      if (fresh) it->second = Fused{id, text, metadata, 0.0, seen++};
      it->second.score += 1.0 / (60.0 + static_cast<double>(r + 1));
    };
    const std::vector<Bm25Hit> lexical_hits = lexical.search(q.text ? q.text : "", n, filter);
    for (size_t r = 0; r < lexical_hits.size(); ++r) rank(lexical_hits[r].id, lexical_hits[r].body, lexical_hits[r].metadata, r);
    const auto dense_hits = dense.search(v.data(), static_cast<size_t>(n), clauses);
    for (size_t r = 0; r < dense_hits.size(); ++r) {
      const auto &d = dense.doc(dense_hits[r].slot);
      rank(d.id, d.text, d.metadata, r);
    }
    std::vector<Fused> fused;
    for (auto &[id, f] : by_id) fused.push_back(std::move(f));
    std::sort(fused.begin(), fused.end(), [](const Fused &a, const Fused &b) {
      return a.score != b.score ? a.score > b.score : a.first_seen < b.first_seen;
    });
    fused.resize(std::min(fused.size(), static_cast<size_t>(q.top_k)));
    for (const Fused &f : fused) emit_passage(emit, user, f.id, f.score, LOOM_SCORE_RRF, f.text, f.metadata, kName);
  }

  void save(const std::string &dir) {
    lexical.save((fs::path(dir) / "bm25").string());
    dense.save((fs::path(dir) / "dense").string());
  }
  void load(const std::string &dir) {
    // All or nothing: bm25 loads into a fresh index, swapped in only after the dense index's
    // load (which replaces it only when the files are whole) has succeeded.
    Bm25Index fresh_lexical;
    fresh_lexical.load((fs::path(dir) / "bm25").string());
    dense.load((fs::path(dir) / "dense").string());
    lexical = std::move(fresh_lexical);
  }
};

constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "depth", LOOM_VALUE_INT, 0, "50", "passages taken from each index before fusing (at least top_k)"},
    {sizeof(loom_param_desc), "metric", LOOM_VALUE_STRING, 0, "\"cosine\"", "the dense index's metric: cosine, ip or l2"},
    {sizeof(loom_param_desc), "dim", LOOM_VALUE_INT, 0, "0", "embedding dimension; 0: the first document's"},
    {sizeof(loom_param_desc), "m", LOOM_VALUE_INT, 0, "16", "HNSW graph degree"},
    {sizeof(loom_param_desc), "ef_construction", LOOM_VALUE_INT, 0, "200", "HNSW candidates while inserting"},
    {sizeof(loom_param_desc), "ef_search", LOOM_VALUE_INT, 0, "128", "HNSW candidates while searching"},
    {sizeof(loom_param_desc), "exact_below", LOOM_VALUE_INT, 0, "20000", "a filtered dense search over at most this many documents is exact"},
};
constexpr loom_component_desc kHybrid = {
    sizeof(loom_component_desc), LOOM_KIND_RETRIEVER, "hybrid", "1.0.0",
    "BM25 and dense retrieval over the same documents, fused by reciprocal rank (k = 60)", kParams, 7,
    LOOM_THREADING_SERIAL, &RetrieverGlue<Hybrid>::kVtable};
const loom_component_desc *const kComponents[] = {&kHybrid};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-retriever-hybrid", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::hybrid

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc *loom_plugin_entry(void) { return &loomp::hybrid::kPlugin; }
