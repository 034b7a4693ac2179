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
// Decode ahead: when the backend can read a step's tokens from the device (CUDA) and the whole
// sampler chain runs there, the sampler leaves its tokens on the device, the decoder queues the
// next forward pass behind it at once (every row of this step, positions known), and only then
// waits for the tokens to reach the host, for stop rules, streaming and the histories; the GPU
// never waits for the host between steps. The queued step is redone the ordinary way (same
// positions, so its KV entries are overwritten) when a row stopped at this token or a swap
// landed in between, so results are those of the step-by-step loop.
//
// Ownership: borrows the manifest and pipeline; the Runtime keeps one decoder (and so one
// backend) for its lifetime, so quantized weights and adapter sites are made once.
// Thread-safety: one thread drives it; swaps from other threads land between steps.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <thread>
#include <optional>
#include <string>
#include <vector>

#include "loom/core/chat_template.hpp"
#include "loom/core/error.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/request_queue.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/sampler_chain.hpp"
#include "loom/core/tokenizer.hpp"
#include "loom/core/vocabulary.hpp"
#include "loom/loom_plugin_api.h"
#include "agent_loop.hpp"
#include "model_backend.hpp"

namespace loom {

// A served request's own stop rules (ServeRequest): the run's stop tokens ignored, more stop
// tokens, no stop token or stop string before min_tokens tokens.
struct RequestStops {
  bool ignore_run_tokens = false;
  std::span<const int32_t> more_tokens;
  int64_t min_tokens = 0;
};

class ModelDecoder {
 public:
  // `vocabulary` (optional) receives the model's tokenizer, for plugins that ask the host for it.
  ModelDecoder(const Manifest &manifest, Pipeline &pipeline, DLDevice device, const std::atomic<bool> &cancelled,
               VocabularySlot *vocabulary = nullptr);
  ~ModelDecoder();
  ModelDecoder(const ModelDecoder &) = delete;
  ModelDecoder &operator=(const ModelDecoder &) = delete;

  // The model's embeddings of `texts` as [embedding] says (Runtime::embed): `query` picks the
  // query prefix, else the document prefix. Runs on the backend (ModelBackend::embed), between
  // runs, under the step lock.
  std::vector<std::vector<float>> embed(const std::vector<std::string> &texts, bool query);
  void retrieve(RunResult &result);
  // RAG: when run.prompt (text) or a run.messages content holds {passages}, replaces it with the
  // retrieved passages (result.passages; numbered [1], [2], ... for citations) and {question}
  // with run.query, and makes that the prompt. Nothing otherwise.
  void place_passages(RunResult &result);
  // Serves the requests of `queue` as they arrive until it is closed and they have all ended
  // (core/serving.cpp; Runtime::serve). Needs [scheduler].
  SchedulerStats serve(RequestQueue &queue, int64_t max_positions);
  void call_tools(RunResult &result);
  // The agent loop ([agent]; core/agent_loop.cpp): turns of generation and tool calls, recorded
  // in result.agent_steps; the last turn's sequence is result's.
  void run_agent(const TokenCallback &on_token, RunResult &result);
  void generate(int64_t steps, const TokenCallback &on_token, const SequenceTokenCallback &on_sequence_token,
                RunResult &result);
  const ModelConfig &config() const { return config_; }
  // Hosts (Runtime::encode_text, encode_messages, continuation): a text prompt's ids (with BOS),
  // a conversation's ids through the manifest's chat template, and what `generated` adds to
  // `prompt` as text (cut at the first of `stops`; stop tokens left out). Need the tokenizer
  // (loom::Error otherwise); `key` names the input in errors.
  std::vector<int32_t> encode_text(const std::string &text, const std::string &key) const {
    return encode_prompt(text, {}, key, tokenizer_error_);
  }
  std::vector<int32_t> encode_messages(const std::vector<ChatMessage> &messages, const std::string &key) const;
  std::vector<int32_t> tokenize(std::string_view text, bool add_special) const {
    if (!tokenizer_) throw runtime_error("tokenize: the model has no tokenizer" + tokenizer_error_);
    return tokenizer_->encode(text, add_special);
  }
  std::string continuation(const std::vector<int32_t> &prompt, const std::vector<int32_t> &generated,
                           const std::vector<std::string> &stops, bool *stopped, int64_t min_tokens = 0,
                           ContinuationCache *cache = nullptr) const;
  bool has_tokenizer() const { return tokenizer_ != nullptr; }
  std::optional<std::string> decode(const std::vector<int32_t> &ids) const;
  std::optional<std::string> token_bytes(int32_t id) const {
    if (!tokenizer_) return std::nullopt;
    return tokenizer_->token_bytes(id);
  }
  const std::vector<std::vector<int32_t>> &prompts() const { return prompts_; }
  std::string backend_description() const { return backend_->describe(); }
  // [PEFT] adapters while serving (Runtime::load_adapter and friends). Requests choose an adapter
  // by its slot (ServeRequest::adapter); the decoder counts the live requests of each.
  // begin_unload: from now on requests naming `slot` are refused; returns once none of them is
  // live (they finish with the adapter), or throws loom::Error after `timeout_s` seconds (the
  // unload is then abandoned: end_unload). end_unload: `slot` may be named again (after a
  // reload, or when the unload failed).
  void begin_unload(const std::string &slot, double timeout_s);
  void end_unload(const std::string &slot);
  // Folds the adapter into the base weights / takes it out again (ModelBackend::merge_adapter),
  // at the next step boundary. Later requests' prefix-cache entries are kept apart from earlier
  // ones (the weights' rounding differs).
  void merge_adapter(const Instance &adapter, bool merge);
  bool runs_adapters() const { return backend_->runs_adapters(); }
  // `loom quantize`: the model with its linears as the pipeline's quantizer stores them, written
  // to dir (CpuBackend::export_quantized). CPU backend only.
  void export_quantized(const std::filesystem::path &dir);

