// libloom-grammar: the GBNF parser, the matcher, the JSON-schema compiler (linked in directly)
// and the `grammar` / `json-schema` sampler components through the runtime, with the token
// vocabulary supplied by a test stand-in for the host extension loom.host.vocab/1.
#include <catch2/catch.hpp>

#include <optional>

#include <cmath>
#include <fstream>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "../../plugins/grammar/gbnf.hpp"
#include "builtin_test_util.hpp"

using namespace loomp::grammar;

namespace {

std::string parse_error(const std::string& text) {
  try {
    parse_gbnf(text);
  } catch (const GrammarError& e) {
    return e.what();
  }
  return "";
}
std::string schema_error(const std::string& text) {
  try {
    parse_gbnf(schema_to_gbnf(text));
  } catch (const GrammarError& e) {
    return e.what();
  }
  return "";
}

bool accepts(const std::string& grammar, const std::string& s, bool* complete = nullptr) {
  Grammar g = parse_gbnf(grammar);
  Matcher m(g);
  State st = m.initial();
  const bool ok = m.advance(st, s);
  if (complete) *complete = ok && st.can_complete();
  return ok;
}
bool full(const std::string& grammar, const std::string& s) {
  bool c = false;
  return accepts(grammar, s, &c) && c;
}

// ---- the test stand-in for loom.host.vocab/1 ----
struct TestVocab {
  std::vector<std::string> text;
  std::vector<char> special;  // no text (token_bytes answers NOT_FOUND)
  std::vector<int32_t> ends;
  int32_t add(const std::string& t, bool sp = false) {
    text.push_back(t);
    special.push_back(sp);
    return static_cast<int32_t>(text.size() - 1);
  }
};
TestVocab* g_vocab = nullptr;

int32_t tv_size(loom_host_ctx*) { return static_cast<int32_t>(g_vocab->text.size()); }
loom_status tv_bytes(loom_host_ctx*, int32_t id, const char** b, size_t* len) {
  if (id < 0 || static_cast<size_t>(id) >= g_vocab->text.size()) return LOOM_ERR_INVALID_ARGUMENT;
  if (g_vocab->special[static_cast<size_t>(id)]) return LOOM_ERR_NOT_FOUND;
  *b = g_vocab->text[static_cast<size_t>(id)].data();
  *len = g_vocab->text[static_cast<size_t>(id)].size();
  return LOOM_OK;
}
loom_status tv_ends(loom_host_ctx*, const int32_t** ids, size_t* n) {
  *ids = g_vocab->ends.data();
  *n = g_vocab->ends.size();
  return LOOM_OK;
}
const loom_host_vocab kTestVocab = {sizeof(loom_host_vocab), tv_size, tv_bytes, tv_ends};
const void* tv_get_extension(loom_host_ctx*, const char* id) {
  return std::string(id) == LOOM_HOST_VOCAB_EXTENSION ? &kTestVocab : nullptr;
}

// The component built by the runtime (which has no vocabulary extension yet), then a second
// instance created on the same manifest table with a host table whose get_extension offers the
// test vocabulary.
struct Harness {
  std::unique_ptr<loom::Runtime> rt;
  loom::Instance* in = nullptr;
  loom_host_api host{};
  void* h = nullptr;
  const loom_sampler_vtable* vt = nullptr;

  Harness(const std::string& toml, TestVocab& v) {
    g_vocab = &v;
    rt = bt::runtime(toml);
    in = &rt->pipeline().at("sampler[0]");
    vt = in->vtable<loom_sampler_vtable>();
    host = *in->host();
    host.get_extension = tv_get_extension;
    REQUIRE(vt->life.create(&host, in->ctx(), &h) == LOOM_OK);
  }
  ~Harness() {
    if (h) vt->life.destroy(h);
  }
  // The ids that survive apply() for sequence `seq` over a row of zeros (vocab_size = n).
  std::vector<int32_t> allowed(int64_t seq, int32_t n = -1) {
    if (n < 0) n = static_cast<int32_t>(g_vocab->text.size());
    bt::Tensor<float> logits({1, n});
    int32_t tok = -1;
    loom_sampling_batch b{};
    b.struct_size = sizeof(b);
    b.n_rows = 1;
    b.vocab_size = n;
    b.logits = logits.dl();
    b.seq_ids = &seq;
    b.tokens_out = &tok;
    const loom_status s = vt->apply(h, &b);
    INFO(in->last_error());
    REQUIRE(s == LOOM_OK);
    std::vector<int32_t> out;
    for (int32_t i = 0; i < n; ++i)
      if (!(std::isinf(logits.v[static_cast<size_t>(i)]) && logits.v[static_cast<size_t>(i)] < 0)) out.push_back(i);
    return out;
  }
  loom_status accept(int64_t seq, int32_t tok) { return vt->accept(h, seq, tok); }
};

std::string toml_str(const std::string& s) {
  std::string o = "'''";
  o += s;
  o += "'''";
  return o;
}

}  // namespace

