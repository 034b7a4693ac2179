// What the `dense` and `hybrid` retrievers share: their index parameters and the checks of the
// embeddings the host hands them.
#ifndef LOOM_PLUGINS_DENSE_DOCUMENTS_HPP
#define LOOM_PLUGINS_DENSE_DOCUMENTS_HPP

#include <cmath>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dense_index.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"

namespace loomp::dense {

// metric, dim, m, ef_construction, ef_search, exact_below (dense.cpp's kParams).
inline IndexOptions read_options(const loom_host_api *h, loom_host_ctx *c) {
  IndexOptions o;
  const std::string metric = cfg_string(h, c, "metric");
  if (metric == "cosine") o.metric = Metric::cosine;
  else if (metric == "ip") o.metric = Metric::ip;
  else if (metric == "l2") o.metric = Metric::l2;
  else invalid_param("metric", "dense: metric must be \"cosine\", \"ip\" or \"l2\", not \"" + metric + "\"");
  const auto ranged = [&](const char *key, int64_t lo, int64_t hi) {
    const int64_t v = cfg_int(h, c, key);
    if (v < lo || v > hi)
      invalid_param(key, "dense: " + std::string(key) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                             "], not " + std::to_string(v));
    return v;
  };
  o.dim = static_cast<int32_t>(ranged("dim", 0, 65536));
  o.m = static_cast<size_t>(ranged("m", 2, 256));
  o.ef_construction = static_cast<size_t>(ranged("ef_construction", 1, 1 << 16));
  o.ef_search = static_cast<size_t>(ranged("ef_search", 1, 1 << 16));
  o.exact_below = static_cast<size_t>(ranged("exact_below", 0, int64_t{1} << 40));

  return o;
}


// The embedding as floats, checked: present, the index's dimension (which the first document
// fixes), finite, and not zero under cosine.
inline std::vector<float> checked_embedding(const DenseIndex &index, const float *v, int32_t dim, const std::string &where) {
  if (v == nullptr || dim <= 0)
    invalid(where + " has no embedding: dense retrieval needs one (add an [embedding] table to the manifest so that "
                    "Loom embeds documents and queries with its model)");
  if (index.dim() != 0 && dim != index.dim())
    invalid(where + ": embedding of dimension " + std::to_string(dim) + ", the index holds dimension " + std::to_string(index.dim()));
  double norm = 0;
  for (int32_t i = 0; i < dim; ++i) {
    if (!std::isfinite(v[i])) invalid(where + ": embedding element " + std::to_string(i) + " is not finite");
    norm += static_cast<double>(v[i]) * v[i];
  }
  if (index.metric() == Metric::cosine && norm == 0) invalid(where + ": a zero embedding has no direction (metric cosine)");
  return {v, v + dim};
}

// `docs` checked as a whole (so that a bad document adds nothing) and converted; `who` prefixes
// messages. *dim receives the batch's dimension (the index's, or the first document's).
inline std::vector<NewDocument> checked_documents(const DenseIndex &index, const loom_document *docs, uint32_t count,
                                                  const std::string &who, int32_t *dim) {
  if (docs == nullptr && count > 0) invalid(who + ": docs is NULL");
  std::vector<NewDocument> batch(count);
  std::set<std::string> seen;
  *dim = index.dim();
  for (uint32_t i = 0; i < count; ++i) {
    const loom_document &d = docs[i];
    std::string where = who + ": document " + std::to_string(i);
    if (!LOOM_HAS_FIELD(&d, loom_document, embedding_dim)) invalid(where + ": struct_size too small");
    if (d.doc_id == nullptr || d.doc_id[0] == '\0') invalid(where + ": doc_id is empty");
    where += " ('" + std::string(d.doc_id) + "')";
    if (d.text == nullptr) invalid(where + ": text is NULL");
    if (!seen.insert(d.doc_id).second) invalid(where + ": doc_id appears twice in one add");
    if (*dim == 0) *dim = d.embedding_dim;  // the first document fixes the dimension
    if (d.embedding != nullptr && d.embedding_dim != *dim)
      invalid(where + ": embedding of dimension " + std::to_string(d.embedding_dim) + ", expected " + std::to_string(*dim));
    batch[i].embedding = checked_embedding(index, d.embedding, d.embedding_dim, where);
    if (d.metadata_json != nullptr) {
      const nlohmann::json m = nlohmann::json::parse(d.metadata_json, nullptr, false);
      if (m.is_discarded() || !m.is_object()) invalid(where + ": metadata_json must be a JSON object");
      batch[i].metadata = m.dump();
    }
    batch[i].id = d.doc_id;
    batch[i].text = d.text;
  }
  return batch;
}

}  // namespace loomp::dense

#endif
