// libloom-grammar's fast masks (step_cache, element_frames, token_tables, masker) against the
// plain reference: Matcher::accepts on every token on its own. Random grammars, random
// vocabularies (with UTF-8 split across tokens) and the states of random walks, so that a
// speed-up cannot change which tokens a mask allows.
#include <catch2/catch.hpp>

#include <cmath>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "../../plugins/grammar/gbnf.hpp"
#include "../../plugins/grammar/masker.hpp"
#include "../../plugins/grammar/step_cache.hpp"
#include "../../plugins/grammar/token_index.hpp"
#include "../../plugins/grammar/token_tables.hpp"

using namespace loomp::grammar;

namespace {

using Rng = std::mt19937;

size_t pick(Rng& rng, size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng); }

// The reference mask: every token checked on its own by the plain matcher.
std::vector<uint64_t> brute_mask(const Matcher& m, const TokenIndex& v, const State& s) {
  std::vector<uint64_t> out((v.size() + 63) / 64, 0);
  for (size_t i = 0; i < v.size(); ++i) {
    const auto id = static_cast<int32_t>(i);
    const bool ok = v.is_end(id) ? s.can_complete() : v.has_text(id) && !v.text(id).empty() && m.accepts(s, v.text(id));
    if (ok) out[i >> 6] |= uint64_t{1} << (i & 63);
  }
  return out;
}

std::vector<int32_t> ids_of(const std::vector<uint64_t>& mask) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < mask.size() * 64; ++i)
    if ((mask[i >> 6] >> (i & 63)) & 1) ids.push_back(static_cast<int32_t>(i));
  return ids;
}

// A vocabulary of `n` tokens made of 1..max_pieces random pieces, plus an end token (no text),
// an empty token and a duplicate text.
std::shared_ptr<const TokenIndex> random_vocab(Rng& rng, const std::vector<std::string>& pieces, size_t n,
                                               size_t max_pieces = 4) {
  std::vector<std::string> texts;
  std::vector<char> has;
  for (size_t i = 0; i < n; ++i) {
    std::string t;
    for (size_t k = 0, len = 1 + pick(rng, max_pieces); k < len; ++k) t += pieces[pick(rng, pieces.size())];
    texts.push_back(t);
    has.push_back(1);
  }
  texts.push_back(texts[0]);
  has.push_back(1);
  texts.emplace_back("");
  has.push_back(1);
  texts.emplace_back("<eos>");
  has.push_back(0);
  return std::make_shared<const TokenIndex>(texts, has, std::vector<int32_t>{static_cast<int32_t>(texts.size() - 1)});
}

// Random walks from the start state, each step comparing the fast mask with the reference and
// then taking a random allowed token. A walk ends where the reference hits the matcher's limits
// (a too ambiguous random grammar): the fast path keeps no more stacks than the reference, so
// it has nothing to compare there. Returns the number of states compared.
size_t compare_walks(const Matcher& m, const std::shared_ptr<const TokenIndex>& v, Rng& rng, int walks, int steps,
                     const std::vector<std::string>& prefixes = {}) {
  auto tables = std::make_shared<const TokenTables>(m, v);
  Masker masker(tables);
  size_t compared = 0;
  auto compare = [&](const State& s, std::vector<int32_t>& allowed) {
    std::vector<uint64_t> slow;
    try {
      slow = brute_mask(m, *v, s);
    } catch (const GrammarError&) {
      return false;
    }
    MaskStats stats;
    const std::span<const uint64_t> got = masker.mask(s, &stats);
    const std::vector<uint64_t> fast(got.begin(), got.end());
    allowed = ids_of(fast);
    CHECK(allowed == ids_of(slow));
    // element_frames' chains hold for every reachable state: only states inside a UTF-8
    // sequence are walked from the root. (A state seen before is not recomputed: zero stats.)
    if (s.partial_need == 0 && tables->build_stats().failed == 0) CHECK(stats.fallback == 0);
    ++compared;
    return true;
  };
  std::vector<int32_t> allowed;
  State start;
  try {
    start = m.initial();
  } catch (const GrammarError&) {
    return compared;
  }
  for (const std::string& p : prefixes) {
    State s = start;
    INFO("prefix '" << p << "'");
    REQUIRE(m.advance(s, p));
    CHECK(compare(s, allowed));
  }
  for (int w = 0; w < walks; ++w) {
    State s = start;
    std::string text;
    for (int k = 0; k < steps; ++k) {
      INFO("after '" << text << "'");
      if (!compare(s, allowed)) break;
      std::vector<int32_t> texts;
      for (int32_t id : allowed)
        if (!v->is_end(id)) texts.push_back(id);
      if (texts.empty()) break;
      const int32_t t = texts[pick(rng, texts.size())];
      try {
        REQUIRE(m.advance(s, v->text(t)));
      } catch (const GrammarError&) {
        break;
      }
      text += v->text(t);
    }
  }
  return compared;
}

