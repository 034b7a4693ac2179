// Scheduler: continuous batching with chunked prefill and preemption by recomputation (see
// scheduler.hpp for the policy).
#include "loom/core/scheduler.hpp"

#include <algorithm>
#include <climits>
#include <string>
#include <utility>

#include "loom/core/error.hpp"

namespace loom {

namespace {

std::string seq_name(int64_t seq) { return "scheduler: sequence " + std::to_string(seq); }

} // namespace

Scheduler::Scheduler(SchedulerOptions options, KvBlockManager &blocks) : options_(options), blocks_(blocks) {
  if (options.max_seqs < 1) throw runtime_error("scheduler: max_seqs must be at least 1, got " + std::to_string(options.max_seqs));
  if (options.max_batched_tokens < 1)
    throw runtime_error("scheduler: max_batched_tokens must be at least 1, got " +
                        std::to_string(options.max_batched_tokens));
}

Scheduler::Request &Scheduler::request(int64_t seq, const char *what) {
  return const_cast<Request &>(std::as_const(*this).request(seq, what));
}

const Scheduler::Request &Scheduler::request(int64_t seq, const char *what) const {
  auto it = requests_.find(seq);
  if (it == requests_.end()) throw runtime_error(seq_name(seq) + " is unknown (" + what + ")");
  return it->second;
}

void Scheduler::add(int64_t seq, std::vector<int32_t> prompt, int64_t max_new_tokens, uint64_t domain, bool token_rows) {
  if (requests_.count(seq) != 0 || blocks_.live(seq)) throw runtime_error(seq_name(seq) + " already exists (add)");
  if (token_rows && options_.token_rows < 1)
    throw runtime_error(seq_name(seq) + " asks for a row per prefill token, and this scheduler gives none (add)");
  if (prompt.empty()) throw runtime_error(seq_name(seq) + " has an empty prompt (add)");
  if (max_new_tokens < 0)
    throw runtime_error(seq_name(seq) + ": max_new_tokens " + std::to_string(max_new_tokens) + " is negative (add)");
  const int64_t capacity = blocks_.total_blocks() * blocks_.block_size();
  // Positions it holds at once: all of them, or under a sliding window the window, a step's
  // tokens and the partly dropped block at the window's start.
  int64_t span = int64_t(prompt.size()) + max_new_tokens;
  if (options_.window > 0)
    span = std::min<int64_t>(span, int64_t(options_.window) + options_.max_batched_tokens + 2 * blocks_.block_size());
  if (span > capacity)
    throw runtime_error(seq_name(seq) + ": prompt " + std::to_string(prompt.size()) + " + max_new_tokens " +
                        std::to_string(max_new_tokens) + " tokens exceed the KV pool's " + std::to_string(capacity) +
                        " positions (add)");
  if (!options_.chunked_prefill && !token_rows && int64_t(prompt.size()) > options_.max_batched_tokens)
    throw runtime_error(seq_name(seq) + ": prompt of " + std::to_string(prompt.size()) +
                        " tokens exceeds max_batched_tokens " + std::to_string(options_.max_batched_tokens) +
                        " without chunked prefill (add)");
  Request r;
  r.prompt_size = prompt.size();
  r.tokens = std::move(prompt);
  r.max_new_tokens = max_new_tokens;
  r.domain = domain;
  r.token_rows = token_rows;
  requests_.emplace(seq, std::move(r));
  waiting_.push_back(seq);
}

int32_t Scheduler::prefill_chunk(const Request &r, int32_t budget, int32_t rows) const {
  const int64_t remaining = int64_t(r.tokens.size()) - r.computed;
  if (r.token_rows) budget = std::min(budget, rows); // always chunked, by rows
  if (remaining <= 0 || budget <= 0) return 0;
  const int64_t chunk = std::min<int64_t>(budget, remaining);
  const bool whole = !options_.chunked_prefill && !r.token_rows && remaining <= options_.max_batched_tokens;
  return whole && chunk < remaining ? 0 : int32_t(chunk);
}

void Scheduler::preempt(int64_t seq, SchedulePlan &plan) {
  Request &r = request(seq, "preempt");
  blocks_.release(seq);
  r.computed = 0;
  r.running = false;
  running_.erase(std::find(running_.begin(), running_.end(), seq));
  waiting_.push_front(seq);
  plan.preempted.push_back(seq);
  ++preemptions_;
}

void Scheduler::drop_behind_window(int64_t seq, const Request &r) {
  // This step's queries start at r.computed and read keys from r.computed - window + 1 on.
  if (options_.window > 0) blocks_.drop_before(seq, r.computed - options_.window + 1);
}

bool Scheduler::grow_running(int64_t seq, int32_t n, SchedulePlan &plan) {
  const Request &r = request(seq, "schedule");
  drop_behind_window(seq, r);
  while (!blocks_.grow(seq, r.computed + n, r.computed, plan.copies)) {
    // The victim: the most recently admitted running sequence with no work in this plan. `seq`
    // itself qualifies, so there always is one.
    auto victim = std::find_if(running_.rbegin(), running_.rend(), [&](int64_t s) { return !requests_.at(s).planned; });
    const int64_t v = *victim;
    preempt(v, plan);
    if (v == seq) return false;
  }
  return true;
}

void Scheduler::plan_work(int64_t seq, int32_t n, SchedulePlan &plan, int32_t draft) {
  Request &r = request(seq, "schedule");
  r.planned = true;
  r.drafted = draft;
  // (A decode with drafts samples every row: its last known token is the first of its n.)
  plan.work.push_back({seq, r.computed, n, r.computed + n - draft == int64_t(r.tokens.size()), draft});
  plan.n_tokens += n;
}

SchedulePlan Scheduler::schedule() {
  SchedulePlan plan;
  for (int64_t s : running_) requests_.at(s).planned = false;
  int32_t budget = options_.max_batched_tokens;

  // 1. Decode, in admission order. A preemption removes an entry at or after i.
  // Drafts ride along only with room to spare: the budget keeps a token for every decode after
  // this one, the rows stay within max_rows, and drafts never take blocks that would preempt.
  int32_t decodes_left = 0;
  for (int64_t s : running_) decodes_left += requests_.at(s).computed + 1 == int64_t(requests_.at(s).tokens.size());
  int64_t draft_rows_left = options_.max_rows > 0 ? std::max<int64_t>(0, int64_t{options_.max_rows} - options_.max_seqs)
                                                  : int64_t{INT32_MAX};
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    const int64_t seq = running_[i];
    const Request &r = requests_.at(seq);
    if (r.computed + 1 != int64_t(r.tokens.size())) {
      ++i;
      continue;
    }
    --decodes_left;
    int32_t drafts = std::max(0, std::min<int32_t>(r.draft, budget - 1 - std::max(0, decodes_left)));
    drafts = static_cast<int32_t>(std::min<int64_t>(drafts, draft_rows_left));
    if (drafts > 0 && blocks_.blocks_needed(seq, r.computed + 1 + drafts) > blocks_.free_blocks() &&
        blocks_.blocks_needed(seq, r.computed + 1) <= blocks_.free_blocks())
      drafts = 0; // (a plain decode fits: no preemption for optional tokens)
    draft_rows_left -= drafts;
    if (!grow_running(seq, 1 + drafts, plan)) continue; // seq went back to waiting; running_[i] is the next one
    plan_work(seq, 1 + drafts, plan, drafts);
    budget -= 1 + drafts;
    ++i;
  }

