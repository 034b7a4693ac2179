#include "tool_arguments.hpp"

// valijson reports schemas it cannot use by exceptions (its default aborts the process).
#define VALIJSON_USE_EXCEPTIONS 1
#include <valijson/adapters/nlohmann_json_adapter.hpp>
#include <valijson/schema.hpp>
#include <valijson/schema_parser.hpp>
#include <valijson/validation_results.hpp>
#include <valijson/validator.hpp>

#include "loom/core/error.hpp"

namespace loom {

struct ArgumentSchema::Impl {
  valijson::Schema schema;
};

ArgumentSchema::ArgumentSchema(const std::string &tool, const std::string &schema_json) : impl_(std::make_unique<Impl>()) {
  const nlohmann::json doc = nlohmann::json::parse(schema_json, nullptr, false);
  if (doc.is_discarded() || !doc.is_object())
    throw runtime_error("tool '" + tool + "': its input schema is not a JSON object");
  try {
    valijson::SchemaParser parser;
    valijson::adapters::NlohmannJsonAdapter adapter(doc);
    parser.populateSchema(adapter, impl_->schema);
  } catch (const std::exception &e) {
    throw runtime_error("tool '" + tool + "': its input schema cannot be used: " + e.what());
  }
}

ArgumentSchema::~ArgumentSchema() = default;
ArgumentSchema::ArgumentSchema(ArgumentSchema &&) noexcept = default;
ArgumentSchema &ArgumentSchema::operator=(ArgumentSchema &&) noexcept = default;

std::string ArgumentSchema::check(const nlohmann::json &arguments) const {
  valijson::Validator validator;
  valijson::ValidationResults results;
  valijson::adapters::NlohmannJsonAdapter target(arguments);
  try {
    if (validator.validate(impl_->schema, target, &results)) return "";
  } catch (const std::exception &e) {
    return std::string("the arguments could not be checked: ") + e.what();
  }
  std::string out;
  valijson::ValidationResults::Error error;
  while (results.popError(error)) {
    std::string path;
    for (const auto &part : error.context) path += part == "<root>" ? "arguments" : part;
    out += (out.empty() ? "" : "\n") + path + ": " + error.description;
  }
  return out.empty() ? "the arguments do not match the tool's schema" : out;
}

}  // namespace loom