// ---- random GBNF grammars ----

const std::vector<std::string> kAlphabet = {"a", "b", "c", "x", "{", "}", ",", " ", "\\\"", "\\n", "é", "ü", "日",
                                            "😀", "\\\\"};

// Postfix operators drawn for an item (mostly none).
using Postfixes = std::vector<std::string>;
const Postfixes kPostfixes = {"", "", "", "?", "*", "+", "{2}", "{0,3}", "{1,}"};
// Counted repetitions longer than a short token, so that copies share their tables.
const Postfixes kCounted = {"", "", "?", "*", "{2}", "{0,3}", "{1,}", "{0,9}", "{3,11}", "{2,}", "{7}", "{1,14}"};

std::string random_item(Rng& rng, int rules, int depth, const Postfixes& postfix);

std::string random_sequence(Rng& rng, int rules, int depth, const Postfixes& postfix) {
  std::string seq;
  for (size_t i = 0, n = pick(rng, 4); i < n; ++i) seq += random_item(rng, rules, depth, postfix) + " ";
  return seq;
}

std::string random_alternatives(Rng& rng, int rules, int depth, const Postfixes& postfix) {
  std::string alts = random_sequence(rng, rules, depth, postfix);
  for (size_t i = 0, n = pick(rng, 3); i < n; ++i) alts += "| " + random_sequence(rng, rules, depth, postfix);
  return alts;
}

std::string random_item(Rng& rng, int rules, int depth, const Postfixes& postfix) {
  std::string item;
  switch (pick(rng, depth < 2 ? 6 : 4)) {
    case 0: {
      item = "\"";
      for (size_t i = 0, n = 1 + pick(rng, 3); i < n; ++i) item += kAlphabet[pick(rng, kAlphabet.size())];
      item += "\"";
      break;
    }
    case 1: {
      static const std::vector<std::string> classes = {"[a-c]", "[^a]", "[^\"\\\\]", "[é-ü]", "[a-zé日]", ".",
                                                       "[^\\x00-\\x7F]", "[ \\n]", "[0-9]", "[😀-😂]"};
      item = classes[pick(rng, classes.size())];
      break;
    }
    case 2:
    case 3: item = "r" + std::to_string(pick(rng, static_cast<size_t>(rules))); break;
    default: item = "(" + random_alternatives(rng, rules, depth + 1, postfix) + ")"; break;
  }
  return item + postfix[pick(rng, postfix.size())];
}

// A random grammar the parser accepts (left-recursive draws are redrawn).
std::string random_grammar(Rng& rng, const Postfixes& postfix = kPostfixes) {
  for (;;) {
    const int rules = 1 + static_cast<int>(pick(rng, 5));
    std::string g = "root ::= " + random_alternatives(rng, rules, 0, postfix) + "\n";
    for (int r = 0; r < rules; ++r)
      g += "r" + std::to_string(r) + " ::= " + random_alternatives(rng, rules, 0, postfix) + "\n";
    try {
      parse_gbnf(g);
      return g;
    } catch (const GrammarError&) {
    }
  }
}

const char* kJsonSchemas[] = {
    R"({"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}, "ok": {"type": "boolean"},
        "kind": {"enum": ["a", "b\u00e9", 1, null]}, "x": {"type": "number"}},
        "required": ["name"], "additionalProperties": false})",
    R"({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object",
        "properties": {"v": {"type": ["integer", "null"]}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["v"]}}})",
    "true",
};

}  // namespace