  // 2a. Unfinished prefills of running sequences (chunked, or resumed ones too long for a step).
  // A token_rows sequence past this step's rows waits for the next step; the others go on.
  int32_t rows = options_.token_rows;
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    const int64_t seq = running_[i];
    const Request &r = requests_.at(seq);
    if (r.planned || r.computed + 1 >= int64_t(r.tokens.size())) {
      ++i;
      continue;
    }
    const int32_t chunk = prefill_chunk(r, budget, rows);
    if (chunk == 0 && r.token_rows) {
      ++i;
      continue;
    }
    if (chunk == 0) break;
    const bool token_rows = r.token_rows; // (r may be preempted below)
    if (!grow_running(seq, chunk, plan)) continue;
    plan_work(seq, chunk, plan);
    budget -= chunk;
    if (token_rows) rows -= chunk;
    ++i;
  }

  // 2b. Admission in arrival order. Not in a step that preempted (as vLLM): the pool is short,
  // and a just-preempted sequence would be readmitted at once to recompute everything.
  // A token_rows request finding this step's rows spent keeps its place; the ones behind it go on.
  for (size_t wi = 0; plan.preempted.empty() && wi < waiting_.size() && running_.size() < size_t(options_.max_seqs) && budget > 0;) {
    const int64_t seq = waiting_[wi];
    Request &r = requests_.at(seq);
    if (r.token_rows && rows == 0) {
      ++wi;
      continue;
    }
    r.computed = blocks_.begin(seq, r.tokens, r.domain);
    drop_behind_window(seq, r); // (a long prefix hit)
    const int32_t chunk = prefill_chunk(r, budget, rows);
    if (chunk == 0 || !blocks_.grow(seq, r.computed + chunk, r.computed, plan.copies)) {
      blocks_.cancel(seq); // it stays first in line; its blocks and the hit stats are given back
      r.computed = 0;
      break;
    }
    waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(wi));
    running_.push_back(seq);
    r.running = true;
    plan_work(seq, chunk, plan);
    budget -= chunk;
    if (r.token_rows) rows -= chunk;
  }

  // Drafts are for this plan only: a sequence that got no decode here (the budget ran out, or it
  // was preempted) proposes again before a later one.
  for (auto &[id, r] : requests_) r.draft = 0;

  // 3. The caller runs the whole plan before the next schedule(): count its tokens as computed.
  for (const ScheduledWork &w : plan.work) {
    Request &r = requests_.at(w.seq);
    r.computed += w.n_tokens - w.draft; // drafts count once accepted (accept_drafts)
    blocks_.computed(w.seq, r.tokens, r.computed);
  }
  return plan;
}

