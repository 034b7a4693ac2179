// Chat templates: a conversation rendered in a model family's format, then encoded with the
// family's special tokens as single ids (never spelled out as text).
//
// Families (the formats their reference templates produce):
//   llama3   <|begin_of_text|><|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>...
//            (content trimmed); the generation prompt opens an assistant header.
//   chatml   <|im_start|>ROLE\nCONTENT<|im_end|>\n... (Qwen2 and others); the generation prompt
//            is <|im_start|>assistant\n. No default system message is added.
//   mistral  <s>[INST] USER [/INST]ASSISTANT</s>[INST] ...; a system message is put before the
//            first user message, separated by a blank line; roles must alternate user/assistant.
//   plain    ROLE: CONTENT\n per message, then "assistant:" as the generation prompt; no special
//            tokens.
// `auto` picks the family from tokenizer_config.json's chat_template markers, else plain.
// Errors: loom::Error (runtime or manifest) naming the message or token. Thread-safety: pure
// functions.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "loom/core/tokenizer.hpp"

namespace loom {

enum class ChatFamily { llama3, chatml, mistral, plain };

struct ChatMessage {
  std::string role; // system, user or assistant
  std::string content;
};

// Text runs and special tokens, in order.
struct ChatSegment {
  bool special = false;
  std::string text; // a special token's text when `special`
};

std::vector<ChatSegment> render_chat(ChatFamily family, const std::vector<ChatMessage> &messages,
                                     bool add_generation_prompt);
// The family from <dir>/tokenizer_config.json's chat_template, or plain.
ChatFamily detect_chat_family(const std::filesystem::path &model_dir);
std::optional<ChatFamily> chat_family_from_name(std::string_view name); // "llama3", ...
const char *chat_family_name(ChatFamily family);
// Text runs through the tokenizer (no added BOS), special tokens by their ids.
std::vector<int32_t> encode_chat(const Tokenizer &tokenizer, const std::vector<ChatSegment> &segments);

} // namespace loom