TEST_CASE("StepCache steps exactly as the matcher does", "[grammar]") {
  Rng rng(5);
  const std::vector<std::string> bytes = {"a", "b", "x", "{", "}", "\"", " ", "\\", "\xC3", "\xA9", "\xE6", "\x97",
                                          "\xA5", "\xF0", "\x9F", "\x98", "\x80", "\xFF", "\xED", "\xA0"};
  for (int g = 0; g < 60; ++g) {
    const std::string text = random_grammar(rng);
    INFO(text);
    const Grammar gr = parse_gbnf(text);
    const Matcher m(gr);
    StepCache cache(m);
    for (int w = 0; w < 40; ++w) {
      State s = m.initial();
      uint32_t id = cache.intern(s);
      for (int k = 0; k < 12 && !s.dead(); ++k) {
        const auto b = static_cast<uint8_t>(bytes[pick(rng, bytes.size())][0]);
        State t;
        const bool ok = m.advance_byte(s, b, t);
        id = cache.step(id, b);
        REQUIRE(ok == (id != StepCache::kDead));
        if (!ok) break;
        s = std::move(t);
        CHECK(cache.intern(s) == id);  // the same state, found by its stacks
        CHECK(cache.complete(id) == s.can_complete());
      }
    }
  }
}

TEST_CASE("fast masks equal per-token checks on random grammars and vocabularies", "[grammar]") {
  Rng rng(2024);
  std::vector<std::string> pieces = {"\xC3", "\xA9", "\xE6\x97", "\xA5", "\xF0\x9F", "\x98\x80", "\x80", "\xFF", "\""};
  for (const std::string& a : kAlphabet) pieces.push_back(a == "\\\"" ? "\"" : a == "\\n" ? "\n" : a == "\\\\" ? "\\" : a);
  Limits lim;
  lim.max_stacks = 128;  // walks end early in the rare, wildly ambiguous draws (slow to check)
  size_t compared = 0;
  for (int g = 0; g < 150; ++g) {
    const std::string text = random_grammar(rng);
    INFO(text);
    const Grammar gr = parse_gbnf(text);
    const Matcher m(gr, lim);
    compared += compare_walks(m, random_vocab(rng, pieces, 400), rng, 4, 12);
  }
  CHECK(compared > 2000);
}

TEST_CASE("fast masks equal per-token checks on JSON schemas", "[grammar]") {
  Rng rng(7);
  const std::vector<std::string> pieces = {"a", "b", "z", " ", "\"", "\\", "{", "}", "[", "]", ":", ",", "1", "0", "-",
                                           ".", "e", "n", "u", "l", "t", "r", "f", "s", "\n", "\xC3", "\xA9",
                                           "\xE6\x97", "\xA5", "\xF0\x9F\x98\x80", "\x80", "\xFF", "name", "kids",
                                           "\\u00", "d8", "null", "true", "\": ", "\", \"", "\"}"};
  // Prefixes that stop inside strings, escapes, numbers and UTF-8 sequences.
  const std::vector<std::string> prefixes = {"", " {", "{\"name\": \"", "{\"name\": \"\xC3", "{\"name\": \"a\\",
                                             "{\"name\": \"a\\u00", "{\"name\": \"x\", \"n\": -1",
                                             "{\"name\": \"x\", \"tags\": [", "{\"name\":\"\",\"n\":0}"};
  size_t compared = 0;
  for (const char* schema : kJsonSchemas) {
    INFO(schema);
    const Grammar gr = parse_gbnf(schema_to_gbnf(schema));
    const Matcher m(gr);
    const auto vocab = random_vocab(rng, pieces, 3000);
    compared += compare_walks(m, vocab, rng, 30, 40, schema == kJsonSchemas[0] ? prefixes : std::vector<std::string>{});
  }
  CHECK(compared > 1000);
}

