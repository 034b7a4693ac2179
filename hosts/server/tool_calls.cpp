#include "tool_calls.hpp"

#include <nlohmann/json.hpp>

#include "json_guard.hpp"

namespace loom::server {

namespace {

using json = nlohmann::ordered_json;

std::string dump(const json &j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

const ToolDef *find_tool(const std::vector<ToolDef> &tools, const std::string &name) {
  for (const auto &t : tools)
    if (t.name == name) return &t;
  return nullptr;
}

// One call object ({"name", "arguments"} or {"name", "parameters"}) naming a known tool.
bool read_call(const std::string &text, const std::vector<ToolDef> &tools, std::vector<ToolCall> &out) {
  if (loom::detail::json_too_deep(text, 64)) return false;
  const json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("name") || !j["name"].is_string()) return false;
  const std::string name = j["name"].get<std::string>();
  if (!find_tool(tools, name)) return false;
  json arguments = json::object();
  if (j.contains("arguments")) arguments = j["arguments"];
  else if (j.contains("parameters")) arguments = j["parameters"];
  if (arguments.is_string()) { // some models write the arguments as a JSON string, as the API does
    arguments = json::parse(arguments.get<std::string>(), nullptr, false);
    if (arguments.is_discarded()) return false;
  }
  if (!arguments.is_object()) return false;
  out.push_back({name, dump(arguments)});
  return true;
}

std::string trim(const std::string &s) {
  const size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? std::string() : s.substr(a, b - a + 1);
}

} // namespace

std::string tool_system_prompt(const std::vector<ToolDef> &tools) {
  std::string text =
      "You may call functions to answer. To call one, reply with only\n"
      "<tool_call>{\"name\": FUNCTION_NAME, \"arguments\": {ARGUMENTS}}</tool_call>\n"
      "(one such line per call). The functions:\n";
  for (const auto &t : tools) {
    json f = {{"name", t.name}, {"description", t.description}, {"parameters", json::parse(t.parameters_json)}};
    text += dump(f) + "\n";
  }
  return text;
}

std::string render_tool_calls(const std::vector<ToolCall> &calls) {
  std::string text;
  for (const auto &c : calls) {
    json args = json::parse(c.arguments_json, nullptr, false);
    if (args.is_discarded()) args = c.arguments_json;
    if (!text.empty()) text += '\n';
    text.append("<tool_call>").append(dump(json{{"name", c.name}, {"arguments", args}})).append("</tool_call>");
  }
  return text;
}

std::string render_tool_result(const std::string &content) {
  return std::string("<tool_response>\n").append(content).append("\n</tool_response>");
}

std::string tool_call_schema(const std::vector<ToolDef> &tools) {
  json branches = json::array();
  for (const auto &t : tools) {
    json parameters = json::parse(t.parameters_json);
    if (parameters.empty()) parameters = {{"type", "object"}, {"properties", json::object()}};
    branches.push_back({{"type", "object"},
                        {"properties", {{"name", {{"const", t.name}}}, {"arguments", parameters}}},
                        {"required", {"name", "arguments"}}});
  }
  return dump(branches.size() == 1 ? branches[0] : json{{"anyOf", branches}});
}

std::vector<ToolCall> parse_tool_calls(const std::string &text, const std::vector<ToolDef> &tools) {
  std::vector<ToolCall> calls;
  const std::string open = "<tool_call>", close = "</tool_call>";
  size_t at = 0;
  while ((at = text.find(open, at)) != std::string::npos) {
    const size_t end = text.find(close, at + open.size());
    const std::string body = trim(text.substr(at + open.size(), end == std::string::npos ? std::string::npos : end - at - open.size()));
    read_call(body, tools, calls);
    if (end == std::string::npos) break;
    at = end + close.size();
  }
  if (calls.empty()) read_call(trim(text), tools, calls);
  return calls;
}

} // namespace loom::server
