// loom::Runtime: a manifest turned into a running pipeline. The one entry point that hosts use
// (the CLI, libloom, tests).
//
// Ownership: the Runtime owns the registry, the pipeline and the metrics; members are declared
// so that instances are destroyed before the libraries they came from.
// Thread-safety: run() runs on the caller's thread; swap() and cancel() may be called from other
// threads while it runs (a swap lands between two steps).
#pragma once

#include <atomic>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "loom/core/continuation_text.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/metrics.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/core/registry.hpp"
#include "loom/core/vocabulary.hpp"

namespace loom {

class ModelHost;

class ModelDecoder;

struct PassageResult {
  std::string retriever_slot;
  std::string doc_id;
  double score = 0;
  std::string score_kind;
  std::string text;
};

struct ToolCallResult {
  std::string tool;
  std::string content;
  bool is_error = false;
};

// One turn of the agent loop ([agent]): the model's action and what came of it.
struct AgentStep {
  std::string action;         // the model's text for the turn (a JSON action, or what it wrote instead)
  std::string tool;           // the tool called ("" for a final answer or an invalid action)
  std::string arguments_json; // as called (compact JSON)
  std::string result;         // what the model was shown: the tool's (capped) output or the error
  bool is_error = false;      // the action was invalid, the arguments failed the schema, or the tool failed
  int64_t tokens = 0;         // tokens generated in the turn
};

// A generated token's log-probability under the model's distribution at its position (the
// softmax of the raw logits, before the sampler chain rewrote them), and the most likely tokens
// there (ServeRequest::logprobs of them), most likely first.
struct TokenLogprob {
  int32_t token = -1;
  float logprob = 0;
  int64_t rank = 0; // 1 + the tokens more likely than it (ties: smaller ids first); 0: unknown
  std::vector<std::pair<int32_t, float>> top; // (token, log-probability)
};
inline constexpr int32_t kMaxTopLogprobs = 20; // alternatives a request may ask for
// Prompt tokens a step computes as rows of their own for requests that asked for
// ServeRequest::prompt_logprobs (the backend's per-row buffers grow by this many rows).
inline constexpr int32_t kPromptLogprobRows = 128;

// One sequence of a run: a prompt of run.prompts (or the one prompt) and what it generated.
struct SequenceResult {
  std::vector<int32_t> prompt; // the prompt's token ids
  std::vector<int32_t> tokens; // generated tokens, prompt excluded (a stop token included)
  std::string text;            // the generated text (what it adds to the prompt's), with a tokenizer
  bool stopped = false;        // a stop token or string ended it before run.steps
  bool cancelled = false;      // served: its cancel flag or a callback ended it early
  // Served, ended with an error that is the request's own (on_done's error): refused when it
  // arrived (an empty prompt, a bad token or stop token, limits, an adapter), or its own sampler
  // chain (ServeRequest::samplers: a constraint, its parameters) failed. Other errors are the
  // engine's (the pipeline's chain, the backend).
  bool request_error = false;
  // Served requests that asked (ServeRequest::logprobs): one entry per token of `tokens`.
  std::vector<TokenLogprob> logprobs;
  // Served requests that asked (ServeRequest::prompt_logprobs): one entry per token of `prompt`
  // after the first (entry i is prompt[i + 1]'s), in the order of the prompt.
  std::vector<TokenLogprob> prompt_logprobs;
};

// One forward pass of the scheduler (a step): what it ran and how long it took on the host's
// clock, from planning to the sampled tokens being on the host (callbacks excluded).
struct StepRecord {
  int32_t sequences = 0; // sequences in the pass (decoding or prefilling a chunk)
  int32_t tokens = 0;    // tokens fed (a decoding sequence feeds one)
  int32_t sampled = 0;   // rows sampled (sequences that produced a token)
  int64_t context = 0;   // KV positions the pass attends to, summed over its sequences
  double seconds = 0;
  int32_t drafted = 0;   // speculative decoding: draft tokens fed (in `tokens`)
  int32_t accepted = 0;  // of those, accepted
};

// What the scheduler did in a run served through [scheduler] (core/serving.cpp).
struct SchedulerStats {
  bool used = false;            // the run went through the scheduler
  int64_t steps = 0;            // forward passes
  int64_t preemptions = 0;      // sequences preempted (and later recomputed) for lack of KV blocks
  int64_t prompt_tokens = 0;    // prompt tokens looked up in the prefix cache (resumed ones included)
  int64_t cached_tokens = 0;    // of those, found there (not recomputed)
  double prefix_cache_hit_rate = 0; // cached_tokens / prompt_tokens
  int64_t kv_blocks = 0;        // the KV pool's blocks
  int32_t block_size = 0;       // positions per block
  // Speculative decoding ([drafter]): draft tokens verified by the target, and of those accepted
  // (acceptance rate = accepted / drafted); drafter calls that failed (those steps ran without
  // drafts), with the last failure's message.
  int64_t drafted_tokens = 0;
  int64_t accepted_tokens = 0;
  int64_t drafter_failures = 0;
  std::string drafter_error;
  double acceptance_rate() const { return drafted_tokens > 0 ? double(accepted_tokens) / double(drafted_tokens) : 0.0; }
  // The run's first kStepLogLimit steps, in order (bounded, so that a long-lived server's log
  // does not grow without end).
  static constexpr size_t kStepLogLimit = 65536;
  std::vector<StepRecord> step_log;
};

struct RunResult {
  // Sequence 0's, for single-prompt callers (the same as sequences[0]).
  std::vector<int32_t> prompt;        // the prompt's token ids
  std::vector<int32_t> tokens;        // generated tokens, prompt excluded (a stop token included)
  std::string text;                   // the generated text (what it adds to the prompt's), with a tokenizer
  bool stopped = false;               // a stop token ended the run before run.steps
  // Every sequence, in run.prompts order (one entry for a single prompt). All are prefilled in
  // one batch and decoded together; a sequence leaves the batch when it stops.
  std::vector<SequenceResult> sequences;
  std::vector<PassageResult> passages; // retrievers' answers to run.query
  // RAG: the passages placed in the prompt where it says {passages}, in citation order ([1]
  // first): run.top_k of them, fused by reciprocal rank (k = 60, score kind "rrf") when several
  // retrievers answered.
  std::vector<PassageResult> context;
  std::vector<ToolCallResult> tool_results;
  // The agent loop ([agent]): its turns, why it stopped ("final", "max_steps", "max_tokens",
  // "repeated call", "context full"), and the final answer (when the model gave one).
  std::vector<AgentStep> agent_steps;
  std::string agent_stop;
  std::string agent_answer;
  double seconds = 0;         // the whole run
  double prefill_seconds = 0; // the prompts' forward pass (one batch)
  double decode_seconds = 0;  // sampling and the generated tokens' forward passes (all sequences)
  bool cancelled = false;
  SchedulerStats scheduler;
};

// Called after each generated token of sequence 0; returning false stops the run (every
// sequence).
using TokenCallback = std::function<bool(int32_t step, int32_t token)>;
// Called after each generated token of every sequence (`sequence` indexes run.prompts; within a
// step, sequences come in order); returning false stops the run (every sequence).
using SequenceTokenCallback = std::function<bool(int32_t sequence, int32_t step, int32_t token)>;

class RequestQueue;

class Runtime {
 public:
  static std::unique_ptr<Runtime> from_file(const std::filesystem::path &path,
                                            const std::vector<std::string> &overrides = {});
  static std::unique_ptr<Runtime> from_string(std::string_view toml_text, std::string_view source_name = "<string>",
                                              const std::vector<std::string> &overrides = {});
  explicit Runtime(Manifest manifest);
  ~Runtime();