TEST_CASE("fast masks equal per-token checks inside counted repetitions", "[grammar]") {
  // Repetitions of rules and groups are cloned per copy (Grammar::copies); with tokens of a few
  // bytes, copies with more than that many repetitions left share their tables.
  Rng rng(31);
  std::vector<std::string> pieces = {"\xC3", "\xA9", "\xE6\x97", "\xA5", "\x80", "\""};
  for (const std::string& a : kAlphabet) pieces.push_back(a == "\\\"" ? "\"" : a == "\\n" ? "\n" : a == "\\\\" ? "\\" : a);
  Limits lim;
  lim.max_stacks = 128;
  size_t compared = 0, shared = 0;
  for (int g = 0; g < 120; ++g) {
    const std::string text = random_grammar(rng, kCounted);
    INFO(text);
    const Grammar gr = parse_gbnf(text);
    const Matcher m(gr, lim);
    const auto vocab = random_vocab(rng, pieces, 300, 1 + pick(rng, 3));
    shared += TokenTables(m, vocab).build_stats().shared;
    compared += compare_walks(m, vocab, rng, 4, 14);
  }
  CHECK(compared > 1500);
  CHECK(shared > 0);
  // Hand-written ones: a rule with escapes and UTF-8, a group, a nullable item (not shared),
  // a repetition inside a repeated item, and the same rule repeated in several places.
  const char* grammars[] = {
      "root ::= \"<\" ch{0,12} \">\" ch{3,9} \"!\" ch{2,} \".\"\nch ::= [a-c] | \"\\\\\" [n\"] | \"é\" | [日-旦]",
      "root ::= (\"ab\" | \"a\" x){2,10} \";\" ch{0,5}\nx ::= \"b\"?\nch ::= [a-c]",
      "root ::= (\"a\"?){0,8} \"b\" (ch \",\"?){1,6}\nch ::= [a-c]{1,3}",
      "root ::= (\"[\" ch{0,4} \"]\"){0,6} \"\\n\"\nch ::= [ab] | \"c\" \"c\"?",
  };
  for (const char* text : grammars) {
    INFO(text);
    const Grammar gr = parse_gbnf(text);
    const Matcher m(gr);
    for (size_t max_pieces : {1, 2, 4}) compare_walks(m, random_vocab(rng, pieces, 400, max_pieces), rng, 20, 20);
  }
  // Runs of 1..40 "a" among short tokens: the longest runs are the long tokens that shared
  // tables leave to a walk (copies past the short tokens' length share), masked at every count.
  std::vector<std::string> texts;
  for (size_t n = 1; n <= 40; ++n) texts.emplace_back(n, 'a');
  for (size_t i = 0; i < 300; ++i) texts.push_back(pieces[pick(rng, pieces.size())] + pieces[pick(rng, pieces.size())]);
  const auto runs = std::make_shared<const TokenIndex>(texts, std::vector<char>(texts.size(), 1), std::vector<int32_t>{});
  std::vector<std::string> prefixes;
  for (size_t n = 0; n <= 30; ++n) prefixes.push_back("<" + std::string(n, 'a'));
  for (const char* text : {"root ::= \"<\" ch{0,30} \">\"\nch ::= [ab] | \"c\" \"c\"",
                           "root ::= \"<\" ch{3,30} \">\"\nch ::= [ab] | \"c\" \"c\"",
                           "root ::= \"<\" ch{2,} \">\" ch{30} \">\"\nch ::= [ab] | \"c\" \"c\""}) {
    INFO(text);
    const Grammar gr = parse_gbnf(text);
    const Matcher m(gr);
    CHECK(TokenTables(m, runs).build_stats().long_tokens > 0);
    compare_walks(m, runs, rng, 10, 30, prefixes);
  }
}

