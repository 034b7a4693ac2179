#include "logprobs_json.hpp"

#include <algorithm>
#include <cmath>

namespace loom::server {

namespace {

using json = nlohmann::json;

double finite(float logprob) { return std::isfinite(logprob) ? static_cast<double>(logprob) : -9999.0; }

// Valid UTF-8, each malformed or cut sequence a U+FFFD (so that two pieces that both become
// U+FFFD are seen to be one key before JSON writes them).
std::string valid_utf8(const std::string &s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    bool ok = n > 0 && i + n <= s.size();
    for (size_t k = 1; ok && k < n; ++k) ok = (static_cast<unsigned char>(s[i + k]) >> 6) == 0x2;
    if (ok) {
      out.append(s, i, n);
      i += n;
    } else {
      out += "\xef\xbf\xbd";
      ++i;
    }
  }
  return out;
}

size_t characters(const std::string &text, size_t bytes) {
  size_t n = 0;
  for (size_t i = 0; i < bytes && i < text.size(); ++i) n += (static_cast<unsigned char>(text[i]) >> 6) != 0x2;
  return n;
}

// The bytes token `id` adds, or `in_text` (its text in the reply) when it has none of its own.
std::string bytes_of_token(const Runtime &runtime, int32_t id, const std::string &in_text = "") {
  const std::optional<std::string> bytes = runtime.token_bytes(id);
  if (!bytes) return "token_id:" + std::to_string(id);
  return bytes->empty() ? in_text : *bytes;
}

json byte_list(const std::string &text) {
  json out = json::array();
  for (unsigned char c : text) out.push_back(static_cast<int>(c));
  return out;
}

// Token i's text in the reply (empty where it completes nothing, or past the text).
std::string text_in_reply(const TokenTexts &texts, const std::string &text, size_t i) {
  const size_t from = std::min(texts.begin(i), text.size()), to = std::min(texts.begin(i + 1), text.size());
  return to > from ? text.substr(from, to - from) : std::string();
}

} // namespace

void TokenTexts::extend(std::span<const TokenLogprob> tokens) {
  while (ids_.size() < tokens.size()) {
    ids_.push_back(tokens[ids_.size()].token);
    const size_t length = runtime_.has_tokenizer() ? runtime_.continuation(prompt_, ids_, {}, nullptr, 0, &text_).size() : 0;
    // (A character cut between tokens decodes as U+FFFD until its last byte comes: keep the
    // offsets from going back.)
    offsets_.push_back(std::max(offsets_.back(), length));
  }
}

size_t TokenTexts::within(size_t text_bytes, bool whole) const {
  if (!runtime_.has_tokenizer()) return measured(); // no text: every token
  size_t n = 0;
  while (n < measured() && offsets_[n] < text_bytes && (!whole || offsets_[n + 1] <= text_bytes)) ++n;
  return n;
}

json chat_logprobs(const Runtime &runtime, std::span<const TokenLogprob> tokens, const TokenTexts &texts,
                   const std::string &text, size_t begin, size_t end) {
  json content = json::array();
  for (size_t i = begin; i < end && i < tokens.size() && i < texts.measured(); ++i) {
    const TokenLogprob &t = tokens[i];
    const std::string token = bytes_of_token(runtime, t.token, text_in_reply(texts, text, i));
    json top = json::array();
    for (const auto &[id, logprob] : t.top) {
      const std::string alt = bytes_of_token(runtime, id);
      top.push_back({{"token", alt}, {"logprob", finite(logprob)}, {"bytes", byte_list(alt)}});
    }
    content.push_back({{"token", token}, {"logprob", finite(t.logprob)}, {"bytes", byte_list(token)}, {"top_logprobs", top}});
  }
  return {{"content", content}, {"refusal", nullptr}};
}

// The (first `limit`) alternatives and the token itself, as OpenAI lists them (an object: clients
// read the values, JSON keeps no order); two ids whose texts are one key: the likelier.
json top_object(const Runtime &runtime, const TokenLogprob &t, const std::string &token, size_t limit = kMaxTopLogprobs) {
  json top = json::object();
  for (const auto &[id, logprob] : std::span(t.top).first(std::min(limit, t.top.size()))) {
    const std::string alt = valid_utf8(bytes_of_token(runtime, id));
    if (!top.contains(alt)) top[alt] = finite(logprob);
  }
  const std::string own = valid_utf8(token);
  if (!top.contains(own)) top[own] = finite(t.logprob);
  return top;
}

