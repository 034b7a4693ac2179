// The `logprobs` of an OpenAI response choice, from the engine's per-token log-probabilities
// (loom::TokenLogprob, ServeRequest::logprobs): chat's {"content": [{token, logprob, bytes,
// top_logprobs}]} and the completions API's {tokens, token_logprobs, top_logprobs, text_offset}.
//
// Where each token's text begins is measured on the text itself: the generated text of the
// first k tokens (Runtime::continuation, as the reply's text is made), so special tokens,
// unknown pieces and characters cut between tokens land where the reply has them. The entries
// cover the tokens that begin inside the returned text: a stop string cuts the text, and the
// tokens wholly past the cut (and an end token at the end, which adds no text) are not listed.
// A token's `token` is the bytes it adds (Runtime::token_bytes; a piece of a UTF-8 character is
// sent with U+FFFD there and exactly in `bytes`), or its text in the reply when it has no bytes
// of its own (special tokens); "token_id:N" without a tokenizer. Log-probabilities that are not
// finite (a -inf alternative, a NaN row) are sent as -9999.0, as vLLM does: JSON has no
// infinities, and clients add them up.
//
// Thread-safety: a TokenTexts belongs to one reader; Runtime's calls are safe from any thread.
#pragma once

#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom/core/runtime.hpp"

namespace loom::server {

// Where the tokens of one reply begin in its text, extended as tokens come (each new token
// decodes the reply's last tokens: continuation_text.hpp).
class TokenTexts {
 public:
  TokenTexts(const Runtime &runtime, std::vector<int32_t> prompt) : runtime_(runtime), prompt_(std::move(prompt)) {}
  // Measures the tokens of `tokens` not measured yet.
  void extend(std::span<const TokenLogprob> tokens);
  size_t measured() const { return offsets_.size() - 1; }
  // Byte offset in the text where token i begins (i <= measured(): the end of the last).
  size_t begin(size_t i) const { return offsets_[i]; }
  // How many tokens begin before byte `text_bytes`; with `whole`, of those the ones that also
  // end there (a streamed chunk lists the tokens whose text it completes).
  size_t within(size_t text_bytes, bool whole) const;

 private:
  const Runtime &runtime_;
  std::vector<int32_t> prompt_, ids_;
  std::vector<size_t> offsets_{0};
  ContinuationCache text_;  // the text of ids_ so far (each token measured without decoding them all)
};

// Entries [begin, end) of `tokens` (measured by `texts`) in the chat format ({"content": [...],
// "refusal": null}), or the completions format (text_offset in characters of `text`, the reply).
nlohmann::json chat_logprobs(const Runtime &runtime, std::span<const TokenLogprob> tokens, const TokenTexts &texts,
                             const std::string &text, size_t begin, size_t end);
nlohmann::json completion_logprobs(const Runtime &runtime, std::span<const TokenLogprob> tokens, const TokenTexts &texts,
                                   const std::string &text, size_t begin, size_t end);

// Completions' echo with logprobs: the entries of the prompt's tokens (from
// SequenceResult::prompt_logprobs, which has one per token after the first) before those of the
// reply (`reply`, from completion_logprobs, whose text_offset then moves past `echo`). The first
// prompt token has no log-probability: null, and null alternatives, as OpenAI sends it. A
// prompt token's entry in `tokens` is the text it adds to the decoded prompt (so that they add
// up to it: the prompt's text when given as text, unless the tokenizer does not give it back
// byte for byte), its text_offset measured there.
// Each entry lists at most `top` of its alternatives (the engine may have computed more). A null
// `reply`: the prompt's entries alone (a stream's echo chunk, sent before the reply's tokens).
nlohmann::json with_prompt_logprobs(const Runtime &runtime, const std::vector<int32_t> &prompt,
                                    std::span<const TokenLogprob> entries, size_t top, const std::string &echo,
                                    nlohmann::json reply);

// Moves the text_offset entries of completions-format `logprobs` past `echo` (the reply's
// offsets in a text that begins with the echoed prompt). Nothing for null.
void offsets_after_echo(nlohmann::json &logprobs, const std::string &echo);

// vLLM's `prompt_logprobs` of a choice: null for the first prompt token, then per token an
// object keyed by token id (as a string) of {logprob, rank, decoded_token}: the prompt's token
// and the `top` most likely alternatives (of those the entries hold).
nlohmann::json vllm_prompt_logprobs(const Runtime &runtime, const std::vector<int32_t> &prompt,
                                    std::span<const TokenLogprob> entries, size_t top);

} // namespace loom::server
