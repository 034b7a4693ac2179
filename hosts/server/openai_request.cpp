#include "openai_request.hpp"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <set>

#include <nlohmann/json.hpp>

#include "json_guard.hpp"
#include "regex_gbnf.hpp"
#include "loom/core/runtime.hpp"

namespace loom::server {

namespace {

using json = nlohmann::json;

constexpr int kMaxDepth = 64;   // deeper JSON is refused before it is parsed
constexpr int64_t kMaxN = 16;   // choices per request
constexpr size_t kMaxStops = 4; // OpenAI's limit
constexpr size_t kMaxPrompts = 64;

[[noreturn]] void bad(const std::string &param, const std::string &message) { throw ApiError(400, message, param); }

json parse_body(const std::string &body) {
  if (loom::detail::json_too_deep(body, kMaxDepth))
    bad("", "the request body nests JSON deeper than " + std::to_string(kMaxDepth) + " levels");
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) bad("", "the request body is not valid JSON");
  if (!j.is_object()) bad("", "the request body must be a JSON object");
  return j;
}

// Refuses members that are neither used nor knowingly ignored, naming them (a typo such as
// "max_token" would otherwise pass unnoticed).
void only(const json &j, const std::set<std::string> &known) {
  for (const auto &[key, value] : j.items())
    if (!known.count(key)) bad(key, "unknown or unsupported parameter '" + key + "'");
}

std::string string_field(const json &j, const char *key, bool required) {
  if (!j.contains(key) || j[key].is_null()) {
    if (required) bad(key, std::string("'") + key + "' is required");
    return {};
  }
  if (!j[key].is_string()) bad(key, std::string("'") + key + "' must be a string");
  return j[key].get<std::string>();
}

std::optional<double> number_field(const json &j, const char *key, double lo, double hi) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  const json &v = j[key];
  if (!v.is_number()) bad(key, std::string("'") + key + "' must be a number");
  const double x = v.get<double>();
  if (!std::isfinite(x) || x < lo || x > hi)
    bad(key, std::string("'") + key + "' must be between " + json(lo).dump() + " and " + json(hi).dump());
  return x;
}

std::optional<int64_t> int_field(const json &j, const char *key, int64_t lo, int64_t hi) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  const json &v = j[key];
  if (!v.is_number_integer()) bad(key, std::string("'") + key + "' must be an integer");
  if (v.is_number_unsigned() ? v.get<uint64_t>() > static_cast<uint64_t>(hi) : (v.get<int64_t>() < lo || v.get<int64_t>() > hi))
    bad(key, std::string("'") + key + "' must be between " + std::to_string(lo) + " and " + std::to_string(hi));
  return v.get<int64_t>();
}

bool bool_field(const json &j, const char *key, bool fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_boolean()) bad(key, std::string("'") + key + "' must be true or false");
  return j[key].get<bool>();
}

int32_t token_id(const json &v, const std::string &param, int64_t vocab_size) {
  if (!v.is_number_integer()) bad(param, "'" + param + "' must hold integer token ids");
  const bool ok = v.is_number_unsigned() ? v.get<uint64_t>() < static_cast<uint64_t>(vocab_size)
                                         : v.get<int64_t>() >= 0 && v.get<int64_t>() < vocab_size;
  if (!ok) bad(param, "'" + param + "': token " + v.dump() + " is outside the vocabulary of " + std::to_string(vocab_size));
  return static_cast<int32_t>(v.get<int64_t>());
}

std::string message_content(const json &m, const std::string &param) {
  if (!m.contains("content") || m["content"].is_null()) bad(param + ".content", "'" + param + ".content' is required");
  const json &c = m["content"];
  if (c.is_string()) return c.get<std::string>();
  if (!c.is_array()) bad(param + ".content", "'" + param + ".content' must be a string or an array of text parts");
  std::string text;
  for (size_t i = 0; i < c.size(); ++i) {
    const std::string part = param + ".content[" + std::to_string(i) + "]";
    const json &p = c[i];
    if (!p.is_object() || !p.contains("type") || p["type"] != "text" || !p.contains("text") || !p["text"].is_string())
      bad(part, "'" + part + "' must be {\"type\": \"text\", \"text\": ...} (other content kinds are not supported)");
    text += p["text"].get<std::string>();
  }
  return text;
}

