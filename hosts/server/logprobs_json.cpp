#include "logprobs_json.hpp"

#include <string>

namespace loom::server {

namespace {

using json = nlohmann::json;

std::string text_of(const Runtime &runtime, int32_t token) {
  std::optional<std::string> bytes = runtime.token_bytes(token);
  return bytes ? *bytes : "token_id:" + std::to_string(token);
}

json bytes_of(const std::string &text) {
  json out = json::array();
  for (unsigned char c : text) out.push_back(static_cast<int>(c));
  return out;
}

} // namespace

std::vector<size_t> token_offsets(const Runtime &runtime, std::span<const TokenLogprob> tokens) {
  std::vector<size_t> offsets(1, 0);
  for (const TokenLogprob &t : tokens) {
    const std::optional<std::string> bytes = runtime.token_bytes(t.token);
    offsets.push_back(offsets.back() + (bytes ? bytes->size() : 0));
  }
  return offsets;
}

size_t tokens_within(const std::vector<size_t> &offsets, size_t text_bytes) {
  size_t n = 0;
  while (n + 1 < offsets.size() && offsets[n] < text_bytes) ++n;
  return n;
}

json chat_logprobs(const Runtime &runtime, std::span<const TokenLogprob> tokens, size_t begin, size_t end) {
  json content = json::array();
  for (size_t i = begin; i < end && i < tokens.size(); ++i) {
    const TokenLogprob &t = tokens[i];
    const std::string text = text_of(runtime, t.token);
    json top = json::array();
    for (const auto &[id, logprob] : t.top) {
      const std::string alt = text_of(runtime, id);
      top.push_back({{"token", alt}, {"logprob", logprob}, {"bytes", bytes_of(alt)}});
    }
    content.push_back({{"token", text}, {"logprob", t.logprob}, {"bytes", bytes_of(text)}, {"top_logprobs", top}});
  }
  return {{"content", content}, {"refusal", nullptr}};
}

json completion_logprobs(const Runtime &runtime, std::span<const TokenLogprob> tokens, const std::vector<size_t> &offsets,
                         size_t begin, size_t end) {
  json out = {{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()},
              {"text_offset", json::array()}};
  for (size_t i = begin; i < end && i < tokens.size(); ++i) {
    const TokenLogprob &t = tokens[i];
    out["tokens"].push_back(text_of(runtime, t.token));
    out["token_logprobs"].push_back(t.logprob);
    json top = json::object();
    for (const auto &[id, logprob] : t.top) {
      const std::string alt = text_of(runtime, id);
      if (!top.contains(alt)) top[alt] = logprob; // (two ids with one text: the likelier)
    }
    out["top_logprobs"].push_back(top);
    out["text_offset"].push_back(i < offsets.size() ? offsets[i] : 0);
  }
  return out;
}

} // namespace loom::server
