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

// The content of a whole reply whose calls are `calls`: all of it when there are none; else the
// text before its first <tool_call> block with trailing whitespace dropped (empty: no content,
// as a reply that is one bare call object has none).
std::string reply_content(const std::string &text, const std::vector<ToolCall> &calls);

// Streams a reply that may hold tool calls (chat with tools): its content as it comes, except
// what may begin a call, and each <tool_call> block's call once the block closes. Held back:
// a reply whose first character (after whitespace) is '{' (it may be one bare call object:
// decided at the end), text from the first <tool_call> on, a tail that may begin one, and
// whitespace in front of them. update() is given the reply's text so far, of which the first
// `safe` bytes are final (a stop string may still cut the rest), and returns what is new;
// finish() the rest once the reply ended. Concatenated, the pieces' content is
// reply_content(text, parse_tool_calls(text, tools)) and their calls are those calls, in order.
// Not thread-safe (one per streamed choice).
class ToolCallStream {
 public:
  struct Piece {
    std::string content;
    std::vector<ToolCall> calls;
    size_t first_call = 0;   // the index of calls[0] among the reply's calls
    size_t content_end = 0;  // bytes of the text the content sent so far covers
  };
  explicit ToolCallStream(std::vector<ToolDef> tools) : tools_(std::move(tools)) {}
  Piece update(const std::string &text, size_t safe);
  Piece finish(const std::string &text);

 private:
  Piece advance(const std::string &text, size_t content_end, std::vector<ToolCall> calls);
  std::vector<ToolDef> tools_;
  size_t content_sent_ = 0, calls_sent_ = 0;
  size_t parsed_to_ = 0; // the end of the last closed block whose calls were parsed
};

} // namespace loom::server