// An assistant message's tool_calls, as the model would have written them.
std::string assistant_tool_calls(const json &calls, const std::string &param) {
  if (!calls.is_array() || calls.empty()) bad(param, "'" + param + "' must be a non-empty array");
  std::vector<ToolCall> out;
  for (size_t i = 0; i < calls.size(); ++i) {
    const std::string at = param + "[" + std::to_string(i) + "]";
    const json &c = calls[i];
    if (!c.is_object() || !c.contains("function") || !c["function"].is_object())
      bad(at, "'" + at + "' must be {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}");
    only(c, {"id", "type", "function"});
    const json &f = c["function"];
    only(f, {"name", "arguments"});
    out.push_back({string_field(f, "name", true), string_field(f, "arguments", false)});
  }
  return render_tool_calls(out);
}

void parse_messages(const json &j, GenerationParams &p) {
  if (!j.contains("messages")) bad("messages", "'messages' is required");
  const json &ms = j["messages"];
  if (!ms.is_array() || ms.empty()) bad("messages", "'messages' must be a non-empty array");
  for (size_t i = 0; i < ms.size(); ++i) {
    const std::string param = "messages[" + std::to_string(i) + "]";
    const json &m = ms[i];
    if (!m.is_object()) bad(param, "'" + param + "' must be an object");
    only(m, {"role", "content", "name", "tool_calls", "tool_call_id"});
    std::string role = string_field(m, "role", true);
    if (role == "developer") role = "system";
    if (role == "tool") { // a tool's result: shown to the model as a user turn
      p.messages.emplace_back("user", render_tool_result(message_content(m, param)));
      continue;
    }
    if (role != "system" && role != "user" && role != "assistant")
      bad(param + ".role", "'" + param + ".role' must be system, developer, user, assistant or tool, got '" + role + "'");
    if (role == "assistant" && m.contains("tool_calls") && !m["tool_calls"].is_null()) {
      std::string text = m.contains("content") && m["content"].is_string() ? m["content"].get<std::string>() + "\n" : "";
      p.messages.emplace_back(role, text + assistant_tool_calls(m["tool_calls"], param + ".tool_calls"));
      continue;
    }
    p.messages.emplace_back(role, message_content(m, param));
  }
}

bool valid_function_name(const std::string &name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '-') return false;
  return true;
}

void parse_tools(const json &j, GenerationParams &p) {
  if (j.contains("tools") && !j["tools"].is_null()) {
    const json &ts = j["tools"];
    if (!ts.is_array() || ts.size() > 128) bad("tools", "'tools' must be an array of at most 128 functions");
    for (size_t i = 0; i < ts.size(); ++i) {
      const std::string param = "tools[" + std::to_string(i) + "]";
      const json &t = ts[i];
      if (!t.is_object() || !t.contains("type") || t["type"] != "function" || !t.contains("function") || !t["function"].is_object())
        bad(param, "'" + param + "' must be {\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}}");
      only(t, {"type", "function"});
      const json &f = t["function"];
      only(f, {"name", "description", "parameters", "strict"});
      ToolDef def;
      def.name = string_field(f, "name", true);
      if (!valid_function_name(def.name))
        bad(param + ".function.name", "'" + param + ".function.name' must be 1 to 64 letters, digits, '_' or '-'");
      for (const auto &other : p.tools)
        if (other.name == def.name) bad(param + ".function.name", "the function name '" + def.name + "' is given twice");
      def.description = string_field(f, "description", false);
      if (f.contains("parameters") && !f["parameters"].is_null()) {
        if (!f["parameters"].is_object()) bad(param + ".function.parameters", "'" + param + ".function.parameters' must be a JSON schema object");
        def.parameters_json = f["parameters"].dump();
      } else {
        def.parameters_json = "{}";
      }
      p.tools.push_back(std::move(def));
    }
  }
  p.tool_choice = p.tools.empty() ? ToolChoice::none : ToolChoice::auto_;
  if (j.contains("tool_choice") && !j["tool_choice"].is_null()) {
    const json &c = j["tool_choice"];
    if (c.is_string()) {
      const std::string v = c.get<std::string>();
      if (v == "none") p.tool_choice = ToolChoice::none;
      else if (v == "auto") p.tool_choice = ToolChoice::auto_;
      else if (v == "required") p.tool_choice = ToolChoice::required;
      else bad("tool_choice", "'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\"}}");
    } else if (c.is_object() && c.contains("function") && c["function"].is_object()) {
      p.tool_choice = ToolChoice::named;
      p.tool_name = string_field(c["function"], "name", true);
    } else {
      bad("tool_choice", "'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\"}}");
    }
    if (p.tool_choice != ToolChoice::none && p.tools.empty()) bad("tool_choice", "'tool_choice' needs 'tools'");
    if (p.tool_choice == ToolChoice::named) {
      bool found = false;
      for (const auto &t : p.tools) found = found || t.name == p.tool_name;
      if (!found) bad("tool_choice", "'tool_choice' names '" + p.tool_name + "', which is not among the tools");
    }
  }
  if (p.uses_tools()) {
    // The tools are offered in a system message (appended to the first one, or a new first one).
    const std::string offer = tool_system_prompt(p.callable_tools());
    if (!p.messages.empty() && p.messages.front().first == "system") p.messages.front().second += "\n\n" + offer;
    else p.messages.insert(p.messages.begin(), {"system", offer});
  }
}

