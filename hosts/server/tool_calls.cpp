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

namespace {

const std::string kOpenTag = "<tool_call>", kCloseTag = "</tool_call>";

// The end of text[0, end) without its trailing whitespace.
size_t before_trailing_space(const std::string &text, size_t end) {
  while (end > 0 && std::string_view(" \t\r\n").find(text[end - 1]) != std::string_view::npos) --end;
  return end;
}

} // namespace

std::string reply_content(const std::string &text, const std::vector<ToolCall> &calls) {
  if (calls.empty()) return text;
  const size_t tag = text.find(kOpenTag);
  return tag == std::string::npos ? std::string() : text.substr(0, before_trailing_space(text, tag));
}

ToolCallStream::Piece ToolCallStream::advance(const std::string &text, size_t content_end, std::vector<ToolCall> calls) {
  Piece piece;
  piece.first_call = calls_sent_;
  if (content_end > content_sent_) {
    piece.content = text.substr(content_sent_, content_end - content_sent_);
    content_sent_ = content_end;
  }
  piece.content_end = content_sent_;
  if (calls.size() > calls_sent_) {
    piece.calls.assign(calls.begin() + static_cast<std::ptrdiff_t>(calls_sent_), calls.end());
    calls_sent_ = calls.size();
  }
  return piece;
}

ToolCallStream::Piece ToolCallStream::update(const std::string &text, size_t safe) {
  safe = std::min(safe, text.size());
  // (A byte-order mark before a bare call object is skipped by the JSON parser, so it is here.)
  const std::string_view bom = "\xEF\xBB\xBF";
  if (text.size() < bom.size() && bom.substr(0, text.size()) == text) return advance(text, 0, {});
  const size_t first = text.find_first_not_of(" \t\r\n", text.compare(0, bom.size(), bom) == 0 ? bom.size() : 0);
  if (first == std::string::npos || first >= safe || text[first] == '{') return advance(text, 0, {});
  const size_t tag = text.find(kOpenTag);
  if (tag == std::string::npos || tag + kOpenTag.size() > safe) {
    // Plain text so far: all of it but a tail that may begin the tag, and whitespace before that.
    size_t end = safe;
    for (size_t keep = std::min(kOpenTag.size() - 1, safe); keep > 0; --keep)
      if (text.compare(safe - keep, keep, kOpenTag, 0, keep) == 0) {
        end = safe - keep;
        break;
      }
    if (tag != std::string::npos) end = std::min(end, tag);
    return advance(text, before_trailing_space(text, end), {});
  }
  // The calls of the blocks closed within the final text (each is parsed as the whole reply's
  // is), parsed again only when another block has closed.
  const size_t closed = text.rfind(kCloseTag, safe >= kCloseTag.size() ? safe - kCloseTag.size() : 0);
  std::vector<ToolCall> calls;
  if (closed != std::string::npos && closed > tag && closed + kCloseTag.size() > parsed_to_) {
    parsed_to_ = closed + kCloseTag.size();
    calls = parse_tool_calls(text.substr(0, parsed_to_), tools_);
  }
  return advance(text, before_trailing_space(text, tag), std::move(calls));
}

ToolCallStream::Piece ToolCallStream::finish(const std::string &text) {
  std::vector<ToolCall> calls = parse_tool_calls(text, tools_);
  const size_t content_end = calls.empty() ? text.size() : reply_content(text, calls).size();
  return advance(text, std::max(content_end, content_sent_), std::move(calls));
}

} // namespace loom::server
