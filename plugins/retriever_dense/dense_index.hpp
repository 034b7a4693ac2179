// The dense retriever's index: documents with their embeddings in an hnswlib HNSW graph
// (Debian's libhnswlib-dev), searched approximately, or exactly over the documents a metadata
// filter leaves when they are few.
//
// Labels: a document's hnswlib label is its slot in docs_ (0, 1, ...). Replacing a document
// marks its old slot deleted and adds a new one, so labels never change meaning; removed slots
// stay (marked) until the index is rebuilt, as hnswlib keeps them.
//
// Metrics: cosine (vectors normalised on the way in; score = cosine similarity, bigger is
// closer), ip (inner product as given; bigger is closer), l2 (score = Euclidean distance,
// smaller is closer).
//
// Ownership: owns its documents and graph. Thread-safety: search() may run concurrently with
// other searches (hnswlib's searches are thread-safe once ef is set, which only add() and
// load() change); add/remove/load/save need exclusive use (retriever.h's rule).
#ifndef LOOM_PLUGINS_DENSE_INDEX_HPP
#define LOOM_PLUGINS_DENSE_INDEX_HPP

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom_metadata_filter.hpp"

// hnswlib 0.6's headers define non-inline functions, so only dense_index.cpp includes them.
namespace hnswlib {
template <typename> class SpaceInterface;
template <typename> class HierarchicalNSW;
}  // namespace hnswlib

namespace loomp::dense {

enum class Metric { cosine, ip, l2 };

struct IndexOptions {
  Metric metric = Metric::cosine;
  int32_t dim = 0;               // 0: taken from the first document
  size_t m = 16;                 // graph degree (hnswlib M)
  size_t ef_construction = 200;  // candidates while inserting
  size_t ef_search = 128;        // candidates while searching (at least top_k)
  size_t exact_below = 20000;    // filtered searches over at most this many documents are exact
};

struct NewDocument {
  std::string id, text;
  std::string metadata;          // compact JSON object, or "" for none
  std::vector<float> embedding;  // already checked to have the index's dimension
};

struct Hit {
  size_t slot;
  float distance;  // hnswlib's: 1 - dot for cosine/ip, squared L2 for l2
};

struct StoredDocument {
  std::string id, text, metadata;  // metadata: "" for none
  nlohmann::json metadata_value;   // parsed once, for filters (null for none)
  bool alive = true;
};

class DenseIndex {
 public:
  explicit DenseIndex(IndexOptions options);
  ~DenseIndex();
  DenseIndex(const DenseIndex &) = delete;
  DenseIndex &operator=(const DenseIndex &) = delete;

  int32_t dim() const { return dim_; }
  Metric metric() const { return options_.metric; }
  uint64_t count() const { return id_to_slot_.size(); }
  // Fixes the dimension (the first add, or the `dim` parameter); later adds must match.
  void set_dim(int32_t dim);
  // Adds or replaces; the documents are already validated (ids unique within the batch).
  void add(std::vector<NewDocument> docs);
  bool remove(const std::string &id);
  // The best `k` live documents for `query` ([dim] floats) that satisfy `clauses`, best first.
  std::vector<Hit> search(const float *query, size_t k, const std::vector<loomp::filter::Clause> &clauses) const;
  const StoredDocument &doc(size_t slot) const { return docs_[slot]; }
  // The score reported to the host for a hit (see the metrics above).
  double score(const Hit &hit) const;

  // dense.json (format, metric, dim, graph settings), dense_docs.jsonl (one line a slot) and
  // dense.hnsw (the graph and vectors). load() checks everything before replacing the live
  // index; errors throw loomp::Fail naming the file.
  void save(const std::string &directory) const;
  void load(const std::string &directory);

 private:
  std::vector<float> prepared(const float *v) const;  // normalised for cosine
  std::vector<Hit> exact(const float *query, size_t k, const std::vector<size_t> &slots) const;

  IndexOptions options_;
  int32_t dim_ = 0;
  std::unique_ptr<hnswlib::SpaceInterface<float>> space_;     // declared before the graph that reads it
  std::unique_ptr<hnswlib::HierarchicalNSW<float>> graph_;
  std::vector<StoredDocument> docs_;
  std::unordered_map<std::string, size_t> id_to_slot_;        // live documents only
};

}  // namespace loomp::dense

#endif
