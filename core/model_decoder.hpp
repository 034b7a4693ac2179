// Private to core: what `loom run` drives: the generation loop, the same for every backend.
//
// The model is either a Hugging Face model directory ([model] path: Llama, Qwen2, Mistral or
// GPT-2 weights, checked against their config) or, without [model], a Llama-shaped model with
// seeded random weights of the [run] geometry. The forward pass is a ModelBackend's
// (make_backend picks it for the runtime's device; it owns the weights, the KV cache, the
// quantizer's weights and the adapter sites); the decoder owns the prompts, the tokenizer, the
// parallel plugin's all-reduce of the logits, the sampler chain, stop tokens and strings,
// streaming callbacks and timing.
//
// A run is a batch: the prompts of [run] prompts (or the one prompt) are prefilled in one ragged
// forward pass, then decoded together, one token per active sequence per step; a sequence that
// stops (a stop token or string) leaves the batch and the rest go on, up to `steps` tokens each.
// Sequence s owns KV slot s and sampler seq_id s; every row's RNG is (seed, step), so a
// sequence's tokens do not depend on the other sequences in the batch.
//
// Ownership: borrows the manifest and pipeline; the Runtime keeps one decoder (and so one
// backend) for its lifetime, so quantized weights and adapter sites are made once.
// Thread-safety: one thread drives it; swaps from other threads land between steps.
#pragma once

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "loom/core/model_config.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/tokenizer.hpp"
#include "loom/core/vocabulary.hpp"
#include "loom/loom_plugin_api.h"
#include "model_backend.hpp"

namespace loom {

class ModelDecoder {
 public:
  // `vocabulary` (optional) receives the model's tokenizer, for plugins that ask the host for it.
  ModelDecoder(const Manifest &manifest, Pipeline &pipeline, DLDevice device, const std::atomic<bool> &cancelled,
               VocabularySlot *vocabulary = nullptr);
  ~ModelDecoder();
  ModelDecoder(const ModelDecoder &) = delete;
  ModelDecoder &operator=(const ModelDecoder &) = delete;

  void retrieve(RunResult &result);
  void call_tools(RunResult &result);
  void generate(int64_t steps, const TokenCallback &on_token, const SequenceTokenCallback &on_sequence_token,
                RunResult &result);
  const ModelConfig &config() const { return config_; }
  std::optional<std::string> decode(const std::vector<int32_t> &ids) const;
  const std::vector<std::vector<int32_t>> &prompts() const { return prompts_; }
  std::string backend_description() const { return backend_->describe(); }

 private:
  // One prompt's token ids from its text or ids; `key` names it in errors.
  std::vector<int32_t> encode_prompt(const std::string &text, const std::vector<int32_t> &ids, const std::string &key,
                                     const std::string &tokenizer_error) const;
  // The text `generated` adds after `prompt` into *text, cut before the first stop string;
  // true when a stop string was found. Needs the tokenizer.
  bool generated_text(const std::vector<int32_t> &prompt, const std::vector<int32_t> &generated, std::string *text) const;
  // Samples one token for each row of `logits` [rows, vocab]; rows[r] is the sequence of row r.
  void sample(DLTensor *logits, const std::vector<int32_t> &rows, const std::vector<std::vector<int32_t>> &histories,
              uint64_t step, std::vector<int32_t> &tokens);
  void all_reduce(DLTensor *logits);
  // Beam search (core/beam_search.cpp): generate() when the chain's last link has
  // LOOM_SAMPLER_BEAMS.
  bool beam_chain() const;
  void generate_beams(int64_t steps, const TokenCallback &on_token, const SequenceTokenCallback &on_sequence_token,
                      RunResult &result);

  const Manifest &manifest_;
  Pipeline &pipeline_;
  const std::atomic<bool> &cancelled_;
  ModelConfig config_;
  std::unique_ptr<ModelBackend> backend_;
  std::shared_ptr<const Tokenizer> tokenizer_;          // null when the model has none
  std::vector<std::vector<int32_t>> prompts_;    // token ids, one per sequence
  std::vector<int32_t> stop_tokens_;
};

} // namespace loom
