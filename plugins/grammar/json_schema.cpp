// JSON schema -> GBNF. Supported: type (string, number, integer, boolean, null, object, array,
// or a list of them), properties, required, additionalProperties (false or absent: no extra
// properties are ever generated), items, minItems, maxItems, minLength, maxLength (of strings),
// enum, const, anyOf and oneOf (alternatives: a value of any one branch; oneOf's "exactly one"
// is not enforced, so its branches should not overlap), $ref to "#",
// "#/$defs/NAME" or "#/definitions/NAME", and the annotations title, description, $schema, $id,
// $comment, default, examples (ignored). Properties appear in the order the schema lists them;
// optional ones may be left out. Any other keyword is an error naming it and its JSON path.
#include <algorithm>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "gbnf.hpp"

namespace loomp::grammar {
namespace {

using json = nlohmann::ordered_json;

const char* kPrelude =
    "space ::= | \" \" | \"\\n\" [ \\t]{0,20}\n"
    "string ::= \"\\\"\" char* \"\\\"\" space\n"
    // \u escapes exclude UTF-16 surrogates (D800-DFFF): a lone one is not valid Unicode text
    // and common parsers refuse it; characters beyond the BMP are written as raw UTF-8.
    "char ::= [^\"\\\\\\x7F\\x00-\\x1F] | \"\\\\\" ([\"\\\\/bfnrt] | \"u\" hex4)\n"
    "hex4 ::= [0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2}\n"
    "integral-part ::= [0] | [1-9] [0-9]{0,15}\n"
    "integer ::= \"-\"? integral-part space\n"
    "number ::= \"-\"? integral-part (\".\" [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})? space\n"
    "boolean ::= (\"true\" | \"false\") space\n"
    "null ::= \"null\" space\n"
    "value ::= object | array | string | number | boolean | null\n"
    "object ::= \"{\" space ( string \":\" space value (\",\" space string \":\" space value)* )? \"}\" space\n"
    "array ::= \"[\" space ( value (\",\" space value)* )? \"]\" space\n";

std::string literal(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') { out += '\\'; out += static_cast<char>(c); }
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7F) {
      const char* hx = "0123456789ABCDEF";
      out += "\\x";
      out += hx[c >> 4];
      out += hx[c & 15];
    } else out += static_cast<char>(c);
  }
  out += '"';
  return out;
}

std::string pointer_escape(const std::string& k) {
  std::string o;
  for (char c : k) {
    if (c == '~') o += "~0";
    else if (c == '/') o += "~1";
    else o += c;
  }
  return o;
}

class Compiler {
 public:
  Compiler(const json& root, const Limits& l) : root_(root), lim_(l) {}

  std::string run() {
    const std::string top = visit(root_, "", 0);
    std::string out = "root ::= space ";
    out += top;
    out += "\n";
    out += kPrelude;
    for (auto& r : rules_) {
      out += r.first;
      out += " ::= ";
      out += r.second;
      out += "\n";
    }
    return out;
  }

 private:
  const json& root_;
  Limits lim_;
  std::vector<std::pair<std::string, std::string>> rules_;
  std::map<std::string, std::string> refs_;  // "$ref" target -> rule name
  size_t n_ = 0;

  [[noreturn]] static void fail(const std::string& path, const std::string& msg) {
    std::string m = "json-schema: ";
    m += path.empty() ? std::string("/") : path;
    m += ": ";
    m += msg;
    throw GrammarError(m);
  }

  std::string add(std::string body) {
    if (rules_.size() > lim_.max_rules) fail("", "schema too large");
    std::string name = "s";
    name += std::to_string(++n_);
    rules_.emplace_back(name, std::move(body));
    return name;
  }

  static std::string dump_literal(const json& v) { return literal(v.dump()) + " space"; }

