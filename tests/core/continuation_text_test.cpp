// continuation_text against its definition: the text prompt + generated decodes to, less the
// prompt's (the whole reply decoded alone where the prompt's text is not a prefix), for every
// prefix of a reply, token by token with one cache as the engine and the server call it.
#include <catch2/catch.hpp>

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "loom/core/continuation_text.hpp"
#include "loom/core/tokenizer.hpp"

namespace fs = std::filesystem;

namespace {

std::string defined_text(const loom::Tokenizer &t, const std::vector<int32_t> &prompt, const std::vector<int32_t> &gen) {
  const std::string before = t.decode(prompt);
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), gen.begin(), gen.end());
  const std::string whole = t.decode(all);
  return whole.compare(0, before.size(), before) == 0 ? whole.substr(before.size()) : t.decode(gen);
}

// Every prefix of `gen` after `prompt`, with one cache (and without), against the definition.
void check_reply(const loom::Tokenizer &t, const std::vector<int32_t> &prompt, const std::vector<int32_t> &gen) {
  loom::ContinuationCache cache;
  for (size_t k = 0; k <= gen.size(); ++k) {
    const std::vector<int32_t> head(gen.begin(), gen.begin() + static_cast<std::ptrdiff_t>(k));
    const std::string want = defined_text(t, prompt, head);
    INFO("prompt of " << prompt.size() << " tokens, reply of " << k);
    REQUIRE(loom::continuation_text(t, prompt, head, &cache) == want);
    REQUIRE(loom::continuation_text(t, prompt, head, nullptr) == want);
    REQUIRE(cache.tokens <= k);
  }
}

std::vector<int32_t> random_ids(std::mt19937 &rng, size_t n, int32_t vocab) {
  std::uniform_int_distribution<int32_t> id(0, vocab - 1);
  std::vector<int32_t> v(n);
  for (auto &x : v) x = id(rng);
  return v;
}

void check_tokenizer(const loom::Tokenizer &t, const std::vector<std::string> &texts) {
  // Text the tokenizer made itself: prompts of every length from a few tokens to a long one.
  for (const std::string &text : texts) {
    const std::vector<int32_t> ids = t.encode(text, true);
    for (size_t cut : {size_t{1}, size_t{3}, size_t{17}, ids.size() / 2, ids.size() - 1})
      if (cut < ids.size())
        check_reply(t, std::vector<int32_t>(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(cut)),
                    std::vector<int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(cut), ids.end()));
  }
  // Random ids (byte pieces, special tokens, characters cut between tokens).
  std::mt19937 rng(7);
  for (int trial = 0; trial < 40; ++trial)
    check_reply(t, random_ids(rng, 1 + rng() % 60, t.vocab_size()), random_ids(rng, rng() % 48, t.vocab_size()));
}

const std::vector<std::string> kTexts = {
    "And God said, Let there be light: and there was light. And God saw the light, that it was good.",
    "  leading spaces,\ttabs\tand\nnew lines\n\nand  double  spaces  ",
    "caf\xc3\xa9 na\xc3\xafve \xe2\x80\x94 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x98\x80 end",
    "def f(x):\n    return [i * i for i in range(x)]  # squares\n"};

}  // namespace

TEST_CASE("continuation_text gives the text of prompt and reply decoded at once (sentencepiece)", "[tokenizer]") {
  const auto t = loom::Tokenizer::load(fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv");
  REQUIRE(t);
  check_tokenizer(*t, kTexts);
  // A prompt far longer than the context: the reply's text is still the definition's.
  std::string longer;
  for (int i = 0; i < 40; ++i) longer += "In the beginning God created the heaven and the earth. ";
  const std::vector<int32_t> ids = t->encode(longer, true);
  check_reply(*t, std::vector<int32_t>(ids.begin(), ids.end() - 30), std::vector<int32_t>(ids.end() - 30, ids.end()));
}

TEST_CASE("continuation_text gives the text of prompt and reply decoded at once (byte-level BPE)", "[tokenizer]") {
  for (const char *name : {"gpt2-style", "llama3-style", "qwen2-style"}) {
    INFO(name);
    const auto t = loom::Tokenizer::load(fs::path(LOOM_SOURCE_DIR) / "tests/fixtures/tokenizers" / name);
    REQUIRE(t);
    check_tokenizer(*t, kTexts);
  }
}

TEST_CASE("a continuation cache follows a reply cut back", "[tokenizer]") {
  const auto t = loom::Tokenizer::load(fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv");
  REQUIRE(t);
  const std::vector<int32_t> prompt = t->encode("And God said", true);
  const std::vector<int32_t> gen = t->encode(", Let there be light: and there was light, and it was good.", false);
  REQUIRE(gen.size() > 12);
  loom::ContinuationCache cache;
  CHECK(loom::continuation_text(*t, prompt, gen, &cache) == defined_text(*t, prompt, gen));
  CHECK(cache.tokens > 0);  // a checkpoint was kept
  const std::vector<int32_t> shorter(gen.begin(), gen.begin() + 3);
  CHECK(loom::continuation_text(*t, prompt, shorter, &cache) == defined_text(*t, prompt, shorter));
}
