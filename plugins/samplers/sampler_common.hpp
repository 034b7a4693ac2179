// Shared plumbing for the sampler components: batch validation, the row view and the
// template that turns a C++ component class into a loom_sampler_vtable.
//
// A component class C provides:
//   C(const loom_host_api*, loom_host_ctx*)   reads and validates its config (may throw)
//   void apply(const loom_sampling_batch&)     may throw loomp::Fail
//   members `host` and `ctx`
#ifndef LOOM_PLUGINS_SAMPLERS_COMMON_HPP
#define LOOM_PLUGINS_SAMPLERS_COMMON_HPP

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"
#include "philox.hpp"

namespace loomp::samplers {

struct Base {
  Base(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c) {}
  const loom_host_api* host;
  loom_host_ctx* ctx;
};

// Validates the batch header and the logits tensor's dtype, rank, shape and layout, on any
// device. logits: [n_rows, vocab_size] float32, strides NULL or row-major.
inline void check_batch(const loom_sampling_batch* b) {
  if (b == nullptr) invalid("sampling batch is NULL");
  if (!LOOM_HAS_FIELD(b, loom_sampling_batch, tokens_out))
    invalid("sampling batch struct_size too small");
  if (b->n_rows < 0) invalid("n_rows is negative");
  if (b->vocab_size <= 0) invalid("vocab_size must be positive");
  const DLTensor* t = b->logits;
  if (t == nullptr) invalid("logits is NULL");
  if (!is_f32(t->dtype)) invalid("logits: expected dtype float32");
  if (t->ndim != 2) invalid("logits: expected a 2-D tensor [n_rows, vocab_size], got " +
                            std::to_string(t->ndim) + "-D");
  if (t->shape[0] != b->n_rows || t->shape[1] != b->vocab_size)
    invalid("logits: shape " + shape_str(*t) + " does not match [n_rows, vocab_size] = [" +
            std::to_string(b->n_rows) + ", " + std::to_string(b->vocab_size) + "]");
  if (!is_contiguous(*t)) invalid("logits: must be contiguous row-major (strides NULL or [vocab, 1])");
  if (t->data == nullptr && b->n_rows > 0) invalid("logits: data is NULL");
}

// Row access to CPU logits; non-CPU logits are UNSUPPORTED for components without a device path.
struct Rows {
  float* data;
  int64_t n;
  int64_t vocab;
  float* row(int64_t r) const { return data + r * vocab; }
};
inline Rows cpu_rows(const loom_sampling_batch* b, const char* component) {
  check_batch(b);
  if (b->logits->device.device_type != kDLCPU)
    unsupported(std::string(component) + ": logits must be on the CPU (this sampler has no " +
                "device implementation); device type " +
                std::to_string(static_cast<int>(b->logits->device.device_type)));
  // Candidate rows (ABI 1.3) are offered with device logits only; active ones here would mean
  // the dense rows are stale.
  if (LOOM_HAS_FIELD(b, loom_sampling_batch, candidates) && b->candidates != nullptr && b->candidates->active != 0)
    unsupported(std::string(component) + ": candidate rows with logits on the CPU");
  return Rows{data_of<float>(*b->logits), b->n_rows, b->vocab_size};
}

// The index of the largest finite-or-infinite logit, first index on ties; throws when the row
// holds nothing but -inf (every token filtered out) or NaN.
inline int64_t argmax_row(const float* x, int64_t vocab, int64_t row) {
  int64_t best = -1;
  float bv = -INFINITY;
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isnan(x[i])) invalid("row " + std::to_string(row) + ": logit " + std::to_string(i) + " is NaN");
    if (x[i] > bv) { bv = x[i]; best = i; }
  }
  if (best < 0)
    invalid("row " + std::to_string(row) + ": every logit is -inf after filtering; nothing to select");
  return best;
}

// A row's softmax is exp(x - max) / sum, computed as unnormalised weights in double. When the
// row's largest logit is +inf (a temperature near 0, a huge logit bias) that is exp(inf - inf) =
// NaN, and a NaN sum makes every comparison against it false; the distribution is then
// softmax's limit instead: 1/n for each of the row's n +inf entries, 0 elsewhere (as core's
// probabilities_of for sampled drafts, and the CUDA paths' weight() in samplers_device.cuh).
// NaN logits never get here: argmax_row refuses them first.

