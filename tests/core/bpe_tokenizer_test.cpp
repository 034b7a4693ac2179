// Hugging Face tokenizer.json byte-level BPE tokenizers through Loom's Tokenizer: the golden ids
// and decodings that the `tokenizers` library produced (tests/fixtures/make_tokenizers.py), and
// the refusal of malformed or unsupported files.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom/core/chat_template.hpp"
#include "loom/core/error.hpp"
#include "loom/core/tokenizer.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

fs::path fixtures() { return fs::path(LOOM_SOURCE_DIR) / "tests/fixtures/tokenizers"; }

json read_json(const fs::path &p) {
  std::ifstream in(p);
  std::stringstream s;
  s << in.rdbuf();
  return json::parse(s.str());
}

// A fresh temporary directory holding `tokenizer.json` with `text`.
fs::path dir_with(const std::string &name, const std::string &text) {
  fs::path dir = fs::temp_directory_path() / ("loom-bpe-test-" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir / "tokenizer.json", std::ios::binary) << text;
  return dir;
}

// A small valid byte-level tokenizer.json, as json, to break in the malformed cases.
json minimal() {
  json vocab = json::object();
  int id = 0;
  for (const char *t : {"a", "b", "c", "ab", "abc", "\xC4\xA0", "<s>"}) vocab[t] = id++; // "Ġ" is the space
  return json{{"version", "1.0"},
              {"added_tokens", json::array({{{"id", 6}, {"content", "<s>"}, {"single_word", false}, {"lstrip", false},
                                             {"rstrip", false}, {"normalized", false}, {"special", true}}})},
              {"normalizer", nullptr},
              {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
              {"post_processor", nullptr},
              {"decoder", {{"type", "ByteLevel"}}},
              {"model",
               {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"byte_fallback", false},
                {"ignore_merges", false}, {"vocab", vocab}, {"merges", json::array({"a b"})}}}};
}

} // namespace

TEST_CASE("tokenizer.json byte-level BPE matches the tokenizers library's golden output", "[bpe]") {
  for (const char *name : {"gpt2-style", "llama3-style"}) {
    INFO(name);
    auto tok = loom::Tokenizer::load(fixtures() / name);
    REQUIRE(tok != nullptr);
    CHECK(tok->vocab_size() == 700);
    json golden = read_json(fixtures() / name / "golden.json");
    const auto &cases = golden.at("cases");
    REQUIRE(cases.size() == 28);
    for (const auto &c : cases) {
      auto text = c.at("text").get<std::string>();
      INFO(text);
      auto want = c.at("ids").get<std::vector<int32_t>>();
      CHECK(tok->encode(text, false) == want);
      CHECK(tok->encode(text, true) == want); // no post-processor support: add_bos adds nothing
      CHECK(tok->decode(want) == c.at("decoded").get<std::string>());
    }
    CHECK(tok->encode("", false).empty());
    CHECK(tok->decode({-1, 123456}).empty()); // unknown ids produce nothing
  }
}

// A copy of the qwen2-style fixture with `edit` applied, in a fresh temporary directory.
fs::path qwen2_with(const std::string &name, const std::function<void(json &)> &edit) {
  json j = read_json(fixtures() / "qwen2-style/tokenizer.json");
  edit(j);
  return dir_with(name, j.dump());
}

TEST_CASE("a Qwen2-style tokenizer.json (NFC normalizer, ChatML tokens) matches the tokenizers library", "[bpe][nfc]") {
  auto tok = loom::Tokenizer::load(fixtures() / "qwen2-style");
  REQUIRE(tok != nullptr);
  CHECK(tok->vocab_size() == 703); // 700 trained, then the 3 ChatML tokens as added tokens
  CHECK(tok->token_id("<|endoftext|>") == 700);
  CHECK(tok->token_id("<|im_start|>") == 701);
  CHECK(tok->token_id("<|im_end|>") == 702);
  json golden = read_json(fixtures() / "qwen2-style/golden.json");
  const auto &cases = golden.at("cases");
  REQUIRE(cases.size() == 37); // the 28 of the other fixtures and 9 that NFC changes or must keep
  for (const auto &c : cases) {
    auto text = c.at("text").get<std::string>();
    INFO(text);
    auto want = c.at("ids").get<std::vector<int32_t>>();
    CHECK(tok->encode(text, false) == want);
    CHECK(tok->encode(text, true) == want); // a ByteLevel post-processor adds nothing
    CHECK(tok->decode(want) == c.at("decoded").get<std::string>());
  }

  // A ChatML conversation (transformers' apply_chat_template) through Loom's chatml renderer.
  const auto &chat = golden.at("chat");
  std::vector<loom::ChatMessage> messages;
  for (const auto &m : chat.at("messages")) messages.push_back({m.at("role").get<std::string>(), m.at("content").get<std::string>()});
  auto segments = loom::render_chat(loom::ChatFamily::chatml, messages, chat.at("add_generation_prompt").get<bool>());
  std::string rendered;
  for (const auto &seg : segments) rendered += seg.text;
  CHECK(rendered == chat.at("text").get<std::string>());
  CHECK(loom::encode_chat(*tok, segments) == chat.at("ids").get<std::vector<int32_t>>());
}