json completion_logprobs(const Runtime &runtime, std::span<const TokenLogprob> tokens, const TokenTexts &texts,
                         const std::string &text, size_t begin, size_t end) {
  json out = {{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()},
              {"text_offset", json::array()}};
  for (size_t i = begin; i < end && i < tokens.size() && i < texts.measured(); ++i) {
    const TokenLogprob &t = tokens[i];
    const std::string token = bytes_of_token(runtime, t.token, text_in_reply(texts, text, i));
    out["tokens"].push_back(token);
    out["token_logprobs"].push_back(finite(t.logprob));
    out["top_logprobs"].push_back(top_object(runtime, t, token));
    out["text_offset"].push_back(characters(text, texts.begin(i)));
  }
  return out;
}

json with_prompt_logprobs(const Runtime &runtime, const std::vector<int32_t> &prompt, std::span<const TokenLogprob> entries,
                          size_t top, const std::string &echo, json reply) {
  json out = {{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()},
              {"text_offset", json::array()}};
  // Each prompt token as the text has it: what it adds to the text of the few tokens before it
  // (kContext: enough for a tokenizer's spacing and a cut UTF-8 character, and linear in the
  // prompt's length; a sentencepiece word starting the prompt loses its space), so that the
  // entries add up to the decoded prompt; where it begins: the characters of the entries before.
  // Its key among the alternatives is its bytes, as theirs are.
  constexpr size_t kContext = 8;
  size_t offset = 0;
  for (size_t i = 0; i < prompt.size(); ++i) {
    const auto lo = static_cast<std::ptrdiff_t>(i > kContext ? i - kContext : 0);
    const std::string piece = runtime.has_tokenizer()
                                  ? runtime.continuation(std::vector<int32_t>(prompt.begin() + lo, prompt.begin() + static_cast<std::ptrdiff_t>(i)),
                                                         {prompt[i]}, {})
                                  : std::string();
    const std::string token = runtime.has_tokenizer() ? piece : bytes_of_token(runtime, prompt[i]);
    out["tokens"].push_back(token);
    out["text_offset"].push_back(offset);
    offset += characters(token, token.size());
    if (i == 0 || i - 1 >= entries.size()) {
      out["token_logprobs"].push_back(nullptr);
      out["top_logprobs"].push_back(nullptr);
      continue;
    }
    const TokenLogprob &t = entries[i - 1];
    out["token_logprobs"].push_back(finite(t.logprob));
    out["top_logprobs"].push_back(top_object(runtime, t, bytes_of_token(runtime, prompt[i], piece), top));
  }
  if (reply.is_null()) return out;
  offsets_after_echo(reply, echo);
  for (const char *key : {"tokens", "token_logprobs", "top_logprobs", "text_offset"})
    for (json &v : reply[key]) out[key].push_back(std::move(v));
  return out;
}

void offsets_after_echo(json &logprobs, const std::string &echo) {
  if (logprobs.is_null()) return;
  const size_t shift = characters(echo, echo.size());
  for (json &o : logprobs["text_offset"]) o = o.get<size_t>() + shift;
}

json vllm_prompt_logprobs(const Runtime &runtime, const std::vector<int32_t> &prompt, std::span<const TokenLogprob> entries,
                          size_t top) {
  json out = json::array();
  if (!prompt.empty()) out.push_back(nullptr);
  for (size_t i = 0; i < entries.size() && i + 1 < prompt.size(); ++i) {
    const TokenLogprob &t = entries[i];
    json position = json::object();
    for (size_t k = 0; k < t.top.size() && k < top; ++k)
      position[std::to_string(t.top[k].first)] = {{"logprob", finite(t.top[k].second)}, {"rank", k + 1},
                                                  {"decoded_token", valid_utf8(bytes_of_token(runtime, t.top[k].first))}};
    const std::string own = std::to_string(t.token);
    if (!position.contains(own))
      position[own] = {{"logprob", finite(t.logprob)}, {"rank", t.rank}, {"decoded_token", valid_utf8(bytes_of_token(runtime, t.token))}};
    out.push_back(std::move(position));
  }
  return out;
}

} // namespace loom::server
