// loom::RequestQueue: requests that arrive while a runtime serves (Runtime::serve). Producers on
// any thread submit requests; the serving thread takes them between steps, so a request joins
// the running batch at the next step, and each one leaves the batch when it ends.
//
// Ownership: the queue owns requests until the server takes them; a request's callbacks are
// called on the serving thread, never concurrently with each other. Thread-safety: submit() and
// close() from any thread; take() from the serving thread only.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "loom/core/runtime.hpp"

namespace loom {

// The key of sample j of a prompt sampled several times from `seed` (sample 0: the seed itself):
// distinct keys a golden-ratio step apart, so the samples draw independent numbers.
inline uint64_t nth_sample_seed(uint64_t seed, int64_t j) { return seed + static_cast<uint64_t>(j) * 0x9e3779b97f4a7c15ull; }

struct ServeRequest {
  std::vector<int32_t> prompt; // token ids, at least one
  int64_t max_new_tokens = 16; // it ends after this many (or at a stop token or string)
  // [PEFT] which adapter it runs with: unset, every adapter of the pipeline (as a manifest's run
  // applies them); "" the base model alone; else one adapter by its slot ("adapter[1]", or its
  // `name`, also one loaded by Runtime::load_adapter). Rows with different adapters run in the
  // same batch. A name that is not loaded (or is being unloaded) refuses the request.
  std::optional<std::string> adapter;
  // The request's own sampler chain (instances from Runtime::make_samplers, owned by the request
  // and used by the serving thread only), applied to its rows instead of the pipeline's
  // [[sampler]] links; empty: the pipeline's (so a swap of those reaches it).
  std::vector<std::shared_ptr<Instance>> samplers;
  // Its RNG key instead of loom.seed: rows sample from (seed, step), so the same seed and prompt
  // give the same tokens whatever else runs (OpenAI's `seed`). Sample j of several of one prompt
  // (the server's `n`, run.n) uses nth_sample_seed(seed, j).
  std::optional<uint64_t> seed;
  // Its stop strings instead of run.stop (the text ends where one begins).
  std::optional<std::vector<std::string>> stop;
  // The run's stop tokens (run.stop_tokens, by default the model's end tokens) do not end it
  // (vLLM's ignore_eos): it generates max_new_tokens unless a stop string ends it or it is
  // cancelled. The tokens stay out of its text, as always.
  bool ignore_stop_tokens = false;
  // More tokens that end it (vLLM's stop_token_ids), left out of its text as the run's are.
  std::vector<int32_t> stop_token_ids;
  // No stop token ends it before it has this many tokens (vLLM's min_tokens): its stop tokens
  // (the run's unless ignored, and stop_token_ids) get no probability until then (their logits
  // are set to -inf before the sampler chain; log-probabilities are the raw row's), and a stop
  // string counts only where it ends in the text of the tokens after the first min_tokens (as
  // vLLM's stop checks start only past min_tokens). 0 to max_new_tokens.
  int64_t min_tokens = 0;
  // Log-probabilities: -1 none; 0 to kMaxTopLogprobs: each generated token's log-probability
  // under the model's raw distribution and that many most likely alternatives
  // (SequenceResult::logprobs, and on_logprob as tokens come). Costs a copy of the row of logits
  // to the host for each token of such a request. Outside that range the request is refused.
  int32_t logprobs = -1;
  // Prompt log-probabilities (vLLM's prompt_logprobs; OpenAI completions' echo with logprobs): -1
  // none; 0 to kMaxTopLogprobs: each prompt token after the first, its log-probability under the
  // model's distribution given the tokens before it and that many most likely alternatives
  // (SequenceResult::prompt_logprobs). Such a request's prefill runs each prompt token as a row
  // of its own, at most kPromptLogprobRows of them a step (so a long prompt takes several steps),
  // and bypasses the prefix cache (every position must be computed). Needs an attention
  // component of plugin ABI 1.9 or newer (loom_attention_batch.shared_blocks); refused otherwise,
  // and outside that range.
  int32_t prompt_logprobs = -1;
  // Set from any thread to end the request at the next step boundary (a client that went away):
  // it leaves the batch, its KV blocks go back to the pool, and on_done gets what it generated
  // (SequenceResult::cancelled set). Optional.
  std::shared_ptr<std::atomic<bool>> cancel;
  // After each generated token: its index in the request's output and the token. Returning false
  // cancels the request (it ends at once). Optional.
  std::function<bool(int64_t index, int32_t token)> on_token;
  // With logprobs >= 0: just before on_token, the token's log-probabilities. Optional.
  std::function<void(int64_t index, const TokenLogprob &logprob)> on_logprob;
  // With prompt_logprobs >= 0 and a prompt of two tokens or more: once, when every entry of
  // SequenceResult::prompt_logprobs is computed (before the first token's on_logprob and
  // on_token), those entries (valid for the call). Not called for a request that ends before its
  // prefill does. Optional.
  std::function<void(const std::vector<TokenLogprob> &entries)> on_prompt_logprobs;
  // Once, when the request ends (stopped, at max_new_tokens, cancelled, or refused: then
  // `error` says why and the result is empty). Optional.
  std::function<void(const SequenceResult &result, const std::string &error)> on_done;
};

// What the serving thread is doing, published after every step (for a host's /metrics and its
// admission control). Relaxed atomics: each value is current, together they are a snapshot only
// approximately.
struct ServeLoad {
  std::atomic<int64_t> waiting{0};        // requests admitted by the scheduler's queue, not yet running
  std::atomic<int64_t> running{0};        // sequences in the running batch
  std::atomic<int64_t> kv_blocks_used{0}; // KV blocks held by sequences (cached free blocks excluded)
  std::atomic<int64_t> kv_blocks_total{0};
  std::atomic<int64_t> prompt_tokens{0};  // prompt tokens looked up in the prefix cache, since serve() began
  std::atomic<int64_t> cached_tokens{0};  // of those, found there
  std::atomic<int64_t> preemptions{0};
  std::atomic<int64_t> drafted_tokens{0};  // speculative decoding: drafts verified, since serve() began
  std::atomic<int64_t> accepted_tokens{0}; // of those, accepted
  std::atomic<int64_t> steps{0};
};

class RequestQueue {
 public:
  // Updated by the serving thread; read from any thread.
  ServeLoad &load() { return load_; }
  // Queues a request and returns its id (0, 1, 2, ... in submission order). Throws loom::Error
  // after close().
  int64_t submit(ServeRequest request);
  // No more requests: serve() returns once every submitted request has ended.
  void close();
  // Serving side: moves the pending requests into `out`. With `wait`, blocks until there is one,
  // the queue is closed, or 100 ms passed. Returns false when the queue is closed and nothing was
  // pending.
  bool take(std::vector<std::pair<int64_t, ServeRequest>> &out, bool wait);

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::pair<int64_t, ServeRequest>> pending_;
  int64_t next_id_ = 0;
  ServeLoad load_;
  bool closed_ = false;
};

} // namespace loom
