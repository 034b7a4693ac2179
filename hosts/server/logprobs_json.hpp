// The `logprobs` of an OpenAI response choice, from the engine's per-token log-probabilities
// (loom::TokenLogprob, ServeRequest::logprobs): chat's {"content": [{token, logprob, bytes,
// top_logprobs}]} and the completions API's {tokens, token_logprobs, top_logprobs, text_offset}.
//
// A token's text is the bytes it adds to the text (Runtime::token_bytes; part of a UTF-8
// character for byte-level pieces, sent with U+FFFD in `token` and exactly in `bytes`);
// "token_id:N" when the model has no tokenizer. The entries cover the tokens that begin inside
// the returned text: a stop string cuts the text, and the tokens wholly past the cut (and a stop
// token at the end, which adds no text) are not listed.
//
// Thread-safety: pure functions of their arguments (Runtime's token_bytes is safe from any thread).
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom/core/runtime.hpp"

namespace loom::server {

// Byte offsets of each token's text in the generated text: entry i where token i begins, and one
// more, where the last ends.
std::vector<size_t> token_offsets(const Runtime &runtime, std::span<const TokenLogprob> tokens);
// How many of the tokens begin before `text_bytes` (the returned text's length).
size_t tokens_within(const std::vector<size_t> &offsets, size_t text_bytes);
// Entries [begin, end) of `tokens` in the chat format ({"content": [...], "refusal": null}).
nlohmann::json chat_logprobs(const Runtime &runtime, std::span<const TokenLogprob> tokens, size_t begin, size_t end);
// The same in the completions format; text_offset from `offsets` (token_offsets of all tokens).
nlohmann::json completion_logprobs(const Runtime &runtime, std::span<const TokenLogprob> tokens,
                                   const std::vector<size_t> &offsets, size_t begin, size_t end);

} // namespace loom::server
