// The text that generated tokens add to a prompt, decoded in context but without decoding the
// whole prompt and reply again for every token (the engine checks stop strings after each token,
// the server streams after each; both used to decode prompt + reply each time, so a step cost
// time in proportion to the prompt).
//
// The text of tokens [from, end) is decoded with a few tokens before `from` as context (their
// spacing and their UTF-8 bytes) and the context's own text taken off; a checkpoint (the text
// of the first k generated tokens, kept where that text ends cleanly: a whole UTF-8 character,
// no U+FFFD, no trailing whitespace) lets the next call decode only from there on. For
// tokenizers whose text of a token depends only on a few tokens before it (sentencepiece,
// byte-level BPE), this gives the text decoding prompt + reply at once gives, byte for byte.
//
// Ownership: a ContinuationCache belongs to one sequence (one prompt, a growing reply); reset it
// (or use a new one) for another. Thread-safety: a cache is not synchronised; the tokenizer's
// decode is const.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "loom/core/tokenizer.hpp"

namespace loom {

struct ContinuationCache {
  size_t tokens = 0;  // generated tokens (as passed: stop tokens already left out) whose text is `text`
  std::string text;
};

// The text `generated` adds after `prompt`. `cache` (may be null) is read when it describes a
// prefix of `generated` and moved forward when the text ends cleanly.
std::string continuation_text(const Tokenizer &tokenizer, std::span<const int32_t> prompt,
                              std::span<const int32_t> generated, ContinuationCache *cache);

}  // namespace loom
