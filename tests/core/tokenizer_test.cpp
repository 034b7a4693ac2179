// The sentencepiece tokenizer of the default model, through Loom's Tokenizer.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

#include "loom/core/error.hpp"
#include "loom/core/tokenizer.hpp"

namespace fs = std::filesystem;

TEST_CASE("the default model's tokenizer encodes and decodes text", "[tokenizer]") {
  auto tok = loom::Tokenizer::load(fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv");
  REQUIRE(tok != nullptr);
  CHECK(tok->vocab_size() == 2000);
  auto ids = tok->encode("In the beginning God created the heaven and the earth.", true);
  REQUIRE(ids.size() > 3);
  CHECK(ids.front() == 1); // BOS
  CHECK(tok->decode(ids) == "In the beginning God created the heaven and the earth.");
  for (const char *text : {"And Jesus said unto them, Verily.", "  spaces   and\ttabs ", "Ünïcödé ✓ 文字 🙂"}) {
    INFO(text);
    auto round = tok->decode(tok->encode(text, false));
    // sentencepiece normalises runs of whitespace; every other character comes back (unknown
    // characters as the unknown piece, which decodes to " ⁇ ").
    CHECK_FALSE(round.empty());
  }
  CHECK(tok->decode(tok->encode("And God said", false)) == "And God said");
  CHECK(tok->decode({1, 2, -5, 99999}) == ""); // control and out-of-range ids produce no text
}

TEST_CASE("tokenizer files are checked", "[tokenizer]") {
  fs::path dir = fs::temp_directory_path() / "loom-tokenizer-test";
  fs::create_directories(dir);
  CHECK(loom::Tokenizer::load(dir) == nullptr); // no tokenizer: token ids only
  std::ofstream(dir / "tokenizer.model") << "not a model";
  CHECK_THROWS_WITH(loom::Tokenizer::load(dir), Catch::Contains("tokenizer.model: not a sentencepiece model"));
  fs::remove(dir / "tokenizer.model");
  std::ofstream(dir / "tokenizer.json") << "{}";
  CHECK_THROWS_WITH(loom::Tokenizer::load(dir), Catch::Contains("tokenizer.json: model: missing"));
  fs::remove_all(dir);
}
