// Sampler `penalties`: OpenAI-style frequency and presence penalties, optionally preceded by
// llama.cpp's repetition penalty, over the last `last_n` tokens of each row's history
// (last_n = 0: the whole history). The computation is repetition-penalty's
// (apply_history_penalties in sampler_common.hpp), with OpenAI's parameter names and defaults.
#include <cmath>

#include "sampler_common.hpp"
#include "samplers_cuda.hpp"

namespace loomp::samplers {
namespace {

struct Penalties : Base {
  float frequency, presence, repetition;
  int64_t last_n;
  DeviceScratch scratch;
  Penalties(const loom_host_api* h, loom_host_ctx* c)
      : Base(h, c),
        frequency(static_cast<float>(cfg_float(h, c, "frequency_penalty"))),
        presence(static_cast<float>(cfg_float(h, c, "presence_penalty"))),
        repetition(static_cast<float>(cfg_float(h, c, "repetition_penalty"))),
        last_n(cfg_int(h, c, "last_n")),
        scratch(h, c) {
    if (!std::isfinite(frequency))
      invalid_param("frequency_penalty",
                    "penalties: frequency_penalty must be a finite number, got " + std::to_string(frequency));
    if (!std::isfinite(presence))
      invalid_param("presence_penalty",
                    "penalties: presence_penalty must be a finite number, got " + std::to_string(presence));
    if (!(repetition > 0.0f) || !std::isfinite(repetition))
      invalid_param("repetition_penalty",
                    "penalties: repetition_penalty must be a finite number > 0 (1.0 disables it), got " +
                        std::to_string(repetition));
    if (last_n < 0)
      invalid_param("last_n", "penalties: last_n must be >= 0 (0 = whole history), got " + std::to_string(last_n));
  }

  void apply(const loom_sampling_batch& b) {
    if (frequency == 0.0f && presence == 0.0f && repetition == 1.0f) return;
#if LOOM_SAMPLERS_CUDA
    if (on_cuda(b))
      return apply_history_penalties_cuda(b, scratch, "penalties", repetition, frequency, presence,
                                          last_n == 0 ? -1 : last_n);
#endif
    const Rows rows = cpu_rows(&b, "penalties");
    apply_history_penalties(b, rows, "penalties", repetition, frequency, presence, last_n == 0 ? -1 : last_n);
  }
};

constexpr loom_sampler_vtable kVtable = make_vtable<Penalties>(LOOM_SAMPLER_USES_HISTORY | kRunsOnCuda);
constexpr loom_param_desc kParams[] = {
    param("frequency_penalty", LOOM_VALUE_FLOAT, "0.0", "subtracted once per occurrence in the window"),
    param("presence_penalty", LOOM_VALUE_FLOAT, "0.0", "subtracted once from every token present in the window"),
    param("repetition_penalty", LOOM_VALUE_FLOAT, "1.0",
          "llama.cpp repetition penalty (> 0): divides positive / multiplies negative logits of "
          "repeated tokens; 1.0 disables"),
    param("last_n", LOOM_VALUE_INT, "0", "history window in tokens (>= 0); 0 = whole history"),
};

}  // namespace

const loom_component_desc penalties_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "penalties", "1.0.0",
    "Frequency and presence penalties (OpenAI semantics) and optional repetition penalty",
    kParams, 4, LOOM_THREADING_SERIAL, &kVtable};

}  // namespace loomp::samplers
