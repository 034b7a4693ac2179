// Beam search in the decoder: what ModelDecoder::generate runs when the sampler chain's
// selecting link has LOOM_SAMPLER_BEAMS (plugin-api/include/loom/sampler.h says what the link
// decides; here is what the host does around it).
//
// Each prompt becomes a beam group of W rows (W = the link's width()), in KV slots
// [g * W, (g + 1) * W) at first. A prompt is prefilled once, in its group's first slot, and
// its cache copied to the other W - 1 (its logits row is repeated for them). Every step the
// chain runs over the rows of the groups still going (each row its own history and sampler
// seq_id), and the link writes for each row the row it continues (its parent) and its token.
// The host then makes every new row a continuation of its parent:
//   - KV cache: the first child of a parent keeps the parent's slot; each other child takes the
//     slot of a parent that has no child and a copy of its own parent's cache (copy_slot);
//   - history: the parent's, plus the token;
//   - other links' per-sequence state: the first child keeps the parent's seq_id; each other
//     child gets a new one, fork()ed from the parent's before any accept(); parents without a
//     child are release()d; then every row accept()s its token.
// A group the link reports done leaves the batch; the link's finish() gives its best
// hypothesis, which becomes the prompt's SequenceResult (tokens, an ending stop token
// included; stopped when it ends with one). Cancelled runs give an unfinished prompt its best
// running beam.
//
// Streaming: a beam's tokens are not final until its group is done, so on_token and
// on_sequence_token get nothing while beams run; when the run ends they get each prompt's
// hypothesis token by token (steps 0, 1, ...), prompt by prompt; returning false stops the
// calls. Stop strings are refused (they would need each beam's text at every step): stop
// tokens are the link's end tokens.
#include <algorithm>
#include <chrono>
#include <cstring>

#include "loom/core/error.hpp"
#include "loom/core/host_buffer.hpp"
#include "loom/core/host_context.hpp"
#include "model_decoder.hpp"