void parse_prompt(const json &j, GenerationParams &p, int64_t vocab_size) {
  if (!j.contains("prompt") || j["prompt"].is_null()) bad("prompt", "'prompt' is required");
  const json &v = j["prompt"];
  const auto ids_of = [&](const json &a, const std::string &param) {
    if (a.empty()) bad(param, "'" + param + "' must not be empty");
    std::vector<int32_t> ids;
    for (const json &t : a) ids.push_back(token_id(t, param, vocab_size));
    return ids;
  };
  if (v.is_string()) {
    p.prompt_texts.push_back(v.get<std::string>());
  } else if (v.is_array() && !v.empty() && v[0].is_number()) {
    p.prompt_ids.push_back(ids_of(v, "prompt"));
  } else if (v.is_array() && !v.empty()) {
    if (v.size() > kMaxPrompts) bad("prompt", "'prompt' holds more than " + std::to_string(kMaxPrompts) + " prompts");
    for (size_t i = 0; i < v.size(); ++i) {
      const std::string param = "prompt[" + std::to_string(i) + "]";
      if (v[i].is_string()) p.prompt_texts.push_back(v[i].get<std::string>());
      else if (v[i].is_array()) p.prompt_ids.push_back(ids_of(v[i], param));
      else bad(param, "'" + param + "' must be a string or an array of token ids");
    }
    if (!p.prompt_texts.empty() && !p.prompt_ids.empty()) bad("prompt", "'prompt' mixes text and token ids");
  } else {
    bad("prompt", "'prompt' must be a string, an array of strings, or token ids");
  }
  for (size_t i = 0; i < p.prompt_texts.size(); ++i)
    if (p.prompt_texts[i].empty()) bad("prompt", "'prompt' must not be empty");
}

void parse_response_format(const json &j, GenerationParams &p) {
  if (!j.contains("response_format") || j["response_format"].is_null()) return;
  const json &f = j["response_format"];
  if (!f.is_object()) bad("response_format", "'response_format' must be an object");
  const std::string type = string_field(f, "type", true);
  if (type == "text") {
    only(f, {"type"});
  } else if (type == "json_object") {
    only(f, {"type"});
    p.format = ResponseFormat::json_object;
  } else if (type == "json_schema") {
    only(f, {"type", "json_schema"});
    if (!f.contains("json_schema") || !f["json_schema"].is_object())
      bad("response_format.json_schema", "'response_format.json_schema' must be an object with a 'schema'");
    const json &s = f["json_schema"];
    only(s, {"name", "schema", "strict", "description"});
    if (!s.contains("schema") || !s["schema"].is_object())
      bad("response_format.json_schema.schema", "'response_format.json_schema.schema' must be a JSON schema object");
    p.format = ResponseFormat::json_schema;
    p.schema_json = s["schema"].dump();
  } else {
    bad("response_format.type", "'response_format.type' must be text, json_object or json_schema, got '" + type + "'");
  }
}

