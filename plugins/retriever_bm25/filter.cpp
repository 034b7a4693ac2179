// Filter expression -> SQL fragment. User text only ever reaches SQLite as bound parameters;
// the fragment is assembled from fixed templates. Parsing is the SDK's (loom_metadata_filter.hpp),
// shared with the dense retriever, so both read a filter the same way.
#include "filter.hpp"

#include "loom_metadata_filter.hpp"

namespace loomp::bm25 {

CompiledFilter compile_filter(const std::string& filter) {
  CompiledFilter out;
  const std::vector<loomp::filter::Clause> clauses = loomp::filter::parse(filter, "bm25");
  if (clauses.empty()) {
    out.sql.push_back('1');  // (not = "1": GCC 12 -O3 warns falsely, PR 105329)
    return out;
  }
  using loomp::filter::Op;
  for (const auto& c : clauses) {
    if (!out.sql.empty()) out.sql += " AND ";
    std::string path = "$";
    for (const auto& part : c.path) path += "." + part;
    if (const auto* s = std::get_if<std::string>(&c.value)) {
      const std::string eq = "coalesce((json_type(metadata, ?) = 'text' AND json_extract(metadata, ?) = ?), 0)";
      out.sql += c.op == Op::eq ? eq : "NOT " + eq;
      out.binds.insert(out.binds.end(), {path, path, *s});
      continue;
    }
    const char* cmp = c.op == Op::lt ? "<" : c.op == Op::le ? "<=" : c.op == Op::gt ? ">" : c.op == Op::ge ? ">=" : "=";
    const std::string frag = std::string("coalesce((json_type(metadata, ?) IN ('integer', 'real') AND json_extract(metadata, ?) ") +
                             cmp + " ?), 0)";
    out.sql += c.op == Op::ne ? "NOT " + frag : frag;
    out.binds.insert(out.binds.end(), {path, path, std::get<double>(c.value)});
  }
  return out;
}

}  // namespace loomp::bm25
