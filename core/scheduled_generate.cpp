// ModelDecoder::generate_scheduled: the run's prompts served as requests by core's
// continuous-batching scheduler (loom/core/scheduler.hpp) over a paged KV cache
// (loom/core/kv_blocks.hpp), when the manifest has [scheduler].
//
// Every step the scheduler plans the work: one token for each running sequence, then chunks of
// prompts (a long prompt over several steps) within the step's token budget, admitting waiting
// requests while the sequence budget and the KV pool allow, and preempting the newest running
// sequence (its blocks freed, its tokens recomputed later) when the pool runs out. The decoder
// runs the plan as one ragged forward pass with each sequence's block table, samples the rows
// whose chunk reached their last token, and applies the stop rules; a finished sequence leaves
// and frees its blocks at once, so a waiting request can take its place at the next step.
//
// Results are the same as the fixed batch's: every row's RNG counter is its own sequence's step,
// a sequence's KV entries are the same whichever blocks hold them, and a preempted sequence
// recomputes exactly the tokens it had. No decode-ahead here (each step waits for its tokens).
#include <algorithm>
#include <chrono>

#include "loom/core/error.hpp"
#include "loom/core/kv_blocks.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/core/scheduler.hpp"
#include "model_decoder.hpp"

namespace loom {

void ModelDecoder::generate_scheduled(int64_t steps, const TokenCallback &on_token,
                                      const SequenceTokenCallback &on_sequence_token, RunResult &result) {
  const SchedulerSpec &spec = manifest_.scheduler;
  const size_t n = prompts_.size();
  const std::vector<int64_t> limits = step_limits(steps);
  auto limit_of = [&](size_t seq) { return limits[seq]; };
  const size_t longest = start_run(steps, result);
  ForgetSequences release_at_end{pipeline_};

  const auto start = std::chrono::steady_clock::now();
  ModelBackend::BlockPool pool;
  {
    auto guard = pipeline_.begin_step();
    pool = backend_->reserve_blocks(static_cast<int32_t>(spec.max_seqs), static_cast<int64_t>(longest) + steps,
                                    spec.kv_blocks, static_cast<uint64_t>(spec.kv_cache_mib) << 20);
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
  options.window = static_cast<int32_t>(config_.sliding_window); // the attention plugins apply it
  Scheduler scheduler(options, blocks);
  for (size_t i = 0; i < n; ++i) {
    try {
      scheduler.add(static_cast<int64_t>(i), prompts_[i], limit_of(i));
    } catch (const Error &e) {
      throw runtime_error(manifest_.source_name + ": run.prompts[" + std::to_string(i) + "]: " + e.what());
    }
  }

  std::vector<std::vector<int32_t>> histories = prompts_; // prompt then generated, by sequence
  std::vector<bool> stopped_by_string(n, false);
  StepBatch batch;
  std::vector<int32_t> rows, sampled;
  std::vector<uint64_t> row_steps;
  std::vector<std::pair<int32_t, int32_t>> copies;
  int64_t step_index = 0;
  auto decode_start = start;
  while (!scheduler.idle()) {
    if (cancelled_.load()) {
      result.cancelled = true;
      break;
    }
    std::vector<std::pair<int32_t, int32_t>> emitted; // (sequence, token) of this step
    {
      auto guard = pipeline_.begin_step();
      SchedulePlan plan = scheduler.schedule();
      if (plan.work.empty())
        throw runtime_error(manifest_.source_name + ": scheduler: no work planned while requests wait (" +
                            std::to_string(scheduler.waiting()) + " waiting, " + std::to_string(scheduler.running()) +
                            " running): the KV pool of " + std::to_string(pool.n_blocks) + " blocks is too small");
      // Rows that sample come first, so that their logits are the first rows of the output.
      std::stable_partition(plan.work.begin(), plan.work.end(), [](const ScheduledWork &w) { return w.samples; });
      batch.tokens.clear();
      batch.seq_offsets.assign(1, 0);
      batch.seq_positions.clear();
      batch.seq_slots.clear();
      batch.block_tables.clear();
      batch.tokens_fed = false;
      int64_t cols = 1;
      for (const ScheduledWork &w : plan.work) cols = std::max<int64_t>(cols, static_cast<int64_t>(blocks.table(w.seq).size()));
      batch.table_cols = static_cast<int32_t>(cols);
      rows.clear();
      row_steps.clear();
      for (const ScheduledWork &w : plan.work) {
        const std::vector<int32_t> &tokens = scheduler.tokens(w.seq);
        batch.tokens.insert(batch.tokens.end(), tokens.begin() + w.first_position,
                            tokens.begin() + w.first_position + w.n_tokens);
        batch.seq_offsets.push_back(static_cast<int32_t>(batch.tokens.size()));
        batch.seq_positions.push_back(static_cast<int32_t>(w.first_position));
        // Blocks dropped behind a sliding window are never attended to, but a kernel may still
        // load a masked tile that reaches back into them: their entries name the sequence's
        // first live block (written data, finite), as do the columns past its table.
        const std::vector<int32_t> &table = blocks.table(w.seq);
        const auto live = std::find_if(table.begin(), table.end(), [](int32_t b) { return b != KvBlockManager::kDropped; });
        const int32_t filler = live != table.end() ? *live : 0;
        for (int32_t b : table) batch.block_tables.push_back(b == KvBlockManager::kDropped ? filler : b);
        batch.block_tables.resize(batch.block_tables.size() + static_cast<size_t>(cols) - table.size(), filler);
        if (w.samples) {
          rows.push_back(static_cast<int32_t>(w.seq));
          row_steps.push_back(static_cast<uint64_t>(scheduler.generated(w.seq)));
        }
      }
      copies.clear();
      for (const BlockCopy &c : plan.copies) copies.emplace_back(c.src, c.dst);
      if (!copies.empty()) backend_->copy_blocks(copies);
      DLTensor *logits = backend_->forward(batch);
      all_reduce(logits);
      ++step_index;
      if (rows.empty()) continue; // prefill chunks only
      DLTensor sampled_rows = *logits; // the first rows.size() rows
      int64_t shape[2] = {static_cast<int64_t>(rows.size()), logits->shape[1]};
      sampled_rows.shape = shape;
      sample(&sampled_rows, rows, histories, 0, sampled, false, &row_steps);
      accept_tokens(rows, sampled);
      for (size_t r = 0; r < rows.size(); ++r) {
        const int32_t seq = rows[r], token = sampled[r];
        SequenceResult &out = result.sequences[static_cast<size_t>(seq)];
        scheduler.append(seq, token);
        histories[static_cast<size_t>(seq)].push_back(token);
        out.tokens.push_back(token);
        emitted.emplace_back(seq, token);
        bool done = std::find(stop_tokens_.begin(), stop_tokens_.end(), token) != stop_tokens_.end();
        if (!done && !manifest_.run.stop.empty() && generated_text(prompts_[static_cast<size_t>(seq)], out.tokens, &out.text))
          done = stopped_by_string[static_cast<size_t>(seq)] = true;
        if (done) out.stopped = true;
        if (done || static_cast<int64_t>(out.tokens.size()) >= limit_of(static_cast<size_t>(seq))) {
          scheduler.finish(seq); // its blocks go back to the pool (full ones stay cached)
          release_sequence(seq);
        }
      }
      // "Prefill" time: until every request has its first token (admitted, prefilled, sampled).
      if (result.prefill_seconds == 0 && std::none_of(result.sequences.begin(), result.sequences.end(),
                                                      [](const SequenceResult &s) { return s.tokens.empty(); })) {
        decode_start = std::chrono::steady_clock::now();
        result.prefill_seconds = std::chrono::duration<double>(decode_start - start).count();
      }
    }
    // Callbacks run outside the step lock: a swap they make lands before the next step.
    bool go_on = true;
    for (size_t e = 0; e < emitted.size() && go_on; ++e) {
      const auto [seq, token] = emitted[e];
      const int32_t at = static_cast<int32_t>(result.sequences[static_cast<size_t>(seq)].tokens.size()) - 1;
      if (seq == 0 && on_token && !on_token(at, token)) go_on = false;
      if (go_on && on_sequence_token && !on_sequence_token(seq, at, token)) go_on = false;
    }
    if (!go_on) break;
  }
  result.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - decode_start).count();
  if (tokenizer_)
    for (size_t i = 0; i < n; ++i)
      if (!stopped_by_string[i]) generated_text(prompts_[i], result.sequences[i].tokens, &result.sequences[i].text);
  const KvBlockStats stats = blocks.stats();
  result.scheduler.used = true;
  result.scheduler.steps = step_index;
  result.scheduler.preemptions = scheduler.preemptions();
  result.scheduler.prompt_tokens = stats.queried_tokens;
  result.scheduler.cached_tokens = stats.hit_tokens;
  result.scheduler.prefix_cache_hit_rate = stats.hit_rate();
  result.scheduler.kv_blocks = pool.n_blocks;
  result.scheduler.block_size = pool.block_size;
  const SequenceResult &first = result.sequences.front();
  result.prompt = first.prompt;
  result.tokens = first.tokens;
  result.text = first.text;
  result.stopped = first.stopped;
}

} // namespace loom
