// Sampler `temperature`: divides every logit by t (t > 0). t = 0 is rejected at create:
// "always pick the argmax" is the greedy sampler's job, and dividing by zero is not; so is a t
// whose 1/t overflows float (it would turn logits of 0 into NaN).
// CPU or CUDA (the same float multiply by 1/t), on dense rows or on candidate rows (ABI 1.3).
// On dense CUDA rows offered with candidates it defers the multiply (ABI 1.4 dense_scale): the
// next link that reads rows (top-k) applies it as it loads them, saving a pass over the rows.
#include <cmath>
#include <cstdio>
#include <string>

#include "sampler_common.hpp"
#include "samplers_cuda.hpp"

namespace loomp::samplers {
namespace {

struct Temperature : Base {
  float t;
  Temperature(const loom_host_api* h, loom_host_ctx* c) : Base(h, c) {
    const double v = cfg_float(h, c, "t");
    if (v == 0.0)
      invalid_param("t", "temperature: t = 0 is not allowed; use the `greedy` sampler for deterministic argmax");
    if (!(v > 0.0) || !std::isfinite(v))
      invalid_param("t", "temperature: t must be a finite number > 0, got " + std::to_string(v));
    t = static_cast<float>(v);
    // Below ~2.9e-39, 1/t overflows to +inf in float and a logit of exactly 0 would become
    // 0 * inf = NaN. (Above it, logits the multiply overflows become +inf, which the links after
    // treat as softmax's limit: the probability spread evenly over them.)
    if (!std::isfinite(1.0f / t)) {
      char got[32];
      std::snprintf(got, sizeof got, "%g", v);
      invalid_param("t", std::string("temperature: t = ") + got +
                             " is too small (1/t overflows float; t must be >= 1/FLT_MAX, about 2.9e-39); use the "
                             "`greedy` sampler for deterministic argmax");
    }
  }

  void apply(const loom_sampling_batch& b) {
    const float inv = 1.0f / t;
#if LOOM_SAMPLERS_CUDA
    if (on_cuda(b)) {
      const DeviceRows d = device_rows(b, host, ctx, "temperature");
      if (const auto cand = candidate_rows(b, "temperature")) {
        if (b.candidates->active != 0) {
          check_cuda(cuda::candidates_scale(*cand, b.n_rows, inv, d.stream), "temperature");
          return;
        }
        if (float* owed = owed_scale(b); owed != nullptr && *owed == 1.0f) {
          *owed = inv;  // deferred: top-k multiplies as it reads, the host before any other link
          return;
        }
        pay_owed_scale(b, d.data, d.stream, "temperature");  // (then this link's own multiply)
      }
      check_cuda(cuda::scale(d.data, int64_t{b.n_rows} * b.vocab_size, inv, d.stream), "temperature");
      return;
    }
#endif
    const Rows rows = cpu_rows(&b, "temperature");
    for (int64_t r = 0; r < rows.n; ++r) {
      float* x = rows.row(r);
      for (int64_t i = 0; i < rows.vocab; ++i) x[i] *= inv;  // -inf stays -inf
    }
  }
};

constexpr loom_sampler_vtable kVtable = make_vtable<Temperature>(kRunsOnCuda | kReadsCandidates | kDenseScale);
constexpr loom_param_desc kParams[] = {
    param("t", LOOM_VALUE_FLOAT, "1.0", "temperature; logits are divided by t (must be > 0)"),
};

}  // namespace

const loom_component_desc temperature_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "temperature", "1.0.0",
    "Scales logits by 1/t", kParams, 1, LOOM_THREADING_SERIAL, &kVtable};

}  // namespace loomp::samplers