// vLLM's guided_json / guided_choice / guided_regex / guided_grammar and llama.cpp's json_schema / grammar:
// one constraint on the reply, as the json-schema and grammar samplers carry it out (GBNF, the
// llama.cpp dialect, for the grammars). At most one of them, and not with response_format.
void parse_guided(const json &j, GenerationParams &p) {
  const auto given = [&](const char *key) { return j.contains(key) && !j[key].is_null(); };
  int count = p.format != ResponseFormat::text ? 1 : 0;
  for (const char *key : {"guided_json", "guided_choice", "guided_regex", "guided_grammar", "grammar", "json_schema"}) {
    if (!given(key)) continue;
    if (++count > 1)
      bad(key, std::string("'") + key + "' and '" + p.constraint_param + "' both constrain the reply: give one");
    p.constraint_param = key;
    const json &v = j[key];
    const std::string k = key;
    if (k == "guided_json" || k == "json_schema") {
      // (vLLM takes the schema as an object or as its JSON text)
      json schema = v;
      if (v.is_string()) {
        schema = json::parse(v.get<std::string>(), nullptr, false);
        if (schema.is_discarded()) bad(key, "'" + k + "' is not valid JSON");
      }
      if (!schema.is_object()) bad(key, "'" + k + "' must be a JSON schema object");
      p.format = ResponseFormat::json_schema;
      p.schema_json = schema.dump();
    } else if (k == "guided_choice") {
      if (!v.is_array() || v.empty() || v.size() > 1024) bad(key, "'guided_choice' must be an array of 1 to 1024 strings");
      std::string rule = "root ::= ";
      for (size_t i = 0; i < v.size(); ++i) {
        if (!v[i].is_string() || v[i].get<std::string>().empty()) bad(key, "'guided_choice' must hold non-empty strings");
        rule += (i ? " | " : "") + gbnf_literal(v[i].get<std::string>());
      }
      p.grammar = rule + "\n";
    } else if (k == "guided_regex") {
      if (!v.is_string()) bad(key, "'guided_regex' must be a regular expression (a string)");
      try {
        p.grammar = regex_to_gbnf(v.get<std::string>());
      } catch (const std::invalid_argument &e) {
        bad(key, std::string("'guided_regex' ") + e.what());
      }
    } else {
      if (!v.is_string() || v.get<std::string>().empty()) bad(key, "'" + k + "' must be a GBNF grammar (text with a 'root' rule)");
      // (a request's grammar is compiled under the grammar cache's lock: kept small)
      if (v.get<std::string>().size() > 16384) bad(key, "'" + k + "' is longer than 16384 bytes");
      p.grammar = v.get<std::string>();
    }
  }
}

// Any JSON object, in the grammar sampler's GBNF (whitespace bounded so that a model cannot
// spend its tokens on it).
constexpr const char *kJsonObjectGrammar = R"(root ::= object
value ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? "}" ws
array ::= "[" ws ( value ( "," ws value )* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] ) )* "\"" ws
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )? ws
ws ::= ( " " | "\n" )?
)";

} // namespace

