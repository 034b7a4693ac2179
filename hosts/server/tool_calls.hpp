// OpenAI function calling on a model without a Jinja chat template: the request's tools are
// described in a system message, the model calls one by writing
//   <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>
// (Hermes / Qwen's convention; a bare {"name", "arguments"|"parameters"} object is read too, as
// Llama 3 writes it), earlier calls and tool results are rendered the same way, and the reply
// is parsed back into tool_calls. With tool_choice "required" or a named function, the reply is
// constrained by the json-schema sampler to one call object of the allowed tools.
// Thread-safety: pure functions.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace loom::server {

struct ToolDef {
  std::string name, description;
  std::string parameters_json; // a JSON schema object ("{}" when the tool takes none)
};

enum class ToolChoice { none, auto_, required, named };

struct ToolCall {
  std::string name;
  std::string arguments_json; // compact JSON object text (OpenAI sends arguments as a string)
};

// The system text that offers `tools` and says how to call them.
std::string tool_system_prompt(const std::vector<ToolDef> &tools);
// An assistant turn that made `calls`, as the model would have written it.
std::string render_tool_calls(const std::vector<ToolCall> &calls);
// A tool result, as the conversation shows it to the model.
std::string render_tool_result(const std::string &content);
// The JSON schema of one call of the allowed tools ({"name": const, "arguments": parameters}),
// for the json-schema sampler.
std::string tool_call_schema(const std::vector<ToolDef> &tools);
// The calls in a reply: every <tool_call>...</tool_call> block, or the whole reply as one call
// object; only calls that name one of `tools` with object arguments count. Empty: a plain answer.
std::vector<ToolCall> parse_tool_calls(const std::string &text, const std::vector<ToolDef> &tools);

} // namespace loom::server
