#include "loom/core/chat_template.hpp"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "json_guard.hpp"
#include "loom/core/error.hpp"

namespace loom {

namespace {

std::string trim(const std::string &s) {
  size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? std::string() : s.substr(a, b - a + 1);
}

void check_roles(const std::vector<ChatMessage> &messages) {
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto &r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant")
      throw runtime_error("messages[" + std::to_string(i) + "].role: '" + r + "' is not system, user or assistant");
  }
}

} // namespace

std::vector<ChatSegment> render_chat(ChatFamily family, const std::vector<ChatMessage> &messages,
                                     bool add_generation_prompt) {
  check_roles(messages);
  std::vector<ChatSegment> out;
  auto special = [&](const char *t) { out.push_back({true, t}); };
  auto text = [&](std::string t) {
    if (t.empty()) return;
    if (!out.empty() && !out.back().special) out.back().text += t;
    else out.push_back({false, std::move(t)});
  };
  switch (family) {
  case ChatFamily::llama3:
    special("<|begin_of_text|>");
    for (const auto &m : messages) {
      special("<|start_header_id|>");
      text(m.role);
      special("<|end_header_id|>");
      text("\n\n" + trim(m.content));
      special("<|eot_id|>");
    }
    if (add_generation_prompt) {
      special("<|start_header_id|>");
      text("assistant");
      special("<|end_header_id|>");
      text("\n\n");
    }
    break;
  case ChatFamily::chatml:
    for (const auto &m : messages) {
      special("<|im_start|>");
      text(m.role + "\n" + m.content);
      special("<|im_end|>");
      text("\n");
    }
    if (add_generation_prompt) {
      special("<|im_start|>");
      text("assistant\n");
    }
    break;
  case ChatFamily::mistral: {
    std::string system;
    size_t first = 0;
    if (!messages.empty() && messages[0].role == "system") {
      system = messages[0].content;
      first = 1;
    }
    special("<s>");
    for (size_t i = first; i < messages.size(); ++i) {
      const auto &m = messages[i];
      bool user_turn = (i - first) % 2 == 0;
      if ((m.role == "user") != user_turn)
        throw runtime_error("messages[" + std::to_string(i) + "]: mistral conversations alternate user and assistant");
      if (user_turn) {
        text("[INST] " + (i == first && !system.empty() ? system + "\n\n" : std::string()) + m.content + " [/INST]");
      } else {
        text(m.content);
        special("</s>");
      }
    }
    break; // the model answers after [/INST]: no separate generation prompt
  }
  case ChatFamily::plain:
    for (const auto &m : messages) text(m.role + ": " + m.content + "\n");
    if (add_generation_prompt) text("assistant:");
    break;
  }
  return out;
}

ChatFamily detect_chat_family(const std::filesystem::path &model_dir) {
  std::filesystem::path path = model_dir / "tokenizer_config.json";
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec) || std::filesystem::file_size(path, ec) > (64u << 20)) return ChatFamily::plain;
  std::ifstream in(path, std::ios::binary);
  std::ostringstream buf;
  buf << in.rdbuf();
  if (detail::json_too_deep(buf.str(), 64)) throw runtime_error(path.string() + ": JSON nested deeper than 64 levels");
  auto j = nlohmann::json::parse(buf.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw runtime_error(path.string() + ": not a JSON object");
  auto t = j.find("chat_template");
  if (t == j.end() || !t->is_string()) return ChatFamily::plain;
  const std::string &tmpl = t->get_ref<const std::string &>();
  if (tmpl.find("<|start_header_id|>") != std::string::npos) return ChatFamily::llama3;
  if (tmpl.find("<|im_start|>") != std::string::npos) return ChatFamily::chatml;
  if (tmpl.find("[INST]") != std::string::npos) return ChatFamily::mistral;
  return ChatFamily::plain;
}

std::optional<ChatFamily> chat_family_from_name(std::string_view name) {
  if (name == "llama3") return ChatFamily::llama3;
  if (name == "chatml") return ChatFamily::chatml;
  if (name == "mistral") return ChatFamily::mistral;
  if (name == "plain") return ChatFamily::plain;
  return std::nullopt;
}

const char *chat_family_name(ChatFamily family) {
  switch (family) {
  case ChatFamily::llama3: return "llama3";
  case ChatFamily::chatml: return "chatml";
  case ChatFamily::mistral: return "mistral";
  case ChatFamily::plain: return "plain";
  }
  return "?";
}

std::vector<int32_t> encode_chat(const Tokenizer &tokenizer, const std::vector<ChatSegment> &segments) {
  std::vector<int32_t> ids;
  for (const auto &s : segments) {
    if (s.special) {
      auto id = tokenizer.token_id(s.text);
      if (!id) throw runtime_error("chat template: the tokenizer has no token " + s.text);
      ids.push_back(*id);
    } else {
      auto piece = tokenizer.encode(s.text, false);
      ids.insert(ids.end(), piece.begin(), piece.end());
    }
  }
  return ids;
}

} // namespace loom