// A token's unnormalised probability: exp(x - max) in double, 0 for -inf; with a +inf max, 1 for
// a +inf entry and 0 for any other.
inline double logit_weight(float x, float max_logit) {
  if (max_logit == INFINITY) return x == INFINITY ? 1.0 : 0.0;
  return x == -INFINITY ? 0.0 : std::exp(static_cast<double>(x) - max_logit);
}
// Its logarithm: x - max in double (-inf for -inf); with a +inf max, 0 or -inf.
inline double log_logit_weight(float x, float max_logit) {
  if (max_logit == INFINITY) return x == INFINITY ? 0.0 : -INFINITY;
  return static_cast<double>(x) - max_logit;
}
inline int64_t count_pos_inf(const float* x, int64_t vocab) {
  int64_t n = 0;
  for (int64_t i = 0; i < vocab; ++i) n += x[i] == INFINITY;
  return n;
}

// log(sum(exp(x))) over a row of finite max, stable; -inf entries contribute nothing.
inline double logsumexp_row(const float* x, int64_t vocab, float max_logit) {
  double s = 0.0;
  for (int64_t i = 0; i < vocab; ++i)
    if (x[i] != -INFINITY) s += std::exp(static_cast<double>(x[i]) - max_logit);
  return static_cast<double>(max_logit) + std::log(s);
}

// log p of a row's logits: x - logsumexp_row, or with a +inf max -log(n) for its n +inf entries
// and -inf for the rest. `lse` is the logsumexp, or log(n) for a +inf max.
struct LogSoftmax {
  double lse;
  bool inf_max;
  double operator()(float xi) const {
    if (inf_max) return xi == INFINITY ? -lse : -INFINITY;
    return xi - lse;
  }
};
inline LogSoftmax log_softmax_row(const float* x, int64_t vocab, float max_logit) {
  if (max_logit == INFINITY) return LogSoftmax{std::log(static_cast<double>(count_pos_inf(x, vocab))), true};
  return LogSoftmax{logsumexp_row(x, vocab, max_logit), false};
}

// prob[i] = logit_weight(x[i], max_logit) over a row of `vocab` entries (prob is at least that
// long); returns their sum: the unnormalised probabilities the mass-based filters (top-p,
// typical-p) work on.
inline double row_weights(const float* x, int64_t vocab, float max_logit, std::vector<double>& prob) {
  double total = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    prob[static_cast<size_t>(i)] = logit_weight(x[i], max_logit);
    total += prob[static_cast<size_t>(i)];
  }
  return total;
}

// The optional logprobs_out, when the caller's struct is new enough to carry it.
inline float* logprobs_of(const loom_sampling_batch& b) {
  return b.struct_size >= offsetof(loom_sampling_batch, logprobs_out) + sizeof(b.logprobs_out)
             ? b.logprobs_out
             : nullptr;
}

// The optional tokens_device (ABI 1.2), when the caller's struct is new enough to carry it.
inline DLTensor* tokens_device_of(const loom_sampling_batch& b) {
  return b.struct_size >= offsetof(loom_sampling_batch, tokens_device) + sizeof(b.tokens_device)
             ? b.tokens_device
             : nullptr;
}

// The draw `dist` makes from one (masked) row: u = uniform01(key, counter) scaled by the sum of
// the weights (logit_weight: exp(x - max) over the finite logits, or 1 for each +inf logit when
// the max is +inf), then the first token, in id order, whose cumulative weight exceeds it.
// Returns the token; *logp (optional) receives its log-probability under the row's softmax.
// Selecting samplers that truncate first (mirostat) mask the row and call this, so they draw
// exactly as `dist` would.
inline int64_t draw_row(const float* x, int64_t vocab, int64_t row, uint64_t key, uint64_t counter,
                        double* logp = nullptr) {
  const float mx = x[argmax_row(x, vocab, row)];
  // Unnormalised probabilities summed in double; the draw scales u by the sum instead of
  // normalising every entry. (A +inf max: the weights are 0 and 1, the sum n exact, u * n < n,
  // so the walk ends on a +inf entry, each of them with probability 1/n.)
  double total = 0.0;
  for (int64_t i = 0; i < vocab; ++i) total += logit_weight(x[i], mx);
  const double target = static_cast<double>(philox::uniform01(key, counter)) * total;
  int64_t chosen = -1;
  double cum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    if (x[i] == -INFINITY) continue;
    cum += logit_weight(x[i], mx);
    chosen = i;  // the last finite token absorbs rounding when target ~ total
    if (cum > target) break;
  }
  if (logp) *logp = log_logit_weight(x[chosen], mx) - std::log(total);
  return chosen;
}

