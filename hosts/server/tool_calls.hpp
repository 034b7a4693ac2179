// OpenAI function calling on a model without a Jinja chat template: the request's tools are
// described in a system message, the model calls one by writing
//   <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>
// (Hermes / Qwen's convention; a bare {"name", "arguments"|"parameters"} object is read too, as
// Llama 3 writes it), earlier calls and tool results are rendered the same way, and the reply
// is parsed back into tool_calls. With tool_choice "required" or a named function, the reply is
// constrained by the json-schema sampler to one call object of the allowed tools.
// Thread-safety: the functions are pure; a ToolCallStream is one choice's, used by one thread at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
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
// what may begin a call, and each call as OpenAI streams one: a first delta with its index and
// name once the block's "name" is read and names a tool, then its arguments' JSON text in pieces
// as they are written (compact, as the whole response writes them: whitespace dropped, each
// number re-written once it is complete, each string value up to its last complete character),
// the rest when the block closes. Held back:
// a reply whose first character (after whitespace) is '{' (it may be one bare call object:
// decided at the end) unless `reply_is_call` (tool_choice "required" or a named function, where
// the sampler makes the reply one call object: it streams as a block does), text from the first
// <tool_call> on, a tail that may begin one, and whitespace in front of them. Arguments are
// streamed as they come only where "name" precedes an "arguments" object; otherwise (a
// "parameters" object, arguments written as a JSON string, the name after them) they go out
// whole when the block closes. update() is given the reply's text so far, of which the first
// `safe` bytes are final (a stop string may still cut the rest), and returns what is new;
// finish() the rest once the reply ended. Concatenated, the pieces' content is
// reply_content(text, parse_tool_calls(text, tools)) and each index's name and arguments are
// those calls', in order, for every reply whose blocks all hold valid calls. A block whose name
// went out but whose call turns out invalid (its JSON broken, a key written twice, or cut off by
// max_tokens or a stop string) stays as far as it was streamed, as OpenAI's stream leaves a
// cut-off call, and the whole response drops it (the calls after it then have numbers one
// higher in the stream than in the whole response). With `reply_is_call`, a block after the
// bare object (which the json-schema sampler does not let through) would not go out.
// Not thread-safe (one per streamed choice).
class ToolCallStream {
 public:
  struct CallDelta {
    size_t index = 0;                 // the call's number among the reply's streamed calls
    std::optional<std::string> name;  // set in a call's first delta (which carries its id and type)
    std::string arguments;            // the next piece of its arguments' JSON text (may be empty)
  };
  struct Piece {
    std::string content;
    std::vector<CallDelta> calls;  // at most one a call
    size_t content_end = 0;        // bytes of the text the content sent so far covers
  };
  // max_calls: the calls streamed at most (1 for parallel_tool_calls false: the first call only).
  explicit ToolCallStream(std::vector<ToolDef> tools, bool reply_is_call = false, size_t max_calls = SIZE_MAX);
  ~ToolCallStream();
  Piece update(const std::string &text, size_t safe);
  Piece finish(const std::string &text);

 private:
  // The blocks from cursor_ on within text[0, safe): closed ones finished, an open one streamed
  // (finished too when `at_end`, as parse_tool_calls reads an unclosed last block).
  void blocks(const std::string &text, size_t safe, bool at_end, Piece &piece);
  // A block body [begin, end) of text: stream what is new (closed: finish it).
  void stream_body(const std::string &text, size_t at, size_t begin, size_t end, bool closed, Piece &piece);
  CallDelta &delta_for(Piece &piece, size_t index);
  // A call read whole (a closed block not streamed before, a bare object at the end): its name
  // and arguments in one delta, as the next call, unless max_calls are out.
  void send_whole(const ToolCall &call, Piece &piece);
  void send_content(const std::string &text, size_t content_end, Piece &piece);
  std::vector<ToolDef> tools_;
  bool reply_is_call_ = false;
  size_t max_calls_ = SIZE_MAX;
  size_t content_sent_ = 0;
  size_t cursor_ = 0;          // where the next block is looked for
  size_t next_index_ = 0;      // the number the next call gets
  // The block (its tag's offset) whose call is streaming; its number is next_index_ - 1 (no
  // other call gets one before it closes).
  size_t open_at_ = std::string::npos;
  std::string args_sent_;      // that call's arguments text sent so far
  struct Scanner;              // the open block's scan so far (tool_calls.cpp)
  std::unique_ptr<Scanner> scan_;
  size_t scan_at_ = std::string::npos;  // the block (its tag's offset) it scans
};

} // namespace loom::server
