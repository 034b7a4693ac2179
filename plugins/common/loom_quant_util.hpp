// Helpers shared by the builtin quantizer plugins (header-only, plugin-api and nlohmann-json
// only): finding an exported tensor by name and reading quantization metadata. Errors are
// loomp::Fail exceptions (LOOM_ERR_INVALID_ARGUMENT) whose message starts with `who`.
#ifndef LOOM_PLUGINS_COMMON_QUANT_UTIL_HPP
#define LOOM_PLUGINS_COMMON_QUANT_UTIL_HPP

#include <string>

#include <nlohmann/json.hpp>

#include "loom_plugin_util.hpp"

namespace loomp {

// The tensor named exactly `suffix`, or "<prefix>.<suffix>" (the host may keep module
// prefixes); `optional` returns nullptr when it is absent instead of failing.
inline const DLTensor* find_named_tensor(const loom_named_tensor* ts, uint32_t count, const std::string& suffix,
                                         const std::string& who, bool optional = false) {
  const DLTensor* found = nullptr;
  for (uint32_t i = 0; i < count; ++i) {
    if (ts[i].name == nullptr) invalid(who + ": tensor " + std::to_string(i) + " has no name");
    const std::string name = ts[i].name;
    const bool match = name == suffix || (name.size() > suffix.size() &&
                                          name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0 &&
                                          name[name.size() - suffix.size() - 1] == '.');
    if (!match) continue;
    if (found) invalid(who + ": tensor '" + suffix + "' given more than once");
    found = ts[i].tensor;
    if (found == nullptr) invalid(who + ": tensor '" + suffix + "' is NULL");
  }
  if (found == nullptr && !optional) invalid(who + ": missing tensor '" + suffix + "'");
  return found;
}

// The metadata object, checked to hold a "format" string (a quantizer that reads several
// formats dispatches on it).
inline nlohmann::json parse_quant_metadata(const char* json, const std::string& who) {
  if (json == nullptr) invalid(who + ": metadata is NULL");
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(json);
  } catch (const nlohmann::json::exception& e) {
    invalid(who + ": metadata is not valid JSON: " + e.what());
  }
  if (!meta.is_object() || !meta.contains("format") || !meta["format"].is_string())
    invalid(who + ": metadata has no \"format\" string");
  return meta;
}

// Fails unless the metadata names `format`.
inline void check_quant_format(const nlohmann::json& meta, const std::string& format, const std::string& who) {
  if (meta["format"] != format)
    invalid(who + ": unknown format '" + meta["format"].get<std::string>() + "' (expected " + format + ")");
}

// The metadata object, checked to name `format`.
inline nlohmann::json parse_quant_metadata(const char* json, const std::string& format, const std::string& who) {
  nlohmann::json meta = parse_quant_metadata(json, who);
  check_quant_format(meta, format, who);
  return meta;
}

}  // namespace loomp

#endif  // LOOM_PLUGINS_COMMON_QUANT_UTIL_HPP
