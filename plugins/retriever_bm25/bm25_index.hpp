// The bm25 retriever's index: an in-memory SQLite FTS5 database (porter stemming), documents
// by id with JSON metadata, filters compiled to SQL (filter.hpp). Used by the `bm25` component
// and by `hybrid`, which fuses it with a dense index.
//   docs: FTS5(doc_id UNINDEXED, body, metadata UNINDEXED), tokenize = 'porter unicode61'
//   ids:  doc_id -> FTS rowid, so replacing or removing a document is an index lookup
// Scores: FTS5's bm25() is smaller-is-better and negative; hits carry -bm25 (bigger is better).
//
// Ownership: owns its database. Thread-safety: one caller at a time.
#ifndef LOOM_PLUGINS_BM25_INDEX_HPP
#define LOOM_PLUGINS_BM25_INDEX_HPP

#include <cstdint>
#include <string>
#include <vector>

#include "loom/loom_plugin_api.h"
#include "sqlite_handle.hpp"

namespace loomp::bm25 {

struct Bm25Hit {
  std::string id, body, metadata;  // metadata: compact JSON, or "" for none
  double score = 0;
};

class Bm25Index {
 public:
  Bm25Index();
  // Every *.txt and *.md file directly in `dir` (doc_id = file name); errors name `param`.
  void add_directory(const std::string& dir, const char* param);
  // Adds or replaces; checks every document first so that a bad one adds nothing. `who`
  // prefixes messages ("bm25", "hybrid").
  void add(const loom_document* docs, uint32_t count, const std::string& who);
  bool erase(const std::string& id);
  uint64_t count();
  // The best top_k documents for `text` that satisfy `filter` (retriever.h's syntax), best first.
  std::vector<Bm25Hit> search(const std::string& text, int32_t top_k, const std::string& filter);
  void save(const std::string& dir);
  void load(const std::string& dir);

 private:
  void put(const std::string& id, const std::string& body, const std::string& meta);
  Db db;
};

}  // namespace loomp::bm25

#endif
