// A Model Context Protocol server over stdio for the tests ([RAG+Tools] item 4): JSON-RPC 2.0,
// one message a line. Its tools exercise the client's paths:
//   add {a, b}          the sum as text (numbers required: a JSON-RPC error otherwise)
//   echo {text}         the text
//   fail {}             a result with isError = true
//   huge {}             a reply of 2 MB on one line (longer than the tests' max_line_bytes)
//   slow {seconds}      answers after sleeping
//   crash {}            exits with status 3 without answering
//   change {}           announces notifications/tools/list_changed; a tool "late" appears
//   ping_me {}          asks the client "ping" first and answers once the client has answered
//   image {}            an image content and a text content
//   sqrt {x >= 0}       the square root (x below 0 is refused: the schema's minimum)
// tools/list comes in two pages (nextCursor). A line "not json" precedes every tools/call
// answer, which the client must skip. Flags: --no-tools (no tools capability), --exit-at-start.
// Every tools/call is appended to the file named by MCP_TEST_LOG, when set, as one JSON line.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

using nlohmann::json;

namespace {

void send(const json &m) {
  std::cout << m.dump() << "\n";
  std::cout.flush();
}

json tool(const std::string &name, const json &properties, const json &required) {
  return {{"name", name},
          {"description", "test tool " + name},
          {"inputSchema", {{"type", "object"}, {"properties", properties}, {"required", required}, {"additionalProperties", false}}}};
}

json text_result(const std::string &text, bool is_error = false) {
  return {{"content", json::array({{{"type", "text"}, {"text", text}}})}, {"isError", is_error}};
}

}  // namespace

int main(int argc, char **argv) {
  bool tools_capability = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--no-tools") tools_capability = false;
    if (a == "--exit-at-start") return 2;
  }
  const json number = {{"type", "number"}};
  std::vector<json> tools = {
      tool("add", {{"a", number}, {"b", number}}, json::array({"a", "b"})),
      tool("echo", {{"text", {{"type", "string"}}}}, json::array({"text"})),
      tool("fail", json::object(), json::array()),
      tool("huge", json::object(), json::array()),
      tool("slow", {{"seconds", number}}, json::array({"seconds"})),
      tool("crash", json::object(), json::array()),
      tool("change", json::object(), json::array()),
      tool("ping_me", json::object(), json::array()),
      tool("image", json::object(), json::array()),
      tool("sqrt", {{"x", {{"type", "number"}, {"minimum", 0}}}}, json::array({"x"})),
  };
  const char *log_path = std::getenv("MCP_TEST_LOG");
  std::string line;
  while (std::getline(std::cin, line)) {
    const json m = json::parse(line, nullptr, false);
    if (m.is_discarded() || !m.is_object() || !m.contains("method")) continue;
    const std::string method = m["method"];
    if (!m.contains("id")) continue;  // notifications (initialized, cancelled)
    const json id = m["id"];
    const json params = m.value("params", json::object());
    if (method == "initialize") {
      json caps = json::object();
      if (tools_capability) caps["tools"] = {{"listChanged", true}};
      send({{"jsonrpc", "2.0"}, {"id", id},
            {"result", {{"protocolVersion", params.value("protocolVersion", "2025-06-18")},
                        {"capabilities", caps},
                        {"serverInfo", {{"name", "loom-test-server"}, {"version", "1"}}}}}});
    } else if (method == "tools/list") {
      const bool second = params.contains("cursor");
      json page = json::array();
      for (size_t i = second ? 3 : 0; i < (second ? tools.size() : 3); ++i) page.push_back(tools[i]);
      json result = {{"tools", page}};
      if (!second) result["nextCursor"] = "page-2";
      send({{"jsonrpc", "2.0"}, {"id", id}, {"result", result}});
    } else if (method == "tools/call") {
      const std::string name = params.value("name", "");
      const json args = params.value("arguments", json::object());
      if (log_path) std::ofstream(log_path, std::ios::app) << json{{"name", name}, {"arguments", args}}.dump() << "\n";
      std::cout << "not json\n";
      json result;
      if (name == "add") {
        if (!args.contains("a") || !args.contains("b") || !args["a"].is_number() || !args["b"].is_number()) {
          send({{"jsonrpc", "2.0"}, {"id", id}, {"error", {{"code", -32602}, {"message", "add needs numbers a and b"}}}});
          continue;
        }
        const double sum = args["a"].get<double>() + args["b"].get<double>();
        result = text_result(json(sum).dump());
      } else if (name == "echo") {
        result = text_result(args.value("text", ""));
      } else if (name == "fail") {
        result = text_result("it failed", true);
      } else if (name == "huge") {
        result = text_result(std::string(2 << 20, 'h'));
      } else if (name == "slow") {
        std::this_thread::sleep_for(std::chrono::duration<double>(args.value("seconds", 1.0)));
        result = text_result("slept");
      } else if (name == "crash") {
        std::exit(3);
      } else if (name == "change") {
        tools.push_back(tool("late", json::object(), json::array()));
        send({{"jsonrpc", "2.0"}, {"method", "notifications/tools/list_changed"}});
        result = text_result("changed");
      } else if (name == "ping_me") {
        send({{"jsonrpc", "2.0"}, {"id", "server-1"}, {"method", "ping"}});
        std::string reply;
        bool answered = false;
        while (!answered && std::getline(std::cin, reply)) {
          const json r = json::parse(reply, nullptr, false);
          answered = r.is_object() && r.value("id", json()) == "server-1" && r.contains("result");
        }
        result = text_result(answered ? "pong received" : "no pong");
      } else if (name == "image") {
        result = {{"content", json::array({{{"type", "image"}, {"mimeType", "image/png"}, {"data", "iVBORw0KGgo="}},
                                           {{"type", "text"}, {"text", "a caption"}}})}};
      } else if (name == "sqrt") {
        const double x = args.value("x", -1.0);
        result = x < 0 ? text_result("x must not be negative", true) : text_result(json(std::sqrt(x)).dump());
      } else if (name == "late") {
        result = text_result("late tool");
      } else {
        send({{"jsonrpc", "2.0"}, {"id", id}, {"error", {{"code", -32602}, {"message", "Unknown tool: " + name}}}});
        continue;
      }
      send({{"jsonrpc", "2.0"}, {"id", id}, {"result", result}});
    } else if (method == "ping") {
      send({{"jsonrpc", "2.0"}, {"id", id}, {"result", json::object()}});
    } else {
      send({{"jsonrpc", "2.0"}, {"id", id}, {"error", {{"code", -32601}, {"message", "Method not found"}}}});
    }
  }
  return 0;
}
