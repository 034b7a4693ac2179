// [Samplers] item 4: 1,000 seeded generations from the default model (models/tiny-kjv, a
// byte-fallback tokenizer) under a JSON schema through the `json-schema` sampler, each of which
// must parse (nlohmann::json) and validate against the schema (checked here by a small
// validator of the keywords the schema uses, written independently of the plugin's compiler).
// 50 seeds x 20 different prompts, the prompts of one seed decoded as one batch.
#include <catch2/catch.hpp>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "builtin_test_util.hpp"
#include "loom/core/runtime.hpp"

namespace {

using nlohmann::json;

std::filesystem::path default_model() {
  const char *env = std::getenv("LOOM_SOURCE_DIR");
  return std::filesystem::path(env && *env ? env : LOOM_SOURCE_DIR) / "models" / "tiny-kjv";
}

// Byte-bounded strings and lists keep every document short enough to finish within the run's
// steps whatever the model prefers; the integer and the enum exercise the other value rules.
const char *const kSchema = R"({
  "type": "object",
  "properties": {
    "book": {"enum": ["Genesis", "Exodus", "Psalms", "John"]},
    "chapter": {"type": "integer"},
    "verse": {"type": "string", "maxLength": 40},
    "people": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 12}, "maxItems": 3},
    "canonical": {"type": "boolean"}
  },
  "required": ["book", "chapter", "verse"],
  "additionalProperties": false
})";

// Why `v` does not satisfy `schema` ("" when it does), for the keywords kSchema uses.
std::string violation(const json &v, const json &schema, const std::string &path) {
  if (schema.contains("enum")) {
    for (const auto &e : schema["enum"])
      if (e == v) return "";
    return path + ": not one of the enum";
  }
  const std::string type = schema.value("type", "");
  if (type == "object") {
    if (!v.is_object()) return path + ": not an object";
    for (const auto &r : schema.value("required", json::array()))
      if (!v.contains(r.get<std::string>())) return path + ": missing " + r.get<std::string>();
    for (const auto &[key, value] : v.items()) {
      if (!schema["properties"].contains(key)) return path + ": unexpected property " + key;
      if (auto why = violation(value, schema["properties"][key], path + "/" + key); !why.empty()) return why;
    }
    return "";
  }
  if (type == "array") {
    if (!v.is_array()) return path + ": not an array";
    if (schema.contains("maxItems") && v.size() > schema["maxItems"].get<size_t>()) return path + ": too many items";
    for (size_t i = 0; i < v.size(); ++i)
      if (auto why = violation(v[i], schema["items"], path + "/" + std::to_string(i)); !why.empty()) return why;
    return "";
  }
  if (type == "string") {
    if (!v.is_string()) return path + ": not a string";
    // JSON Schema counts characters (code points), not bytes.
    size_t chars = 0;
    for (unsigned char c : v.get<std::string>()) chars += (c & 0xC0) != 0x80;
    if (schema.contains("maxLength") && chars > schema["maxLength"].get<size_t>()) return path + ": too long";
    if (schema.contains("minLength") && chars < schema["minLength"].get<size_t>()) return path + ": too short";
    return "";
  }
  if (type == "integer") return v.is_number_integer() ? "" : path + ": not an integer";
  if (type == "boolean") return v.is_boolean() ? "" : path + ": not a boolean";
  return path + ": the validator does not know this schema";
}

} // namespace

TEST_CASE("1,000 seeded generations from the default model under a JSON schema all parse and validate",
          "[grammar][json][model]") {
  const json schema = json::parse(kSchema);
  std::string prompts = "[";
  const char *starts[] = {"And God said", "In the beginning", "The LORD is my shepherd", "Blessed are",
                          "And it came to pass", "Thus saith the LORD", "Now the serpent", "Let there be",
                          "Honour thy father", "The heavens declare", "Fear not", "And Moses said",
                          "For God so loved", "Hear, O Israel", "Praise ye the LORD", "And Jesus answered",
                          "Vanity of vanities", "I am the way", "Remember the sabbath", "Give ear"};
  for (const char *s : starts) prompts += std::string(prompts.size() > 1 ? ", " : "") + "\"" + s + "\"";
  prompts += "]";
  // The schema as a TOML literal string (it holds no single quote).
  const std::string chain = "[[sampler]]\nuse = \"json-schema\"\nschema = '''" + std::string(kSchema) +
                            "'''\n[[sampler]]\nuse = \"temperature\"\nt = 0.8\n[[sampler]]\nuse = \"dist\"\n";
  size_t documents = 0, failures = 0;
  for (int seed = 1; seed <= 50; ++seed) {
    auto rt = loom::Runtime::from_string("[loom]\ndevice = \"cpu\"\nseed = " + std::to_string(seed) + "\n[model]\npath = \"" +
                                         default_model().string() + "\"\n[attention]\nuse = \"sdpa\"\n" + chain +
                                         "[run]\nprompts = " + prompts + "\nsteps = 200\n");
    const loom::RunResult r = rt->run();
    for (const auto &s : r.sequences) {
      ++documents;
      INFO("seed " << seed << ": " << s.text);
      json doc;
      std::string why;
      try {
        doc = json::parse(s.text);
        why = violation(doc, schema, "");
      } catch (const json::exception &e) {
        why = std::string("does not parse: ") + e.what();
      }
      if (!why.empty() || !s.stopped) {
        ++failures;
        FAIL_CHECK((why.empty() ? std::string("did not finish within the steps") : why));
      }
    }
  }
  CHECK(documents == 1000);
  CHECK(failures == 0);
}

TEST_CASE("json-schema: minLength and maxLength bound strings, and are refused elsewhere", "[grammar][json]") {
  auto error = [](const std::string &schema) {
    return bt::build_error("[[sampler]]\nuse = \"json-schema\"\nschema = '" + schema + "'\n");
  };
  CHECK(error(R"({"type": "string", "minLength": 2, "maxLength": 5})").empty());
  CHECK(error(R"({"type": ["string", "null"], "maxLength": 5})").empty());
  CHECK(error(R"({"type": "integer", "maxLength": 3})").find("json-schema: /maxLength: keyword 'maxLength' needs type 'string'") !=
        std::string::npos);
  CHECK(error(R"({"type": "string", "minLength": 5, "maxLength": 2})").find("json-schema: /maxLength: maxLength < minLength") !=
        std::string::npos);
  CHECK(error(R"({"enum": ["a"], "maxLength": 1})").find("json-schema: /maxLength: keyword 'maxLength' beside enum or const") !=
        std::string::npos);
  CHECK(error(R"({"type": "string", "minLength": -1})").find("json-schema: /minLength: must be a non-negative integer") !=
        std::string::npos);
  CHECK(error(R"({"maxLength": 4})").find("json-schema: /maxLength: keyword 'maxLength' needs a 'type'") != std::string::npos);
  CHECK(error(R"({"$defs": {"s": {"type": "string"}}, "$ref": "#/$defs/s", "maxLength": 4})")
            .find("json-schema: /maxLength: keyword 'maxLength' beside $ref is not supported") != std::string::npos);
}
