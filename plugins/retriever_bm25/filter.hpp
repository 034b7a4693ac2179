// Metadata filters for the bm25 retriever, compiled to a SQL fragment with bound parameters.
//
// Grammar (anything else is LOOM_ERR_UNSUPPORTED, never silently ignored):
//   filter  := clause ("&&" clause)*
//   clause  := field ("==" | "!=") string
//            | field ("==" | "!=" | "<" | "<=" | ">" | ">=") number
//   field   := [A-Za-z_][A-Za-z0-9_]* ("." [A-Za-z_][A-Za-z0-9_]*)*   (a path in the metadata)
//   string  := '"' chars with \" and \\ escapes '"'
//   number  := decimal with optional sign, fraction and exponent
// Comparisons read json_extract(metadata, '$.field'); a clause on a missing field is false for
// ==, <, <=, >, >= and true for != (!= is exactly the negation of ==). Numeric clauses only
// match numeric JSON values, string clauses only JSON strings.
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
