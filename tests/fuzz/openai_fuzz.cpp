// libFuzzer target: `loom serve`'s request parser (hosts/server/openai_request.cpp,
// tool_calls.cpp) on arbitrary bodies. The first byte picks the route (completions, chat,
// embeddings); the rest is the body. A body either parses (then its sampler chain, tool schema
// and tool-call parsing run too) or is refused with ApiError (a 4xx); anything else escaping,
// a crash, or a sanitizer report is a bug.
#include <cstddef>
#include <cstdint>
#include <string>

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
  (void)loom::server::parse_tool_calls(body, {{"add", "", "{}"}, {"get", "", "{}"}});
  (void)loom::server::streamable_prefix(body, {"</s>", "\n\n"});
  return 0;
}
