// Private to core: a tool call's arguments checked against the tool's input JSON Schema
// (valijson, Debian's libvalijson-dev; draft 7) before the tool runs ([RAG+Tools] agent loop).
//
// Thread-safety: reentrant; a compiled schema is immutable once made.
#pragma once

#include <memory>
#include <string>

#include <nlohmann/json.hpp>

namespace loom {

class ArgumentSchema {
 public:
  // Compiles `schema_json`. A schema that does not parse, or that valijson cannot use, throws
  // loom::Error naming `tool`.
  ArgumentSchema(const std::string &tool, const std::string &schema_json);
  ~ArgumentSchema();
  ArgumentSchema(ArgumentSchema &&) noexcept;
  ArgumentSchema &operator=(ArgumentSchema &&) noexcept;
  // "" when `arguments` satisfies the schema; otherwise every violation, one per line, as
  // "<path>: what" (the text the model is shown to correct its call).
  std::string check(const nlohmann::json &arguments) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace loom