 private:
  // One prompt's token ids from its text or ids; `key` names it in errors.
  std::vector<int32_t> encode_prompt(const std::string &text, const std::vector<int32_t> &ids, const std::string &key,
                                     const std::string &tokenizer_error) const;
  // The text `generated` adds after `prompt` into *text, cut before the first stop string;
  // true when a stop string was found. Needs the tokenizer.
  // `stops`: these stop strings instead of run.stop. `more_stop_tokens` (a request's
  // stop_token_ids) are left out of the text as the run's stop tokens are. `min_tokens`: a stop
  // string counts only where it ends in the text after the first min_tokens tokens (vLLM's
  // min_tokens holds stop strings back as it holds stop tokens).
  // `cache`: the sequence's (continuation_text.hpp), so that a call after each token decodes only
  // the reply's last tokens.
  bool generated_text(const std::vector<int32_t> &prompt, const std::vector<int32_t> &generated, std::string *text,
                      const std::vector<std::string> *stops = nullptr, std::span<const int32_t> more_stop_tokens = {},
                      int64_t min_tokens = 0, ContinuationCache *cache = nullptr) const;
  // Whether `token`, just appended to out.tokens, ends the sequence: a stop token, or one of
  // run.stop in its text (then *by_string is set and out.text holds the text). Sets out.stopped.
  bool hits_stop(const std::vector<int32_t> &prompt, SequenceResult &out, int32_t token, bool *by_string,
                 const std::vector<std::string> *stops = nullptr, const RequestStops &own = {},
                 ContinuationCache *cache = nullptr) const;
  bool is_stop_token(int32_t token) const {
    return std::find(stop_tokens_.begin(), stop_tokens_.end(), token) != stop_tokens_.end();
  }
  // Whether `token` is one of a request's stop tokens (the run's unless ignored, and its own).
  bool is_stop_token(int32_t token, const RequestStops &own) const {
    return (!own.ignore_run_tokens && is_stop_token(token)) ||
           std::find(own.more_tokens.begin(), own.more_tokens.end(), token) != own.more_tokens.end();
  }
  // The run's single-sequence fields (prompt, tokens, text, stopped) from its first sequence.
  static void take_first_sequence(RunResult &result);
  // Runs the sampler chain over `logits` [rows, vocab]; rows[r] is the sequence of row r and
  // row_history[r] its tokens so far (prompt then generated; valid for the call). With
  // `ahead` (the caller would queue the next step before the tokens reach the host), when the
  // logits are on the device, the whole chain runs there and its selecting link can leave the
  // tokens there (LOOM_SAMPLER_DEVICE_TOKENS), the tokens go to the backend's token feed
  // (ModelBackend::token_feed) and the call returns the feed: they are still to be read back.
  // Otherwise `tokens` holds them and it returns nullptr. Either way accept_tokens() follows
  // once they are known. LOOM_DECODE_AHEAD=0 turns `ahead` off.
  // `row_steps` (optional): each row's own RNG counter instead of `step` (the scheduler's rows
  // are at different steps of their sequences).
  int32_t *sample(DLTensor *logits, const std::vector<int32_t> &rows,
                  const std::vector<std::span<const int32_t>> &row_history, uint64_t step, std::vector<int32_t> &tokens, bool ahead,
                  const std::vector<uint64_t> *row_steps = nullptr,
                  const std::vector<std::shared_ptr<Instance>> *own_chain = nullptr,
                  const std::vector<uint64_t> *row_keys = nullptr);
  // The part of a sampling batch every call fills the same way: each row's sequence, history
  // and random numbers. Every row's RNG is (seed, step): a sequence samples exactly as it would
  // alone, whatever else is in the batch (so identical prompts in one batch sample alike).
  struct SamplingRows {
    std::vector<int64_t> seq_ids;
    std::vector<const int32_t *> history;
    std::vector<int32_t> history_len;
    std::vector<uint64_t> keys, counters;
    void add(int64_t seq, std::span<const int32_t> tokens, uint64_t seed, uint64_t step);
    // A batch over these rows and `logits` [rows, vocab] whose selecting link writes tokens_out.
    loom_sampling_batch batch(DLTensor *logits, int64_t vocab, int32_t *tokens_out);
  };
  // Applies every link of `chain` to `b` in order (SamplerChain: candidates between the links
  // that read them); a link after one that already selected a token is an error, `hint` says
  // which link must come last.
  void apply_chain(const std::vector<std::shared_ptr<Instance>> &chain, const loom_sampling_batch &b,
                   const char *hint) {
    sampler_chain_.apply(chain, b, hint);
  }
  // Checks the sampled tokens and tells every link of the chain which token each sequence got.
  // `own_chain` (non-empty): a served request's own links instead of the pipeline's (also in sample()).
  void accept_tokens(const std::vector<int32_t> &rows, const std::vector<int32_t> &tokens,
                     const std::vector<std::shared_ptr<Instance>> *own_chain = nullptr);
  void all_reduce(DLTensor *logits);
  // Beam search (core/beam_search.cpp): generate() when the chain's last link has
  // LOOM_SAMPLER_BEAMS.
  // What every run starts with: result.sequences holds one entry per prompt (its prompt set);
  // throws when the longest prompt and `steps` exceed the model's positions. Returns that
  // longest prompt's length.
  size_t start_run(int64_t steps, RunResult &result) const;
  // Held for a run: however it ends (an exception included), every sampler link forgets its
  // sequences (release(-1)).
  struct ForgetSequences {
    Pipeline &pipeline;
    ~ForgetSequences();
  };
  // Each prompt's own step limit (run.prompt_steps, else `steps`); raises `steps` to the
  // largest of them.
  std::vector<int64_t> step_limits(int64_t &steps) const;
  // Every sampler link forgets sequence `seq` (it left the run).
  void release_sequence(int64_t seq);
  // The drafter (speculative decoding) forgets sequence `seq`; -1: every sequence.
  void release_draft_sequence(int64_t seq);
  bool beam_chain() const;
  // serve()'s adapter choices: why a request naming `slot` is refused ("" when it is loaded);
  // a choice as StepBatch::seq_adapters codes it among `adapters`; its prefix-cache domain.
  std::string check_adapter_choice(const std::string &slot) const;
  int32_t adapter_index(const std::optional<std::string> &choice, const std::vector<std::shared_ptr<Instance>> &adapters) const;
  uint64_t prefix_domain(const std::optional<std::string> &choice) const;
  // Prefix tuning: the virtual tokens of the prefix adapter a choice runs with (0: none), and a
  // prompt with that many placeholders in front.
  int64_t virtual_tokens(const std::optional<std::string> &choice) const;
  std::vector<int32_t> with_virtual_tokens(int64_t n, const std::vector<int32_t> &prompt) const;
  // generate() when the manifest has [scheduler] (core/serving.cpp): the prompts are
  // requests of a continuous-batching scheduler over a paged KV cache, all queued at the start.
  void generate_scheduled(int64_t steps, const TokenCallback &on_token, const SequenceTokenCallback &on_sequence_token,
                          RunResult &result);
  void generate_beams(int64_t steps, const TokenCallback &on_token, const SequenceTokenCallback &on_sequence_token,
                      RunResult &result);