  std::string ref(const std::string& target, const std::string& path, int depth) {
    auto it = refs_.find(target);
    if (it != refs_.end()) return it->second;
    const json* node = nullptr;
    std::string tpath;
    if (target == "#") {
      node = &root_;
    } else {
      for (const char* pre : {"#/$defs/", "#/definitions/"}) {
        const std::string p(pre);
        if (target.rfind(p, 0) == 0) {
          const std::string name = target.substr(p.size());
          const std::string key = p.substr(2, p.size() - 3);
          if (name.find('/') != std::string::npos || name.find('~') != std::string::npos)
            fail(path + "/$ref", "unsupported $ref '" + target + "' (only #/$defs/NAME, #/definitions/NAME or #)");
          if (!root_.is_object() || !root_.contains(key) || !root_[key].is_object() || !root_[key].contains(name))
            fail(path + "/$ref", "unresolved $ref '" + target + "'");
          node = &root_[key][name];
          tpath = "/" + key + "/" + name;
        }
      }
      if (node == nullptr)
        fail(path + "/$ref", "unsupported $ref '" + target + "' (only #/$defs/NAME, #/definitions/NAME or #)");
    }
    // Reserve the rule first, so recursive references resolve to it.
    const std::string name = add("");
    const size_t slot = rules_.size() - 1;
    refs_.emplace(target, name);
    std::string body = visit(*node, tpath, depth + 1);
    rules_[slot].second = std::move(body);
    return name;
  }

  // Returns a GBNF expression (a rule name or a short sequence) for the schema at `path`.
  std::string visit(const json& s, const std::string& path, int depth) {
    if (depth > lim_.max_nesting) fail(path, "schema nested deeper than " + std::to_string(lim_.max_nesting));
    if (s.is_boolean()) {
      if (s.get<bool>()) return "value";
      fail(path, "schema 'false' accepts nothing");
    }
    if (!s.is_object()) fail(path, "a schema must be an object or a boolean");
    static const std::set<std::string> known = {
        "type", "properties", "required", "additionalProperties", "items", "minItems",
        "maxItems", "minLength", "maxLength", "enum", "const", "$ref", "$defs", "definitions", "title", "description",
        "$schema", "$id", "$comment", "default", "examples", "anyOf", "oneOf"};
    for (auto it = s.begin(); it != s.end(); ++it)
      if (!known.count(it.key())) fail(path + "/" + pointer_escape(it.key()), "unsupported keyword '" + it.key() + "'");
    if (s.contains("$defs") && !s["$defs"].is_object()) fail(path + "/$defs", "must be an object");
    if (s.contains("definitions") && !s["definitions"].is_object()) fail(path + "/definitions", "must be an object");
    if (s.contains("$ref")) {
      if (!s["$ref"].is_string()) fail(path + "/$ref", "must be a string");
      for (const char* k : {"type", "properties", "items", "enum", "const", "required", "additionalProperties",
                            "minItems", "maxItems", "minLength", "maxLength"})
        if (s.contains(k)) fail(path + "/" + k, std::string("keyword '") + k + "' beside $ref is not supported");
      return ref(s["$ref"].get<std::string>(), path, depth);
    }
    for (const char* alt : {"anyOf", "oneOf"}) {
      if (!s.contains(alt)) continue;
      const std::string at = path + "/" + alt;
      for (const char* k : {"type", "properties", "items", "enum", "const", "required", "additionalProperties", "minItems",
                            "maxItems", "minLength", "maxLength", "anyOf", "oneOf"})
        if (k != std::string(alt) && s.contains(k)) fail(path + "/" + k, std::string("keyword '") + k + "' beside " + alt + " is not supported");
      const json& branches = s[alt];
      if (!branches.is_array() || branches.empty()) fail(at, "must be a non-empty array of schemas");
      std::string body;
      for (size_t i = 0; i < branches.size(); ++i) {
        if (i) body += " | ";
        body += visit(branches[i], at + "/" + std::to_string(i), depth + 1);
      }
      return add(body);
    }
    if (s.contains("const") || s.contains("enum"))
      for (const char* k : {"minLength", "maxLength"})
        if (s.contains(k)) fail(path + "/" + k, std::string("keyword '") + k + "' beside enum or const is not supported");
    if (s.contains("const")) return add(dump_literal(s["const"]));
    if (s.contains("enum")) {
      const json& e = s["enum"];
      if (!e.is_array() || e.empty()) fail(path + "/enum", "must be a non-empty array");
      std::string body;
      for (size_t i = 0; i < e.size(); ++i) {
        if (i) body += " | ";
        body += dump_literal(e[i]);
      }
      return add(body);
    }
    std::vector<std::string> types;
    if (s.contains("type")) {
      const json& t = s["type"];
      if (t.is_string()) types.push_back(t.get<std::string>());
      else if (t.is_array() && !t.empty()) {
        for (const auto& x : t) {
          if (!x.is_string()) fail(path + "/type", "must be a string or an array of strings");
          types.push_back(x.get<std::string>());
        }
      } else fail(path + "/type", "must be a string or an array of strings");
    } else if (s.contains("properties")) {
      types.push_back("object");
    } else if (s.contains("items")) {
      types.push_back("array");
    } else {
      for (const char* k : {"required", "additionalProperties", "minItems", "maxItems", "minLength", "maxLength"})
        if (s.contains(k)) fail(path + "/" + k, std::string("keyword '") + k + "' needs a 'type'");
      return "value";
    }
    if (std::find(types.begin(), types.end(), "string") == types.end())
      for (const char* k : {"minLength", "maxLength"})
        if (s.contains(k)) fail(path + "/" + k, std::string("keyword '") + k + "' needs type 'string'");
    std::string body;
    for (size_t i = 0; i < types.size(); ++i) {
      const std::string& t = types[i];
      std::string e;
      if (t == "string") e = string(s, path);
      else if (t == "number" || t == "integer" || t == "boolean" || t == "null") e = t;
      else if (t == "object") e = object(s, path, depth);
      else if (t == "array") e = array(s, path, depth);
      else fail(path + "/type", "unknown type '" + t + "'");
      if (i) body += " | ";
      body += e;
    }
    if (types.size() == 1) return body;
    return add(body);
  }

