// The text that generated tokens add to a prompt, decoded in context but without decoding the
// whole prompt and reply again for every token (the engine checks stop strings after each token,
// the server streams after each; both used to decode prompt + reply each time, so a step cost
// time in proportion to the prompt).
//
// The text of tokens [from, end) is decoded with a few tokens before `from` as context (their
// spacing and their UTF-8 bytes) and the context's own text taken off; a checkpoint (the text
// of the first k generated tokens, kept where that text ends cleanly: a whole UTF-8 character,
// no U+FFFD, no trailing whitespace) lets the next call decode only from there on. For
// tokenizers whose text of a token depends only on a few tokens before it (sentencepiece models
// without a denormalizer, which would rewrite the whole text; Loom's byte-level BPE), this gives
// the text decoding prompt + reply at once gives, byte for byte. What a call still does in
// proportion to the reply: a copy of its text so far (the caller's stop-string search scans it
// too), and a decode from the last checkpoint where the text has not ended cleanly since.
//
// Ownership: a ContinuationCache belongs to one sequence (one prompt, a reply that only grows,
// or is cut back below the checkpoint); reset it (or use a new one) for anything else: the
// cache's tokens are not compared with `generated`. Thread-safety: a cache is not synchronised;
// the tokenizer's decode is const.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "loom/core/tokenizer.hpp"

namespace loom {

struct ContinuationCache {
  size_t tokens = 0;  // generated tokens (as passed: stop tokens already left out) whose text is `text`
  std::string text;
};

// The text `generated` adds after `prompt`. `cache` (may be null): its text is taken as that of
// generated's first cache->tokens tokens (reset when `generated` is shorter), and moved forward
// when the text ends cleanly.
std::string continuation_text(const Tokenizer &tokenizer, std::span<const int32_t> prompt,
                              std::span<const int32_t> generated, ContinuationCache *cache);

// Bytes of `text` before a UTF-8 sequence left incomplete at its end (a lead byte with fewer
// continuation bytes than it announces): all of it when it ends on a whole character.
size_t complete_utf8_prefix(std::string_view text);

}  // namespace loom
