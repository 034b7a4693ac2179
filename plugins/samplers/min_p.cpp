// Sampler `min-p`: masks tokens whose probability is below p times the row's top probability,
// i.e. logit < max_logit + ln(p). Works in logit space, so no softmax is needed.
#include <cmath>

#include "sampler_common.hpp"

namespace loomp::samplers {
namespace {

struct MinP : Base {
  double p;
  MinP(const loom_host_api* h, loom_host_ctx* c) : Base(h, c), p(cfg_float(h, c, "p")) {
    if (!(p >= 0.0 && p <= 1.0)) invalid("min-p: p must be in [0, 1], got " + std::to_string(p));
  }

  void apply(const loom_sampling_batch& b) {
    const Rows rows = cpu_rows(&b, "min-p");
    if (p <= 0.0) return;  // p = 0 keeps everything
    const double log_p = std::log(p);
    for (int64_t r = 0; r < rows.n; ++r) {
      float* x = rows.row(r);
      const double threshold = static_cast<double>(x[argmax_row(x, rows.vocab, r)]) + log_p;
      for (int64_t i = 0; i < rows.vocab; ++i)
        if (static_cast<double>(x[i]) < threshold) x[i] = -INFINITY;
    }
  }
};

constexpr loom_sampler_vtable kVtable = make_vtable<MinP>(0);
constexpr loom_param_desc kParams[] = {
    param("p", LOOM_VALUE_FLOAT, "0.05", "minimum probability relative to the top token, in [0, 1]"),
};

}  // namespace

const loom_component_desc min_p_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "min-p", "1.0.0",
    "Masks tokens less probable than p times the most probable one", kParams, 1,
    LOOM_THREADING_SERIAL, &kVtable};

}  // namespace loomp::samplers