std::string error_body(const ApiError &e) {
  json err = {{"message", e.what()}, {"type", e.type}, {"param", nullptr}, {"code", nullptr}};
  if (!e.param.empty()) err["param"] = e.param;
  return json{{"error", err}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

bool GenerationParams::own_sampling() const {
  return temperature || top_p || frequency_penalty != 0 || presence_penalty != 0 || !logit_bias.empty() || top_k > 0 ||
         !grammar.empty() ||
         min_p > 0 || repetition_penalty != 1.0 ||
         format != ResponseFormat::text || reply_is_call();
}

std::vector<ToolDef> GenerationParams::callable_tools() const {
  if (tool_choice != ToolChoice::named) return tools;
  for (const auto &t : tools)
    if (t.name == tool_name) return {t};
  return {};
}

GenerationParams parse_generation(const std::string &body, bool chat, int64_t vocab_size) {
  const json j = parse_body(body);
  std::set<std::string> known = {"model", "max_tokens", "n", "stop", "temperature", "top_p", "frequency_penalty",
                                 "presence_penalty", "seed", "logit_bias", "response_format", "stream", "stream_options",
                                 "user", "logprobs",
                                 // vLLM's sampling extensions
                                 "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "min_tokens",
                                 "prompt_logprobs",
                                 // constrained decoding as vLLM (guided_*) and llama.cpp's server (grammar, json_schema) take it
                                 "guided_json", "guided_choice", "guided_regex", "guided_grammar", "grammar", "json_schema"};
  if (chat) {
    known.insert({"messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls", "top_logprobs"});
  } else {
    known.insert({"prompt", "echo"});
  }
  only(j, known);
  GenerationParams p;
  p.chat = chat;
  p.model = string_field(j, "model", true);
  if (chat) {
    parse_messages(j, p);
    parse_tools(j, p);
    p.parallel_tool_calls = bool_field(j, "parallel_tool_calls", true);
  } else {
    parse_prompt(j, p, vocab_size);
  }
  // 0 (completions with echo: score the prompt, generate nothing, as lm-evaluation-harness asks).
  p.max_tokens = int_field(j, "max_tokens", 0, 1 << 24);
  if (chat)
    if (auto m = int_field(j, "max_completion_tokens", 1, 1 << 24)) p.max_tokens = m;
  p.n = int_field(j, "n", 1, kMaxN).value_or(1);
  if (j.contains("stop") && !j["stop"].is_null()) {
    const json &s = j["stop"];
    if (s.is_string()) p.stop.push_back(s.get<std::string>());
    else if (s.is_array() && s.size() <= kMaxStops) {
      for (const json &x : s) {
        if (!x.is_string()) bad("stop", "'stop' must be a string or an array of up to 4 strings");
        p.stop.push_back(x.get<std::string>());
      }
    } else bad("stop", "'stop' must be a string or an array of up to 4 strings");
    for (const auto &x : p.stop)
      if (x.empty()) bad("stop", "'stop' strings must not be empty");
  }
  p.temperature = number_field(j, "temperature", 0.0, 2.0);
  p.top_p = number_field(j, "top_p", 0.0, 1.0);
  if (p.top_p && *p.top_p <= 0.0) bad("top_p", "'top_p' must be greater than 0");
  p.frequency_penalty = number_field(j, "frequency_penalty", -2.0, 2.0).value_or(0.0);
  // vLLM's extensions: top_k (-1 or 0: off), min_p, repetition_penalty (1: off; over the prompt
  // and the reply), ignore_eos.
  p.top_k = int_field(j, "top_k", -1, 1 << 30).value_or(0);
  if (p.top_k < 0) p.top_k = 0;
  p.min_p = number_field(j, "min_p", 0.0, 1.0).value_or(0.0);
  p.repetition_penalty = number_field(j, "repetition_penalty", 0.0, 2.0).value_or(1.0);
  if (p.repetition_penalty <= 0.0) bad("repetition_penalty", "'repetition_penalty' must be greater than 0");
  p.ignore_eos = bool_field(j, "ignore_eos", false);
  if (j.contains("stop_token_ids") && !j["stop_token_ids"].is_null()) {
    const json &ids = j["stop_token_ids"];
    if (!ids.is_array() || ids.size() > 64) bad("stop_token_ids", "'stop_token_ids' must be an array of up to 64 token ids");
    for (const json &id : ids) p.stop_token_ids.push_back(token_id(id, "stop_token_ids", vocab_size));
  }
  p.min_tokens = int_field(j, "min_tokens", 0, 1 << 24).value_or(0);
  if (p.max_tokens && p.min_tokens > *p.max_tokens) bad("min_tokens", "'min_tokens' must not exceed 'max_tokens'");
  p.presence_penalty = number_field(j, "presence_penalty", -2.0, 2.0).value_or(0.0);
  if (j.contains("seed") && !j["seed"].is_null()) {
    const json &s = j["seed"];
    if (!s.is_number_integer()) bad("seed", "'seed' must be an integer");
    p.seed = s.is_number_unsigned() ? s.get<uint64_t>() : static_cast<uint64_t>(s.get<int64_t>());
  }
  if (j.contains("logit_bias") && !j["logit_bias"].is_null()) {
    const json &b = j["logit_bias"];
    if (!b.is_object()) bad("logit_bias", "'logit_bias' must be an object of token id -> bias");
    if (b.size() > 1024) bad("logit_bias", "'logit_bias' holds more than 1024 tokens");
    for (const auto &[key, value] : b.items()) {
      int64_t id = -1;
      if (key.empty() || key.size() > 10 || key.find_first_not_of("0123456789") != std::string::npos ||
          (id = std::stoll(key)) >= vocab_size)
        bad("logit_bias", "'logit_bias': key '" + key + "' is not a token id of the vocabulary of " + std::to_string(vocab_size));
      if (!value.is_number() || !std::isfinite(value.get<double>()) || std::fabs(value.get<double>()) > 100.0)
        bad("logit_bias", "'logit_bias': the bias of token " + key + " must be a number between -100 and 100");
      p.logit_bias.emplace_back(static_cast<int32_t>(id), value.get<double>());
    }
  }
  parse_response_format(j, p);
  parse_guided(j, p);
  const bool constrained = p.constrained();
  // A completed constraint leaves only the end token, which ignore_eos and min_tokens take away.
  if (constrained && p.ignore_eos) bad("ignore_eos", "'ignore_eos' cannot go with '" + p.constraint_param + "': the reply ends where the constraint does");
  if (constrained && p.min_tokens > 0)
    bad("min_tokens", "'min_tokens' cannot go with '" + p.constraint_param + "': the reply ends where the constraint does");
  if (constrained && p.reply_is_call())
    bad(p.constraint_param, "'" + p.constraint_param + "' and a required tool call both constrain the reply: give one");
  p.stream = bool_field(j, "stream", false);
  if (j.contains("stream_options") && !j["stream_options"].is_null()) {
    const json &o = j["stream_options"];
    if (!o.is_object()) bad("stream_options", "'stream_options' must be an object");
    only(o, {"include_usage"});
    p.include_usage = bool_field(o, "include_usage", false);
    if (!p.stream) bad("stream_options", "'stream_options' is only allowed with stream: true");
  }
  string_field(j, "user", false);
  // Chat: logprobs true/false and top_logprobs alternatives; completions: logprobs = alternatives.
  if (chat) {
    const bool wants = bool_field(j, "logprobs", false);
    const std::optional<int64_t> top = int_field(j, "top_logprobs", 0, kMaxTopLogprobs);
    if (top && !wants) bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    if (wants) p.logprobs = static_cast<int32_t>(top.value_or(0));
  } else if (const std::optional<int64_t> top = int_field(j, "logprobs", 0, kMaxTopLogprobs)) {
    p.logprobs = static_cast<int32_t>(*top);
  }
  p.echo = !chat && bool_field(j, "echo", false);
  if (p.max_tokens == 0 && !p.echo) bad("max_tokens", "'max_tokens' must be at least 1 (0 only with 'echo': the prompt alone)");
  // (echo with logprobs lists the prompt's tokens too; streamed, in each choice's echo chunk.)
  if (const std::optional<int64_t> n = int_field(j, "prompt_logprobs", 0, kMaxTopLogprobs)) {
    p.prompt_logprobs = static_cast<int32_t>(*n);
    // (as vLLM, which refuses them with stream; echo with logprobs streams the prompt's entries)
    if (p.stream) bad("stream", "'prompt_logprobs' is not streamed: leave 'stream' out (or stream 'echo' with 'logprobs')");
  }
  return p;
}

std::string toml_quote(const std::string &s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"') out += "\\\"";
    else if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c == '\r') out += "\\r";
    else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04X", c);
      out += buf;
    } else out += static_cast<char>(c);
  }
  return out + "\"";
}

