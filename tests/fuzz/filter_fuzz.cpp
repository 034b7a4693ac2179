// The retrievers' metadata filter (plugins/common/loom_metadata_filter.hpp): any text either
// parses or is refused with LOOM_ERR_UNSUPPORTED, and a parsed filter evaluates on any JSON
// document without crashing; bm25's SQL compilation of it binds every value (no text of the
// filter reaches the SQL). Input: a filter, then (after the first newline) a metadata document.
#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "filter.hpp"
#include "loom_metadata_filter.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const std::string input(reinterpret_cast<const char *>(data), size);
  const size_t nl = input.find('\n');
  const std::string filter = input.substr(0, nl), document = nl == std::string::npos ? "{}" : input.substr(nl + 1);
  try {
    const auto clauses = loomp::filter::parse(filter, "fuzz");
    const nlohmann::json j = nlohmann::json::parse(document, nullptr, false);
    (void)loomp::filter::matches(clauses, j.is_discarded() ? nlohmann::json() : j);
    const auto sql = loomp::bm25::compile_filter(filter);
    size_t placeholders = 0;
    for (char c : sql.sql) placeholders += c == '?' ? 1 : 0;
    if (placeholders != sql.binds.size()) __builtin_trap();  // every value is a bound parameter
  } catch (const loomp::Fail &f) {
    if (f.status != LOOM_ERR_UNSUPPORTED) __builtin_trap();
  }
  return 0;
}