TEST_CASE("gbnf: accepted grammars and the matcher on strings", "[grammar]") {
  const std::string g = "root ::= \"a\" [0-9]+ (\"x\" | \"yz\")?  # a comment\n";
  CHECK(full(g, "a1"));
  CHECK(full(g, "a12x"));
  CHECK(full(g, "a0yz"));
  CHECK(accepts(g, "a"));
  CHECK_FALSE(full(g, "a"));
  CHECK(accepts(g, "a1y"));
  CHECK_FALSE(full(g, "a1y"));
  CHECK_FALSE(accepts(g, "b"));
  CHECK_FALSE(accepts(g, "a1xx"));
  CHECK_FALSE(accepts(g, "ax"));

  // Multi-line rules, negated classes, escapes, {m,n}, '.', rule references.
  const std::string json =
      "root   ::= object\n"
      "value  ::= object | array | string | number | (\"true\" | \"false\" | \"null\") ws\n"
      "object ::=\n"
      "  \"{\" ws (\n"
      "            string \":\" ws value\n"
      "    (\",\" ws string \":\" ws value)*\n"
      "  )? \"}\" ws\n"
      "array  ::= \"[\" ws ( value (\",\" ws value)* )? \"]\" ws\n"
      "string ::= \"\\\"\" ( [^\"\\\\\\x7F\\x00-\\x1F] | \"\\\\\" ([\"\\\\/bfnrt] | \"u\" [0-9a-fA-F]{4}) )* \"\\\"\" ws\n"
      "number ::= (\"-\"? ([0-9] | [1-9] [0-9]{0,15})) (\".\" [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws\n"
      "ws ::= | \" \" | \"\\n\" [ \\t]{0,20}\n";
  CHECK(full(json, "{\"a\": [1, 2.5, -3e4, true, null, \"x\\u00e9\\n\"], \"b\": {}}"));
  CHECK(full(json, "{ }"));
  CHECK_FALSE(accepts(json, "{\"a\" 1}"));
  CHECK_FALSE(accepts(json, "{\"a\": 01"));
  CHECK_FALSE(accepts(json, "{\"a\": \"\x01"));
  CHECK(full("root ::= \"a\"{2,3}", "aa"));
  CHECK(full("root ::= \"a\"{2,3}", "aaa"));
  CHECK_FALSE(accepts("root ::= \"a\"{2,3}", "aaaa"));
  CHECK_FALSE(full("root ::= \"a\"{2,}", "a"));
  CHECK(full("root ::= \"a\"{2,}", "aaaaaa"));
  CHECK(full("root ::= \"ab\"{2}", "abab"));
  CHECK(full("root ::= . \"\\x41\\u00e9\"", "zAé"));
  CHECK(full("root ::= [\\]\\-a]+", "]-a"));

  // UTF-8: code points split across advance() calls, and classes over non-ASCII ranges.
  Grammar u = parse_gbnf("root ::= \"é\" [α-ω]*");
  Matcher m(u);
  State s = m.initial();
  CHECK(m.advance(s, "\xC3"));
  CHECK_FALSE(s.can_complete());
  CHECK(m.advance(s, "\xA9\xCE"));  // é complete, then half of a Greek letter
  CHECK(m.advance(s, "\xB2"));      // β
  CHECK(s.can_complete());
  CHECK_FALSE(m.accepts(s, "\xC3\xA9"));  // é is not in [α-ω]
  CHECK(m.accepts(s, "\xCE"));            // a prefix of U+0380..U+03BF, which holds α..ο
  CHECK_FALSE(m.accepts(s, "\xC3"));      // U+00C0..U+00FF: nothing in [α-ω]

  // A pending sequence must be able to end as valid UTF-8: byte-level vocabularies hold every
  // single byte, and a token that starts an overlong form, a surrogate or a code point past
  // U+10FFFF would leave a state no token (not even the end) can follow.
  Grammar any = parse_gbnf("root ::= .*");
  Matcher am(any);
  const State a0 = am.initial();
  CHECK(am.accepts(a0, "\xF0\x9F\x98"));  // U+1F600..: fine
  CHECK(am.accepts(a0, "\xE0\xA0"));
  CHECK(am.accepts(a0, "\xED\x9F"));       // U+D7C0..U+D7FF
  CHECK_FALSE(am.accepts(a0, "\xF0\x80"));  // overlong
  CHECK_FALSE(am.accepts(a0, "\xE0\x9F"));  // overlong
  CHECK_FALSE(am.accepts(a0, "\xED\xA0"));  // surrogates
  CHECK_FALSE(am.accepts(a0, "\xF4\x90"));  // past U+10FFFF
  CHECK(am.accepts(a0, "\xF4\x8F\xBF\xBF"));
}