// Checks history/history_len for row r and returns its token history; every token must lie in
// [0, vocab). `component` prefixes the messages.
struct HistoryView {
  const int32_t* tokens;
  int64_t len;
};
inline void require_history(const loom_sampling_batch& b, const char* component) {
  if (b.n_rows > 0 && (b.history == nullptr || b.history_len == nullptr))
    invalid(std::string(component) + ": history and history_len are required");
}
inline HistoryView history_of(const loom_sampling_batch& b, int64_t r, const char* component) {
  const int64_t len = b.history_len[r];
  if (len < 0) invalid(std::string(component) + ": history_len[" + std::to_string(r) + "] is negative");
  if (len > 0 && b.history[r] == nullptr)
    invalid(std::string(component) + ": history[" + std::to_string(r) + "] is NULL");
  const int32_t* h = b.history[r];
  for (int64_t i = 0; i < len; ++i)
    if (h[i] < 0 || h[i] >= b.vocab_size) {
      std::string m(component);
      m += ": history[" + std::to_string(r) + "] holds token " + std::to_string(h[i]);
      m += " outside the vocabulary (vocab_size " + std::to_string(b.vocab_size) + ")";
      invalid(m);
    }
  return HistoryView{h, len};
}

// Occurrences of each token among the last `window` entries of a history (window < 0 or
// >= len: the whole history). `counts` is cleared first.
inline void count_window(const HistoryView& h, int64_t window,
                         std::unordered_map<int32_t, int32_t>& counts) {
  counts.clear();
  const int64_t start = (window < 0 || window >= h.len) ? 0 : h.len - window;
  for (int64_t i = start; i < h.len; ++i) ++counts[h.tokens[i]];
}

// The history penalties of `repetition-penalty` and `penalties` (one computation, two ways of
// naming its parameters): for each distinct token t seen c > 0 times among the last `window`
// history tokens of a row (window < 0: all of them),
//   logit[t] = logit[t] > 0 ? logit[t] / repetition : logit[t] * repetition
//   logit[t] -= frequency * c + presence
// (repetition = 1 leaves the first line exact). -INFINITY stays -INFINITY.
inline void apply_history_penalties(const loom_sampling_batch& b, const Rows& rows, const char* component,
                                    float repetition, float frequency, float presence, int64_t window) {
  require_history(b, component);
  std::unordered_map<int32_t, int32_t> counts;
  for (int64_t r = 0; r < rows.n; ++r) {
    count_window(history_of(b, r, component), window, counts);
    float* x = rows.row(r);
    for (const auto& [tok, c] : counts) {
      float& v = x[tok];
      v = v > 0.0f ? v / repetition : v * repetition;
      v -= frequency * static_cast<float>(c) + presence;
    }
  }
}

// ---- vtable glue ----
template <class C>
loom_status apply_fn(void* inst, const loom_sampling_batch* batch) {
  auto* c = static_cast<C*>(inst);
  return guard(c->host, c->ctx, [&] {
    check_batch(batch);
    c->apply(*batch);
  });
}
template <class C>
constexpr loom_sampler_vtable make_vtable(uint32_t flags) {
  loom_sampler_vtable v{};
  v.struct_size = sizeof(loom_sampler_vtable);
  v.life.create = &create_instance<C>;
  v.life.destroy = &destroy_instance<C>;
  v.life.get_extension = nullptr;
  v.life.export_state = nullptr;  // stateless: history and RNG come from the batch
  v.life.import_state = nullptr;
  v.flags = flags;
  v.apply = &apply_fn<C>;
  v.accept = nullptr;
  v.fork = nullptr;
  v.release = nullptr;
  return v;
}

inline constexpr loom_param_desc param(const char* key, loom_value_type type, const char* def,
                                       const char* description) {
  return loom_param_desc{sizeof(loom_param_desc), key, type, 0, def, description};
}

// Component descriptors, defined one per source file and listed by entry.cpp.
extern const loom_component_desc greedy_desc;
extern const loom_component_desc dist_desc;
extern const loom_component_desc temperature_desc;
extern const loom_component_desc top_k_desc;
extern const loom_component_desc top_p_desc;
extern const loom_component_desc min_p_desc;
extern const loom_component_desc repetition_penalty_desc;
extern const loom_component_desc typical_p_desc;
extern const loom_component_desc penalties_desc;
extern const loom_component_desc logit_bias_desc;
extern const loom_component_desc no_repeat_ngram_desc;
extern const loom_component_desc mirostat_v2_desc;
extern const loom_component_desc beam_search_desc;

}  // namespace loomp::samplers

#endif