namespace loom {

namespace {

// One row of the beam batch: a beam of group `group`.
struct BeamRow {
  int32_t group = 0;
  int64_t seq = 0;  // the seq_id the other links key their state by
  int32_t slot = 0; // the KV slot
  std::vector<int32_t> history;
};

std::string named(const Instance &link) { return link.slot() + " (" + link.desc().name + ")"; }

const loom_sampler_beams *beams_of(const Instance &link) {
  const auto *beams = link.extension<loom_sampler_beams>(LOOM_SAMPLER_BEAMS_EXTENSION);
  if (!LOOM_HAS_FIELD(beams, loom_sampler_beams, finish) || beams->width == nullptr || beams->finish == nullptr)
    throw runtime_error(named(link) + ": declares LOOM_SAMPLER_BEAMS but offers no " LOOM_SAMPLER_BEAMS_EXTENSION);
  return beams;
}

// Calls fn(instance, vtable) for every link of the chain.
template <class F> void each_link(Pipeline &pipeline, F &&fn) {
  for (auto &s : pipeline.list(LOOM_KIND_SAMPLER)) fn(*s, *s->vtable<loom_sampler_vtable>());
}

} // namespace

bool ModelDecoder::beam_chain() const {
  auto chain = pipeline_.list(LOOM_KIND_SAMPLER);
  return !chain.empty() && (chain.back()->vtable<loom_sampler_vtable>()->flags & LOOM_SAMPLER_BEAMS) != 0;
}

void ModelDecoder::generate_beams(int64_t steps, const TokenCallback &on_token,
                                  const SequenceTokenCallback &on_sequence_token, RunResult &result) {
  const std::shared_ptr<Instance> link = pipeline_.list(LOOM_KIND_SAMPLER).back();
  if (!manifest_.run.stop.empty())
    throw manifest_error(manifest_.source_name + ": run.stop: stop strings are not supported with beam search (" +
                         named(*link) + "); use run.stop_tokens");
  const loom_sampler_beams *beams = beams_of(*link);
  const int32_t W = beams->width(link->handle());
  if (W < 1 || W > 1024) throw runtime_error(named(*link) + ": width() returned " + std::to_string(W));
  const size_t n = prompts_.size();
  const int64_t vocab = config_.vocab_size;
  const size_t longest = start_run(steps, result);
  // However the run ends, every link forgets its sequences (and the beam link its groups).
  ForgetSequences forget{pipeline_};

  std::vector<BeamRow> rows; // the groups still going, W adjacent rows each, in group order
  std::vector<float> host_logits; // [rows, vocab]
  int64_t next_seq = static_cast<int64_t>(n) * W;
  const auto prefill_start = std::chrono::steady_clock::now();
  {
    auto guard = pipeline_.begin_step();
    backend_->reserve(static_cast<int32_t>(n) * W, static_cast<int64_t>(longest) + steps);
    StepBatch batch;
    batch.seq_offsets.push_back(0);
    for (size_t g = 0; g < n; ++g) {
      batch.tokens.insert(batch.tokens.end(), prompts_[g].begin(), prompts_[g].end());
      batch.seq_offsets.push_back(static_cast<int32_t>(batch.tokens.size()));
      batch.seq_positions.push_back(0);
      batch.seq_slots.push_back(static_cast<int32_t>(g) * W);
    }
    DLTensor *logits = backend_->forward(batch);
    all_reduce(logits);
    std::vector<float> firsts(n * static_cast<size_t>(vocab));
    std::string error;
    if (device_memcpy(firsts.data(), DLDevice{kDLCPU, 0}, logits->data, logits->device, firsts.size() * sizeof(float),
                      error) != LOOM_OK)
      throw runtime_error(manifest_.source_name + ": copying logits to the host for beam search: " + error);
    for (size_t g = 0; g < n; ++g)
      for (int32_t k = 0; k < W; ++k) {
        const int32_t slot = static_cast<int32_t>(g) * W + k;
        if (k > 0) backend_->copy_slot(static_cast<int32_t>(g) * W, slot, static_cast<int64_t>(prompts_[g].size()));
        rows.push_back(BeamRow{static_cast<int32_t>(g), slot, slot, prompts_[g]});
        host_logits.insert(host_logits.end(), firsts.begin() + static_cast<std::ptrdiff_t>(g * static_cast<size_t>(vocab)),
                           firsts.begin() + static_cast<std::ptrdiff_t>((g + 1) * static_cast<size_t>(vocab)));
      }
  }
  const auto decode_start = std::chrono::steady_clock::now();
  result.prefill_seconds = std::chrono::duration<double>(decode_start - prefill_start).count();

  for (int64_t step = 0; step < steps && !rows.empty(); ++step) {
    if (cancelled_.load()) {
      result.cancelled = true;
      break;
    }
    auto guard = pipeline_.begin_step();
    auto chain = pipeline_.list(LOOM_KIND_SAMPLER);
    if (chain.empty() || chain.back() != link)
      throw runtime_error(named(*link) + ": the beam sampler was swapped or removed during a beam search run");
    // The chain over every row, with the beam fields.
    const size_t R = rows.size();
    int64_t shape[2] = {static_cast<int64_t>(R), vocab};
    DLTensor view{};
    view.data = host_logits.data();
    view.device = {kDLCPU, 0};
    view.ndim = 2;
    view.dtype = {kDLFloat, 32, 1};
    view.shape = shape;
    std::vector<int64_t> group_ids(R);
    std::vector<int32_t> max_new(R, static_cast<int32_t>(steps)), tokens(R, -1), parents(R, -1), done(R, 0);
    SamplingRows sampling;
    for (size_t r = 0; r < R; ++r) {
      sampling.add(rows[r].seq, rows[r].history, manifest_.seed, static_cast<uint64_t>(step));
      group_ids[r] = rows[r].group;
    }
    loom_sampling_batch b = sampling.batch(&view, vocab, tokens.data());
    b.group_ids = group_ids.data();
    b.max_new_tokens = max_new.data();
    b.end_tokens = stop_tokens_.data();
    b.n_end_tokens = static_cast<int32_t>(stop_tokens_.size());
    b.parents_out = parents.data();
    b.done_out = done.data();
    apply_chain(chain, b, "the beam sampler must come last");
    // Done groups leave with their best hypothesis; the others continue their parents.
    std::vector<BeamRow> next;
    for (size_t s0 = 0; s0 < R; s0 += static_cast<size_t>(W)) {
      const int32_t g = rows[s0].group;
      const bool group_done = done[s0] != 0;
      for (size_t r = s0; r < s0 + static_cast<size_t>(W); ++r) {
        const bool ok = group_done ? done[r] != 0
                                   : done[r] == 0 && tokens[r] >= 0 && tokens[r] < vocab &&
                                         parents[r] >= static_cast<int32_t>(s0) && parents[r] < static_cast<int32_t>(s0) + W;
        if (!ok)
          throw runtime_error(named(*link) + ": row " + std::to_string(r) + " of group " + std::to_string(g) +
                              " got token " + std::to_string(tokens[r]) + ", parent " + std::to_string(parents[r]) +
                              " and done " + std::to_string(done[r]) + ", which do not continue the group");
      }
      if (group_done) {
        HostBuffer buffer;
        float score = 0.0f;
        link->check(beams->finish(link->handle(), g, buffer.abi(), &score), "finish");
        const std::string_view bytes = buffer.view();
        SequenceResult &out = result.sequences[static_cast<size_t>(g)];
        out.tokens.resize(bytes.size() / sizeof(int32_t));
        std::memcpy(out.tokens.data(), bytes.data(), out.tokens.size() * sizeof(int32_t));
        for (int32_t t : out.tokens)
          if (t < 0 || t >= vocab) throw runtime_error(named(*link) + ": finish() gave token " + std::to_string(t));
        out.stopped = !out.tokens.empty() &&
                      std::find(stop_tokens_.begin(), stop_tokens_.end(), out.tokens.back()) != stop_tokens_.end();
        each_link(pipeline_, [&](Instance &s, const loom_sampler_vtable &vt) {
          if (vt.release)
            for (size_t r = s0; r < s0 + static_cast<size_t>(W); ++r) vt.release(s.handle(), rows[r].seq);
        });
        continue;
      }
      // The first child of a parent takes over its slot and seq_id; the others fork.
      std::vector<bool> kept(static_cast<size_t>(W), false);
      const size_t first_new = next.size();
      for (size_t r = s0; r < s0 + static_cast<size_t>(W); ++r) {
        const BeamRow &parent = rows[static_cast<size_t>(parents[r])];
        BeamRow child{g, parent.seq, parent.slot, parent.history};
        if (kept[static_cast<size_t>(parents[r]) - s0]) {
          child.seq = next_seq++;
          child.slot = -1;
          each_link(pipeline_, [&](Instance &s, const loom_sampler_vtable &vt) {
            if (vt.fork) s.check(vt.fork(s.handle(), parent.seq, child.seq), "fork");
          });
        }
        kept[static_cast<size_t>(parents[r]) - s0] = true;
        child.history.push_back(tokens[r]);
        next.push_back(std::move(child));
      }
      // Parents without a child free their slot (for a copy) and their seq_id.
      std::vector<int32_t> free_slots;
      for (size_t p = s0; p < s0 + static_cast<size_t>(W); ++p)
        if (!kept[p - s0]) {
          free_slots.push_back(rows[p].slot);
          each_link(pipeline_, [&](Instance &s, const loom_sampler_vtable &vt) {
            if (vt.release) vt.release(s.handle(), rows[p].seq);
          });
        }
      for (size_t i = first_new, r = s0; i < next.size(); ++i, ++r)
        if (next[i].slot < 0) {
          next[i].slot = free_slots.back();
          free_slots.pop_back();
          const BeamRow &parent = rows[static_cast<size_t>(parents[r])];
          backend_->copy_slot(parent.slot, next[i].slot, static_cast<int64_t>(parent.history.size()));
        }
    }
    each_link(pipeline_, [&](Instance &s, const loom_sampler_vtable &vt) {
      if (vt.accept)
        for (const BeamRow &row : next) s.check(vt.accept(s.handle(), row.seq, row.history.back()), "accept");
    });
    rows = std::move(next);
    // The next step's logits: one new token for every row still going.
    if (step + 1 < steps && !rows.empty()) {
      StepBatch batch;
      batch.seq_offsets.push_back(0);
      for (const BeamRow &row : rows) {
        batch.tokens.push_back(row.history.back());
        batch.seq_offsets.push_back(static_cast<int32_t>(batch.tokens.size()));
        batch.seq_positions.push_back(static_cast<int32_t>(row.history.size()) - 1);
        batch.seq_slots.push_back(row.slot);
      }
      DLTensor *logits = backend_->forward(batch);
      all_reduce(logits);
      host_logits.resize(rows.size() * static_cast<size_t>(vocab));
      std::string error;
      if (device_memcpy(host_logits.data(), DLDevice{kDLCPU, 0}, logits->data, logits->device,
                        host_logits.size() * sizeof(float), error) != LOOM_OK)
        throw runtime_error(manifest_.source_name + ": copying logits to the host for beam search: " + error);
    }
  }
  if (!rows.empty() && !result.cancelled && steps > 0)
    throw runtime_error(named(*link) + ": did not finish every beam group within max_new_tokens (" +
                        std::to_string(steps) + ")");
  // A cancelled run (or no steps): an unfinished prompt gets its best running beam (its group's
  // first row).
  for (size_t r = 0; r < rows.size(); r += static_cast<size_t>(W)) {
    SequenceResult &out = result.sequences[static_cast<size_t>(rows[r].group)];
    const size_t prompt = prompts_[static_cast<size_t>(rows[r].group)].size();
    out.tokens.assign(rows[r].history.begin() + static_cast<std::ptrdiff_t>(prompt), rows[r].history.end());
  }
  result.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - decode_start).count();
  if (tokenizer_)
    for (size_t g = 0; g < n; ++g) generated_text(prompts_[g], result.sequences[g].tokens, &result.sequences[g].text);
  take_first_sequence(result);
  // The hypotheses are final only now: stream them.
  bool go_on = true;
  for (size_t g = 0; g < n && go_on; ++g) {
    const auto &tokens = result.sequences[g].tokens;
    for (size_t i = 0; i < tokens.size() && go_on; ++i) {
      if (g == 0 && on_token && !on_token(static_cast<int32_t>(i), tokens[i])) go_on = false;
      if (go_on && on_sequence_token && !on_sequence_token(static_cast<int32_t>(g), static_cast<int32_t>(i), tokens[i]))
        go_on = false;
    }
  }
}

} // namespace loom
