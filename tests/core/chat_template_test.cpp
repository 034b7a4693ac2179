// Chat templates: each family's rendering, special tokens as single ids, and conversations in runs.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

#include "loom/core/chat_template.hpp"
#include "loom/core/error.hpp"
#include "loom/core/runtime.hpp"

namespace fs = std::filesystem;
using loom::ChatFamily;

namespace {

std::string flat(const std::vector<loom::ChatSegment> &segments) {
  std::string out;
  for (const auto &s : segments) out += s.text;
  return out;
}

const std::vector<loom::ChatMessage> kConversation = {
    {"system", "Be brief."}, {"user", " Hi! "}, {"assistant", "Hello."}, {"user", "Who made the heaven?"}};

} // namespace

TEST_CASE("each family renders the conversation in its format", "[chat]") {
  CHECK(flat(loom::render_chat(ChatFamily::llama3, kConversation, true)) ==
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho made the heaven?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n");
  CHECK(flat(loom::render_chat(ChatFamily::chatml, kConversation, true)) ==
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi! <|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWho made the heaven?<|im_end|>\n<|im_start|>assistant\n");
  CHECK(flat(loom::render_chat(ChatFamily::mistral, kConversation, true)) ==
        "<s>[INST] Be brief.\n\n Hi!  [/INST]Hello.</s>[INST] Who made the heaven? [/INST]");
  CHECK(flat(loom::render_chat(ChatFamily::plain, kConversation, true)) ==
        "system: Be brief.\nuser:  Hi! \nassistant: Hello.\nuser: Who made the heaven?\nassistant:");
  auto llama = loom::render_chat(ChatFamily::llama3, kConversation, false);
  CHECK(llama.front().special);
  CHECK(llama.front().text == "<|begin_of_text|>");
  CHECK_THROWS_WITH(loom::render_chat(ChatFamily::mistral, {{"user", "a"}, {"user", "b"}}, true),
                    Catch::Contains("messages[1]: mistral conversations alternate user and assistant"));
  CHECK_THROWS_WITH(loom::render_chat(ChatFamily::plain, {{"robot", "a"}}, true),
                    Catch::Contains("messages[0].role: 'robot' is not system, user or assistant"));
}

TEST_CASE("special tokens become single ids; a tokenizer without them is refused", "[chat]") {
  auto tok = loom::Tokenizer::load(fs::path(LOOM_SOURCE_DIR) / "tests/fixtures/tokenizers/llama3-style");
  REQUIRE(tok);
  CHECK(tok->token_id("<|begin_of_text|>") == 0);
  CHECK_FALSE(tok->token_id("<|im_start|>").has_value());
  auto ids = loom::encode_chat(*tok, {{true, "<|begin_of_text|>"}, {false, "Hello world"}, {true, "<|end_of_text|>"}});
  auto text = tok->encode("Hello world", false);
  REQUIRE(ids.size() == text.size() + 2);
  CHECK(ids.front() == 0);
  CHECK(ids.back() == 1);
  CHECK_THROWS_WITH(loom::encode_chat(*tok, loom::render_chat(ChatFamily::chatml, kConversation, true)),
                    Catch::Contains("the tokenizer has no token <|im_start|>"));
  auto kjv = loom::Tokenizer::load(fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv");
  CHECK(kjv->token_id("<s>") == 1);
  CHECK_FALSE(kjv->token_id("<|eot_id|>").has_value());
}

TEST_CASE("the family comes from tokenizer_config.json when asked for auto", "[chat]") {
  fs::path dir = fs::temp_directory_path() / "loom-chat-test";
  fs::create_directories(dir);
  CHECK(loom::detect_chat_family(dir) == ChatFamily::plain);
  std::ofstream(dir / "tokenizer_config.json") << R"({"chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}"})";
  CHECK(loom::detect_chat_family(dir) == ChatFamily::chatml);
  std::ofstream(dir / "tokenizer_config.json") << R"({"chat_template": "<|start_header_id|>"})";
  CHECK(loom::detect_chat_family(dir) == ChatFamily::llama3);
  std::ofstream(dir / "tokenizer_config.json") << "[[[";
  CHECK_THROWS_WITH(loom::detect_chat_family(dir), Catch::Contains("tokenizer_config.json: not a JSON object"));
  fs::remove_all(dir);
}

TEST_CASE("a run can take a conversation instead of a prompt", "[chat][pipeline]") {
  const std::string model = (fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv").string();
  const std::string base = "[model]\npath = \"" + model + "\"\n[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n";
  auto rt = loom::Runtime::from_string(base + "[run]\nsteps = 5\nchat_template = \"plain\"\n"
                                              "messages = [{ role = \"user\", content = \"Who made the heaven?\" }]\n");
  auto expected = loom::Tokenizer::load(model)->encode("user: Who made the heaven?\nassistant:", false);
  CHECK(rt->prompt() == expected);
  CHECK(rt->run().tokens.size() == 5);
  CHECK_THROWS_WITH(loom::Runtime::from_string(base + "[run]\nchat_template = \"llama3\"\nmessages = [{ role = \"user\", content = \"x\" }]\n"),
                    Catch::Contains("run.messages (llama3 template): chat template: the tokenizer has no token <|begin_of_text|>"));
  CHECK_THROWS_WITH(loom::Runtime::from_string(base + "[run]\nprompt = \"x\"\nmessages = [{ role = \"user\", content = \"x\" }]\n"),
                    Catch::Contains("give either prompt or messages, not both"));
  CHECK_THROWS_WITH(loom::Runtime::from_string(base + "[run]\nmessages = [{ role = \"bot\", content = \"x\" }]\n"),
                    Catch::Contains("run.messages[0].role: expected system, user or assistant"));
  CHECK_THROWS_WITH(loom::Runtime::from_string(base + "[run]\nchat_template = \"jinja\"\nmessages = [{ role = \"user\", content = \"x\" }]\n"),
                    Catch::Contains("run.chat_template: expected auto, llama3, chatml, mistral or plain"));
}