TEST_CASE("gbnf: rejected grammars give line:column and a message", "[grammar]") {
  CHECK(parse_error("root ::= \"a") == "grammar:1:10: unterminated string literal");
  CHECK(parse_error("root ::= foo") == "grammar:1:10: undefined rule 'foo'");
  CHECK(parse_error("root = \"a\"") == "grammar:1:6: expected '::=' after rule name 'root'");
  CHECK(parse_error("a ::= \"x\"") == "grammar: no 'root' rule");
  CHECK(parse_error("") == "grammar: no 'root' rule");
  CHECK(parse_error("root ::= [a-") == "grammar:1:10: unterminated character class");
  CHECK(parse_error("root ::= *") == "grammar:1:10: repetition operator '*' without a preceding item");
  CHECK(parse_error("root ::= \"a\"{3,1}") == "grammar:1:13: repetition {m,n} with n < m");
  CHECK(parse_error("root ::= \"a\"{2000}") == "grammar:1:14: repetition count exceeds 1000");
  CHECK(parse_error("root ::= \"a\"\nroot ::= \"b\"") == "grammar:2:1: rule 'root' is defined twice");
  CHECK(parse_error("root ::= \"\\q\"") == "grammar:1:12: unknown escape '\\q'");
  CHECK(parse_error("root ::= (\"a\"") == "grammar:1:14: expected ')'");
  CHECK(parse_error("root ::= \"a\" )") == "grammar:1:14: unexpected character ')'");
  CHECK(parse_error("root ::= [z-a]") == "grammar:1:10: character range is reversed");
  CHECK(parse_error("root ::= \"\xC3\"") == "grammar:1:11: invalid UTF-8");
  CHECK(parse_error("root ::= (((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((\"a\""
                    "))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))") ==
        "grammar:1:74: parentheses nested deeper than 64");
  CHECK(parse_error("root ::= root \"a\" | \"b\"") ==
        "grammar: left recursion is not supported: root -> root (rewrite it with repetition, e.g. x ::= y (\"op\" y)*)");
  CHECK(parse_error("root ::= a \"x\"\na ::= b? root\nb ::= \"b\"") ==
        "grammar: left recursion is not supported: root -> a -> root (rewrite it with repetition, e.g. x ::= y (\"op\" y)*)");
  // Size limits: {m,n} expansion cannot blow up memory.
  // Nested repetitions stay linear (each group becomes a rule); the element cap still holds.
  CHECK(parse_error("root ::= ((((\"a\"{1000}){1000}){1000}){1000})").empty());
  Limits small;
  small.max_elements = 100;
  CHECK_THROWS_WITH(parse_gbnf("root ::= \"a\"{200}", small), "grammar:1:18: grammar exceeds 100 elements");
  // Right recursion is fine and the matcher's stacks stay bounded.
  CHECK(full("root ::= \"(\" root \")\" | \"x\"", "((x))"));
  Limits lim;
  lim.max_stack_depth = 16;
  Grammar deep = parse_gbnf("root ::= \"(\" root \")\" | \"x\"");
  Matcher dm(deep, lim);
  State ds = dm.initial();
  CHECK_THROWS_WITH(dm.advance(ds, std::string(40, '(')), "grammar: parse stack deeper than 16");
}