TEST_CASE("NFC: decomposed and precomposed text encode alike; compatibility characters stay", "[bpe][nfc]") {
  auto tok = loom::Tokenizer::load(fixtures() / "qwen2-style");
  REQUIRE(tok != nullptr);
  struct Pair {
    const char *decomposed, *composed;
  };
  for (auto [decomposed, composed] : {
           Pair{"cafe\u0301", "caf\u00e9"},
           Pair{"A\u030angstro\u0308m", "\u00c5ngstr\u00f6m"},
           Pair{"\u212b", "\u00c5"},                              // a singleton: ANGSTROM SIGN
           Pair{"\u1100\u1161\u11a8", "\uac01"},                  // Hangul jamo L V T
           Pair{"Vie\u0323\u0302t e\u0301\u0323", "Vi\u1ec7t \u1eb9\u0301"}, // canonical reordering
           Pair{"\u0958", "\u0915\u093c"},                        // a composition exclusion decomposes
       }) {
    INFO(decomposed);
    auto ids = tok->encode(decomposed, false);
    CHECK(ids == tok->encode(composed, false));
    CHECK(tok->decode(ids) == composed); // the normalized text comes back
  }
  // NFC is not NFKC: the "fi" ligature, a circled digit, a superscript keep their own bytes.
  for (const char *text : {"\ufb01", "\u2460", "x\u00b2"}) {
    INFO(text);
    CHECK(tok->decode(tok->encode(text, false)) == text);
  }
  CHECK(tok->encode("\ufb01", false) != tok->encode("fi", false));

  // The same file without the normalizer: decomposed text is tokenized as its raw bytes.
  auto raw = loom::Tokenizer::load(qwen2_with("nfc-null", [](json &j) { j["normalizer"] = nullptr; }));
  CHECK(raw->encode("cafe\u0301", false) != raw->encode("caf\u00e9", false));
  CHECK(raw->decode(raw->encode("cafe\u0301", false)) == "cafe\u0301");
  CHECK(raw->encode("caf\u00e9", false) == tok->encode("caf\u00e9", false));

  // Sequences of NFC (nested too) are NFC.
  auto seq = loom::Tokenizer::load(qwen2_with("nfc-sequence", [](json &j) {
    j["normalizer"] = {{"type", "Sequence"},
                       {"normalizers", json::array({{{"type", "NFC"}},
                                                    {{"type", "Sequence"}, {"normalizers", json::array({{{"type", "NFC"}}})}}})}};
  }));
  auto empty = loom::Tokenizer::load(qwen2_with("nfc-empty-sequence", [](json &j) {
    j["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array()}};
  }));
  const json golden = read_json(fixtures() / "qwen2-style/golden.json"); // kept: the loop borrows from it
  for (const auto &c : golden.at("cases")) {
    auto text = c.at("text").get<std::string>();
    INFO(text);
    CHECK(seq->encode(text, false) == c.at("ids").get<std::vector<int32_t>>());
    CHECK(empty->encode(text, false) == raw->encode(text, false));
  }
}

TEST_CASE("NFC and added tokens: normalized ones match the normalized text, the others the raw text", "[bpe][nfc]") {
  // Two added tokens with decomposed contents, as the tokenizers library added them.
  const auto added = read_json(fixtures() / "qwen2-style/golden.json").at("added_normalization");
  auto dir = qwen2_with("nfc-added", [&](json &j) {
    for (const auto &t : added.at("added_tokens")) j["added_tokens"].push_back(t);
  });
  auto tok = loom::Tokenizer::load(dir);
  for (const auto &c : added.at("cases")) {
    auto text = c.at("text").get<std::string>();
    INFO(text);
    CHECK(tok->encode(text, false) == c.at("ids").get<std::vector<int32_t>>());
  }
  fs::remove_all(dir);
}

TEST_CASE("BPE details: merges, added tokens, ignore_merges, prefix space, lossy decoding", "[bpe]") {
  json j = minimal();
  auto dir = dir_with("details", j.dump());
  auto tok = loom::Tokenizer::load(dir);
  REQUIRE(tok != nullptr);
  CHECK(tok->vocab_size() == 7);
  CHECK(tok->encode("abc", false) == std::vector<int32_t>{3, 2}); // only "a b" merges: ab c
  CHECK(tok->encode("a<s>abc", false) == std::vector<int32_t>{0, 6, 3, 2});
  CHECK(tok->encode("ab c", false) == std::vector<int32_t>{3, 5, 2}); // " c" is one pre-token: Ġ c
  CHECK(tok->decode({3, 5, 2, 6}) == "ab c<s>");
  CHECK_THROWS_WITH(tok->encode("x", false), Catch::Contains("\"x\" is not in the vocab"));
  CHECK_THROWS_WITH(tok->encode("\xFF", false), Catch::Contains("not valid UTF-8"));

  j["model"]["ignore_merges"] = true; // a pre-token that is in the vocab maps straight to its id
  j["pre_tokenizer"]["add_prefix_space"] = true;
  dir = dir_with("details", j.dump());
  tok = loom::Tokenizer::load(dir);
  CHECK(tok->encode("abc", false) == std::vector<int32_t>{5, 3, 2}); // " abc" is not in the vocab
  j["pre_tokenizer"]["add_prefix_space"] = false;
  dir = dir_with("details", j.dump());
  tok = loom::Tokenizer::load(dir);
  CHECK(tok->encode("abc", false) == std::vector<int32_t>{4});

  // A vocabulary of two bytes of "é" (C3 A9 -> "Ã" "©"): a lone first byte decodes to U+FFFD.
  j["model"]["vocab"]["\xC3\x83"] = 7;
  j["model"]["vocab"]["\xC2\xA9"] = 8;
  dir = dir_with("details", j.dump());
  tok = loom::Tokenizer::load(dir);
  CHECK(tok->encode("\xC3\xA9", false) == std::vector<int32_t>{7, 8});
  CHECK(tok->decode({7, 8}) == "\xC3\xA9");
  CHECK(tok->decode({7, 0}) == "\xEF\xBF\xBD" "a");
  fs::remove_all(dir);
}

TEST_CASE("Split pre-tokenizers: regex and string patterns", "[bpe]") {
  json j = minimal();
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers",
                         json::array({{{"type", "Split"}, {"pattern", {{"String", "b"}}}, {"behavior", "Isolated"}},
                                      {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}};
  auto dir = dir_with("split", j.dump());
  auto tok = loom::Tokenizer::load(dir);
  CHECK(tok->encode("abcab", false) == std::vector<int32_t>{0, 1, 2, 0, 1}); // a|b|ca|b: "a b" cannot merge
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "\\p{L}{2}"}};
  dir = dir_with("split", j.dump());
  tok = loom::Tokenizer::load(dir);
  CHECK(tok->encode("abcab", false) == std::vector<int32_t>{3, 2, 0, 1}); // ab|ca|b: "c a" cannot merge
  CHECK(tok->encode("abcabc", false) == std::vector<int32_t>{3, 2, 0, 1, 2});
  fs::remove_all(dir);
}

