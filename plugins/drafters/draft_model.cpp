// Drafter component `draft-model`: a smaller model that shares the target's tokenizer drafts
// greedily (each draft is its argmax after the context and the drafts before it). The model
// runs through the host extension loom.host.models/1, with a KV cache of its own: sequence
// slots, each holding the tokens this drafter fed last time. At every call the new context is
// compared with them: the common prefix is kept (the target accepted those drafts), the rest is
// fed again from there (positions are overwritten), so rejected drafts cost nothing to undo.
//
// Greedy drafts are point-mass proposals: the engine's verification keeps exactly the target's
// output (DESIGN.md "Speculative decoding"). With `temperature` > 0, a sequence whose sampler
// chain the host verifies against a distribution (loom_draft_batch.q_out, ABI 1.10) gets drafts
// drawn from softmax(logits / temperature) and that q with them, so the host keeps each with
// probability min(1, p/q); those passes bring their logits back to the host one by one. The
// draws are a pure function of (seed, sequence, position). Sequences beyond max_seqs at once get
// no drafts.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <unordered_map>
#include <vector>

#include "drafter_glue.hpp"

namespace loomp::drafters {
namespace {

struct DraftModel {
  const loom_host_api* host;
  loom_host_ctx* ctx;
  const loom_host_models* models = nullptr;
  loom_host_model* model = nullptr;
  int32_t max_seqs = 0, max_positions = 0;
  double temperature = 0.0;
  uint64_t seed = 0;
  struct Seq {
    int32_t slot = 0;
    std::vector<int32_t> cached; // tokens whose KV the slot holds, from position 0
  };
  std::unordered_map<int64_t, Seq> seqs;
  std::vector<int32_t> free_slots;
  // One forward pass's arrays (kept between calls).
  std::vector<int32_t> slots, positions, offsets, tokens, rows, drafted;
  std::vector<float> logits;

  DraftModel(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c) {
    const std::string path = cfg_string(h, c, "model");
    if (path.empty()) invalid_param("model", "model must name the draft model's directory");
    const int64_t n = cfg_int(h, c, "max_seqs"), p = cfg_int(h, c, "max_positions");
    if (n < 1 || n > 4096) invalid_param("max_seqs", "max_seqs must be between 1 and 4096, got " + std::to_string(n));
    if (p < 0 || p > (int64_t{1} << 24)) invalid_param("max_positions", "max_positions must be 0 (the model's) or positive");
    // Every parameter is checked before the model opens: a throw after it would skip the
    // destructor and leak the model.
    temperature = cfg_float(h, c, "temperature");
    if (!(temperature >= 0.0) || !std::isfinite(temperature))
      invalid_param("temperature", "temperature must be 0 (greedy drafts) or a positive number");
    seed = static_cast<uint64_t>(cfg_int(h, c, "seed"));
    models = static_cast<const loom_host_models*>(h->get_extension(c, LOOM_HOST_MODELS_EXTENSION));
    if (models == nullptr || !LOOM_HAS_FIELD(models, loom_host_models, greedy))
      unsupported("draft-model: this host offers no " LOOM_HOST_MODELS_EXTENSION " extension to run a model");
    const std::string attention = cfg_string(h, c, "attention");
    const loom_status s = models->open(c, path.c_str(), attention.empty() ? nullptr : attention.c_str(),
                                       static_cast<int32_t>(n), static_cast<int32_t>(p), &model);
    if (s != LOOM_OK)
      throw Fail(s, "draft-model: cannot open the draft model '" + path + "': " + models->open_error(c), "model");
    max_seqs = static_cast<int32_t>(n);
    max_positions = models->max_positions(model);
    try {
      for (int32_t i = max_seqs - 1; i >= 0; --i) free_slots.push_back(i);
    } catch (...) {
      models->close(model);
      throw;
    }
  }
  ~DraftModel() {
    if (model != nullptr) models->close(model);
  }
  DraftModel(const DraftModel&) = delete;
  DraftModel& operator=(const DraftModel&) = delete;

