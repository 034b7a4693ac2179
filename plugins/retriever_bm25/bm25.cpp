// Retriever component `bm25`: lexical search on SQLite FTS5, one in-memory database per
// instance (bm25_index.hpp).
#include <memory>
#include <string>

#include "bm25_index.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"
#include "loom_retriever_glue.hpp"

namespace loomp::bm25 {
namespace {

struct Bm25 {
  static constexpr const char* kName = "bm25";
  const loom_host_api* host;
  loom_host_ctx* ctx;
  Bm25Index index;

  Bm25(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c) {
    const std::string dir = cfg_string(h, c, "documents");
    if (!dir.empty()) index.add_directory(dir, "documents");
  }

  void add(const loom_document* docs, uint32_t count) { index.add(docs, count, kName); }
  bool erase(const std::string& id) { return index.erase(id); }
  uint64_t count() { return index.count(); }
  void save(const std::string& dir) { index.save(dir); }
  void load(const std::string& dir) { index.load(dir); }
  void search(const loom_query& q, loom_passage_fn emit, void* user) {
    for (const Bm25Hit& h : index.search(q.text ? q.text : "", q.top_k, q.filter ? q.filter : ""))
      emit_passage(emit, user, h.id, h.score, LOOM_SCORE_BM25, h.body, h.metadata, kName);
  }
};

constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "documents", LOOM_VALUE_PATH, 0, "\"\"",
     "optional directory whose *.txt and *.md files are indexed at start (doc_id = file name)"},
};
constexpr loom_component_desc kBm25 = {
    sizeof(loom_component_desc), LOOM_KIND_RETRIEVER, "bm25", "1.0.0",
    "Lexical BM25 retrieval on SQLite FTS5 (porter stemming), metadata filters",
    kParams, 1, LOOM_THREADING_SERIAL, &RetrieverGlue<Bm25>::kVtable};
const loom_component_desc* const kComponents[] = {&kBm25};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-retriever-bm25", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::bm25

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::bm25::kPlugin; }
