// Metadata filters for the bm25 retriever, compiled to a SQL fragment with bound parameters
// (the grammar and semantics: plugins/common/loom_metadata_filter.hpp, which parses them).
// Comparisons read json_extract(metadata, '$.field').
#ifndef LOOM_PLUGINS_BM25_FILTER_HPP
#define LOOM_PLUGINS_BM25_FILTER_HPP

#include <string>
#include <variant>
#include <vector>

namespace loomp::bm25 {

struct CompiledFilter {
  std::string sql;  // "1" when there is no filter; otherwise clauses joined by AND, using '?'
  std::vector<std::variant<std::string, double>> binds;  // in placeholder order
};

// Throws loomp::Fail(LOOM_ERR_UNSUPPORTED) naming what is not supported and where.
CompiledFilter compile_filter(const std::string& filter);

}  // namespace loomp::bm25

#endif
