// Tool component `mcp`: a Model Context Protocol client over stdio (JSON-RPC 2.0, one message a
// line). It starts the server from `command` (an argument vector, never a shell), initializes,
// lists the server's tools (following nextCursor pages) and offers each as a Loom tool;
// tools/call runs them. The list is fetched again after the server's
// notifications/tools/list_changed, at the next tool_count.
//
// Outcomes: a tools/call result's text contents (joined; other content kinds summarised) are
// the tool's content, isError its is_error; a JSON-RPC error answer, a reply longer than
// max_line_bytes, or no answer within timeout_s (the request is then cancelled with
// notifications/cancelled) are tool errors the model can see; a server that has exited is a
// failure of the plugin (LOOM_ERR_IO). Content beyond max_output_bytes is cut off. The server's
// requests to the client are answered: ping with an empty result, anything else with
// "method not found" (this client offers no sampling or roots).
//
// Thread-safety: one mutex serialises the conversation with the server.
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"
#include "stdio_peer.hpp"

namespace loomp::mcp {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr const char *kProtocolVersion = "2025-06-18";

// Whether `j` nests at most `limit` arrays and objects deep (checked without recursion): deeper
// messages are refused, since dumping them (recursive) could exhaust the stack.
bool shallow(const json &j, int limit) {
  std::vector<std::pair<const json *, int>> stack{{&j, 0}};
  while (!stack.empty()) {
    const auto [node, depth] = stack.back();
    stack.pop_back();
    if (!node->is_structured()) continue;
    if (depth >= limit) return false;
    for (const auto &child : *node) stack.push_back({&child, depth + 1});
  }
  return true;
}

struct ToolEntry {
  std::string name, description, input_schema, output_schema;
};

struct Mcp {
  const loom_host_api *host;
  loom_host_ctx *ctx;
  std::mutex mutex;
  std::unique_ptr<StdioPeer> peer;
  std::string program;
  double timeout_s = 30;
  size_t max_line_bytes = 4 << 20, max_output_bytes = 64 << 10;
  int64_t next_id = 1;
  std::vector<ToolEntry> tools;
  bool list_changed = false;

  Mcp(const loom_host_api *h, loom_host_ctx *c) : host(h), ctx(c) {
    const std::vector<std::string> command = cfg_string_array(h, c, "command");
    if (command.empty() || command[0].empty())
      invalid_param("command", "mcp: command must name the server program and its arguments, e.g. [\"mcp-server\", \"--stdio\"]");
    program = command[0];
    timeout_s = cfg_float(h, c, "timeout_s");
    if (!(timeout_s > 0 && timeout_s <= 3600)) invalid_param("timeout_s", "mcp: timeout_s must be in (0, 3600]");
    const double startup_s = cfg_float(h, c, "startup_timeout_s");
    if (!(startup_s > 0 && startup_s <= 3600)) invalid_param("startup_timeout_s", "mcp: startup_timeout_s must be in (0, 3600]");
    const int64_t line = cfg_int(h, c, "max_line_bytes"), output = cfg_int(h, c, "max_output_bytes");
    if (line < 1024 || line > (int64_t{1} << 30)) invalid_param("max_line_bytes", "mcp: max_line_bytes must be in [1024, 2^30]");
    if (output < 1 || output > (int64_t{1} << 30)) invalid_param("max_output_bytes", "mcp: max_output_bytes must be in [1, 2^30]");
    max_line_bytes = static_cast<size_t>(line);
    max_output_bytes = static_cast<size_t>(output);
    peer = std::make_unique<StdioPeer>(command);
    const json init = request("initialize",
                              {{"protocolVersion", kProtocolVersion},
                               {"capabilities", json::object()},
                               {"clientInfo", {{"name", "loom"}, {"version", "1.0.0"}}}},
                              startup_s);
    if (!init.contains("result") || !init["result"].is_object())
      fail(LOOM_ERR_IO, "mcp: '" + program + "' did not initialize: " + error_text(init));
    if (!init["result"].contains("capabilities") || !init["result"]["capabilities"].contains("tools"))
      fail(LOOM_ERR_UNSUPPORTED, "mcp: '" + program + "' offers no tools (its capabilities have no \"tools\")");
    notify("notifications/initialized", json::object());
    list_tools();
  }