TEST_CASE("a hostile regex fails with an error instead of hanging", "[bpe]") {
  json j = minimal();
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", json::array({{{"type", "Split"},
                                                        {"pattern", {{"Regex", "(a+)+$"}}},
                                                        {"behavior", "Isolated"}},
                                                       {{"type", "ByteLevel"}, {"use_regex", false}}})}};
  auto dir = dir_with("hostile", j.dump());
  auto tok = loom::Tokenizer::load(dir);
  CHECK_THROWS_WITH(tok->encode(std::string(64, 'a') + "b", false), Catch::Contains("regex match failed"));
  fs::remove_all(dir);
}

TEST_CASE("malformed or unsupported tokenizer.json files are refused with the key at fault", "[bpe]") {
  struct Case {
    const char *name;
    std::string text;
    const char *message;
  };
  auto edit = [](auto f) {
    json j = minimal();
    f(j);
    return j.dump();
  };
  std::vector<Case> cases = {
      {"not-json", "{ \"model\": ", "tokenizer.json: not valid JSON"},
      {"array", "[1, 2]", "tokenizer.json: not a JSON object"},
      {"no-model", edit([](json &j) { j.erase("model"); }), "tokenizer.json: model: missing"},
      {"wordpiece", edit([](json &j) { j["model"]["type"] = "WordPiece"; }),
       "tokenizer.json: model.type 'WordPiece' is not supported"},
      {"no-vocab", edit([](json &j) { j["model"].erase("vocab"); }), "tokenizer.json: model.vocab: missing"},
      {"vocab-type", edit([](json &j) { j["model"]["vocab"] = json::array({"a"}); }),
       "tokenizer.json: model.vocab: not an object"},
      {"id-type", edit([](json &j) { j["model"]["vocab"]["a"] = "zero"; }),
       "tokenizer.json: model.vocab[\"a\"]: not an integer id"},
      {"id-range", edit([](json &j) { j["model"]["vocab"]["a"] = -3; }),
       "tokenizer.json: model.vocab[\"a\"]: id out of range"},
      {"id-huge", edit([](json &j) { j["model"]["vocab"]["a"] = 5000000000LL; }),
       "tokenizer.json: model.vocab[\"a\"]: id out of range"},
      {"duplicate-id", edit([](json &j) { j["model"]["vocab"]["b"] = 0; }), "is also used by"},
      {"merge-unknown", edit([](json &j) { j["model"]["merges"] = json::array({"a z"}); }),
       "tokenizer.json: model.merges[0]: \"z\" is not in the vocab"},
      {"merge-result", edit([](json &j) { j["model"]["merges"] = json::array({json::array({"b", "c"})}); }),
       "tokenizer.json: model.merges[0]: the merged token \"bc\" is not in the vocab"},
      {"merge-shape", edit([](json &j) { j["model"]["merges"] = json::array({"a b c"}); }),
       "tokenizer.json: model.merges[0]: not two tokens separated by one space"},
      {"byte-fallback", edit([](json &j) { j["model"]["byte_fallback"] = true; }),
       "tokenizer.json: model.byte_fallback: only false is supported"},
      {"dropout", edit([](json &j) { j["model"]["dropout"] = 0.1; }),
       "tokenizer.json: model.dropout: only null is supported"},
      {"suffix", edit([](json &j) { j["model"]["end_of_word_suffix"] = "</w>"; }),
       "tokenizer.json: model.end_of_word_suffix: only null or \"\" is supported"},
      {"nfkc", edit([](json &j) { j["normalizer"] = {{"type", "NFKC"}}; }),
       "tokenizer.json: normalizer.type: 'NFKC' is not supported (NFC or a Sequence of NFC)"},
      {"lowercase-in-sequence",
       edit([](json &j) {
         j["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array({{{"type", "NFC"}}, {{"type", "Lowercase"}}})}};
       }),
       "tokenizer.json: normalizer.normalizers[1].type: 'Lowercase' is not supported (NFC or a Sequence of NFC)"},
      {"normalizer-shape", edit([](json &j) { j["normalizer"] = "NFC"; }), "tokenizer.json: normalizer: not an object"},
      {"normalizer-no-type", edit([](json &j) { j["normalizer"] = json::object(); }),
       "tokenizer.json: normalizer.type: missing"},
      {"sequence-no-list", edit([](json &j) { j["normalizer"] = {{"type", "Sequence"}}; }),
       "tokenizer.json: normalizer.normalizers: missing"},
      {"lstrip", edit([](json &j) { j["added_tokens"][0]["lstrip"] = true; }),
       "tokenizer.json: added_tokens[0].lstrip: only false is supported"},
      {"added-id", edit([](json &j) { j["added_tokens"][0]["id"] = 1.5; }),
       "tokenizer.json: added_tokens[0].id: not an integer id"},
      {"bad-regex",
       edit([](json &j) {
         j["pre_tokenizer"] = {{"type", "Sequence"},
                               {"pretokenizers", json::array({{{"type", "Split"},
                                                               {"pattern", {{"Regex", "(unclosed"}}},
                                                               {"behavior", "Isolated"}},
                                                              {{"type", "ByteLevel"}}})}};
       }),
       "tokenizer.json: pre_tokenizer.pretokenizers[0].pattern.Regex: cannot compile the regex at offset"},
      {"behavior", edit([](json &j) {
         j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"String", " "}}}, {"behavior", "Removed"}};
       }),
       "tokenizer.json: pre_tokenizer.behavior: \"Removed\" is not supported (only \"Isolated\")"},
      {"no-byte-level", edit([](json &j) {
         j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"String", " "}}}, {"behavior", "Isolated"}};
       }),
       "tokenizer.json: pre_tokenizer: no ByteLevel step"},
      {"whitespace", edit([](json &j) { j["pre_tokenizer"] = {{"type", "Whitespace"}}; }),
       "tokenizer.json: pre_tokenizer.type: 'Whitespace' is not supported"},
      {"decoder", edit([](json &j) { j["decoder"] = {{"type", "WordPiece"}}; }),
       "tokenizer.json: decoder: {\"type\":\"WordPiece\"} is not supported (only ByteLevel)"},
  };
  for (const auto &c : cases) {
    INFO(c.name);
    auto dir = dir_with(c.name, c.text);
    try {
      loom::Tokenizer::load(dir);
      FAIL("loaded");
    } catch (const loom::Error &e) {
      CHECK(e.category() == loom::ErrorCategory::runtime);
      CHECK_THAT(e.what(), Catch::Contains(c.message));
      CHECK_THAT(e.what(), Catch::Contains((dir / "tokenizer.json").string()));
    }
    fs::remove_all(dir);
  }

  // Over 64 MiB: refused before it is read.
  auto dir = dir_with("huge", "");
  fs::resize_file(dir / "tokenizer.json", (64u << 20) + 1);
  CHECK_THROWS_WITH(loom::Tokenizer::load(dir), Catch::Contains("tokenizer.json: file is larger than 64 MiB"));
  fs::remove_all(dir);
}

