#include "loom/core/continuation_text.hpp"

#include <algorithm>
#include <string_view>
#include <vector>

namespace loom {
namespace {

// Tokens of context decoded before the first new token (more where they decode to nothing, such
// as a prompt ending in special tokens), and how many new tokens a checkpoint waits for.
constexpr size_t kContext = 16;
constexpr size_t kCheckpointEvery = 8;

// Whether `text` ends where the next token's text cannot change it: a complete UTF-8 character
// that is not U+FFFD (a character cut between byte tokens decodes as U+FFFD until its last byte)
// and not whitespace (a tokenizer may fold spaces into what follows).
bool ends_cleanly(std::string_view text) {
  if (text.empty()) return false;
  const auto last = static_cast<unsigned char>(text.back());
  if (last == ' ' || last == '\n' || last == '\t' || last == '\r') return false;
  return complete_utf8_prefix(text) == text.size() && !text.ends_with("\xEF\xBF\xBD");
}

}  // namespace

size_t complete_utf8_prefix(std::string_view text) {
  size_t back = 0;  // continuation bytes at the end
  while (back < 4 && back < text.size() && (static_cast<unsigned char>(text[text.size() - 1 - back]) & 0xC0) == 0x80)
    ++back;
  if (back < text.size()) {
    const auto lead = static_cast<unsigned char>(text[text.size() - 1 - back]);
    const size_t need = lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0;
    if (need > back) return text.size() - back - 1;
  }
  return text.size();
}

std::string continuation_text(const Tokenizer &tokenizer, std::span<const int32_t> prompt,
                              std::span<const int32_t> generated, ContinuationCache *cache) {
  if (cache && cache->tokens > generated.size()) *cache = {};  // (not a prefix: the reply was cut back)
  const size_t from = cache ? cache->tokens : 0;                // first generated token to decode
  // ids [a, b) of prompt + generated, without building the whole sequence.
  const auto slice = [&](size_t a, size_t b) {
    std::vector<int32_t> ids;
    ids.reserve(b - a);
    for (size_t i = a; i < b; ++i) ids.push_back(i < prompt.size() ? prompt[i] : generated[i - prompt.size()]);
    return ids;
  };
  const size_t start = prompt.size() + from, end = prompt.size() + generated.size();
  // The context: kContext tokens before `start`, widened (doubling) while it decodes to nothing.
  size_t width = kContext, c = start >= width ? start - width : 0;
  std::string before = tokenizer.decode(slice(c, start));
  while (before.empty() && c > 0) {
    width *= 2;
    c = start >= width ? start - width : 0;
    before = tokenizer.decode(slice(c, start));
  }
  const std::string whole = tokenizer.decode(slice(c, end));
  std::string added = whole.compare(0, before.size(), before) == 0 ? whole.substr(before.size())
                                                                    : tokenizer.decode(slice(start, end));
  std::string text = from > 0 ? cache->text + added : std::move(added);
  if (cache && generated.size() >= from + kCheckpointEvery && ends_cleanly(text)) {
    cache->tokens = generated.size();
    cache->text = text;
  }
  return text;
}

}  // namespace loom