  std::string where() const { return "mcp: '" + program + "'"; }

  static std::string error_text(const json &reply) {
    if (reply.contains("error") && reply["error"].is_object())
      return "MCP error " + std::to_string(reply["error"].value("code", 0)) + ": " + reply["error"].value("message", "?");
    return "an answer without a result";
  }

  // Writes a message by `deadline` (a request's own); a server that does not read it in time, or
  // has gone, is a failure of the plugin.
  void send(const json &message, Clock::time_point deadline) {
    switch (peer->write_line(message.dump(), deadline, [this] { return host->is_cancelled(ctx) != 0; })) {
      case StdioPeer::Read::line: return;
      case StdioPeer::Read::cancelled: fail(LOOM_ERR_CANCELLED, where() + ": cancelled while writing to the server");
      case StdioPeer::Read::timeout: fail(LOOM_ERR_IO, where() + " does not read its input");
      default: fail(LOOM_ERR_IO, where() + " does not take input any more (" + peer->state() + ")");
    }
  }
  void send(const json &message) { send(message, Clock::now() + std::chrono::seconds(5)); }
  void notify(const std::string &method, const json &params) { send({{"jsonrpc", "2.0"}, {"method", method}, {"params", params}}); }

  // What the server sends that is not the answer being waited for.
  void on_other(const json &m) {
    if (!m.is_object() || !m.contains("method")) return;  // a stale answer (a request that timed out)
    const std::string method = m.value("method", "");
    if (!m.contains("id")) {
      if (method == "notifications/tools/list_changed") list_changed = true;
      return;
    }
    if (method == "ping") send({{"jsonrpc", "2.0"}, {"id", m["id"]}, {"result", json::object()}});
    else send({{"jsonrpc", "2.0"}, {"id", m["id"]}, {"error", {{"code", -32601}, {"message", "method not found: " + method}}}});
  }

  // Sends a request and returns the answer (an object with "result" or "error"). A reply that
  // is too long or late becomes an error answer with code 0; a closed server throws.
  json request(const std::string &method, const json &params, double seconds) {
    const int64_t id = next_id++;
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
    send({{"jsonrpc", "2.0"}, {"id", id}, {"method", method}, {"params", params}}, deadline);
    std::string line;
    for (;;) {
      switch (peer->read_line(&line, deadline, max_line_bytes, [this] { return host->is_cancelled(ctx) != 0; })) {
        case StdioPeer::Read::line: {
          json m = json::parse(line, nullptr, false);
          if (m.is_discarded()) continue;  // not JSON (a server's stray output): not an answer
          if (!shallow(m, 64)) {
            notify("notifications/cancelled", {{"requestId", id}, {"reason", "reply nested too deeply"}});
            return {{"error", {{"code", 0}, {"message", "a message nested deeper than 64 levels was dropped"}}}};
          }
          if (m.is_object() && m.contains("id") && m["id"] == id && !m.contains("method")) return m;
          on_other(m);
          continue;
        }
        case StdioPeer::Read::too_long:
          // The answer may have been the long line: nothing more for this id will come.
          return {{"error", {{"code", 0}, {"message", "a reply longer than max_line_bytes (" + std::to_string(max_line_bytes) +
                                                          " bytes) was dropped"}}}};
        case StdioPeer::Read::timeout:
        case StdioPeer::Read::cancelled: {
          const bool late = Clock::now() >= deadline;
          notify("notifications/cancelled", {{"requestId", id}, {"reason", late ? "timeout" : "cancelled"}});
          return {{"error", {{"code", 0}, {"message", late ? "no answer to " + method + " within " + std::to_string(seconds) + " s"
                                                           : method + " cancelled"}}}};
        }
        case StdioPeer::Read::closed:
          fail(LOOM_ERR_IO, where() + " closed its output (" + peer->state() + ")");
      }
    }
  }