TEST_CASE("gbnf: counted repetitions of a rule clone it per copy", "[grammar]") {
  // Rules reachable from root, and the rules their elements reference.
  auto references = [](const Grammar& g) {
    std::vector<char> seen(g.alts.size(), 0);
    std::vector<uint32_t> todo{g.root};
    std::multiset<std::string> refs;
    seen[g.root] = 1;
    while (!todo.empty()) {
      const uint32_t r = todo.back();
      todo.pop_back();
      for (uint32_t a : g.alts[r])
        for (uint32_t i = a; g.elems[i].kind != Elem::END; ++i) {
          if (g.elems[i].kind != Elem::REF) continue;
          refs.insert(g.names[g.elems[i].ref]);
          if (!seen[g.elems[i].ref]) {
            seen[g.elems[i].ref] = 1;
            todo.push_back(g.elems[i].ref);
          }
        }
    }
    return refs;
  };
  // x's rule comes before the repetition of ch inside it: ch's copies are made first, so that
  // every copy of x holds copies of ch, and no reachable element references ch itself.
  const Grammar g = parse_gbnf("root ::= x{0,3} \"!\" x{2}\nx ::= \"<\" ch{1,5} \">\"\nch ::= [ab] | \"c\" d\nd ::= \"d\"");
  const auto refs = references(g);
  CHECK(refs.count("x") == 0);
  CHECK(refs.count("ch") == 0);
  CHECK(refs.count("d") == 0);
  size_t x_copies = 0, ch_copies = 0;
  for (const Grammar::Copy& c : g.copies) (c.family == g.copies.front().family ? ch_copies : x_copies) += 1;
  CHECK(ch_copies == 5);  // the 5 copies of ch in x's own rule (each copy of x clones them)
  CHECK(x_copies == 5);
  for (const Grammar::Copy& c : g.copies)  // copies of one repetition line up element by element
    for (const Grammar::Copy& d : g.copies)
      if (c.family == d.family) CHECK(c.elems.size() == d.elems.size());
  CHECK(accepts("root ::= x{0,3} \"!\" x{2}\nx ::= \"<\" ch{1,5} \">\"\nch ::= [ab] | \"c\" d\nd ::= \"d\"",
                "<a><cdb>!<a><bbbbb>"));
  // A nullable item keeps its one rule: its copies cannot share tables.
  const Grammar n = parse_gbnf("root ::= (\"a\"?){0,4} \"b\"");
  CHECK(n.copies.empty());
  // Limits still hold: copies that would pass max_elements reference the rule itself.
  Limits small;
  small.max_elements = 120;  // the grammar takes 83, its 20 copies of ch 80 more
  const Grammar s = parse_gbnf("root ::= ch{0,20}\nch ::= [ab] | \"c\"", small);
  CHECK(s.copies.empty());
  CHECK(references(s).count("ch") == 20);
}

