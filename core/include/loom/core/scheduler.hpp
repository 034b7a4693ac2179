// loom::Scheduler: continuous batching over a paged KV cache (vLLM v1's policy). Each step it
// decodes every running sequence, gives the rest of the token budget to prefill chunks (running
// sequences first, then waiting ones in arrival order), and preempts by recomputation when the
// KV pool runs out. Pure host logic: the caller runs the plan's forward pass and reports sampled
// tokens.
//
// A step, from the caller's side:
//   SchedulePlan plan = scheduler.schedule();
//   apply plan.copies (in order), run every work item, then for each item with samples == true:
//   scheduler.append(item.seq, sampled), and finish() the sequences that are done.
// schedule() counts the plan's tokens as computed, so every item must run before the next call.
//
// Ownership: the scheduler keeps a reference to `blocks` (the caller's, outliving it) and is the
// only one that begins/grows/releases sequences in it while it runs them. Thread-safety: one thread
// at a time, the same one that uses `blocks`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <unordered_map>
#include <vector>

#include "loom/core/kv_blocks.hpp"

namespace loom {

struct SchedulerOptions {
  int32_t max_seqs = 64;             // running sequences at most
  int32_t max_batched_tokens = 2048; // tokens computed per step at most (decode + prefill)
  bool chunked_prefill = true;       // false: a prompt's prefill is scheduled whole or not at all
  // Sliding-window attention (0: none): a query at position p reads keys > p - window only, so a
  // sequence's blocks wholly behind its next query's window go back to the pool
  // (KvBlockManager::drop_before) and a request needs about window + a step's tokens of blocks.
  int32_t window = 0;
  // Speculative decoding: rows a step's batch may hold (each draft is a row of its own beside
  // one per sequence): drafts are trimmed to max_rows - max_seqs per plan. 0: no limit.
  int32_t max_rows = 0;
  // Rows a step gives to the prefill of sequences added with token_rows (each of their prefill
  // tokens a row of its own: prompt log-probabilities): their chunks are capped by what is left
  // of these this step, and chunked whatever chunked_prefill says. 0: add() refuses them.
  int32_t token_rows = 0;
};

// This step computes tokens(seq)[first_position, first_position + n_tokens) at those positions.
// samples: the chunk ends at the seq's last known token, so its logits are sampled this step.
// draft (speculative decoding, propose_draft()): a decode whose n_tokens are the last known token
// then `draft` draft tokens the caller holds, at the positions after it; every one of its rows is
// sampled, and only the token before the drafts counts as computed until accept_drafts().
struct ScheduledWork {
  int64_t seq;
  int64_t first_position;
  int32_t n_tokens;
  bool samples;
  int32_t draft = 0;
};

struct SchedulePlan {
  std::vector<ScheduledWork> work;  // at most one item per sequence; decodes first
  std::vector<BlockCopy> copies;    // apply in order before the forward pass
  std::vector<int64_t> preempted;   // sequences moved back to waiting this step (blocks released)
  int32_t n_tokens = 0;             // sum of work[].n_tokens, <= max_batched_tokens
};

class Scheduler {
 public:
  // Throws loom::Error on max_seqs < 1 or max_batched_tokens < 1.
  Scheduler(SchedulerOptions options, KvBlockManager &blocks);

  // A request joins the waiting queue (first come, first served). Throws on a duplicate id (here
  // or live in the block manager), an empty prompt, max_new_tokens < 0, prompt + max_new_tokens
  // needing more blocks than the whole pool, or (without chunked prefill) a prompt longer than
  // max_batched_tokens: requests that could never run. `domain`: the prefix-cache domain of its
  // KV (KvBlockManager::begin): what besides its tokens its KV depends on (its adapter).
  // token_rows: the caller computes each of its prefill tokens as a row of its own
  // (SchedulerOptions::token_rows); throws when that is 0.
  void add(int64_t seq, std::vector<int32_t> prompt, int64_t max_new_tokens, uint64_t domain = 0,
           bool token_rows = false);