  std::string object(const json& s, const std::string& path, int depth) {
    for (const char* k : {"items", "minItems", "maxItems"})
      if (s.contains(k)) fail(path + "/" + k, std::string("keyword '") + k + "' is not valid for an object");
    if (s.contains("additionalProperties")) {
      const json& a = s["additionalProperties"];
      if (!(a.is_boolean() && !a.get<bool>()))
        fail(path + "/additionalProperties", "only 'additionalProperties: false' is supported");
    }
    std::set<std::string> required;
    if (s.contains("required")) {
      if (!s["required"].is_array()) fail(path + "/required", "must be an array of strings");
      for (const auto& r : s["required"]) {
        if (!r.is_string()) fail(path + "/required", "must be an array of strings");
        required.insert(r.get<std::string>());
      }
    }
    std::vector<std::pair<std::string, bool>> kv;  // rule for `"key": value`, required
    if (s.contains("properties")) {
      const json& props = s["properties"];
      if (!props.is_object()) fail(path + "/properties", "must be an object");
      for (auto it = props.begin(); it != props.end(); ++it) {
        const std::string p = path + "/properties/" + pointer_escape(it.key());
        const std::string v = visit(it.value(), p, depth + 1);
        kv.emplace_back(add(literal(json(it.key()).dump()) + " space \":\" space " + v),
                        required.count(it.key()) > 0);
      }
    }
    for (const auto& r : required) {
      bool found = false;
      if (s.contains("properties") && s["properties"].contains(r)) found = true;
      if (!found) fail(path + "/required", "required property '" + r + "' is not in 'properties'");
    }
    // head[i]: properties i.. with none emitted yet; tail[i]: with at least one emitted.
    const size_t n = kv.size();
    std::vector<std::string> head(n + 1), tail(n + 1);
    head[n] = "";
    tail[n] = "";
    for (size_t i = n; i-- > 0;) {
      const std::string& k = kv[i].first;
      std::string t = kv[i].second ? "\",\" space " + k : "(\",\" space " + k + ")?";
      if (!tail[i + 1].empty()) t += " " + tail[i + 1];
      tail[i] = add(t);
      std::string h = k;
      if (!tail[i + 1].empty()) h += " " + tail[i + 1];
      if (!kv[i].second) {
        // Optional: or skip it. The empty alternative goes first: a trailing '|' would make the
        // parser continue on the next line.
        if (head[i + 1].empty()) h.insert(0, "| ");
        else h += " | " + head[i + 1];
      }
      head[i] = add(h);
    }
    std::string body = "\"{\" space ";
    if (n) body += head[0] + " ";
    body += "\"}\" space";
    return add(body);
  }

