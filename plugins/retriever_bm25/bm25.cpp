// Retriever component `bm25`: lexical search on SQLite FTS5, one in-memory database per
// instance (bm25_index.hpp).
#include <memory>
#include <string>

#include "bm25_index.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"

namespace loomp::bm25 {
namespace {

struct Bm25 {
  const loom_host_api* host;
  loom_host_ctx* ctx;
  Bm25Index index;

  Bm25(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c) {
    const std::string dir = cfg_string(h, c, "documents");
    if (!dir.empty()) index.add_directory(dir, "documents");
  }

  void search(const loom_query& q, loom_passage_fn emit, void* user) {
    if (emit == nullptr) invalid("bm25: emit is NULL");
    if (q.top_k < 0) invalid("bm25: top_k must be >= 0");
    for (const Bm25Hit& h : index.search(q.text ? q.text : "", q.top_k, q.filter ? q.filter : "")) {
      loom_passage p{};
      p.struct_size = sizeof(loom_passage);
      p.doc_id = h.id.c_str();
      p.score = h.score;
      p.score_kind = LOOM_SCORE_BM25;
      p.text = h.body.c_str();
      p.offset_begin = -1;
      p.offset_end = -1;
      p.metadata_json = h.metadata.empty() ? nullptr : h.metadata.c_str();
      const loom_status s = emit(user, &p);
      if (s != LOOM_OK) fail(s, "bm25: search stopped by the caller");
    }
  }
};

Bm25& self(void* inst) { return *static_cast<Bm25*>(inst); }

loom_status create_fn(const loom_host_api* host, loom_host_ctx* ctx, void** out) {
  return guard(host, ctx, [&] {
    if (out == nullptr) invalid("out_instance is NULL");
    *out = std::make_unique<Bm25>(host, ctx).release();
  });
}
void destroy_fn(void* inst) { delete static_cast<Bm25*>(inst); }
loom_status add_fn(void* inst, const loom_document* docs, uint32_t count) {
  return guard(self(inst).host, self(inst).ctx, [&] { self(inst).index.add(docs, count, "bm25"); });
}
loom_status remove_fn(void* inst, const char* id) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (id == nullptr) invalid("bm25: doc_id is NULL");
    if (!self(inst).index.erase(id)) fail(LOOM_ERR_NOT_FOUND, std::string("bm25: no document '") + id + "'");
  });
}
loom_status count_fn(void* inst, uint64_t* out) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (out == nullptr) invalid("bm25: out is NULL");
    *out = self(inst).index.count();
  });
}
loom_status search_fn(void* inst, const loom_query* q, loom_passage_fn emit, void* user) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (q == nullptr) invalid("bm25: query is NULL");
    if (!LOOM_HAS_FIELD(q, loom_query, filter)) invalid("bm25: query struct_size too small");
    self(inst).search(*q, emit, user);
  });
}
loom_status save_fn(void* inst, const char* dir) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (dir == nullptr) invalid("bm25: directory is NULL");
    self(inst).index.save(dir);
  });
}
loom_status load_fn(void* inst, const char* dir) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (dir == nullptr) invalid("bm25: directory is NULL");
    self(inst).index.load(dir);
  });
}

constexpr loom_retriever_vtable kVtable = {
    sizeof(loom_retriever_vtable),
    {&create_fn, &destroy_fn, nullptr, nullptr, nullptr},
    &add_fn, &remove_fn, &count_fn, &search_fn, &save_fn, &load_fn,
};
constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "documents", LOOM_VALUE_PATH, 0, "\"\"",
     "optional directory whose *.txt and *.md files are indexed at start (doc_id = file name)"},
};
constexpr loom_component_desc kBm25 = {
    sizeof(loom_component_desc), LOOM_KIND_RETRIEVER, "bm25", "1.0.0",
    "Lexical BM25 retrieval on SQLite FTS5 (porter stemming), metadata filters",
    kParams, 1, LOOM_THREADING_SERIAL, &kVtable};
const loom_component_desc* const kComponents[] = {&kBm25};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-retriever-bm25", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::bm25

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::bm25::kPlugin; }