void Scheduler::append(int64_t seq, int32_t token) {
  Request &r = request(seq, "append");
  if (!r.running || r.computed != int64_t(r.tokens.size()))
    throw runtime_error(seq_name(seq) + " did not sample in the last step (append)");
  if (int64_t(r.tokens.size() - r.prompt_size) >= r.max_new_tokens)
    throw runtime_error(seq_name(seq) + " already has its max_new_tokens " + std::to_string(r.max_new_tokens) +
                        " tokens (append)");
  r.tokens.push_back(token);
}

std::vector<int64_t> Scheduler::decoding() const {
  std::vector<int64_t> out;
  for (int64_t s : running_) {
    const Request &r = requests_.at(s);
    if (r.computed + 1 == int64_t(r.tokens.size())) out.push_back(s);
  }
  return out;
}

void Scheduler::propose_draft(int64_t seq, int32_t n) {
  Request &r = request(seq, "propose_draft");
  if (!r.running || r.computed + 1 != int64_t(r.tokens.size()))
    throw runtime_error(seq_name(seq) + " is not decoding (propose_draft)");
  const int64_t room = r.max_new_tokens - int64_t(r.tokens.size() - r.prompt_size) - 1;
  if (n < 0 || n > room)
    throw runtime_error(seq_name(seq) + ": " + std::to_string(n) + " drafts outside 0 .. " + std::to_string(room) +
                        " (propose_draft)");
  r.draft = n;
}

void Scheduler::accept_drafts(int64_t seq, const int32_t *tokens, int32_t n) {
  Request &r = request(seq, "accept_drafts");
  if (!r.running || r.computed != int64_t(r.tokens.size()) || n < 0 || n > r.drafted)
    throw runtime_error(seq_name(seq) + ": " + std::to_string(n) + " accepted drafts, but the last step ran " +
                        std::to_string(r.drafted) + " (accept_drafts)");
  r.tokens.insert(r.tokens.end(), tokens, tokens + n);
  r.computed += n;
  r.drafted = 0;
  blocks_.computed(seq, r.tokens, r.computed);
}

void Scheduler::finish(int64_t seq) {
  const Request &r = request(seq, "finish");
  if (r.running) {
    blocks_.release(seq);
    running_.erase(std::find(running_.begin(), running_.end(), seq));
  } else {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), seq));
  }
  requests_.erase(seq);
}

const std::vector<int32_t> &Scheduler::tokens(int64_t seq) const { return request(seq, "tokens").tokens; }

int64_t Scheduler::generated(int64_t seq) const {
  const Request &r = request(seq, "generated");
  return int64_t(r.tokens.size() - r.prompt_size);
}

} // namespace loom
