// The retriever vtable's C entry points over a builtin retriever's C++ class (bm25, dense,
// hybrid), so that each plugin writes its search and not the ABI edge: NULL and struct_size
// checks, exceptions turned into statuses through guard(), the instance cast.
//
// R is the instance type: constructible from (host, ctx), with `host`, `ctx` members,
// `static constexpr const char* kName`, and add(docs, count), erase(id) -> bool (false: no such
// document), count() -> uint64_t, search(query, emit, user), save(dir), load(dir).
// Ownership: create() returns a heap instance that destroy() deletes. Thread-safety: as the
// component declares (the builtin retrievers are SERIAL).
#ifndef LOOM_PLUGINS_COMMON_RETRIEVER_GLUE_HPP
#define LOOM_PLUGINS_COMMON_RETRIEVER_GLUE_HPP

#include <cstdint>
#include <string>

#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"

namespace loomp {

// Hands one passage to the host's callback; a non-OK answer stops the search with that status.
inline void emit_passage(loom_passage_fn emit, void* user, const std::string& id, double score, loom_score_kind kind,
                         const std::string& text, const std::string& metadata /* "" = none */, const char* who) {
  loom_passage p{};
  p.struct_size = sizeof(loom_passage);
  p.doc_id = id.c_str();
  p.score = score;
  p.score_kind = kind;
  p.text = text.c_str();
  p.offset_begin = -1;
  p.offset_end = -1;
  p.metadata_json = metadata.empty() ? nullptr : metadata.c_str();
  const loom_status s = emit(user, &p);
  if (s != LOOM_OK) fail(s, std::string(who) + ": search stopped by the caller");
}

template <class R>
struct RetrieverGlue {
  static R& self(void* inst) { return *static_cast<R*>(inst); }
  static std::string who() { return std::string(R::kName) + ": "; }

  static loom_status add(void* inst, const loom_document* docs, uint32_t count) {
    return guard(self(inst).host, self(inst).ctx, [&] { self(inst).add(docs, count); });
  }
  static loom_status remove(void* inst, const char* id) {
    return guard(self(inst).host, self(inst).ctx, [&] {
      if (id == nullptr) invalid(who() + "doc_id is NULL");
      if (!self(inst).erase(id)) fail(LOOM_ERR_NOT_FOUND, who() + "no document '" + id + "'");
    });
  }
  static loom_status count(void* inst, uint64_t* out) {
    return guard(self(inst).host, self(inst).ctx, [&] {
      if (out == nullptr) invalid(who() + "out is NULL");
      *out = self(inst).count();
    });
  }
  static loom_status search(void* inst, const loom_query* q, loom_passage_fn emit, void* user) {
    return guard(self(inst).host, self(inst).ctx, [&] {
      if (q == nullptr) invalid(who() + "query is NULL");
      if (!LOOM_HAS_FIELD(q, loom_query, filter)) invalid(who() + "query struct_size too small");
      if (emit == nullptr) invalid(who() + "emit is NULL");
      if (q->top_k < 0) invalid(who() + "top_k must be >= 0");
      self(inst).search(*q, emit, user);
    });
  }
  static loom_status save(void* inst, const char* dir) {
    return guard(self(inst).host, self(inst).ctx, [&] {
      if (dir == nullptr) invalid(who() + "directory is NULL");
      self(inst).save(dir);
    });
  }
  static loom_status load(void* inst, const char* dir) {
    return guard(self(inst).host, self(inst).ctx, [&] {
      if (dir == nullptr) invalid(who() + "directory is NULL");
      self(inst).load(dir);
    });
  }

  static constexpr loom_retriever_vtable kVtable = {
      sizeof(loom_retriever_vtable),
      {&create_instance<R>, &destroy_instance<R>, nullptr, nullptr, nullptr},
      &add, &remove, &count, &search, &save, &load,
  };
};

}  // namespace loomp

#endif