  void list_tools() {
    std::vector<ToolEntry> found;
    json params = json::object();
    for (int page = 0; page < 1000; ++page) {
      const json reply = request("tools/list", params, timeout_s);
      if (!reply.contains("result") || !reply["result"].is_object())
        fail(LOOM_ERR_IO, where() + ": tools/list failed: " + error_text(reply));
      const json &result = reply["result"];
      if (!result.contains("tools") || !result["tools"].is_array()) fail(LOOM_ERR_IO, where() + ": tools/list has no tools array");
      for (const auto &t : result["tools"]) {
        if (!t.is_object() || !t.contains("name") || !t["name"].is_string() || t["name"].get<std::string>().empty()) continue;
        ToolEntry e;
        e.name = t["name"].get<std::string>();
        e.description = t.value("description", "");
        e.input_schema = t.contains("inputSchema") && t["inputSchema"].is_object() ? t["inputSchema"].dump() : R"({"type":"object"})";
        if (t.contains("outputSchema") && t["outputSchema"].is_object()) e.output_schema = t["outputSchema"].dump();
        bool duplicate = false;
        for (const auto &f : found) duplicate = duplicate || f.name == e.name;
        if (!duplicate) found.push_back(std::move(e));
      }
      if (!result.contains("nextCursor") || !result["nextCursor"].is_string()) break;
      params = {{"cursor", result["nextCursor"]}};
    }
    tools = std::move(found);
    list_changed = false;
  }

