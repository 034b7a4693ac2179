// OpenAI-style request bodies (/v1/completions, /v1/chat/completions, /v1/embeddings) parsed
// and checked into plain structs, and the errors a client gets back.
//
// Everything a client sends is untrusted: the parser never throws anything but ApiError (a 4xx
// with an OpenAI-style body naming the field), bounds every number, and refuses parameters Loom
// does not implement instead of ignoring them silently.
// Thread-safety: pure functions over their arguments.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "tool_calls.hpp"

namespace loom::server {

// A request the server refuses: HTTP status, OpenAI's error `type`, the offending field (`param`,
// "" when none) and a message. Serialised by error_body().
struct ApiError : std::runtime_error {
  int status;
  std::string type, param;
  ApiError(int status_, std::string message, std::string param_ = {}, std::string type_ = "invalid_request_error")
      : std::runtime_error(std::move(message)), status(status_), type(std::move(type_)), param(std::move(param_)) {}
};

// {"error": {"message", "type", "param", "code"}} (param and code null when empty).
std::string error_body(const ApiError &e);

enum class ResponseFormat { text, json_object, json_schema };

// A completion or chat completion, after checking.
struct GenerationParams {
  bool chat = false;
  std::string model;
  // Completions: one or more prompts (text, or token ids); chat: the conversation.
  std::vector<std::string> prompt_texts;
  std::vector<std::vector<int32_t>> prompt_ids;
  std::vector<std::pair<std::string, std::string>> messages; // (role, content)
  std::optional<int64_t> max_tokens;
  int64_t n = 1;
  std::vector<std::string> stop;
  std::optional<double> temperature, top_p;
  double frequency_penalty = 0, presence_penalty = 0;
  // vLLM's extensions: top_k (0: off), min_p (0: off), repetition_penalty (1: off), ignore_eos
  // (the model's end tokens do not end the reply).
  int64_t top_k = 0;
  double min_p = 0, repetition_penalty = 1.0;
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids; // more tokens that end the reply (left out of its text)
  int64_t min_tokens = 0;              // no end token, and no stop string ending, before this many tokens
  std::optional<uint64_t> seed;
  std::vector<std::pair<int32_t, double>> logit_bias; // token id, bias in [-100, 100]
  ResponseFormat format = ResponseFormat::text;
  std::string schema_json; // json_schema: the schema (compact JSON)
  std::string grammar;     // a GBNF grammar the reply must follow (guided_choice, guided_grammar, grammar)
  // The request field the reply's constraint came from (response_format, guided_json, ...), for errors.
  std::string constraint_param = "response_format";
  bool stream = false;
  bool include_usage = false; // stream_options.include_usage
  // Log-probabilities of the reply's tokens with this many alternatives (0-20); -1: none. Chat:
  // logprobs: true and top_logprobs; completions: logprobs.
  int32_t logprobs = -1;
  // vLLM's prompt_logprobs: the prompt's tokens' log-probabilities with this many alternatives
  // (0-20), in each choice's `prompt_logprobs`; -1: none.
  int32_t prompt_logprobs = -1;
  bool echo = false; // completions: the reply's text begins with the prompt's (with logprobs: and its tokens' entries)
  // Completions with echo and max_tokens 0: the prompt is scored (its log-probabilities), nothing
  // is generated.
  bool prompt_only() const { return echo && max_tokens && *max_tokens == 0; }
  // A constraint (response_format, guided_*, grammar, json_schema) shapes the reply.
  bool constrained() const { return format != ResponseFormat::text || !grammar.empty(); }
  // Chat function calling (tool_calls.hpp): the offered tools and how the model may use them.
  // With tools and a choice other than none, the tools are described in a system message (in
  // `messages` already) and the reply is parsed into tool_calls.
  std::vector<ToolDef> tools;
  ToolChoice tool_choice = ToolChoice::none;
  std::string tool_name; // ToolChoice::named
  // parallel_tool_calls: false keeps a reply's first call only (the model may still write
  // several blocks; the whole response and the stream both stop at the first call).
  bool parallel_tool_calls = true;
  bool uses_tools() const { return !tools.empty() && tool_choice != ToolChoice::none; }
  // The tools the reply may call (the named one, or all).
  std::vector<ToolDef> callable_tools() const;
  // tool_choice required or named: the reply is one bare call object (the json-schema sampler
  // makes it one).
  bool reply_is_call() const { return tool_choice == ToolChoice::required || tool_choice == ToolChoice::named; }
  // Whether the request asks for anything but the manifest's sampler chain (then it gets a chain
  // of its own, built by sampler_chain_tomls()).
  bool own_sampling() const;
};

// /tokenize and /detokenize, in vLLM's and llama.cpp's server's shapes. Tokenize: `prompt`
// (vLLM; special tokens added unless add_special_tokens is false), `content` (llama.cpp; added
// only with add_special: true), or chat `messages` (through the chat template, ending in the
// assistant's generation prompt); with_pieces (llama.cpp) asks for each token's text.
struct TokenizeParams {
  std::string model;
  std::string text;
  std::vector<std::pair<std::string, std::string>> messages; // (role, content), when given
  bool add_special = true;
  bool with_pieces = false;
};
TokenizeParams parse_tokenize(const std::string &body);
// Detokenize: `tokens`, ids within the vocabulary, and the optional `model`.
struct DetokenizeParams {
  std::string model;
  std::vector<int32_t> ids;
};
DetokenizeParams parse_detokenize(const std::string &body, int64_t vocab_size);

// Parses a /v1/completions (chat = false) or /v1/chat/completions body. `vocab_size` bounds
// token ids (prompt ids, logit_bias keys). Throws ApiError.
GenerationParams parse_generation(const std::string &body, bool chat, int64_t vocab_size);

// The sampler chain that carries out a request's sampling parameters, as component TOML texts
// for Runtime::make_samplers: logit-bias, the JSON constraint (json-schema or grammar),
// penalties, repetition-penalty, then greedy when temperature is 0, else temperature, top-k, top-p
// (when < 1), min-p and dist.
std::vector<std::string> sampler_chain_tomls(const GenerationParams &p);

// A /v1/embeddings body: `input` as one string or an array of strings.
struct EmbeddingParams {
  std::string model;
  std::vector<std::string> input;
  bool base64 = false; // encoding_format "base64": little-endian float32s
};
EmbeddingParams parse_embeddings(const std::string &body);

// A TOML basic string holding `s` (quotes, backslashes and control characters escaped).
std::string toml_quote(const std::string &s);

} // namespace loom::server