  // The next step's work. Policy:
  // 1. Decode: every running sequence whose cache holds all but its last token gets 1 token, in
  //    admission order, while the budget lasts. When the pool cannot hold it, the most recently
  //    admitted running sequence not yet in the plan (possibly this one) is preempted: its blocks
  //    are released and it goes to the front of the waiting queue with all its tokens, so its
  //    re-prefill covers prompt + generated and samples the next token.
  // 2. Prefill: running sequences with an unfinished prefill get chunks (preempting the same way
  //    when the pool is short), then waiting ones are admitted in order while running < max_seqs:
  //    a prefix-cache hit skips the cached tokens; the first one whose chunk does not fit the pool
  //    (or, without chunked prefill, the budget whole) stops admission. A resumed sequence longer
  //    than max_batched_tokens is chunked even without chunked prefill (else it could never run).
  // 3. The plan's tokens count as computed (the block manager may cache them for later requests).
  // Deterministic: the same calls give the same plans.
  SchedulePlan schedule();

  // After the step: the sampled token of a work item with samples == true. Throws when seq is not
  // running, did not sample last step, or already has max_new_tokens generated tokens.
  void append(int64_t seq, int32_t token);

  // Speculative decoding. Running sequences whose next step is a decode (their cache holds all
  // but their last token), in admission order: the ones a drafter may propose for.
  std::vector<int64_t> decoding() const;
  // The next schedule() gives seq's decode 1 + n tokens when the budget allows (fewer drafts
  // otherwise, none when seq gets no decode in that plan; ScheduledWork::draft says how many): its blocks grow for them, their KV
  // is computed, but they are not the sequence's tokens. Throws when seq is not decoding, n < 0,
  // or the drafts would pass max_new_tokens - 1 (the step samples one token of its own after them).
  void propose_draft(int64_t seq, int32_t n);
  // After a step that ran seq with drafts: the first `n` of them were accepted (they equal what
  // the target sampled): they join seq's tokens with their KV computed; append() then adds the
  // token sampled after them. The KV of the rejected drafts stays in seq's blocks, unused, and
  // is overwritten by later steps (nothing caches it: only computed tokens enter the prefix
  // cache). Throws when n exceeds the last plan's drafts of seq.
  void accept_drafts(int64_t seq, const int32_t *tokens, int32_t n);

  // The caller ended seq (stop token or string, max_new_tokens, cancel), running or waiting:
  // releases its blocks and forgets it. Throws on an unknown seq.
  void finish(int64_t seq);

  // Prompt + generated so far; the reference is valid until the next append() or finish() of seq.
  const std::vector<int32_t> &tokens(int64_t seq) const;
  int64_t generated(int64_t seq) const; // tokens appended since add()
  int32_t running() const { return int32_t(running_.size()); }
  size_t waiting() const { return waiting_.size(); }
  bool idle() const { return running_.empty() && waiting_.empty(); }
  int64_t preemptions() const { return preemptions_; }

 private:
  struct Request {
    std::vector<int32_t> tokens; // prompt + generated
    size_t prompt_size = 0;
    int64_t max_new_tokens = 0;
    uint64_t domain = 0;         // prefix-cache domain (add)
    bool token_rows = false;     // each prefill token a row of its own (add)
    int64_t computed = 0;        // leading tokens whose KV the cache holds (or will after this step)
    bool running = false;
    bool planned = false;        // has a work item in the plan being built
    int32_t draft = 0;           // propose_draft()'s, for the next plan
    int32_t drafted = 0;         // drafts in the last plan's work item, for accept_drafts()
  };

  Request &request(int64_t seq, const char *what);
  const Request &request(int64_t seq, const char *what) const;
  // Grows seq for `n` more tokens from its computed count, preempting the most recently admitted
  // unplanned running sequences while the pool is short. False when seq itself was preempted.
  bool grow_running(int64_t seq, int32_t n, SchedulePlan &plan);
  // Under a sliding window, seq's blocks wholly behind this step's first query's window go back.
  void drop_behind_window(int64_t seq, const Request &r);
  void preempt(int64_t seq, SchedulePlan &plan);
  void plan_work(int64_t seq, int32_t n, SchedulePlan &plan, int32_t draft = 0);
  // Tokens of seq's next prefill chunk within `budget`; 0 when it must wait (whole-or-nothing).
  // The next prefill chunk of r within `budget` tokens (and `rows` for a token_rows sequence);
  // 0 when none fits.
  int32_t prefill_chunk(const Request &r, int32_t budget, int32_t rows) const;

  SchedulerOptions options_;
  KvBlockManager &blocks_;
  std::unordered_map<int64_t, Request> requests_;
  std::vector<int64_t> running_; // admission order
  std::deque<int64_t> waiting_;  // front: next to admit
  int64_t preemptions_ = 0;
};

} // namespace loom
