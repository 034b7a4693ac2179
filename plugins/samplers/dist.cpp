// Sampler `dist`: draws a token from softmax(logits) of each row with the counter-based
// Philox-4x32-10 keyed by (rng_key[row], rng_counter[row]); see philox.hpp for the convention.
// Masked (-inf) tokens have probability zero.
#include <cmath>

#include "sampler_common.hpp"

namespace loomp::samplers {
namespace {

struct Dist : Base {
  using Base::Base;

  void apply(const loom_sampling_batch& b) {
    const Rows rows = cpu_rows(&b, "dist");
    if (b.tokens_out == nullptr) invalid("dist: tokens_out is NULL");
    if (rows.n > 0 && (b.rng_key == nullptr || b.rng_counter == nullptr))
      invalid("dist: rng_key and rng_counter are required");
    float* logprobs = logprobs_of(b);
    for (int64_t r = 0; r < rows.n; ++r) {
      const float* x = rows.row(r);
      float mx = 0.0f;
      double log_total = 0.0;
      const int64_t chosen = draw_row(x, rows.vocab, r, b.rng_key[r], b.rng_counter[r], &mx, &log_total);
      b.tokens_out[r] = static_cast<int32_t>(chosen);
      if (logprobs) logprobs[r] = static_cast<float>(static_cast<double>(x[chosen]) - mx - log_total);
    }
  }
};

constexpr loom_sampler_vtable kVtable = make_vtable<Dist>(LOOM_SAMPLER_SELECTS | LOOM_SAMPLER_USES_RNG);

}  // namespace

const loom_component_desc dist_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "dist", "1.0.0",
    "Samples a token from softmax of the (masked) logits with counter-based Philox-4x32-10",
    nullptr, 0, LOOM_THREADING_SERIAL, &kVtable};

}  // namespace loomp::samplers
