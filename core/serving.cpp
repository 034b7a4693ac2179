// ModelDecoder::serve and generate_scheduled: requests served by core's continuous-batching
// scheduler (loom/core/scheduler.hpp) over a paged KV cache (loom/core/kv_blocks.hpp), when the
// manifest has [scheduler]. serve() takes requests from a RequestQueue as they arrive (between
// steps); generate_scheduled() serves the run's prompts as requests all queued at the start.
//
// Every step the scheduler plans the work: one token for each running sequence, then chunks of
// prompts (a long prompt over several steps) within the step's token budget, admitting waiting
// requests while the sequence budget and the KV pool allow, and preempting the newest running
// sequence (its blocks freed, its tokens recomputed later) when the pool runs out. The decoder
// runs the plan as one ragged forward pass with each sequence's block table, samples the rows
// whose chunk reached their last token, and applies the stop rules; a finished request leaves
// and frees its blocks at once, so a waiting request can take its place at the next step.
//
// Results are the same as the fixed batch's: every row's RNG counter is its own sequence's step,
// a sequence's KV entries are the same whichever blocks hold them, and a preempted sequence
// recomputes exactly the tokens it had. No decode-ahead here (each step waits for its tokens).
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <deque>
#include <limits>
#include <span>
#include <unordered_map>
#include <utility>

#include "loom/core/draft_verification.hpp"
#include "loom/core/error.hpp"
#include "loom/core/host_context.hpp"
#include "loom/core/kv_blocks.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/core/request_queue.hpp"
#include "loom/core/scheduler.hpp"
#include "model_decoder.hpp"
#include "token_logprobs.hpp"