  const Manifest &manifest() const { return manifest_; }
  Registry &registry() { return registry_; }
  Pipeline &pipeline() { return *pipeline_; }
  Metrics &metrics() { return metrics_; }
  DLDevice device() const { return device_; }

  // Runs the manifest's [run] section; `steps` > 0 overrides run.steps. Callbacks run on this
  // thread outside the step lock (a swap from a callback lands before the next step); both may be
  // given (on_token first).
  // The model's embeddings of `texts` ([embedding]: pooling, normalisation, max_tokens; the
  // query prefix when `query`, else the document prefix), one vector of hidden_size floats per
  // text. Throws loom::Error without [embedding] or a tokenizer, or on a backend that does not
  // compute embeddings. Not concurrently with run() or serve().
  std::vector<std::vector<float>> embed(const std::vector<std::string> &texts, bool query);
  RunResult run(int64_t steps = 0, const TokenCallback &on_token = {}, const SequenceTokenCallback &on_sequence_token = {});
  // Serves requests as they arrive in `queue` (from any thread), on this thread, through the
  // manifest's [scheduler] (its defaults without one): each request joins the running batch at the next step and
  // its callbacks run here. Returns when the queue is closed and every request has ended (or at
  // cancel(), which ends the rest with what they generated so far; an idle server notices it
  // within 100 ms). A request longer than `max_positions` (prompt + new tokens), or that the KV
  // pool could never hold, is refused through its on_done. The KV pool is sized for
  // `max_positions`-position sequences. One run or serve at a time.
  SchedulerStats serve(RequestQueue &queue, int64_t max_positions);
  // For hosts that take requests (loom serve, libloom); each may be called from any thread, also
  // while serve() runs. make_samplers: a sampler chain of its own for one ServeRequest, one
  // instance per TOML table text (`use = "top-p"\np = 0.9`), in order; `what` names it in errors
  // (loom::Error naming the link). encode_text: a text prompt's ids (BOS first, as run.prompt);
  // encode_messages: a conversation through the manifest's chat template (run.chat_template),
  // ending in the assistant's generation prompt; continuation: the text `generated` adds to
  // `prompt`, cut where the first of `stops` begins (*stopped says whether one did); with
  // `min_tokens` (a request's, ServeRequest::min_tokens) only a stop string that ends in the text
  // after the first min_tokens tokens counts, as the engine cuts. The three need a tokenizer (loom::Error otherwise, also for text that encodes to no tokens).
  std::vector<std::shared_ptr<Instance>> make_samplers(const std::vector<std::string> &component_tomls,
                                                       const std::string &what);
  std::vector<int32_t> encode_text(const std::string &text, const std::string &key) const;
  // The tokenizer's ids of `text`, with or without the special tokens it adds to a sequence (BOS),
  // possibly none (hosts' /tokenize). Needs a tokenizer (loom::Error otherwise).
  std::vector<int32_t> tokenize(std::string_view text, bool add_special) const;
  std::vector<int32_t> encode_messages(const std::vector<std::pair<std::string, std::string>> &messages,
                                       const std::string &key) const;
  // `cache` (continuation_text.hpp; one a sequence, may be null): a caller asking after each new
  // token (a streaming server) then decodes only the reply's last tokens.
  std::string continuation(const std::vector<int32_t> &prompt, const std::vector<int32_t> &generated,
                           const std::vector<std::string> &stops, bool *stopped = nullptr, int64_t min_tokens = 0,
                           ContinuationCache *cache = nullptr) const;
  bool has_tokenizer() const;
  // The model's context length (positions) and vocabulary size.
  int64_t max_positions() const;
  int64_t vocab_size() const;
  // The prompt's token ids (run.prompt, or its text encoded by the model's tokenizer); with
  // run.prompts, the first one's.
  const std::vector<int32_t> &prompt() const;
  // Every prompt's token ids, in run.prompts order (one entry for a single prompt).
  const std::vector<std::vector<int32_t>> &prompts() const;
  // "cpu float32 x2 threads": where and how the model computes.
  std::string backend_description() const;
  // `loom quantize`: writes the [model] with its linears as the [quantizer] stores them (and the
  // model's config and tokenizer) to dir/model.safetensors, loadable by a manifest naming the same
  // quantizer without re-quantizing. CPU device only; throws loom::Error.
  void export_quantized(const std::filesystem::path &dir);
  // The text of `ids` by the model's tokenizer; nullopt when the model has none.
  std::optional<std::string> decode(const std::vector<int32_t> &ids) const;
  // The bytes token `id` adds to a text it continues (Tokenizer::token_bytes: possibly part of a
  // UTF-8 character; empty for control tokens and ids outside the vocabulary); nullopt when the
  // model has no tokenizer.
  std::optional<std::string> token_bytes(int32_t id) const;
  // Swaps the component in `slot` for the one described by a TOML table text
  // (`use = "top-k"\nk = 5`, optionally with library/version).
  SwapReport swap(std::string_view slot, std::string_view component_toml);
  // [PEFT] adapters while serving. Each may be called from any thread, also while serve() runs;
  // changes land between steps and no running request fails.
  // load_adapter: a new adapter (an [[adapter]] table as TOML text: use, weights, r, ...) joins
  // the pipeline in slot `name`; requests choose it by that name (ServeRequest::adapter).
  // Throws loom::Error (naming the slot) when the name is taken, the table is bad, or the
  // backend runs no adapters (CUDA, for now), and then nothing changes.
  void load_adapter(std::string_view name, std::string_view component_toml);
  // unload_adapter: requests naming it are refused from now on; the ones running with it
  // finish first (waits up to `timeout_s`; past it, throws and the adapter stays loaded).
  void unload_adapter(std::string_view name, double timeout_s = 60.0);
  // merge_adapter: folds the adapter into the base weights (its requests run at the base
  // model's cost; the others are unaffected); unmerge_adapter puts the weights back exactly.
  void merge_adapter(std::string_view name);
  void unmerge_adapter(std::string_view name);
  // Asks the run in progress (and plugins polling is_cancelled) to stop; a cancel that comes
  // before a run starts stops that run at its first step. Cleared when a run ends.
  void cancel() { cancelled_.store(true); }

 private:
  void record_scheduler_metrics(const SchedulerStats &s);
  std::shared_ptr<Instance> adapter_in(std::string_view name, const char *what) const;
  Manifest manifest_;
  DLDevice device_{kDLCPU, 0};
  Metrics metrics_;
  VocabularySlot vocabulary_; // the model's tokens, offered to plugins; filled by the decoder
  std::atomic<bool> cancelled_{false};
  Registry registry_;
  std::unique_ptr<ModelHost> model_host_; // models plugins run (draft models); outlives the pipeline
  std::unique_ptr<Pipeline> pipeline_;
  std::unique_ptr<ModelDecoder> decoder_; // destroyed before the pipeline
};

} // namespace loom