TokenizeParams parse_tokenize(const std::string &body) {
  const json j = parse_body(body);
  only(j, {"model", "prompt", "content", "messages", "add_special_tokens", "add_special", "with_pieces", "add_generation_prompt"});
  TokenizeParams p;
  p.model = string_field(j, "model", false);
  const int given = static_cast<int>(j.contains("prompt")) + static_cast<int>(j.contains("content")) +
                    static_cast<int>(j.contains("messages"));
  if (given != 1) bad("prompt", "give one of 'prompt', 'content' or 'messages'");
  if (j.contains("messages")) {
    GenerationParams chat;
    parse_messages(j, chat);
    p.messages = std::move(chat.messages);
    if (!bool_field(j, "add_generation_prompt", true))
      bad("add_generation_prompt", "'add_generation_prompt': the chat template always ends in the assistant's prompt here");
  } else {
    const char *key = j.contains("prompt") ? "prompt" : "content";
    if (!j[key].is_string()) bad(key, std::string("'") + key + "' must be a string");
    p.text = j[key].get<std::string>();
    p.add_special = j.contains("prompt") ? bool_field(j, "add_special_tokens", true) : bool_field(j, "add_special", false);
  }
  p.with_pieces = bool_field(j, "with_pieces", false);
  return p;
}

