// The sentencepiece tokenizer of the default model, through Loom's Tokenizer.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

#include "loom/core/error.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/tokenizer.hpp"
#include "loom/host_vocab.h"

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

TEST_CASE("token bytes concatenate to the text a token sequence continues", "[tokenizer]") {
  auto spm = loom::Tokenizer::load(fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv");
  REQUIRE(spm != nullptr);
  for (const char *text : {"And God said unto them, Verily.", "In the beginning"}) {
    INFO(text);
    std::string bytes;
    for (int32_t id : spm->encode(text, true)) bytes += spm->token_bytes(id);
    CHECK(bytes == std::string(" ") + text); // BOS adds nothing; the first piece carries the dummy prefix
  }
  CHECK(spm->token_bytes(1).empty()); // control
  CHECK(spm->token_bytes(-1).empty());
  CHECK(spm->token_bytes(spm->vocab_size()).empty());
  // Byte-level BPE: a character split across tokens comes back as its bytes, not U+FFFD.
  auto bpe = loom::Tokenizer::load(fs::path(LOOM_SOURCE_DIR) / "tests/fixtures/tokenizers/gpt2-style");
  REQUIRE(bpe != nullptr);
  for (const char *text : {"hello world", "Ünïcödé ✓ 文字 🙂 and   spaces"}) {
    INFO(text);
    std::string bytes;
    for (int32_t id : bpe->encode(text, false)) bytes += bpe->token_bytes(id);
    CHECK(bytes == text);
  }
}

TEST_CASE("plugins read the model's tokens through loom.host.vocab/1", "[tokenizer][host]") {
  const std::string kjv = (fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv").string();
  auto rt = loom::Runtime::from_string("[model]\npath = \"" + kjv +
                                       "\"\n[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n");
  loom::Instance &inst = rt->pipeline().at("sampler[0]");
  auto *v = static_cast<const loom_host_vocab *>(inst.host()->get_extension(inst.ctx(), LOOM_HOST_VOCAB_EXTENSION));
  REQUIRE(v != nullptr);
  REQUIRE(v->struct_size >= sizeof(loom_host_vocab));
  CHECK(v->vocab_size(inst.ctx()) == 2000);
  auto tok = loom::Tokenizer::load(kjv);
  std::string text;
  for (int32_t id : tok->encode("And God said", false)) {
    const char *bytes = nullptr;
    size_t len = 0;
    REQUIRE(v->token_bytes(inst.ctx(), id, &bytes, &len) == LOOM_OK);
    text.append(bytes, len);
  }
  CHECK(text == " And God said");
  const char *bytes = nullptr;
  size_t len = 0;
  CHECK(v->token_bytes(inst.ctx(), 1, &bytes, &len) == LOOM_ERR_NOT_FOUND); // BOS spells nothing
  CHECK(v->token_bytes(inst.ctx(), 2000, &bytes, &len) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK(v->token_bytes(inst.ctx(), -1, &bytes, &len) == LOOM_ERR_INVALID_ARGUMENT);
  const int32_t *ends = nullptr;
  size_t count = 0;
  REQUIRE(v->end_tokens(inst.ctx(), &ends, &count) == LOOM_OK);
  CHECK(count >= 1);
  // Without a model there is no vocabulary to offer.
  auto synthetic = loom::Runtime::from_string("[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n");
  loom::Instance &other = synthetic->pipeline().at("sampler[0]");
  CHECK(other.host()->get_extension(other.ctx(), LOOM_HOST_VOCAB_EXTENSION) == nullptr);
}