  // {content, is_error}
  std::pair<std::string, bool> call(const std::string &name, const char *arguments_json) {
    json arguments = json::object();
    if (arguments_json != nullptr && arguments_json[0] != '\0') {
      arguments = json::parse(arguments_json, nullptr, false);
      if (arguments.is_discarded() || !arguments.is_object()) return {"error: arguments must be a JSON object", true};
    }
    const json reply = request("tools/call", {{"name", name}, {"arguments", arguments}}, timeout_s);
    if (!reply.contains("result") || !reply["result"].is_object()) return {"error: " + error_text(reply), true};
    const json &result = reply["result"];
    std::string text;
    if (result.contains("content") && result["content"].is_array()) {
      for (const auto &item : result["content"]) {
        if (!item.is_object()) continue;
        const std::string type = item.value("type", "");
        std::string piece;
        if (type == "text" && item.contains("text") && item["text"].is_string()) piece = item["text"].get<std::string>();
        else if (type == "resource_link" || type == "resource")
          piece = "[resource: " + (item.contains("resource") && item["resource"].is_object() ? item["resource"].value("uri", "?") : item.value("uri", "?")) + "]";
        else piece = "[" + (type.empty() ? std::string("content") : type) + ": " + item.value("mimeType", "?") + "]";
        text += (text.empty() ? "" : "\n") + piece;
      }
    }
    if (text.empty() && result.contains("structuredContent")) text = result["structuredContent"].dump();
    if (text.size() > max_output_bytes) {
      text.resize(max_output_bytes);
      text += "\n[cut off at " + std::to_string(max_output_bytes) + " bytes]";
    }
    return {text, result.value("isError", false)};
  }
};

Mcp &self(void *inst) { return *static_cast<Mcp *>(inst); }

loom_status create_fn(const loom_host_api *host, loom_host_ctx *ctx, void **out) {
  return guard(host, ctx, [&] {
    if (out == nullptr) invalid("out_instance is NULL");
    *out = std::make_unique<Mcp>(host, ctx).release();
  });
}
void destroy_fn(void *inst) { delete static_cast<Mcp *>(inst); }
loom_status tool_count_fn(void *inst, uint32_t *out) {
  Mcp &m = self(inst);
  return guard(m.host, m.ctx, [&] {
    if (out == nullptr) invalid("mcp: out is NULL");
    std::lock_guard lock(m.mutex);
    if (m.list_changed) m.list_tools();
    *out = static_cast<uint32_t>(m.tools.size());
  });
}
loom_status tool_info_fn(void *inst, uint32_t index, loom_tool_info *out) {
  Mcp &m = self(inst);
  return guard(m.host, m.ctx, [&] {
    if (out == nullptr) invalid("mcp: out is NULL");
    if (out->struct_size < sizeof(loom_tool_info)) invalid("mcp: tool_info struct_size too small");
    std::lock_guard lock(m.mutex);
    if (index >= m.tools.size()) fail(LOOM_ERR_NOT_FOUND, "mcp: tool index " + std::to_string(index) + " does not exist");
    const ToolEntry &t = m.tools[index];
    *out = loom_tool_info{sizeof(loom_tool_info), t.name.c_str(), t.description.c_str(), t.input_schema.c_str(),
                          t.output_schema.empty() ? nullptr : t.output_schema.c_str()};
  });
}
loom_status call_fn(void *inst, const char *tool_name, const char *arguments_json, loom_tool_result *result) {
  Mcp &m = self(inst);
  return guard(m.host, m.ctx, [&] {
    if (result == nullptr || result->content == nullptr) invalid("mcp: result or result->content is NULL");
    if (tool_name == nullptr) fail(LOOM_ERR_NOT_FOUND, "mcp: tool name is NULL");
    std::lock_guard lock(m.mutex);
    bool known = false;
    for (const auto &t : m.tools) known = known || t.name == tool_name;
    if (!known) fail(LOOM_ERR_NOT_FOUND, m.where() + " offers no tool named '" + tool_name + "'");
    const auto [text, is_error] = m.call(tool_name, arguments_json);
    write_tool_result(m.host, result, text, is_error, "mcp");
  });
}

constexpr loom_tool_vtable kVtable = {
    sizeof(loom_tool_vtable),
    {&create_fn, &destroy_fn, nullptr, nullptr, nullptr},
    &tool_count_fn, &tool_info_fn, &call_fn,
};
constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "command", LOOM_VALUE_ARRAY, 1, nullptr,
     "the MCP server to start: program and arguments (run directly, never through a shell)"},
    {sizeof(loom_param_desc), "timeout_s", LOOM_VALUE_FLOAT, 0, "30.0", "time limit of each request (tools/list, tools/call)"},
    {sizeof(loom_param_desc), "startup_timeout_s", LOOM_VALUE_FLOAT, 0, "10.0", "time limit of initialize"},
    {sizeof(loom_param_desc), "max_line_bytes", LOOM_VALUE_INT, 0, "4194304", "longest message accepted from the server"},
    {sizeof(loom_param_desc), "max_output_bytes", LOOM_VALUE_INT, 0, "65536", "a tool result's text is cut off after this"},
};
constexpr loom_component_desc kMcp = {
    sizeof(loom_component_desc), LOOM_KIND_TOOL, "mcp", "1.0.0",
    "Model Context Protocol client (stdio): the server's tools become Loom tools", kParams, 5, LOOM_THREADING_SERIAL,
    &kVtable};
const loom_component_desc *const kComponents[] = {&kMcp};
const loom_plugin_desc kPlugin = {
    sizeof(loom_plugin_desc), LOOM_ABI_MAJOR, LOOM_ABI_MINOR, "loom-tool-mcp", "1.0.0",
    "Apache-2.0", kComponents, 1, nullptr};

}  // namespace
}  // namespace loomp::mcp

extern "C" LOOM_PLUGIN_EXPORT const loom_plugin_desc *loom_plugin_entry(void) { return &loomp::mcp::kPlugin; }
