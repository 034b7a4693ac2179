// Tool component `calculator`: offers one tool, "calculator", that evaluates an arithmetic
// expression with the safe evaluator in evaluator.cpp. A wrong expression is a tool error
// (is_error = 1, the message in content) so the model can correct itself; only failures of the
// plugin itself (unknown tool name, buffer errors) are non-OK statuses.
// Stateless, so concurrent calls are safe.
#include <cstring>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "evaluator.hpp"
#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"

namespace loomp::calc {
namespace {

constexpr const char* kToolName = "calculator";
constexpr const char* kDescription =
    "Evaluates an arithmetic expression: numbers, + - * / % ^ (power), parentheses, "
    "sqrt abs ln log10 exp sin cos tan floor ceil min(a,b) max(a,b), constants pi and e.";
constexpr const char* kInputSchema =
    R"({"type":"object","properties":{"expression":{"type":"string"}},"required":["expression"]})";

struct Calculator {
  const loom_host_api* host;
  loom_host_ctx* ctx;
};
Calculator& self(void* inst) { return *static_cast<Calculator*>(inst); }

// Parses the arguments and evaluates; returns {text, is_error}.
std::pair<std::string, bool> run(const char* arguments_json) {
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

loom_status create_fn(const loom_host_api* host, loom_host_ctx* ctx, void** out) {
  return guard(host, ctx, [&] {
    if (out == nullptr) invalid("out_instance is NULL");
    *out = new Calculator{host, ctx};
  });
}
void destroy_fn(void* inst) { delete static_cast<Calculator*>(inst); }
loom_status tool_count_fn(void* inst, uint32_t* out) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (out == nullptr) invalid("calculator: out is NULL");
    *out = 1;
  });
}
loom_status tool_info_fn(void* inst, uint32_t index, loom_tool_info* out) {
  return guard(self(inst).host, self(inst).ctx, [&] {
    if (out == nullptr) invalid("calculator: out is NULL");
    if (index != 0) fail(LOOM_ERR_NOT_FOUND, "calculator: tool index " + std::to_string(index) + " does not exist");
    if (out->struct_size < sizeof(loom_tool_info)) invalid("calculator: tool_info struct_size too small");
    *out = loom_tool_info{sizeof(loom_tool_info), kToolName, kDescription, kInputSchema, nullptr};
  });
}
loom_status call_fn(void* inst, const char* tool_name, const char* arguments_json, loom_tool_result* result) {
  Calculator& c = self(inst);
  return guard(c.host, c.ctx, [&] {
    if (result == nullptr || result->content == nullptr) invalid("calculator: result or result->content is NULL");
    if (tool_name == nullptr || std::strcmp(tool_name, kToolName) != 0)
      fail(LOOM_ERR_NOT_FOUND, std::string("calculator: no tool named '") + (tool_name ? tool_name : "(null)") + "'");
    const auto [text, is_error] = run(arguments_json);
    write_tool_result(c.host, result, text, is_error, "calculator");
  });
}

constexpr loom_tool_vtable kVtable = {
    sizeof(loom_tool_vtable),
    {&create_fn, &destroy_fn, nullptr, nullptr, nullptr},
    &tool_count_fn, &tool_info_fn, &call_fn,
};
constexpr loom_component_desc kCalculator = {
    sizeof(loom_component_desc), LOOM_KIND_TOOL, "calculator", "1.0.0",
    "A safe arithmetic calculator tool", nullptr, 0, LOOM_THREADING_CONCURRENT, &kVtable};
const loom_component_desc* const kComponents[] = {&kCalculator};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-tool-calculator", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::calc

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc* loom_plugin_entry(void) { return &loomp::calc::kPlugin; }