namespace loom {

namespace {

// What a request's StepBatch row needs: its table, with the entries a sliding window dropped
// (never attended to, but a kernel may still load a masked tile reaching back into them) and
// the columns past its end naming its first live block (written data, finite): the rule
// fill_block_table (model_backend.hpp) applies to the columns past the batch's tables.
void append_table(const std::vector<int32_t> &table, int64_t cols, std::vector<int32_t> &out) {
  const auto live = std::find_if(table.begin(), table.end(), [](int32_t b) { return b != KvBlockManager::kDropped; });
  const int32_t filler = live != table.end() ? *live : 0;
  for (int32_t b : table) out.push_back(b == KvBlockManager::kDropped ? filler : b);
  out.resize(out.size() + static_cast<size_t>(cols) - table.size(), filler);
}

} // namespace

SchedulerStats ModelDecoder::serve(RequestQueue &queue, int64_t max_positions) {
  const SchedulerSpec &spec = manifest_.scheduler;
  // (Without a [scheduler] table its defaults apply: SchedulerSpec's.)
  if (max_positions < 1 || max_positions > config_.max_positions)
    throw runtime_error(manifest_.source_name + ": serving requests of up to " + std::to_string(max_positions) +
                        " positions, outside the model's 1 to " + std::to_string(config_.max_positions));
  ForgetSequences release_at_end{pipeline_};
  ModelBackend::BlockPool pool;
  int64_t reserved_rows = spec.max_seqs;
  // Rows of one sequence may share blocks (verification, prompt log-probabilities) only with an
  // attention component that knows loom_attention_batch.shared_blocks (ABI 1.9); checked each
  // step, as the component may be swapped. (Prompt rows need no backend reservation: paged
  // backends size their per-row buffers at each forward.)
  const auto shares_blocks = [](const std::vector<std::shared_ptr<Instance>> &attention) {
    return !attention.empty() && attention.front()->library().descriptor().abi_minor >= 9;
  };
  {
    auto guard = pipeline_.begin_step();
    // With a drafter a step's batch holds up to 1 + speculative_max_tokens one-token rows per
    // decoding sequence (verification), so the backend sizes its per-row buffers for them.
    if (!pipeline_.list(LOOM_KIND_DRAFTER).empty())
      reserved_rows = std::min<int64_t>(spec.max_seqs * (1 + spec.speculative_max_tokens), std::max<int64_t>(spec.max_seqs, 4096));
    pool = backend_->reserve_blocks(static_cast<int32_t>(reserved_rows), max_positions, spec.kv_blocks,
                                    static_cast<uint64_t>(spec.kv_cache_mib) << 20);
  }
  KvBlockOptions block_options;
  block_options.n_blocks = pool.n_blocks;
  block_options.block_size = pool.block_size;
  block_options.prefix_caching = spec.prefix_caching;
  KvBlockManager blocks(block_options);
  SchedulerOptions options;
  options.max_seqs = static_cast<int32_t>(spec.max_seqs);
  options.max_batched_tokens = static_cast<int32_t>(spec.max_batched_tokens);
  options.chunked_prefill = spec.chunked_prefill;
  options.window = pool.window; // the window the attention plugin applies (its own, or the model's)
  options.max_rows = static_cast<int32_t>(reserved_rows);
  options.token_rows = kPromptLogprobRows;
  Scheduler scheduler(options, blocks);

  struct Live {
    ServeRequest request;
    std::string adapter_slot; // counted in adapter_use_.live while it is live (named adapters)
    SequenceResult out;
    bool stopped_by_string = false;
    ContinuationCache text_cache; // its reply's text so far, for the stop-string check after each token
    bool ending = false; // ends at this step (in `ended`)
    size_t cut = SIZE_MAX; // on_token said stop after this many tokens (a step may emit several)
    int64_t virtual_n = 0; // a prefix adapter's placeholders before the prompt
    // prompt_logprobs: out.prompt_logprobs has an entry per prompt token after the first, filled
    // (token >= 0) as the prefill computes them; `prompt_missing` counts the unfilled ones.
    size_t prompt_missing = 0;
    bool prompt_blocked = false; // the attention component swapped in while it prefilled cannot share blocks
    // Speculative decoding: the drafts proposed for the next step, and this sequence's k.
    std::vector<int32_t> draft;
    // Sampled drafts (loom_draft_batch.q_out): the drafter's distribution q of each draft,
    // normalised; empty when the drafts are point masses.
    std::vector<std::vector<float>> draft_q;
    int32_t k = 0;
  };
  std::unordered_map<int64_t, Live> live;
  // Ends a request that the scheduler no longer holds: its text, then on_done.
  auto end_request = [&](int64_t id, std::string error) {
    auto it = live.find(id);
    Live &l = it->second;
    if (l.prompt_blocked && error.empty() && !l.out.cancelled)
      error = "prompt_logprobs: the attention component swapped in while the prompt was prefilled does not know "
              "loom_attention_batch.shared_blocks (plugin ABI 1.9 or newer)";
    if (l.out.tokens.size() > l.cut) { // (the callback refused a token before one that stopped it)
      l.out.tokens.resize(l.cut);
      if (l.out.logprobs.size() > l.cut) l.out.logprobs.resize(l.cut);
      l.stopped_by_string = false;
      l.out.stopped = false;
    }
    if (l.prompt_missing > 0) { // ended before its prefill did (cancelled, failed): the computed ones
      const auto unfilled = std::find_if(l.out.prompt_logprobs.begin(), l.out.prompt_logprobs.end(),
                                         [](const TokenLogprob &e) { return e.token < 0; });
      l.out.prompt_logprobs.erase(unfilled, l.out.prompt_logprobs.end());
    }
    release_draft_sequence(id);
    if (tokenizer_ && !l.stopped_by_string)
      generated_text(l.out.prompt, l.out.tokens, &l.out.text, l.request.stop ? &*l.request.stop : nullptr,
                     l.request.stop_token_ids, l.request.min_tokens, &l.text_cache);
    release_sequence(id);
    ServeRequest request = std::move(l.request);
    SequenceResult out = std::move(l.out);
    if (!l.adapter_slot.empty()) {
      std::lock_guard lock(adapter_use_.mutex);
      if (--adapter_use_.live[l.adapter_slot] == 0) adapter_use_.live.erase(l.adapter_slot);
      adapter_use_.changed.notify_all();
    }
    live.erase(it);
    if (request.on_done) request.on_done(out, error);
  };

  SchedulerStats stats;
  ServeLoad &load = queue.load();
  const auto publish_load = [&] {
    const KvBlockStats b = blocks.stats();
    load.waiting.store(scheduler.waiting(), std::memory_order_relaxed);
    load.running.store(scheduler.running(), std::memory_order_relaxed);
    load.kv_blocks_total.store(blocks.total_blocks(), std::memory_order_relaxed);
    load.kv_blocks_used.store(blocks.total_blocks() - blocks.free_blocks(), std::memory_order_relaxed);
    load.prompt_tokens.store(b.queried_tokens, std::memory_order_relaxed);
    load.cached_tokens.store(b.hit_tokens, std::memory_order_relaxed);
    load.preemptions.store(scheduler.preemptions(), std::memory_order_relaxed);
    load.drafted_tokens.store(stats.drafted_tokens, std::memory_order_relaxed);
    load.accepted_tokens.store(stats.accepted_tokens, std::memory_order_relaxed);
    load.steps.fetch_add(1, std::memory_order_relaxed);
  };
  publish_load();
  StepBatch batch;
  std::vector<int32_t> rows, sampled;
  struct Emitted {
    int64_t seq;
    int64_t index; // in the request's generated tokens
    int32_t token;
  };
  std::vector<Emitted> emitted; // tokens of this step, in order
  // Requests whose prompt log-probabilities were completed by a step, for on_prompt_logprobs:
  // reported outside the step lock, before the step's tokens, or at the next loop turn where a
  // prefill-only step skipped the token callbacks.
  std::vector<int64_t> prompts_scored;
  auto report_scored_prompts = [&] {
    for (int64_t seq : prompts_scored)
      if (auto it = live.find(seq); it != live.end() && it->second.request.on_prompt_logprobs)
        it->second.request.on_prompt_logprobs(it->second.out.prompt_logprobs);
    prompts_scored.clear();
  };
  std::vector<int64_t> ended;                       // requests that ended at this step
  std::vector<std::span<const int32_t>> row_history; // the tokens of each sampled row (the scheduler's, or with drafts)
  std::vector<uint64_t> row_steps;
  std::vector<const Instance *> row_chain; // each sampled row's chain (nullptr: the pipeline's)
  std::vector<int32_t> row_draft;          // a verification row's index j (0: the last token's row, or no drafts)
  std::vector<char> row_q;                 // the row verifies sampled drafts (Live::draft_q)
  // Log-probabilities: the raw logits of the sampled rows whose request asked for them, copied
  // to the host before the samplers run; row i's is lp_rows[lp_at[i] * vocab...] (-1: none).
  std::vector<float> lp_rows;
  std::vector<int64_t> lp_at;
  // Prompt log-probabilities: the prompt positions of this step that run as rows of their own
  // (the rows of a chunk in position order, where the chunk is in the batch), their logits on
  // the host; and where each sampled row is in the batch (sample_at[i], i for every sampled row
  // unless a chunk's rows come before it: the rows are then moved up after the forward pass).
  struct PromptRow {
    int64_t seq;
    int64_t position; // in the scheduler's tokens (a prefix adapter's placeholders first)
    int32_t row;      // in the batch
  };
  std::vector<PromptRow> prompt_rows_now;
  std::vector<float> prompt_lp_rows;
  std::vector<int32_t> sample_at;
  // Speculative decoding: a drafter's proposals, and the histories of the rows after drafts.
  const int32_t spec_max_k = static_cast<int32_t>(spec.speculative_max_tokens);
  std::vector<int64_t> draft_seqs;
  std::vector<const int32_t *> draft_context;
  std::vector<int32_t> draft_len, draft_max, draft_out, draft_n;
  std::deque<std::vector<int32_t>> draft_histories;
  std::vector<float> draft_q_store;  // the q rows offered to the drafter, stride x vocab per sequence
  std::vector<float *> draft_q_out;
  std::vector<int32_t> draft_q_given;
  std::vector<char> draft_categorical;
  const auto speculable = [](const std::vector<std::shared_ptr<Instance>> &chain) {
    // Beams are selected across a sequence's candidates, not row by row: their requests decode
    // without drafts. Chains with per-sequence state (accept(): grammars, json-schema,
    // mirostat) verify row by row (below).
    return !chain.empty() && std::none_of(chain.begin(), chain.end(), [](const std::shared_ptr<Instance> &s) {
      return (s->vtable<loom_sampler_vtable>()->flags & LOOM_SAMPLER_BEAMS) != 0;
    });
  };
  const auto stateful = [](const std::vector<std::shared_ptr<Instance>> &chain) {
    return std::any_of(chain.begin(), chain.end(),
                       [](const std::shared_ptr<Instance> &s) { return s->vtable<loom_sampler_vtable>()->accept != nullptr; });
  };
  // A chain that can verify sampled drafts against their q: its selecting link draws from the
  // row's softmax (LOOM_SAMPLER_CATEGORICAL) and no link keeps per-sequence state, so the target's
  // distribution at every row is the softmax of the rows its other links leave.
  const auto categorical = [&](const std::vector<std::shared_ptr<Instance>> &chain) {
    return !chain.empty() && (chain.back()->vtable<loom_sampler_vtable>()->flags & LOOM_SAMPLER_CATEGORICAL) != 0 &&
           !stateful(chain);
  };

  // A request's own stop rules (ServeRequest: ignore_stop_tokens, stop_token_ids, min_tokens),
  // and its stop tokens for min_tokens' mask.
  const auto stops_of = [](const Live &l) {
    return RequestStops{l.request.ignore_stop_tokens, l.request.stop_token_ids, l.request.min_tokens};
  };
  std::vector<int32_t> masked_tokens;

  // One chain's rows of a step (sampled together).
  std::vector<int32_t> group_rows, group_tokens;
  std::vector<std::span<const int32_t>> group_history;
  std::vector<uint64_t> group_steps, group_keys;
  std::vector<std::pair<int64_t, std::string>> failed; // requests whose own chain failed this step
  std::vector<std::pair<int32_t, int32_t>> copies;
  std::vector<std::pair<int64_t, ServeRequest>> arrived;
  // Speculative decoding, before a step is planned: the drafter proposes up to k tokens for each
  // decoding sequence whose chain can verify them (Live::draft); the scheduler gives them room
  // when the budget allows (Scheduler::propose_draft).
  const auto propose_drafts = [&](Instance &drafter) {
    const bool pipeline_speculable = speculable(pipeline_.list(LOOM_KIND_SAMPLER));
    const bool pipeline_categorical = categorical(pipeline_.list(LOOM_KIND_SAMPLER));
    draft_seqs.clear();
    draft_context.clear();
    draft_len.clear();
    draft_max.clear();
    draft_categorical.clear();
    for (int64_t seq : scheduler.decoding()) {
      Live &l = live.at(seq);
      l.draft.clear();
      l.draft_q.clear();
      const bool verifiable = l.request.samplers.empty() ? pipeline_speculable : speculable(l.request.samplers);
      const int64_t room = l.request.max_new_tokens - static_cast<int64_t>(l.out.tokens.size()) - 1;
      const int32_t max_draft = static_cast<int32_t>(std::min<int64_t>(l.k, room));
      if (!verifiable || max_draft < 1) continue;
      const std::vector<int32_t> &tokens = scheduler.tokens(seq);
      draft_seqs.push_back(seq);
      draft_context.push_back(tokens.data() + l.virtual_n);
      draft_len.push_back(static_cast<int32_t>(static_cast<int64_t>(tokens.size()) - l.virtual_n));
      draft_max.push_back(max_draft);
      draft_categorical.push_back(l.request.samplers.empty() ? pipeline_categorical : categorical(l.request.samplers));
    }
    if (draft_seqs.empty()) return;
    const int32_t stride = *std::max_element(draft_max.begin(), draft_max.end());
    draft_n.assign(draft_seqs.size(), 0);
    draft_q_out.assign(draft_seqs.size(), nullptr);
    draft_q_given.assign(draft_seqs.size(), 0);
    const size_t q_row = static_cast<size_t>(config_.vocab_size);
    try {
      draft_out.assign(draft_seqs.size() * static_cast<size_t>(stride), -1);
      // Room for sampled drafts' q (stride x vocab floats a sequence: GBs for large batches and
      // vocabularies), only for a drafter built for ABI 1.10 or later (older ones never write
      // it) and only for sequences whose chain can verify them; allocated on first use. Each
      // offered row's first entry is set to NaN before the call (not the whole row: that would be
      // max_draft x vocab floats a sequence every step, even for drafters that never write q),
      // so a row the drafter leaves unwritten is no distribution, never an earlier step's q, and
      // its drafts verify as point masses. (Only rows below max_draft are read back.)
      if (drafter.library().descriptor().abi_minor >= 10) {
        const size_t offered = static_cast<size_t>(std::count(draft_categorical.begin(), draft_categorical.end(), 1));
        if (draft_q_store.size() < offered * static_cast<size_t>(stride) * q_row)
          draft_q_store.resize(offered * static_cast<size_t>(stride) * q_row);
        for (size_t i = 0, at = 0; i < draft_seqs.size(); ++i)
          if (draft_categorical[i]) {
            draft_q_out[i] = draft_q_store.data() + at;
            for (size_t j = 0; j < static_cast<size_t>(draft_max[i]); ++j)
              draft_q_out[i][j * q_row] = std::numeric_limits<float>::quiet_NaN();
            at += static_cast<size_t>(stride) * q_row;
          }
      }
      loom_draft_batch db{};
      db.struct_size = sizeof(db);
      db.n_seqs = static_cast<int32_t>(draft_seqs.size());
      db.vocab_size = static_cast<int32_t>(config_.vocab_size);
      db.seq_ids = draft_seqs.data();
      db.context = draft_context.data();
      db.context_len = draft_len.data();
      db.max_draft = draft_max.data();
      db.stride = stride;
      db.draft_out = draft_out.data();
      db.n_out = draft_n.data();
      db.q_out = draft_q_out.data();
      db.q_given = draft_q_given.data();
      drafter.check(drafter.vtable<loom_drafter_vtable>()->propose(drafter.handle(), &db), "propose");
      for (size_t i = 0; i < draft_seqs.size(); ++i) {
        Live &l = live.at(draft_seqs[i]);
        const int32_t n = std::clamp(draft_n[i], 0, draft_max[i]);
        // (A token outside the vocabulary ends the drafts: they are proposals, never trusted.)
        for (int32_t j = 0; j < n; ++j) {
          const int32_t t = draft_out[i * static_cast<size_t>(stride) + static_cast<size_t>(j)];
          if (t < 0 || t >= config_.vocab_size) break;
          l.draft.push_back(t);
        }
        // Sampled drafts keep their q; a row that is not a distribution (or gives its draft no
        // probability) makes them all point masses, which verify correctly whatever drew them.
        if (draft_q_given[i] != 0 && draft_q_out[i] != nullptr) {
          for (size_t j = 0; j < l.draft.size(); ++j) {
            const float *q = draft_q_out[i] + j * q_row;
            std::vector<float> &row = l.draft_q.emplace_back(q, q + q_row);
            if (!normalise_proposal(row, l.draft[j])) {
              l.draft_q.clear();
              break;
            }
          }
        }
        if (!l.draft.empty()) scheduler.propose_draft(draft_seqs[i], static_cast<int32_t>(l.draft.size()));
      }
    } catch (const std::exception &e) {
      // A failing drafter costs this step its drafts, never a request; so does a q buffer that
      // cannot be allocated (std::bad_alloc): drafts are optional.
      // (The throw may come after earlier sequences' propose_draft, e.g. copying a later q row:
      // their room is withdrawn too, so no step plans drafts that Live::draft no longer holds.)
      ++stats.drafter_failures;
      stats.drafter_error = e.what();
      for (int64_t seq : draft_seqs) {
        live.at(seq).draft.clear();
        live.at(seq).draft_q.clear();
        scheduler.propose_draft(seq, 0);
      }
    }
  };
  bool open = true;
  while (true) {
    report_scored_prompts();
    if (cancelled_.load()) {
      while (!live.empty()) {
        const int64_t id = live.begin()->first;
        scheduler.finish(id);
        end_request(id, ""); // what it generated so far
      }
      break;
    }
    // New requests join between steps; an idle server waits for them (a while, then looks at
    // the cancel flag again).
    arrived.clear();
    if (open) open = queue.take(arrived, scheduler.idle());
    for (auto &[id, request] : arrived) {
      std::string refused;
      if (request.prompt.empty()) refused = "an empty prompt";
      for (int32_t t : request.prompt)
        if (refused.empty() && (t < 0 || t >= config_.vocab_size))
          refused = "token " + std::to_string(t) + " is outside the vocabulary of " + std::to_string(config_.vocab_size);
      // A prefix adapter's virtual tokens go before the prompt (KV positions for its keys and
      // values); the request's own prompt and tokens are what it sees.
      const int64_t virtual_n = refused.empty() ? virtual_tokens(request.adapter) : 0;
      if (refused.empty() && (request.max_new_tokens < 1 ||
                              static_cast<int64_t>(request.prompt.size()) + virtual_n + request.max_new_tokens > max_positions))
        refused = "a prompt of " + std::to_string(request.prompt.size()) + " tokens and " +
                  std::to_string(request.max_new_tokens) + " new tokens (1 or more; " + std::to_string(max_positions) +
                  " positions in all at most)";
      for (int32_t t : request.stop_token_ids)
        if (refused.empty() && (t < 0 || t >= config_.vocab_size))
          refused = "stop token " + std::to_string(t) + " is outside the vocabulary of " + std::to_string(config_.vocab_size);
      if (refused.empty() && (request.min_tokens < 0 || request.min_tokens > request.max_new_tokens))
        refused = "min_tokens " + std::to_string(request.min_tokens) + ": 0 to max_new_tokens (" +
                  std::to_string(request.max_new_tokens) + ")";
      if (refused.empty() && (request.logprobs < -1 || request.logprobs > kMaxTopLogprobs))
        refused = "logprobs " + std::to_string(request.logprobs) + ": -1 for none, else 0 to " +
                  std::to_string(kMaxTopLogprobs) + " alternatives";
      if (refused.empty() && (request.prompt_logprobs < -1 || request.prompt_logprobs > kMaxTopLogprobs))
        refused = "prompt_logprobs " + std::to_string(request.prompt_logprobs) + ": -1 for none, else 0 to " +
                  std::to_string(kMaxTopLogprobs) + " alternatives";
      if (refused.empty() && request.prompt_logprobs >= 0 && !shares_blocks(pipeline_.list(LOOM_KIND_ATTENTION)))
        refused = "prompt_logprobs needs an attention component that knows loom_attention_batch.shared_blocks "
                  "(plugin ABI 1.9 or newer)";
      // Prompt log-probabilities: every prompt position computed, as rows of their own; its own
      // prefix-cache domain, so that no other request's blocks stand in for positions it must
      // compute (its own, after a preemption, may: those positions were computed already).
      const bool prompt_rows_wanted = request.prompt_logprobs >= 0 && request.prompt.size() > 1;
      uint64_t domain = 0;
      if (refused.empty()) {
        domain = prefix_domain(request.adapter);
        if (prompt_rows_wanted) domain = (domain ^ 0x9e3779b97f4a7c15ull) * 0xbf58476d1ce4e5b9ull + static_cast<uint64_t>(id) + 1;
      }
      std::string adapter_slot;
      if (refused.empty() && !request.adapter && backend_->one_adapter_per_row()) {
        const size_t loaded = pipeline_.list(LOOM_KIND_ADAPTER).size();
        if (loaded > 1)
          refused = std::to_string(loaded) + " adapters are loaded and on " + backend_->describe() +
                    " each request chooses one (or \"\" for the base model)";
      }
      if (refused.empty() && request.adapter && !request.adapter->empty()) {
        refused = check_adapter_choice(*request.adapter);
        if (refused.empty()) adapter_slot = *request.adapter;
      }
      if (refused.empty()) {
        try {
          scheduler.add(id, with_virtual_tokens(virtual_n, request.prompt), request.max_new_tokens, domain, prompt_rows_wanted);
        } catch (const Error &e) {
          refused = e.what();
        }
      }
      if (refused.empty() && !adapter_slot.empty()) {
        // Counted under the lock that begin_unload checks: an unload that began after the check
        // above refuses it here instead.
        std::lock_guard lock(adapter_use_.mutex);
        if (adapter_use_.draining.count(adapter_slot)) {
          refused = "adapter '" + adapter_slot + "' is being unloaded";
          scheduler.finish(id);
        } else {
          ++adapter_use_.live[adapter_slot];
        }
      }
      if (!refused.empty()) {
        if (request.on_done) {
          SequenceResult none;
          none.prompt = request.prompt;
          none.request_error = true;
          request.on_done(none, refused);
        }
        continue;
      }
      Live l;
      l.adapter_slot = std::move(adapter_slot);
      l.virtual_n = virtual_n;
      l.k = static_cast<int32_t>(spec.speculative_tokens);
      if (prompt_rows_wanted) {
        l.out.prompt_logprobs.resize(request.prompt.size() - 1);
        l.prompt_missing = request.prompt.size() - 1;
      }
      l.out.prompt = std::move(request.prompt); // (the scheduler holds its own copy for the tokens)
      l.request = std::move(request);
      live.emplace(id, std::move(l));
    }
    // Requests cancelled from outside (their client went away) leave before the step.
    ended.clear();
    for (auto &[id, l] : live)
      if (l.request.cancel && l.request.cancel->load(std::memory_order_relaxed)) ended.push_back(id);
    for (int64_t id : ended) {
      scheduler.finish(id);
      live.at(id).out.cancelled = true;
      end_request(id, "");
    }
    if (scheduler.idle()) {
      publish_load();
      if (!open) break;
      continue;
    }
    emitted.clear();
    ended.clear();
    {
      auto guard = pipeline_.begin_step();
      const auto step_start = std::chrono::steady_clock::now();
      StepRecord record;
      const auto drafters = pipeline_.list(LOOM_KIND_DRAFTER);
      const bool rows_share_blocks = shares_blocks(pipeline_.list(LOOM_KIND_ATTENTION));
      if (!drafters.empty() && rows_share_blocks) // (verification's rows share blocks)
        propose_drafts(*drafters.front());
      SchedulePlan plan = scheduler.schedule();
      if (plan.work.empty())
        throw runtime_error(manifest_.source_name + ": scheduler: no work planned while requests wait (" +
                            std::to_string(scheduler.waiting()) + " waiting, " + std::to_string(scheduler.running()) +
                            " running): the KV pool of " + std::to_string(pool.n_blocks) + " blocks is too small");
      // Rows that sample come first, so that their logits are the first rows of the output; among
      // them, the rows of the pipeline's chain, then each request's own chain (the rows of one
      // chain are contiguous and sampled together).
      std::stable_partition(plan.work.begin(), plan.work.end(), [](const ScheduledWork &w) { return w.samples; });
      const auto chain_of = [&](const ScheduledWork &w) -> const Instance * {
        const auto &own = live.at(w.seq).request.samplers;
        return own.empty() ? nullptr : own.front().get();
      };
      const auto sampling_end = std::find_if(plan.work.begin(), plan.work.end(), [](const ScheduledWork &w) { return !w.samples; });
      std::stable_sort(plan.work.begin(), sampling_end, [&](const ScheduledWork &a, const ScheduledWork &b) {
        return std::less<const Instance *>()(chain_of(a), chain_of(b));
      });
      batch.tokens.clear();
      batch.seq_offsets.assign(1, 0);
      batch.seq_positions.clear();
      batch.seq_slots.clear();
      batch.block_tables.clear();
      batch.tokens_fed = false;
      batch.shared_blocks = std::any_of(plan.work.begin(), plan.work.end(), [](const ScheduledWork &w) { return w.draft > 0; });
      int64_t cols = 1;
      for (const ScheduledWork &w : plan.work) cols = std::max<int64_t>(cols, static_cast<int64_t>(blocks.table(w.seq).size()));
      batch.table_cols = static_cast<int32_t>(cols);
      rows.clear();
      prompt_rows_now.clear();
      sample_at.clear();
      row_steps.clear();
      row_history.clear();
      row_chain.clear();
      row_draft.clear();
      row_q.clear();
      draft_histories.clear();
      // Each row's adapter, when some request chose one (StepBatch::seq_adapters).
      batch.seq_adapters.clear();
      const bool choosing = std::any_of(plan.work.begin(), plan.work.end(),
                                        [&](const ScheduledWork &w) { return live.at(w.seq).request.adapter.has_value(); });
      std::vector<std::shared_ptr<Instance>> adapters;
      if (choosing) adapters = pipeline_.list(LOOM_KIND_ADAPTER);
      for (const ScheduledWork &w : plan.work) {
        const std::vector<int32_t> &tokens = scheduler.tokens(w.seq);
        if (w.draft > 0) {
          // Verification: the last token and each draft are one-token sequences of their own
          // sharing the block table, at consecutive positions, so that each gets its logits
          // (attention reads the keys the earlier ones write in the same pass: loom/attention.h).
          // Row j is sampled as the sequence's step generated + j would be after drafts 0..j-1.
          const Live &l = live.at(w.seq);
          const int32_t adapter = choosing ? adapter_index(l.request.adapter, adapters) : 0;
          for (int32_t j = 0; j <= w.draft; ++j) {
            if (choosing) batch.seq_adapters.push_back(adapter);
            batch.tokens.push_back(j == 0 ? tokens[static_cast<size_t>(w.first_position)] : l.draft[static_cast<size_t>(j - 1)]);
            batch.seq_offsets.push_back(static_cast<int32_t>(batch.tokens.size()));
            batch.seq_positions.push_back(static_cast<int32_t>(w.first_position + j));
            append_table(blocks.table(w.seq), cols, batch.block_tables);
            record.context += w.first_position + j + 1;
            rows.push_back(static_cast<int32_t>(w.seq));
            sample_at.push_back(batch.n_seqs() - 1);
            // Row j's history: the tokens and drafts 1..j, prefixes of one copy per sequence.
            if (j == 0) {
              row_history.emplace_back(tokens);
            } else {
              if (j == 1) {
                std::vector<int32_t> &h = draft_histories.emplace_back(tokens);
                h.insert(h.end(), l.draft.begin(), l.draft.begin() + w.draft);
              }
              row_history.emplace_back(draft_histories.back().data(), tokens.size() + static_cast<size_t>(j));
            }
            row_steps.push_back(static_cast<uint64_t>(scheduler.generated(w.seq) + j));
            row_chain.push_back(chain_of(w));
            row_draft.push_back(j);
            row_q.push_back(static_cast<char>(l.draft_q.size() >= static_cast<size_t>(w.draft)));
          }
          continue;
        }
        // One entry of the batch: tokens [first, first + n) of w's sequence at their positions.
        const auto add_entry = [&](int64_t first, int32_t n) {
          if (choosing) batch.seq_adapters.push_back(adapter_index(live.at(w.seq).request.adapter, adapters));
          batch.tokens.insert(batch.tokens.end(), tokens.begin() + first, tokens.begin() + first + n);
          batch.seq_offsets.push_back(static_cast<int32_t>(batch.tokens.size()));
          batch.seq_positions.push_back(static_cast<int32_t>(first));
          append_table(blocks.table(w.seq), cols, batch.block_tables);
          record.context += first + n;
        };
        // The entry just added is a sampled row (its logits go to the chain).
        const auto sampled_row = [&] {
          rows.push_back(static_cast<int32_t>(w.seq));
          sample_at.push_back(batch.n_seqs() - 1);
          row_history.emplace_back(tokens);
          row_steps.push_back(static_cast<uint64_t>(scheduler.generated(w.seq)));
          row_chain.push_back(chain_of(w));
          row_draft.push_back(0);
          row_q.push_back(0);
        };
        Live &lw = live.at(w.seq);
        // (a chunk holding a prompt position whose log-probability is still to come)
        const bool prompt_rows_due =
            lw.prompt_missing > 0 && w.first_position < lw.virtual_n + static_cast<int64_t>(lw.out.prompt.size()) - 1;
        if (prompt_rows_due && !rows_share_blocks) lw.prompt_blocked = true; // (prefilled as usual; it ends with an error)
        if (prompt_rows_due && !lw.prompt_blocked) {
          // Prompt log-probabilities: each position a one-token row of its own sharing the block
          // table, in position order (as verification's rows: loom/attention.h), so that each
          // gets its logits. The last one samples when the chunk does.
          for (int32_t j = 0; j < w.n_tokens; ++j) {
            add_entry(w.first_position + j, 1);
            if (w.samples && j + 1 == w.n_tokens) sampled_row();
            else prompt_rows_now.push_back({w.seq, w.first_position + j, batch.n_seqs() - 1});
          }
          batch.shared_blocks = true; // its rows read keys the earlier ones write
          continue;
        }
        add_entry(w.first_position, w.n_tokens);
        if (w.samples) sampled_row();
      }
      copies.clear();
      for (const BlockCopy &c : plan.copies) copies.emplace_back(c.src, c.dst);
      if (!copies.empty()) backend_->copy_blocks(copies);
      DLTensor *logits = backend_->forward(batch);
      all_reduce(logits);
      ++stats.steps;
      record.sequences = static_cast<int32_t>(plan.work.size());
      record.tokens = static_cast<int32_t>(batch.tokens.size());
      record.sampled = static_cast<int32_t>(rows.size());
      auto log_step = [&] {
        record.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
        if (stats.step_log.size() < SchedulerStats::kStepLogLimit) stats.step_log.push_back(record);
      };
      const size_t V = static_cast<size_t>(config_.vocab_size);
      // Rows read on the host are [rows, vocab] float32, row-major (as sample() checks the shape
      // for the chains): anything else is the backend's error, not a request's.
      const auto check_host_readable = [&](size_t n_rows, const char *why) {
        if (logits->ndim != 2 || logits->shape[0] < static_cast<int64_t>(n_rows) || logits->shape[1] != config_.vocab_size)
          throw runtime_error(manifest_.source_name + ": the model backend returned logits of the wrong shape");
        if (logits->dtype.code != kDLFloat || logits->dtype.bits != 32 || logits->dtype.lanes != 1 ||
            (logits->strides != nullptr && (logits->strides[1] != 1 || logits->strides[0] != logits->shape[1])))
          throw runtime_error(manifest_.source_name + ": the model backend returned logits that are not compact float32 rows (" +
                              why + ")");
      };
      if (!prompt_rows_now.empty()) {
        // Prompt log-probabilities: the row at position q is the distribution of the token at
        // q + 1; the prompt's (past a prefix adapter's placeholders) are kept, once each. Then
        // the sampled rows move up to the first rows.size() rows, where the chains read them
        // (each to a row at or before its own, in order, so no row is overwritten before it moved).
        const size_t n = prompt_rows_now.size();
        check_host_readable(static_cast<size_t>(batch.n_seqs()), "prompt log-probabilities");
        prompt_lp_rows.resize(n * V);
        std::string error;
        const auto row_bytes = [&](size_t row) { return static_cast<char *>(logits->data) + logits->byte_offset + row * V * sizeof(float); };
        // One copy per run of consecutive batch rows (a chunk's rows are one run, but the one that
        // samples).
        for (size_t k = 0, run = 1; k < n; k += run) {
          for (run = 1; k + run < n && prompt_rows_now[k + run].row == prompt_rows_now[k].row + static_cast<int32_t>(run);) ++run;
          if (device_memcpy(prompt_lp_rows.data() + k * V, DLDevice{kDLCPU, 0}, row_bytes(static_cast<size_t>(prompt_rows_now[k].row)),
                            logits->device, run * V * sizeof(float), error) != LOOM_OK)
            throw runtime_error(manifest_.source_name + ": copying logits to the host for prompt log-probabilities: " + error);
        }
        for (size_t i = 0; i < sample_at.size(); ++i)
          if (static_cast<size_t>(sample_at[i]) != i &&
              device_memcpy(row_bytes(i), logits->device, row_bytes(static_cast<size_t>(sample_at[i])), logits->device,
                            V * sizeof(float), error) != LOOM_OK)
            throw runtime_error(manifest_.source_name + ": moving the sampled rows of logits up: " + error);
        for (size_t k = 0; k < n; ++k) {
          Live &l = live.at(prompt_rows_now[k].seq);
          const int64_t i = prompt_rows_now[k].position - l.virtual_n;
          if (i < 0 || i + 1 >= static_cast<int64_t>(l.out.prompt.size())) continue;
          TokenLogprob &entry = l.out.prompt_logprobs[static_cast<size_t>(i)];
          if (entry.token >= 0) continue; // (computed before a preemption)
          entry = token_logprob(std::span<const float>(prompt_lp_rows.data() + k * V, V), l.out.prompt[static_cast<size_t>(i) + 1],
                                l.request.prompt_logprobs);
          if (--l.prompt_missing == 0 && l.request.on_prompt_logprobs) prompts_scored.push_back(prompt_rows_now[k].seq);
        }
      }
      if (rows.empty()) { // prefill chunks only
        log_step();
        continue;
      }
      // The first rows.size() rows of the logits are the sampled ones.
      // Log-probabilities (ServeRequest::logprobs): the rows of the requests that asked, raw, on
      // the host before any sampler link rewrites them (a sequence verifying drafts: each of its
      // rows, the kept drafts' included).
      lp_at.assign(rows.size(), -1);
      int64_t lp_n = 0;
      for (size_t i = 0; i < rows.size(); ++i)
        if (live.at(rows[i]).request.logprobs >= 0) lp_at[i] = lp_n++;
      if (lp_n > 0) {
        check_host_readable(rows.size(), "log-probabilities");
        lp_rows.resize(static_cast<size_t>(lp_n) * V); // (as sample()'s host rows: no memory is the engine's failure)
        for (size_t i = 0; i < rows.size();) {
          size_t n = 0;
          while (i + n < rows.size() && lp_at[i + n] >= 0) ++n;
          if (n == 0) {
            ++i;
            continue;
          }
          std::string error;
          const char *src = static_cast<const char *>(logits->data) + logits->byte_offset + i * V * sizeof(float);
          if (device_memcpy(lp_rows.data() + static_cast<size_t>(lp_at[i]) * V, DLDevice{kDLCPU, 0}, src, logits->device,
                            n * V * sizeof(float), error) != LOOM_OK)
            throw runtime_error(manifest_.source_name + ": copying logits to the host for log-probabilities: " + error);
          i += n;
        }
      }
      // min_tokens: a row of a request short of it gives its stop tokens no probability (after
      // the log-probabilities' copy, which reports the raw rows).
      bool mask_checked = false;
      for (size_t i = 0; i < rows.size(); ++i) {
        const Live &l = live.at(rows[i]);
        if (static_cast<int64_t>(row_steps[i]) >= l.request.min_tokens) continue;
        masked_tokens.assign(l.request.stop_token_ids.begin(), l.request.stop_token_ids.end());
        if (!l.request.ignore_stop_tokens) masked_tokens.insert(masked_tokens.end(), stop_tokens_.begin(), stop_tokens_.end());
        if (masked_tokens.empty()) continue;
        if (!std::exchange(mask_checked, true)) check_host_readable(rows.size(), "min_tokens");
        const float none = -std::numeric_limits<float>::infinity();
        for (int32_t t : masked_tokens) {
          char *at = static_cast<char *>(logits->data) + logits->byte_offset + (i * V + static_cast<size_t>(t)) * sizeof(float);
          std::string error;
          if (device_memcpy(at, logits->device, &none, DLDevice{kDLCPU, 0}, sizeof none, error) != LOOM_OK)
            throw runtime_error(manifest_.source_name + ": masking stop tokens for min_tokens: " + error);
        }
      }
      sampled.assign(rows.size(), -1);
      // Samples rows [begin, end), all of one chain, in one call, and tells the chain's links
      // the tokens. A request's own chain failing fails that request only; so does the
      // pipeline's chain failing on a row after drafts (`contained`); otherwise its failure is
      // the engine's.
      const auto sample_rows = [&](size_t begin, size_t end, bool contained) {
        const ServeRequest &first = live.at(rows[begin]).request;
        group_rows.assign(rows.begin() + static_cast<std::ptrdiff_t>(begin), rows.begin() + static_cast<std::ptrdiff_t>(end));
        group_history.assign(row_history.begin() + static_cast<std::ptrdiff_t>(begin),
                             row_history.begin() + static_cast<std::ptrdiff_t>(end));
        group_steps.assign(row_steps.begin() + static_cast<std::ptrdiff_t>(begin), row_steps.begin() + static_cast<std::ptrdiff_t>(end));
        group_keys.clear();
        for (int32_t seq : group_rows) group_keys.push_back(live.at(seq).request.seed.value_or(manifest_.seed));
        DLTensor group_logits = *logits;
        int64_t shape[2] = {static_cast<int64_t>(end - begin), logits->shape[1]};
        group_logits.shape = shape;
        // (data moved rather than byte_offset: links index from data)
        group_logits.data = static_cast<char *>(logits->data) + logits->byte_offset +
                            begin * static_cast<size_t>(logits->shape[1]) * (logits->dtype.bits / 8u);
        group_logits.byte_offset = 0;
        if (first.samplers.empty() && !contained) {
          sample(&group_logits, group_rows, group_history, 0, group_tokens, false, &group_steps, &first.samplers, &group_keys);
          accept_tokens(group_rows, group_tokens, &first.samplers);
        } else {
          // (a constraint nothing satisfies, say): its rows get no token and the request ends
          // with the error below.
          try {
            sample(&group_logits, group_rows, group_history, 0, group_tokens, false, &group_steps, &first.samplers, &group_keys);
            accept_tokens(group_rows, group_tokens, &first.samplers);
          } catch (const Error &e) {
            group_tokens.assign(group_rows.size(), -1);
            for (int32_t seq : group_rows) // (a sequence verifying drafts has several rows: once each)
              if (failed.empty() || failed.back().first != seq) failed.emplace_back(seq, e.what());
          }
        }
        std::copy(group_tokens.begin(), group_tokens.end(), sampled.begin() + static_cast<std::ptrdiff_t>(begin));
      };
      // One sampling call per chain, over its contiguous rows. A chain with per-sequence state
      // verifying drafts goes row by row instead: row j is sampled only when rows 0..j-1 gave
      // the drafts, none of them a stop token, after the chain accepted those tokens, so its
      // state is the one decoding without drafts has there; the rows after the first difference
      // are not sampled (-1). (A stop string among them ends the request below, and a failure
      // of a row after it is dropped there.)
      // Sampled drafts (rows [begin, end), whole sequences of one categorical chain): the
      // chain's links but the selecting one rewrite a host copy of each sequence's rows, whose
      // softmax is the target's distribution p there, and the rejection rule against the drafts'
      // q picks the tokens (core/draft_verification.hpp). A failing link fails that request.
      const auto verify_sampled = [&](size_t begin, size_t end) {
        const ServeRequest &first = live.at(rows[begin]).request;
        const std::vector<std::shared_ptr<Instance>> chain =
            first.samplers.empty() ? pipeline_.list(LOOM_KIND_SAMPLER) : first.samplers;
        const std::vector<std::shared_ptr<Instance>> links(chain.begin(), chain.end() - 1);
        check_host_readable(end, "verifying sampled drafts");
        for (size_t r = begin; r < end;) {
          const int64_t seq = rows[r];
          size_t n = 1;
          while (r + n < end && row_draft[r + n] > 0) ++n;
          const Live &l = live.at(seq);
          try {
            std::vector<float> host(n * V);
            std::string error;
            const char *src = static_cast<const char *>(logits->data) + logits->byte_offset + r * V * sizeof(float);
            if (device_memcpy(host.data(), DLDevice{kDLCPU, 0}, src, logits->device, host.size() * sizeof(float), error) != LOOM_OK)
              throw runtime_error("copying logits to the host to verify sampled drafts: " + error);
            const uint64_t key = l.request.seed.value_or(manifest_.seed);
            if (!links.empty()) {
              SamplingRows sampling;
              for (size_t i = 0; i < n; ++i) sampling.add(seq, row_history[r + i], key, row_steps[r + i]);
              int64_t shape[2] = {static_cast<int64_t>(n), static_cast<int64_t>(V)};
              DLTensor view{host.data(), DLDevice{kDLCPU, 0}, 2, DLDataType{kDLFloat, 32, 1}, shape, nullptr, 0};
              std::vector<int32_t> none(n, -1);
              apply_chain(links, sampling.batch(&view, static_cast<int64_t>(V), none.data()),
                          "selecting samplers (greedy, dist) must come last");
            }
            std::vector<std::vector<double>> p(n, std::vector<double>(V));
            for (size_t i = 0; i < n; ++i) probabilities_of(std::span<const float>(host.data() + i * V, V), p[i]);
            std::vector<int32_t> tokens;
            verify_sampled_drafts(p, std::span(l.draft_q.data(), n - 1), std::span(l.draft.data(), n - 1), key,
                                  std::span(row_steps.data() + r, n), tokens);
            std::copy(tokens.begin(), tokens.end(), sampled.begin() + static_cast<std::ptrdiff_t>(r));
          } catch (const std::exception &e) {
            // (a link failing, a NaN logit, or the host rows not allocated: std::bad_alloc)
            failed.emplace_back(seq, e.what());
          }
          r += n;
        }
      };
      for (size_t begin = 0; begin < rows.size();) {
        const ServeRequest &first = live.at(rows[begin]).request;
        const Instance *chain = first.samplers.empty() ? nullptr : first.samplers.front().get();
        size_t end = begin + 1;
        while (end < rows.size() && row_chain[end] == chain && row_q[end] == row_q[begin]) ++end;
        if (row_q[begin] != 0) {
          verify_sampled(begin, end);
          begin = end;
          continue;
        }
        const bool verifying = std::any_of(row_draft.begin() + static_cast<std::ptrdiff_t>(begin),
                                           row_draft.begin() + static_cast<std::ptrdiff_t>(end), [](int32_t j) { return j > 0; });
        if (!verifying || !(first.samplers.empty() ? stateful(pipeline_.list(LOOM_KIND_SAMPLER)) : stateful(first.samplers))) {
          sample_rows(begin, end, false);
        } else {
          for (size_t r = begin; r < end; ++r) {
            const int32_t j = row_draft[r];
            const Live &l = live.at(rows[r]);
            if (j > 0 && (sampled[r - 1] != l.draft[static_cast<size_t>(j - 1)] || is_stop_token(sampled[r - 1], stops_of(l))))
              continue;
            sample_rows(r, r + 1, j > 0);
          }
        }
        begin = end;
      }
      size_t r = 0;
      for (const ScheduledWork &w : plan.work) {
        if (!w.samples) continue;
        const int64_t seq = w.seq;
        const size_t first_row = r;
        const int32_t *got = sampled.data() + r; // 1 + w.draft rows
        r += static_cast<size_t>(1 + w.draft);
        Live &l = live.at(seq);
        // Drafts are kept while each equals what the target sampled at its position (the token
        // the target itself would have produced there, with the same random numbers); the row
        // after the last kept draft gives the step's own token. So the tokens are exactly those
        // of decoding without drafts: for greedy chains the argmax, for sampling chains the
        // rejection-sampling rule with a point-mass proposal (DESIGN.md "Speculative decoding").
        // Sampled drafts (verify_sampled) come here as the kept drafts and then a token that
        // differs from the next draft, so the same walk counts them.
        int32_t kept = 0;
        while (kept < w.draft && got[kept] == l.draft[static_cast<size_t>(kept)]) ++kept;
        // No token where its chain failed (the error is in `failed`): the tokens before it are
        // those decoding without drafts gives before the same failure.
        const bool chain_failed = got[kept] < 0;
        if (chain_failed && kept == 0) {
          scheduler.finish(seq);
          continue;
        }
        if (w.draft > 0) {
          stats.drafted_tokens += w.draft;
          stats.accepted_tokens += kept;
          record.drafted += w.draft;
          record.accepted += kept;
          if (spec.speculative_adaptive) // (transformers' "heuristic" schedule: +2 when all were kept, else -1)
            l.k = kept == w.draft ? std::min(l.k + 2, spec_max_k) : std::max(1, l.k - 1);
        }
        bool done = false;
        for (int32_t i = 0; i < kept + (chain_failed ? 0 : 1) && !done; ++i) {
          const int32_t token = got[i];
          l.out.tokens.push_back(token);
          if (l.request.logprobs >= 0 && lp_at[first_row + static_cast<size_t>(i)] >= 0)
            l.out.logprobs.push_back(token_logprob(
                std::span<const float>(lp_rows.data() + static_cast<size_t>(lp_at[first_row + static_cast<size_t>(i)]) * V, V),
                token, l.request.logprobs));
          emitted.push_back({seq, static_cast<int64_t>(l.out.tokens.size()) - 1, token});
          done = hits_stop(l.out.prompt, l.out, token, &l.stopped_by_string, l.request.stop ? &*l.request.stop : nullptr,
                           stops_of(l), &l.text_cache) ||
                 static_cast<int64_t>(l.out.tokens.size()) >= l.request.max_new_tokens;
        }
        if (done) {
          // (decoding without drafts would have stopped before the failing row)
          if (chain_failed) std::erase_if(failed, [&](const auto &f) { return f.first == seq; });
          scheduler.finish(seq); // its blocks go back to the pool (full ones stay cached)
          ended.push_back(seq);
          l.ending = true;
        } else if (chain_failed) {
          scheduler.finish(seq); // it ends with its chain's error (`failed`)
        } else {
          if (kept > 0) scheduler.accept_drafts(seq, l.draft.data(), kept);
          scheduler.append(seq, got[kept]);
        }
      }
      log_step();
    }
    // Callbacks run outside the step lock: a swap they make lands before the next step. A
    // request whose callback says stop ends here.
    report_scored_prompts();
    for (const Emitted &e : emitted) {
      Live &l = live.at(e.seq);
      if (l.cut == SIZE_MAX && l.request.on_logprob && static_cast<size_t>(e.index) < l.out.logprobs.size())
        l.request.on_logprob(e.index, l.out.logprobs[static_cast<size_t>(e.index)]);
      if (l.cut != SIZE_MAX || !l.request.on_token || l.request.on_token(e.index, e.token)) continue;
      l.cut = static_cast<size_t>(e.index) + 1; // (later tokens of this step are dropped)
      if (!l.ending) {
        l.out.cancelled = true;
        scheduler.finish(e.seq);
        ended.push_back(e.seq);
        l.ending = true;
      }
    }
    for (int64_t seq : ended) end_request(seq, "");
    for (const auto &[seq, error] : failed) {
      Live &l = live.at(seq);
      l.out.request_error = !l.request.samplers.empty(); // its own chain, not the pipeline's
      end_request(seq, "sampling: " + error);
    }
    failed.clear();
    publish_load();
  }
  const KvBlockStats block_stats = blocks.stats();
  stats.used = true;
  stats.preemptions = scheduler.preemptions();
  stats.prompt_tokens = block_stats.queried_tokens;
  stats.cached_tokens = block_stats.hit_tokens;
  stats.prefix_cache_hit_rate = block_stats.hit_rate();
  stats.kv_blocks = pool.n_blocks;
  stats.block_size = pool.block_size;
  return stats;
}

std::string ModelDecoder::check_adapter_choice(const std::string &slot) const {
  std::string loaded;
  for (const auto &a : pipeline_.list(LOOM_KIND_ADAPTER)) {
    if (a->slot() == slot) return "";
    loaded += (loaded.empty() ? "" : ", ") + a->slot();
  }
  return "adapter '" + slot + "' is not loaded (" + (loaded.empty() ? "no adapters" : "loaded: " + loaded) + ")";
}

int32_t ModelDecoder::adapter_index(const std::optional<std::string> &choice,
                                    const std::vector<std::shared_ptr<Instance>> &adapters) const {
  if (!choice) return StepBatch::kEveryAdapter;
  if (choice->empty()) return StepBatch::kNoAdapter;
  for (size_t k = 0; k < adapters.size(); ++k)
    if (adapters[k]->slot() == *choice) return static_cast<int32_t>(k);
  // A live request's adapter stays loaded until it ends (begin_unload waits for it).
  throw runtime_error(manifest_.source_name + ": adapter '" + *choice + "' of a live request is gone");
}

uint64_t ModelDecoder::prefix_domain(const std::optional<std::string> &choice) const {
  // What a sequence's KV depends on besides its tokens: its adapter, and the weights as swaps,
  // loads, unloads and merges left them. 0 (the manifest's own pipeline, never changed) keeps
  // the domain of runs without choices.
  const uint64_t generation = pipeline_.swaps() * 0x9e3779b97f4a7c15ull ^ merges_.load() * 0xc2b2ae3d27d4eb4full;
  if (!choice && generation == 0) return 0;
  uint64_t h = 1469598103934665603ull ^ generation;
  const std::string key = !choice ? std::string("*") : "=" + *choice;
  for (unsigned char c : key) h = (h ^ c) * 1099511628211ull;
  return h == 0 ? 1 : h;
}

void ModelDecoder::begin_unload(const std::string &slot, double timeout_s) {
  std::unique_lock lock(adapter_use_.mutex);
  adapter_use_.draining.insert(slot);
  const bool drained = adapter_use_.changed.wait_for(lock, std::chrono::duration<double>(timeout_s),
                                                     [&] { return adapter_use_.live.count(slot) == 0; });
  if (!drained) {
    adapter_use_.draining.erase(slot);
    throw runtime_error("unload " + slot + ": " + std::to_string(adapter_use_.live[slot]) +
                        " requests still run with it after " + std::to_string(timeout_s) + " s; it stays loaded");
  }
}

void ModelDecoder::end_unload(const std::string &slot) {
  std::lock_guard lock(adapter_use_.mutex);
  adapter_use_.draining.erase(slot);
}

void ModelDecoder::merge_adapter(const Instance &adapter, bool merge) {
  auto guard = pipeline_.begin_step();
  if (merge) backend_->merge_adapter(adapter);
  else backend_->unmerge_adapter(adapter);
  merges_.fetch_add(1);
}

void ModelDecoder::generate_scheduled(int64_t steps, const TokenCallback &on_token,
                                      const SequenceTokenCallback &on_sequence_token, RunResult &result) {
  const size_t n = prompts_.size();
  const std::vector<int64_t> limits = step_limits(steps);
  const size_t longest = start_run(steps, result);
  const auto start = std::chrono::steady_clock::now();
  // Every prompt queued at once; the run stops (every request) when a callback says so.
  RequestQueue queue;
  bool stop_all = false;
  size_t first_tokens = 0;
  for (size_t i = 0; i < n; ++i) {
    ServeRequest r;
    r.prompt = prompts_[i];
    r.max_new_tokens = limits[i];
    if (manifest_.run.n > 1) r.seed = sample_key(i);
    const int32_t seq = static_cast<int32_t>(i);
    r.on_token = [&, seq](int64_t index, int32_t token) {
      if (index == 0 && ++first_tokens == n)
        result.prefill_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (!stop_all && seq == 0 && on_token && !on_token(static_cast<int32_t>(index), token)) stop_all = true;
      if (!stop_all && on_sequence_token && !on_sequence_token(seq, static_cast<int32_t>(index), token)) stop_all = true;
      return !stop_all;
    };
    r.on_done = [&, i](const SequenceResult &out, const std::string &error) {
      if (!error.empty())
        throw runtime_error(manifest_.source_name + ": run.prompts[" + std::to_string(i / static_cast<size_t>(manifest_.run.n)) +
                            "]: " + error);
      result.sequences[i] = out;
    };
    queue.submit(std::move(r));
  }
  queue.close();
  result.scheduler = serve(queue, static_cast<int64_t>(longest) + steps);
  result.cancelled = cancelled_.load();
  // "Prefill" time: until every request had its first token (admitted, prefilled, sampled).
  result.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() -
                          result.prefill_seconds;
  take_first_sequence(result);
}

} // namespace loom
