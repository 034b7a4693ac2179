// Tool component `calculator`: offers one tool, "calculator", that evaluates an arithmetic
// expression with the safe evaluator in evaluator.cpp. A wrong expression is a tool error
// (is_error = 1, the message in content) so the model can correct itself; only failures of the
// plugin itself (unknown tool name, buffer errors) are non-OK statuses.
// Stateless, so concurrent calls are safe.
#include <string>

#include <nlohmann/json.hpp>

#include "evaluator.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"
#include "loom_tool_glue.hpp"

namespace loomp::calc {
namespace {

constexpr const char* kToolDescription =
    "Evaluates an arithmetic expression: numbers, + - * / % ^ (power), parentheses, "
    "sqrt abs ln log10 exp sin cos tan floor ceil min(a,b) max(a,b), constants pi and e.";
constexpr const char* kToolSchema =
    R"({"type":"object","properties":{"expression":{"type":"string"}},"required":["expression"]})";


// Parses the arguments and evaluates; returns {text, is_error}.
std::pair<std::string, bool> evaluate_arguments(const char* arguments_json) {
  if (arguments_json == nullptr) return {"error: arguments are missing", true};
  nlohmann::json args;
  try {
    args = nlohmann::json::parse(arguments_json);
  } catch (const nlohmann::json::exception& e) {
    return {std::string("error: arguments are not valid JSON: ") + e.what(), true};
  }
  if (!args.is_object()) return {"error: arguments must be a JSON object", true};
  const auto it = args.find("expression");
  if (it == args.end()) return {"error: missing required argument \"expression\"", true};
  if (!it->is_string()) return {"error: \"expression\" must be a string", true};
  try {
    return {format_number(evaluate(it->get<std::string>())), false};
  } catch (const EvalError& e) {
    return {std::string("error: ") + e.what(), true};
  }
}

struct Calculator {
  static constexpr const char* kName = "calculator", *kDescription = kToolDescription, *kInputSchema = kToolSchema;
  const loom_host_api* host;
  loom_host_ctx* ctx;
  Calculator(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c) {}
  std::pair<std::string, bool> run(const char* arguments_json) const { return evaluate_arguments(arguments_json); }
};

constexpr loom_component_desc kCalculator = {
    sizeof(loom_component_desc), LOOM_KIND_TOOL, "calculator", "1.0.0",
    "A safe arithmetic calculator tool", nullptr, 0, LOOM_THREADING_CONCURRENT, &SingleToolGlue<Calculator>::kVtable};
const loom_component_desc* const kComponents[] = {&kCalculator};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-tool-calculator", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::calc

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::calc::kPlugin; }
