// libFuzzer target: `loom serve`'s request parser (hosts/server/openai_request.cpp,
// tool_calls.cpp) on arbitrary bodies. The first byte picks the route (completions, chat,
// embeddings); the rest is the body. A body either parses (then its sampler chain, tool schema
// and tool-call parsing run too) or is refused with ApiError (a 4xx); anything else escaping,
// a crash, or a sanitizer report is a bug. The body is also streamed as a reply with tools
// (ToolCallStream), whose content must add up to the whole reply's.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "openai_request.hpp"
#include "stream_text.hpp"
#include "tool_calls.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size == 0) return 0;
  const int route = data[0] % 3;
  const std::string body(reinterpret_cast<const char *>(data + 1), size - 1);
  try {
    if (route == 2) {
      (void)loom::server::parse_embeddings(body);
    } else {
      const loom::server::GenerationParams p = loom::server::parse_generation(body, route == 1, 32000);
      for (const auto &toml : loom::server::sampler_chain_tomls(p)) (void)toml.size();
      if (!p.tools.empty()) {
        (void)loom::server::tool_call_schema(p.callable_tools());
        (void)loom::server::parse_tool_calls(body, p.tools);
      }
    }
  } catch (const loom::server::ApiError &e) {
    if (e.status < 400 || e.status > 499) __builtin_trap(); // the parser only ever refuses with a 4xx
    (void)loom::server::error_body(e);
  }
  const std::vector<loom::server::ToolDef> tools = {{"add", "", "{}"}, {"get", "", "{}"}};
  const std::vector<loom::server::ToolCall> calls = loom::server::parse_tool_calls(body, tools);
  (void)loom::server::streamable_prefix(body, {"</s>", "\n\n"});
  // The body as a reply streamed with tools, in steps of 1-8 bytes (the route byte picks the
  // step and whether the reply must be one call object): its content adds up to the whole
  // reply's, each call's first delta carries the next number and a name, later ones a number
  // already given.
  loom::server::ToolCallStream stream(tools, (data[0] & 8) != 0);
  const size_t step = 1 + (data[0] >> 4) % 8;
  std::string content;
  size_t calls_seen = 0;
  const auto take = [&](const loom::server::ToolCallStream::Piece &piece) {
    content += piece.content;
    for (const auto &d : piece.calls) {
      if (d.name) {
        if (d.index != calls_seen++) __builtin_trap();
      } else if (d.index >= calls_seen) {
        __builtin_trap();
      }
    }
  };
  for (size_t n = step; n < body.size(); n += step) take(stream.update(body.substr(0, n), n - n / 4));
  take(stream.finish(body));
  if (content != loom::server::reply_content(body, calls)) __builtin_trap();
  return 0;
}