  void propose(const loom_draft_batch& b) {
    const int32_t draft_vocab = models->vocab_size(model);
    if (draft_vocab > b.vocab_size)
      invalid("draft-model: the draft model's vocabulary (" + std::to_string(models->vocab_size(model)) +
              " tokens) is larger than the target's (" + std::to_string(b.vocab_size) + "): they must share a tokenizer");
    // Pass 0: each sequence feeds what its slot does not hold yet (at least its last token).
    slots.clear();
    positions.clear();
    offsets.assign(1, 0);
    tokens.clear();
    rows.clear();
    std::vector<int32_t> want(static_cast<size_t>(b.n_seqs), 0);
    for (int32_t s = 0; s < b.n_seqs; ++s) {
      b.n_out[s] = 0;
      const int32_t len = b.context_len[s];
      if (len < 1 || b.context[s] == nullptr) continue;
      want[s] = std::min({b.max_draft[s], b.stride, max_positions - len});
      if (want[s] < 1) continue;
      auto it = seqs.find(b.seq_ids[s]);
      if (it == seqs.end()) {
        if (free_slots.empty()) continue; // more sequences than slots: this one goes without
        it = seqs.emplace(b.seq_ids[s], Seq{free_slots.back(), {}}).first;
        free_slots.pop_back();
      }
      Seq& q = it->second;
      const int32_t* x = b.context[s];
      // A context token the draft model does not know (the target's vocabulary is larger) means
      // no drafts for this sequence, not a failed batch.
      if (std::any_of(x, x + len, [&](int32_t t) { return t < 0 || t >= draft_vocab; })) continue;
      int32_t common = 0;
      const int32_t held = static_cast<int32_t>(std::min<size_t>(q.cached.size(), static_cast<size_t>(len - 1)));
      while (common < held && q.cached[static_cast<size_t>(common)] == x[common]) ++common;
      q.cached.assign(x, x + len);
      slots.push_back(q.slot);
      positions.push_back(common);
      tokens.insert(tokens.end(), x + common, x + len);
      offsets.push_back(static_cast<int32_t>(tokens.size()));
      rows.push_back(s);
    }
    if (rows.empty()) return;
    // Then the drafts, all passes in one host call (on a GPU they follow one another on the
    // device): as many as the sequence that wants most; the others keep their first want[s].
    int32_t steps = 0;
    for (int32_t s : rows) steps = std::max(steps, want[s]);
    for (size_t r = 0; r < rows.size(); ++r) // (a sequence near its slot's end drafts no further than it fits)
      steps = std::min(steps, max_positions - b.context_len[rows[r]] + 1);
    if (steps < 1) return;
    loom_model_batch mb{};
    mb.struct_size = sizeof(mb);
    mb.n_seqs = static_cast<int32_t>(rows.size());
    mb.slots = slots.data();
    mb.positions = positions.data();
    mb.offsets = offsets.data();
    mb.tokens = tokens.data();
    drafted.assign(rows.size() * static_cast<size_t>(steps), -1);
    const bool sampling = temperature > 0.0 && b.struct_size >= offsetof(loom_draft_batch, q_given) + sizeof b.q_given && // (ABI 1.10)
                           b.q_out != nullptr &&
                          b.q_given != nullptr &&
                          std::any_of(rows.begin(), rows.end(), [&](int32_t s) { return b.q_out[s] != nullptr; });
    const loom_status st = sampling ? sample_passes(b, mb, steps) : models->greedy(model, &mb, steps, drafted.data());
    if (st != LOOM_OK) {
      for (int32_t s : rows) seqs.at(b.seq_ids[s]).cached.clear(); // what the slots hold is unknown now
      fail(st, "draft-model: the draft model's forward passes failed");
    }
    for (size_t r = 0; r < rows.size(); ++r) {
      const int32_t s = rows[r];
      Seq& q = seqs.at(b.seq_ids[s]);
      const int32_t n = std::min(want[s], steps);
      for (int32_t i = 0; i < n; ++i) {
        const int32_t t = drafted[r * static_cast<size_t>(steps) + static_cast<size_t>(i)];
        if (t < 0 || t >= b.vocab_size) break;
        b.draft_out[static_cast<size_t>(s) * static_cast<size_t>(b.stride) + static_cast<size_t>(b.n_out[s]++)] = t;
      }
      // The slot holds the context and the first steps - 1 drafts.
      for (int32_t i = 0; i + 1 < steps; ++i) q.cached.push_back(drafted[r * static_cast<size_t>(steps) + static_cast<size_t>(i)]);
    }
  }

  // A uniform double in [0, 1) for (seed, sequence, position).
  static uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
  }
  double uniform(int64_t seq, int64_t position) const {
    return static_cast<double>(mix(mix(mix(seed) ^ static_cast<uint64_t>(seq)) ^ static_cast<uint64_t>(position)) >> 11) *
           0x1.0p-53;
  }