  // A string, of minLength..maxLength characters (a character: one `char` of the prelude, a
  // code point or an escape) when those are given.
  std::string string(const json& s, const std::string& path) {
    const int64_t lo = std::max<int64_t>(count(s, path, "minLength"), 0);
    const int64_t hi = count(s, path, "maxLength");
    if (hi >= 0 && hi < lo) fail(path + "/maxLength", "maxLength < minLength");
    if (lo == 0 && hi < 0) return "string";
    return add("\"\\\"\" char{" + std::to_string(lo) + "," + (hi >= 0 ? std::to_string(hi) : "") + "} \"\\\"\" space");
  }

  // The value of a count keyword (minItems, maxLength, ...), or -1 when absent.
  int64_t count(const json& s, const std::string& path, const char* k) const {
    if (!s.contains(k)) return -1;
    const json& v = s[k];
    if (!v.is_number_integer() || v.get<int64_t>() < 0) fail(path + "/" + k, "must be a non-negative integer");
    if (v.get<int64_t>() > static_cast<int64_t>(lim_.max_repeat))
      fail(path + "/" + k, "larger than " + std::to_string(lim_.max_repeat) + " is not supported");
    return v.get<int64_t>();
  }

  std::string array(const json& s, const std::string& path, int depth) {
    for (const char* k : {"properties", "required", "additionalProperties"})
      if (s.contains(k)) fail(path + "/" + k, std::string("keyword '") + k + "' is not valid for an array");
    std::string item = "value";
    if (s.contains("items")) {
      if (s["items"].is_array()) fail(path + "/items", "tuple 'items' (an array) is not supported");
      item = visit(s["items"], path + "/items", depth + 1);
    }
    const int64_t lo = std::max<int64_t>(count(s, path, "minItems"), 0);
    const int64_t hi = count(s, path, "maxItems");
    if (hi >= 0 && hi < lo) fail(path + "/maxItems", "maxItems < minItems");
    std::string body = "\"[\" space ";
    if (hi != 0) {
      const std::string more = "(\",\" space " + item + ")";
      std::string seq = item + " " + more;
      const int64_t more_lo = lo > 0 ? lo - 1 : 0;
      if (hi < 0) seq += "{" + std::to_string(more_lo) + ",}";
      else seq += "{" + std::to_string(more_lo) + "," + std::to_string(hi - 1) + "}";
      body += lo > 0 ? seq : "(" + seq + ")?";
      body += " ";
    }
    body += "\"]\" space";
    return add(body);
  }
};

}  // namespace

std::string schema_to_gbnf(std::string_view text, const Limits& limits) {
  if (text.size() > limits.max_text)
    throw GrammarError("json-schema: text of " + std::to_string(text.size()) + " bytes exceeds the limit of " +
                       std::to_string(limits.max_text));
  json root;
  try {
    // The callback caps nesting: dump() and the compiler recurse per level.
    const int max_depth = limits.max_nesting * 4;
    json::parser_callback_t cb = [max_depth](int depth, json::parse_event_t, json&) {
      if (depth > max_depth)
        throw GrammarError("json-schema: JSON nested deeper than " + std::to_string(max_depth));
      return true;
    };
    root = json::parse(text.begin(), text.end(), cb, true, false);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for number overflow
    std::string m = "json-schema: invalid JSON: ";
    m += e.what();
    throw GrammarError(m);
  }
  try {
    return Compiler(root, limits).run();
  } catch (const json::exception& e) {  // a value of an unexpected type the checks missed
    std::string m = "json-schema: ";
    m += e.what();
    throw GrammarError(m);
  }
}

}  // namespace loomp::grammar