TEST_CASE("fast masks equal per-token checks on length-bounded JSON strings", "[grammar]") {
  Rng rng(11);
  const std::vector<std::string> pieces = {"a", "b", "z", " ", "\"", "\\", "{", "}", "[", "]", ":", ",", "n", "u",
                                           "\n", "\xC3", "\xA9", "\xE6\x97", "\xA5", "\xF0\x9F\x98\x80", "\x80",
                                           "id", "note", "w", "\\u00", "e9", "\": ", "\", \"", "\"}", "ab"};
  const char* schema = R"({"type": "object", "properties": {
      "id": {"type": "string", "minLength": 2, "maxLength": 14}, "note": {"type": "string", "maxLength": 30},
      "w": {"type": "array", "maxItems": 3, "items": {"type": "string", "minLength": 1, "maxLength": 3}},
      "k": {"type": "string", "minLength": 20}},
    "required": ["id", "note"]})";
  const std::vector<std::string> prefixes = {"{\"id\": \"", "{\"id\": \"a", "{\"id\": \"abcdefghijklm",
                                             "{\"id\": \"ab\\u00", "{\"id\": \"\xC3\xA9\xC3",
                                             "{\"id\": \"ab\", \"note\": \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                                             "{\"id\": \"ab\", \"note\": \"\", \"w\": [\"a\", \"b"};
  const Grammar gr = parse_gbnf(schema_to_gbnf(schema));
  const Matcher m(gr);
  size_t compared = 0;
  for (size_t max_pieces : {2, 4, 8}) {
    const auto vocab = random_vocab(rng, pieces, 2000, max_pieces);
    compared += compare_walks(m, vocab, rng, 30, 40, prefixes);
  }
  CHECK(compared > 1000);
}

TEST_CASE("Masker writes its mask into logits rows", "[grammar]") {
  const Grammar gr = parse_gbnf("root ::= \"ab\" | \"b\"");
  const Matcher m(gr);
  std::vector<std::string> texts;
  for (int i = 0; i < 130; ++i) texts.push_back(i == 3 ? "a" : i == 70 ? "b" : i == 129 ? "ab" : "zz");
  texts.push_back("</s>");
  auto v = std::make_shared<const TokenIndex>(texts, std::vector<char>(texts.size(), 1), std::vector<int32_t>{130});
  Masker masker(std::make_shared<const TokenTables>(m, v));
  std::vector<float> row(140, 1.0f);
  masker.apply(m.initial(), row.data(), row.size());  // a row padded past the vocabulary
  for (size_t i = 0; i < row.size(); ++i) CHECK((row[i] == 1.0f) == (i == 3 || i == 70 || i == 129));
  State done = m.initial();
  REQUIRE(m.advance(done, "b"));
  std::fill(row.begin(), row.end(), 2.0f);
  masker.apply(done, row.data(), row.size());
  for (size_t i = 0; i < row.size(); ++i) CHECK((row[i] == 2.0f) == (i == 130));
  std::fill(row.begin(), row.end(), 3.0f);
  masker.apply_ended(row.data(), row.size());
  for (size_t i = 0; i < row.size(); ++i) CHECK((row[i] == 3.0f) == (i == 130));
}

TEST_CASE("Masker::apply equals a per-token write on masks of every density", "[grammar]") {
  // Tokens "a" (allowed at the start of root ::= "a") and "b" (refused), mixed at a given
  // density over 1000 ids (the last 64-token word is partial), into a row padded past them.
  const Grammar gr = parse_gbnf("root ::= \"a\"");
  const Matcher m(gr);
  Rng rng(3);
  for (double density : {0.0, 0.002, 0.03, 0.5, 0.97, 0.999, 1.0}) {
    std::vector<std::string> texts(1000);
    for (auto& t : texts) t.assign(1, std::uniform_real_distribution<double>(0, 1)(rng) < density ? 'a' : 'b');
    auto v = std::make_shared<const TokenIndex>(texts, std::vector<char>(texts.size(), 1), std::vector<int32_t>{});
    Masker masker(std::make_shared<const TokenTables>(m, v));
    std::vector<float> row(1030);
    for (size_t i = 0; i < row.size(); ++i) row[i] = static_cast<float>(i) - 500.0f;
    const std::vector<float> before = row;
    masker.apply(m.initial(), row.data(), row.size());
    INFO("density " << density);
    for (size_t i = 0; i < row.size(); ++i) {
      const bool keep = i < texts.size() && texts[i] == "a";
      if (keep) CHECK(row[i] == before[i]);
      else CHECK((std::isinf(row[i]) && row[i] < 0));
    }
  }
}