  // The draft passes one at a time, each pass's logits on the host: a row whose sequence the
  // host offered q draws its draft from softmax(logits / temperature) and writes that q (zero
  // past the draft model's vocabulary); the other rows take the argmax. Fills `drafted` as
  // greedy() does.
  loom_status sample_passes(const loom_draft_batch& b, loom_model_batch mb, int32_t steps) {
    const size_t V = static_cast<size_t>(models->vocab_size(model)), R = rows.size();
    logits.resize(R * V);
    std::vector<int32_t> feed_positions(R), feed_tokens(R), feed_offsets(R + 1);
    std::vector<double> w(V);
    for (int32_t i = 0; i < steps; ++i) {
      mb.logits_out = logits.data();
      mb.argmax_out = nullptr;
      if (const loom_status st = models->forward(model, &mb); st != LOOM_OK) return st;
      for (size_t r = 0; r < R; ++r) {
        const int32_t s = rows[r];
        const float* x = logits.data() + r * V;
        const int32_t argmax = static_cast<int32_t>(std::max_element(x, x + V) - x);
        int32_t token = argmax;
        if (float* q = b.q_out[s] != nullptr ? b.q_out[s] + static_cast<size_t>(i) * static_cast<size_t>(b.vocab_size) : nullptr) {
          double total = 0.0;
          for (size_t t = 0; t < V; ++t) total += w[t] = std::exp((static_cast<double>(x[t]) - x[argmax]) / temperature);
          std::fill(q, q + b.vocab_size, 0.0f);
          if (total > 0.0 && std::isfinite(total)) {
            const double target = uniform(b.seq_ids[s], b.context_len[s] + i) * total;
            double acc = 0.0;
            for (size_t t = 0; t < V; ++t) {
              q[t] = static_cast<float>(w[t] / total);
              if (acc <= target && target < acc + w[t]) token = static_cast<int32_t>(t);
              acc += w[t];
            }
          } else {
            q[argmax] = 1.0f;  // (logits that make no distribution: a point mass, which verifies too)
          }
          if (q[token] <= 0.0f) { // (rounding put the draw on a token whose q rounds to 0)
            std::fill(q, q + b.vocab_size, 0.0f);
            token = argmax;
            q[argmax] = 1.0f;
          }
        }
        drafted[r * static_cast<size_t>(steps) + static_cast<size_t>(i)] = token;
      }
      if (i + 1 == steps) break;
      for (size_t r = 0; r < R; ++r) { // each row's draft at its next position
        feed_positions[r] = b.context_len[rows[r]] + i;
        feed_tokens[r] = drafted[r * static_cast<size_t>(steps) + static_cast<size_t>(i)];
        feed_offsets[r + 1] = static_cast<int32_t>(r + 1);
      }
      mb.positions = feed_positions.data();
      mb.tokens = feed_tokens.data();
      mb.offsets = feed_offsets.data();
    }
    for (int32_t s : rows)
      if (b.q_out[s] != nullptr) b.q_given[s] = 1;
    return LOOM_OK;
  }

  void release(int64_t seq) {
    if (seq == -1) {
      for (const auto& [id, q] : seqs) free_slots.push_back(q.slot);
      seqs.clear();
      return;
    }
    if (auto it = seqs.find(seq); it != seqs.end()) {
      free_slots.push_back(it->second.slot);
      seqs.erase(it);
    }
  }
};

constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "model", LOOM_VALUE_STRING, 1, nullptr,
     "the draft model's directory (Hugging Face layout; the target's tokenizer), relative to the manifest"},
    {sizeof(loom_param_desc), "attention", LOOM_VALUE_STRING, 0, "\"\"",
     "attention component for the draft model (\"sdpa\", \"flash\"); \"\": the manifest's [attention]"},
    {sizeof(loom_param_desc), "max_seqs", LOOM_VALUE_INT, 0, "16", "sequences drafted for at once (KV slots)"},
    {sizeof(loom_param_desc), "temperature", LOOM_VALUE_FLOAT, 0, "0",
     "0: greedy drafts; > 0: sequences whose sampler chain draws from a distribution get drafts drawn from "
     "softmax(logits / temperature), verified against it (min(1, p/q))"},
    {sizeof(loom_param_desc), "seed", LOOM_VALUE_INT, 0, "0", "the sampled drafts' random numbers"},
    {sizeof(loom_param_desc), "max_positions", LOOM_VALUE_INT, 0, "0",
     "positions of each slot; 0: the draft model's maximum"},
};

}  // namespace

extern const loom_component_desc draft_model_desc;
const loom_component_desc draft_model_desc = {
    sizeof(loom_component_desc), LOOM_KIND_DRAFTER, "draft-model", "1.0.0",
    "A smaller model with the same tokenizer drafts greedily (its own KV cache, through loom.host.models/1)",
    kParams, 6, LOOM_THREADING_SERIAL, &DrafterGlue<DraftModel>::kVtable};

}  // namespace loomp::drafters