TEST_CASE("masking on a hand-made vocabulary keeps exactly the right tokens", "[grammar]") {
  TestVocab v;
  const int32_t a = v.add("a"), one = v.add("1"), twelve = v.add("12"), x = v.add("x"), yz = v.add("yz"),
                y = v.add("y"), b = v.add("b"), a1 = v.add("a1"), eos = v.add("</s>", true),
                empty = v.add(""), a1x = v.add("a1x"), sp = v.add("<tool>", true);
  v.ends = {eos};
  (void)b;
  (void)empty;
  (void)sp;
  Harness hs("[[sampler]]\nuse = \"grammar\"\ngrammar = " + toml_str("root ::= \"a\" [0-9]+ (\"x\" | \"yz\")?") + "\n", v);
  CHECK(hs.allowed(1) == std::vector<int32_t>{a, a1, a1x});
  REQUIRE(hs.accept(1, a) == LOOM_OK);
  CHECK(hs.allowed(1) == std::vector<int32_t>{one, twelve});
  REQUIRE(hs.accept(1, twelve) == LOOM_OK);
  CHECK(hs.allowed(1) == std::vector<int32_t>{one, twelve, x, yz, y, eos});
  // A padded logits row: ids past the tokenizer's vocabulary are masked.
  CHECK(hs.allowed(1, 20) == std::vector<int32_t>{one, twelve, x, yz, y, eos});
  // fork copies the state; sequences are independent.
  REQUIRE(hs.vt->fork(hs.h, 1, 2) == LOOM_OK);
  REQUIRE(hs.accept(2, x) == LOOM_OK);
  CHECK(hs.allowed(2) == std::vector<int32_t>{eos});
  CHECK(hs.allowed(1) == std::vector<int32_t>{one, twelve, x, yz, y, eos});
  CHECK(hs.allowed(3) == std::vector<int32_t>{a, a1, a1x});
  // Refused tokens and early EOS are errors.
  CHECK(hs.accept(3, x) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK(hs.in->last_error() == "grammar: token 3 is not allowed by the grammar here");
  CHECK(hs.accept(3, eos) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK(hs.in->last_error() == "grammar: end token 8 before the grammar is complete");
  REQUIRE(hs.accept(2, eos) == LOOM_OK);
  CHECK(hs.allowed(2) == std::vector<int32_t>{eos});
  // release forgets: sequence 1 starts afresh.
  hs.vt->release(hs.h, 1);
  CHECK(hs.allowed(1) == std::vector<int32_t>{a, a1, a1x});
  hs.vt->release(hs.h, -1);
  CHECK(hs.allowed(2) == std::vector<int32_t>{a, a1, a1x});
}

TEST_CASE("grammar component: configuration and a host without the vocabulary", "[grammar]") {
  CHECK(bt::build_error("[[sampler]]\nuse = \"grammar\"\n").find("set exactly one of 'grammar' and 'grammar_file'") !=
        std::string::npos);
  CHECK(bt::build_error("[[sampler]]\nuse = \"grammar\"\ngrammar = 'root ::= \"a\"'\ngrammar_file = \"x.gbnf\"\n")
            .find("set exactly one of 'grammar' and 'grammar_file'") != std::string::npos);
  CHECK(bt::build_error("[[sampler]]\nuse = \"grammar\"\ngrammar = 'root ::= foo'\n")
            .find("grammar:1:10: undefined rule 'foo'") != std::string::npos);
  CHECK(bt::build_error("[[sampler]]\nuse = \"json-schema\"\nschema = '{\"type\": \"string\", \"pattern\": \"a+\"}'\n")
            .find("json-schema: /pattern: unsupported keyword 'pattern'") != std::string::npos);

  const std::string path = std::string(LOOM_BINARY_DIR) + "/grammar_test_file.gbnf";
  { std::ofstream(path) << "root ::= \"yes\" | \"no\"\n"; }
  auto rt = bt::runtime("[[sampler]]\nuse = \"grammar\"\ngrammar_file = \"" + path + "\"\n");
  auto& in = rt->pipeline().at("sampler[0]");
  bt::Tensor<float> logits({1, 4});
  int64_t seq = 0;
  int32_t tok = -1;
  loom_sampling_batch b{};
  b.struct_size = sizeof(b);
  b.n_rows = 1;
  b.vocab_size = 4;
  b.logits = logits.dl();
  b.seq_ids = &seq;
  b.tokens_out = &tok;
  CHECK(in.vtable<loom_sampler_vtable>()->apply(in.handle(), &b) == LOOM_ERR_UNSUPPORTED);
  CHECK(in.last_error() == "grammar: the host does not offer the token vocabulary (extension loom.host.vocab/1)");

  TestVocab v;
  const int32_t yes = v.add("yes"), n = v.add("n"), o = v.add("o"), eos = v.add("<eos>", true);
  v.ends = {eos};
  Harness hs("[[sampler]]\nuse = \"grammar\"\ngrammar_file = \"" + path + "\"\n", v);
  CHECK(hs.allowed(0) == std::vector<int32_t>{yes, n});
  REQUIRE(hs.accept(0, n) == LOOM_OK);
  CHECK(hs.allowed(0) == std::vector<int32_t>{o});
}

TEST_CASE("json-schema: unsupported keywords are errors naming the keyword and its path", "[grammar]") {
  CHECK(schema_error(R"({"type": "string", "format": "date"})") == "json-schema: /format: unsupported keyword 'format'");
  CHECK(schema_error(R"({"type": "object", "properties": {"a": {"type": "array", "items": {"pattern": "x"}}}})") ==
        "json-schema: /properties/a/items/pattern: unsupported keyword 'pattern'");
  CHECK(schema_error(R"({"allOf": [{"type": "string"}]})") == "json-schema: /allOf: unsupported keyword 'allOf'");
  CHECK(schema_error(R"({"anyOf": []})") == "json-schema: /anyOf: must be a non-empty array of schemas");
  CHECK(schema_error(R"({"oneOf": [{"type": "string"}], "type": "string"})") ==
        "json-schema: /type: keyword 'type' beside oneOf is not supported");
  CHECK(schema_error(R"({"oneOf": [{"type": "string"}, {"pattern": "x"}]})") == "json-schema: /oneOf/1/pattern: unsupported keyword 'pattern'");
  CHECK(schema_error(R"({"type": "object", "additionalProperties": true})") ==
        "json-schema: /additionalProperties: only 'additionalProperties: false' is supported");
  CHECK(schema_error(R"({"type": "object", "properties": {}, "required": ["x"]})") ==
        "json-schema: /required: required property 'x' is not in 'properties'");
  CHECK(schema_error(R"({"$ref": "#/$defs/missing"})") == "json-schema: /$ref: unresolved $ref '#/$defs/missing'");
  CHECK(schema_error(R"({"$ref": "http://x/y"})") ==
        "json-schema: /$ref: unsupported $ref 'http://x/y' (only #/$defs/NAME, #/definitions/NAME or #)");
  CHECK(schema_error(R"({"type": "strin"})") == "json-schema: /type: unknown type 'strin'");
  CHECK(schema_error(R"({"type": "array", "minItems": 3, "maxItems": 2})") == "json-schema: /maxItems: maxItems < minItems");
  CHECK(schema_error("{\"type\": ").rfind("json-schema: invalid JSON: ", 0) == 0);
  CHECK(schema_error(std::string(1000, '[') + std::string(1000, ']')) == "json-schema: JSON nested deeper than 256");
  // Supported forms compile.
  CHECK(schema_error(R"({"type": ["string", "null"]})").empty());
  CHECK(schema_error(R"({"type": "array", "minItems": 2, "maxItems": 4, "items": {"enum": [1, "a", null]}})").empty());
  CHECK(schema_error(R"({"$ref": "#/definitions/n", "definitions": {"n": {"type": "object", "properties": {"next": {"$ref": "#/definitions/n"}}}}})").empty());
  CHECK(schema_error("true").empty());
}

namespace {
const char* kSchema = R"({
  "type": "object",
  "properties": {
    "name": {"type": "string"},
    "age": {"type": "integer"},
    "score": {"type": "number"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    "ok": {"type": "boolean"},
    "kind": {"enum": ["a", "b", 1, null]},
    "child": {"$ref": "#/$defs/child"},
    "pair": {"type": "array", "items": {"type": ["integer", "null"]}, "minItems": 2, "maxItems": 2}
  },
  "required": ["name", "age"],
  "additionalProperties": false,
  "$defs": {"child": {"type": "object", "properties": {"id": {"type": "integer"}, "v": {"const": "x"}},
                      "required": ["id"]}}
})";

// Checks `j` against kSchema by hand; returns "" or what is wrong.
std::string check_instance(const nlohmann::json& j) {
  if (!j.is_object()) return "not an object";
  if (!j.contains("name") || !j["name"].is_string()) return "name";
  if (!j.contains("age") || !j["age"].is_number_integer()) return "age";
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const auto& v = it.value();
    if (k == "name" || k == "age") continue;
    if (k == "score") { if (!v.is_number()) return "score"; }
    else if (k == "tags") {
      if (!v.is_array() || v.size() > 3) return "tags";
      for (auto& t : v) if (!t.is_string()) return "tags item";
    } else if (k == "ok") { if (!v.is_boolean()) return "ok"; }
    else if (k == "kind") {
      if (!(v == "a" || v == "b" || v == 1 || v.is_null())) return "kind";
    } else if (k == "child") {
      if (!v.is_object() || !v.contains("id") || !v["id"].is_number_integer()) return "child";
      for (auto c = v.begin(); c != v.end(); ++c)
        if (!(c.key() == "id" || (c.key() == "v" && c.value() == "x"))) return "child key";
    } else if (k == "pair") {
      if (!v.is_array() || v.size() != 2) return "pair";
      for (auto& t : v) if (!(t.is_number_integer() || t.is_null())) return "pair item";
    } else return "extra key " + k;
  }
  return "";
}

TestVocab json_vocab() {
  TestVocab v;
  for (int c = 0x20; c < 0x7F; ++c) v.add(std::string(1, static_cast<char>(c)));
  for (const char* t : {"\n", "\t", "{\"", "\":", "\": ", "\", \"", "\",", "name", "age", "score", "tags", "ok", "kind",
                        "child", "pair", "id", "true", "false", "null", "nu", "ll", "12", "3.5", "e+", "-0", "\\n",
                        "\\u00", "é", "\xC3", "\xA9", "日本", "[\"", "\"]", "},", "}}", "]}", ", ", "\"x\"", "xyz"})
    v.add(t);
  v.ends = {v.add("<eos>", true)};
  return v;
}
}  // namespace

// One walk of sequence `seq` over uniformly drawn allowed tokens until an end token: the text
// generated, or nothing when 4000 steps did not end it. Every step must allow some token.
std::optional<std::string> random_walk(Harness &hs, const TestVocab &v, int64_t seq, std::mt19937 &rng) {
  std::string out;
  bool done = false;
  for (int step = 0; step < 4000 && !done; ++step) {
    const auto allowed = hs.allowed(seq);
    REQUIRE_FALSE(allowed.empty());
    const int32_t t = allowed[std::uniform_int_distribution<size_t>(0, allowed.size() - 1)(rng)];
    REQUIRE(hs.accept(seq, t) == LOOM_OK);
    if (t == v.ends[0]) done = true;
    else out += v.text[static_cast<size_t>(t)];
  }
  hs.vt->release(hs.h, seq);
  if (!done) return std::nullopt;
  return out;
}

TEST_CASE("json-schema: random walks over allowed tokens always produce valid instances", "[grammar]") {
  TestVocab v = json_vocab();
  Harness hs("[[sampler]]\nuse = \"json-schema\"\nschema = " + toml_str(kSchema) + "\n", v);
  std::mt19937 rng(1234);
  const int kSamples = 300;
  int completed = 0;
  std::set<std::string> keys_seen;
  for (int s = 0; s < kSamples; ++s) {
    const auto walked = random_walk(hs, v, 1000 + s, rng);
    if (!walked) continue;  // a very long walk; counted below
    const std::string &out = *walked;
    ++completed;
    nlohmann::json j;
    INFO(out);
    REQUIRE_NOTHROW(j = nlohmann::json::parse(out));
    CHECK(check_instance(j) == "");
    for (auto it = j.begin(); it != j.end(); ++it) keys_seen.insert(it.key());
  }
  CHECK(completed >= kSamples * 9 / 10);
  CHECK(keys_seen.size() >= 6);  // the walks exercise the optional properties too
}

TEST_CASE("json-schema: oneOf branches (an agent's tool call or final answer) give instances of one branch", "[grammar]") {
  const char *schema = R"({"oneOf": [
    {"type": "object", "properties": {"tool": {"const": "add"}, "arguments": {"type": "object",
      "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"], "additionalProperties": false}},
     "required": ["tool", "arguments"], "additionalProperties": false},
    {"type": "object", "properties": {"final": {"type": "string"}}, "required": ["final"], "additionalProperties": false}]})";
  TestVocab v = json_vocab();
  for (const char *t : {"tool", "add", "arguments", "final", "\"a\"", "\"b\""}) v.add(t);
  Harness hs("[[sampler]]\nuse = \"json-schema\"\nschema = " + toml_str(schema) + "\n", v);
  std::mt19937 rng(99);
  int calls = 0, finals = 0;
  for (int s = 0; s < 200; ++s) {
    const auto walked = random_walk(hs, v, 5000 + s, rng);
    if (!walked) continue;
    const std::string &out = *walked;
    INFO(out);
    nlohmann::json j;
    REQUIRE_NOTHROW(j = nlohmann::json::parse(out));
    REQUIRE(j.is_object());
    if (j.contains("final")) {
      CHECK(j.size() == 1);
      CHECK(j["final"].is_string());
      ++finals;
    } else {
      CHECK(j.size() == 2);
      CHECK(j["tool"] == "add");
      REQUIRE(j["arguments"].is_object());
      CHECK(j["arguments"].size() == 2);
      CHECK(j["arguments"]["a"].is_number());
      CHECK(j["arguments"]["b"].is_number());
      ++calls;
    }
  }
  CHECK(calls > 20);
  CHECK(finals > 20);
}
