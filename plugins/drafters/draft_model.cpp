// Drafter component `draft-model`: a smaller model that shares the target's tokenizer drafts
// greedily (each draft is its argmax after the context and the drafts before it). The model
// runs through the host extension loom.host.models/1, with a KV cache of its own: sequence
// slots, each holding the tokens this drafter fed last time. At every call the new context is
// compared with them: the common prefix is kept (the target accepted those drafts), the rest is
// fed again from there (positions are overwritten), so rejected drafts cost nothing to undo.
//
// Greedy drafts are point-mass proposals: the engine's verification keeps exactly the target's
// output (DESIGN.md "Speculative decoding"). Sequences beyond max_seqs at once get no drafts.
#include <algorithm>
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
  struct Seq {
    int32_t slot = 0;
    std::vector<int32_t> cached; // tokens whose KV the slot holds, from position 0
  };
  std::unordered_map<int64_t, Seq> seqs;
  std::vector<int32_t> free_slots;
  // One forward pass's arrays (kept between calls).
  std::vector<int32_t> slots, positions, offsets, tokens, rows, drafted;

  DraftModel(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c) {
    const std::string path = cfg_string(h, c, "model");
    if (path.empty()) invalid_param("model", "model must name the draft model's directory");
    const int64_t n = cfg_int(h, c, "max_seqs"), p = cfg_int(h, c, "max_positions");
    if (n < 1 || n > 4096) invalid_param("max_seqs", "max_seqs must be between 1 and 4096, got " + std::to_string(n));
    if (p < 0 || p > (int64_t{1} << 24)) invalid_param("max_positions", "max_positions must be 0 (the model's) or positive");
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
    for (int32_t i = max_seqs - 1; i >= 0; --i) free_slots.push_back(i);
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
    const loom_status st = models->greedy(model, &mb, steps, drafted.data());
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
    {sizeof(loom_param_desc), "max_positions", LOOM_VALUE_INT, 0, "0",
     "positions of each slot; 0: the draft model's maximum"},
};

}  // namespace

extern const loom_component_desc draft_model_desc;
const loom_component_desc draft_model_desc = {
    sizeof(loom_component_desc), LOOM_KIND_DRAFTER, "draft-model", "1.0.0",
    "A smaller model with the same tokenizer drafts greedily (its own KV cache, through loom.host.models/1)",
    kParams, 4, LOOM_THREADING_SERIAL, &DrafterGlue<DraftModel>::kVtable};

}  // namespace loomp::drafters
