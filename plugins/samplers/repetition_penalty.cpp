// Sampler `repetition-penalty`: llama.cpp's penalties over the last `last_n` history tokens.
// For each distinct token t seen c > 0 times in the window:
//   logit[t] = logit[t] > 0 ? logit[t] / penalty : logit[t] * penalty
//   logit[t] -= frequency * c + presence
// last_n = 0 disables it; last_n = -1 uses the whole history.
#include <cmath>

#include "sampler_common.hpp"
#include "samplers_cuda.hpp"

namespace loomp::samplers {
namespace {

struct RepetitionPenalty : Base {
  float penalty, frequency, presence;
  int64_t last_n;
  DeviceScratch scratch;
  RepetitionPenalty(const loom_host_api* h, loom_host_ctx* c)
      : Base(h, c),
        penalty(static_cast<float>(cfg_float(h, c, "penalty"))),
        frequency(static_cast<float>(cfg_float(h, c, "frequency"))),
        presence(static_cast<float>(cfg_float(h, c, "presence"))),
        last_n(cfg_int(h, c, "last_n")),
        scratch(h, c) {
    if (!(penalty > 0.0f) || !std::isfinite(penalty))
      invalid_param("penalty", "repetition-penalty: penalty must be a finite number > 0 (1.0 disables it)");
    if (!std::isfinite(frequency)) invalid_param("frequency", "repetition-penalty: frequency must be finite");
    if (!std::isfinite(presence)) invalid_param("presence", "repetition-penalty: presence must be finite");
    if (last_n < -1) invalid_param("last_n", "repetition-penalty: last_n must be >= -1 (-1 = whole history)");
  }

  void apply(const loom_sampling_batch& b) {
    if (last_n == 0) return;
#if LOOM_SAMPLERS_CUDA
    if (on_cuda(b))
      return apply_history_penalties_cuda(b, scratch, "repetition-penalty", penalty, frequency, presence, last_n);
#endif
    const Rows rows = cpu_rows(&b, "repetition-penalty");
    apply_history_penalties(b, rows, "repetition-penalty", penalty, frequency, presence, last_n);
  }
};

constexpr loom_sampler_vtable kVtable = make_vtable<RepetitionPenalty>(LOOM_SAMPLER_USES_HISTORY | kRunsOnCuda);
constexpr loom_param_desc kParams[] = {
    param("penalty", LOOM_VALUE_FLOAT, "1.1", "divides positive / multiplies negative logits of repeated tokens"),
    param("frequency", LOOM_VALUE_FLOAT, "0.0", "subtracted once per occurrence in the window"),
    param("presence", LOOM_VALUE_FLOAT, "0.0", "subtracted once from every token present in the window"),
    param("last_n", LOOM_VALUE_INT, "64", "history window in tokens; 0 disables, -1 = whole history"),
};

}  // namespace

const loom_component_desc repetition_penalty_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "repetition-penalty", "1.0.0",
    "Penalises tokens repeated in the recent history (llama.cpp semantics)", kParams, 4,
    LOOM_THREADING_SERIAL, &kVtable};

}  // namespace loomp::samplers