TEST_CASE("a sentencepiece tokenizer.model takes priority over tokenizer.json", "[bpe]") {
  auto dir = dir_with("both", "not even JSON");
  fs::copy_file(fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv/tokenizer.model", dir / "tokenizer.model");
  auto tok = loom::Tokenizer::load(dir);
  REQUIRE(tok != nullptr);
  CHECK(tok->vocab_size() == 2000); // the sentencepiece model's
  CHECK(tok->decode(tok->encode("And God said", true)) == "And God said");
  fs::remove(dir / "tokenizer.model");
  CHECK_THROWS_WITH(loom::Tokenizer::load(dir), Catch::Contains("tokenizer.json: not valid JSON"));
  fs::remove_all(dir);
}

TEST_CASE("a TemplateProcessing post-processor adds its special tokens with add_bos", "[bpe]") {
  namespace fs = std::filesystem;
  const fs::path src = fs::path(LOOM_SOURCE_DIR) / "tests/fixtures/tokenizers/llama3-style";
  std::ifstream in(src / "tokenizer.json");
  auto j = nlohmann::json::parse(in);
  j["post_processor"] = {{"type", "Sequence"},
                         {"processors",
                          {{{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}},
                           {{"type", "TemplateProcessing"},
                            {"single", {{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                                        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                            {"pair", nlohmann::json::array()},
                            {"special_tokens", {{"<|begin_of_text|>", {{"id", "<|begin_of_text|>"}, {"ids", {0}}, {"tokens", {"<|begin_of_text|>"}}}}}}}}}};
  fs::path dir = fs::temp_directory_path() / "loom-bpe-template-test";
  fs::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << j.dump();
  auto tok = loom::Tokenizer::load(dir);
  auto plain = tok->encode("Hello world", false);
  auto with = tok->encode("Hello world", true);
  REQUIRE(with.size() == plain.size() + 1);
  CHECK(with.front() == 0); // <|begin_of_text|>
  CHECK(std::vector<int32_t>(with.begin() + 1, with.end()) == plain);
  j["post_processor"] = {{"type", "RobertaProcessing"}};
  std::ofstream(dir / "tokenizer.json") << j.dump();
  CHECK_THROWS_WITH(loom::Tokenizer::load(dir), Catch::Contains("post_processor.type: 'RobertaProcessing' is not supported"));
  fs::remove_all(dir);
}