  const Manifest &manifest_;
  Pipeline &pipeline_;
  const std::atomic<bool> &cancelled_;
  ModelConfig config_;
  std::unique_ptr<ModelBackend> backend_;
  std::shared_ptr<const Tokenizer> tokenizer_;          // null when the model has none
  std::vector<std::vector<int32_t>> prompts_;    // token ids, one per sequence
  // run.n > 1 (prompts_ holds each prompt n times): sequence i is sample i % n of its prompt,
  // keyed nth_sample_seed(loom.seed, i % n); with n = 1 every row samples with loom.seed.
  uint64_t sample_key(size_t seq) const {
    return nth_sample_seed(manifest_.seed, static_cast<int64_t>(seq % static_cast<size_t>(manifest_.run.n)));
  }
  // Agent tool calls that overran call_timeout_s, still running; joined by the destructor.
  std::vector<AbandonedCall> abandoned_calls_;
  std::vector<int32_t> stop_tokens_;
  bool decode_ahead_ = true; // LOOM_DECODE_AHEAD=0 turns the queued-ahead decode step off
  SamplerChain sampler_chain_;
  // Live requests per adapter slot, and the slots being unloaded (serve() and the unloading
  // thread share them).
  struct AdapterUse {
    std::mutex mutex;
    std::condition_variable changed;
    std::map<std::string, int64_t> live;
    std::set<std::string> draining;
  } adapter_use_;
  std::atomic<uint64_t> merges_{0}; // merge/unmerge calls, part of the prefix-cache domain
  // The id of a prefix adapter's placeholder tokens: the tokenizer's BOS (their ids do not matter
  // to the model, whose backend gives those positions the adapter's keys and values; BOS keeps
  // sampler histories plausible), else 0.
  int32_t placeholder_ = 0;
  // RAG (place_passages): the prompt's template, as given; `rag_` when it has {passages}.
  bool rag_ = false;
  std::string rag_text_;                                   // run.prompt's text
  std::vector<std::pair<std::string, std::string>> rag_messages_;  // or run.messages
  std::string tokenizer_error_;                            // why there is no tokenizer, for errors
};

} // namespace loom