DetokenizeParams parse_detokenize(const std::string &body, int64_t vocab_size) {
  const json j = parse_body(body);
  only(j, {"model", "tokens"});
  DetokenizeParams p;
  p.model = string_field(j, "model", false);
  if (!j.contains("tokens") || !j["tokens"].is_array()) bad("tokens", "'tokens' must be an array of token ids");
  for (const json &t : j["tokens"]) p.ids.push_back(token_id(t, "tokens", vocab_size)); // (may be none: no text)
  return p;
}

std::vector<std::string> sampler_chain_tomls(const GenerationParams &p) {
  std::vector<std::string> chain;
  if (!p.logit_bias.empty()) {
    std::string t = "use = \"logit-bias\"\nbias = [";
    for (size_t i = 0; i < p.logit_bias.size(); ++i) {
      // -100 bans the token outright, as OpenAI documents.
      const std::string value = p.logit_bias[i].second <= -100.0 ? "-inf" : json(p.logit_bias[i].second).dump();
      t += (i ? ", " : "") + std::string("{ token = ") + std::to_string(p.logit_bias[i].first) + ", value = " + value + " }";
    }
    chain.push_back(t + "]");
  }
  if (p.format == ResponseFormat::json_schema) chain.push_back("use = \"json-schema\"\nschema = " + toml_quote(p.schema_json));
  if (p.reply_is_call())
    chain.push_back("use = \"json-schema\"\nschema = " + toml_quote(tool_call_schema(p.callable_tools())));
  if (p.format == ResponseFormat::json_object) chain.push_back("use = \"grammar\"\ngrammar = " + toml_quote(kJsonObjectGrammar));
  if (!p.grammar.empty()) chain.push_back("use = \"grammar\"\ngrammar = " + toml_quote(p.grammar));
  if (p.frequency_penalty != 0 || p.presence_penalty != 0)
    chain.push_back("use = \"penalties\"\nfrequency_penalty = " + json(p.frequency_penalty).dump() +
                    "\npresence_penalty = " + json(p.presence_penalty).dump());
  if (p.repetition_penalty != 1.0) chain.push_back("use = \"repetition-penalty\"\npenalty = " + json(p.repetition_penalty).dump());
  const double temperature = p.temperature.value_or(1.0);
  if (temperature == 0.0) {
    chain.push_back("use = \"greedy\"");
    return chain;
  }
  if (temperature != 1.0) chain.push_back("use = \"temperature\"\nt = " + json(temperature).dump());
  // (vLLM's order: top-k, top-p, then min-p.)
  if (p.top_k > 0) chain.push_back("use = \"top-k\"\nk = " + std::to_string(p.top_k));
  if (p.top_p && *p.top_p < 1.0) chain.push_back("use = \"top-p\"\np = " + json(*p.top_p).dump());
  if (p.min_p > 0.0) chain.push_back("use = \"min-p\"\np = " + json(p.min_p).dump());
  chain.push_back("use = \"dist\"");
  return chain;
}

EmbeddingParams parse_embeddings(const std::string &body) {
  const json j = parse_body(body);
  only(j, {"model", "input", "encoding_format", "user", "dimensions"});
  EmbeddingParams p;
  p.model = string_field(j, "model", true);
  if (!j.contains("input")) bad("input", "'input' is required");
  const json &in = j["input"];
  if (in.is_string()) p.input.push_back(in.get<std::string>());
  else if (in.is_array() && !in.empty() && in.size() <= 2048) {
    for (size_t i = 0; i < in.size(); ++i) {
      if (!in[i].is_string()) bad("input", "'input[" + std::to_string(i) + "]' must be a string (token ids are not supported)");
      p.input.push_back(in[i].get<std::string>());
    }
  } else bad("input", "'input' must be a string or an array of 1 to 2048 strings");
  for (const auto &s : p.input)
    if (s.empty()) bad("input", "'input' strings must not be empty");
  const std::string format = string_field(j, "encoding_format", false);
  if (!format.empty() && format != "float" && format != "base64")
    bad("encoding_format", "'encoding_format' must be float or base64");
  p.base64 = format == "base64";
  if (j.contains("dimensions") && !j["dimensions"].is_null()) bad("dimensions", "'dimensions' is not supported");
  string_field(j, "user", false);
  return p;
}

} // namespace loom::server
