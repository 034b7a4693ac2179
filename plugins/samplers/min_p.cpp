// Sampler `min-p`: masks tokens whose probability is below p times the row's top probability,
// i.e. logit < max_logit + ln(p). Works in logit space, so no softmax is needed. CPU or CUDA
// (the same double threshold; a row of only -inf is left as it is on CUDA, refused on the CPU),
// on dense rows or on candidate rows (ABI 1.3).
#include <cmath>

#include "sampler_common.hpp"
#include "samplers_cuda.hpp"

namespace loomp::samplers {
namespace {

struct MinP : Base {
  double p;
  DeviceScratch scratch;
  MinP(const loom_host_api* h, loom_host_ctx* c) : Base(h, c), p(cfg_float(h, c, "p")), scratch(h, c) {
    if (!(p >= 0.0 && p <= 1.0)) invalid_param("p", "min-p: p must be in [0, 1], got " + std::to_string(p));
  }

  void apply(const loom_sampling_batch& b) {
    if (p <= 0.0) return;  // p = 0 keeps everything
    const double log_p = std::log(p);
#if LOOM_SAMPLERS_CUDA
    if (on_cuda(b)) {
      const DeviceRows d = device_rows(b, host, ctx, "min-p");
      if (const auto cand = candidate_rows(b, "min-p"); cand && b.candidates->active != 0) {
        check_cuda(cuda::candidates_min_p(*cand, b.n_rows, log_p, d.stream), "min-p");
        return;
      }
      void* s = scratch.get(b.logits->device, cuda::min_p_scratch_bytes(b.n_rows, b.vocab_size), "min-p");
      check_cuda(cuda::min_p(d.data, b.n_rows, b.vocab_size, log_p, s, d.stream), "min-p");
      return;
    }
#endif
    const Rows rows = cpu_rows(&b, "min-p");
    for (int64_t r = 0; r < rows.n; ++r) {
      float* x = rows.row(r);
      const double threshold = static_cast<double>(x[argmax_row(x, rows.vocab, r)]) + log_p;
      for (int64_t i = 0; i < rows.vocab; ++i)
        if (static_cast<double>(x[i]) < threshold) x[i] = -INFINITY;
    }
  }
};

constexpr loom_sampler_vtable kVtable = make_vtable<MinP>(kRunsOnCuda | kReadsCandidates);
constexpr loom_param_desc kParams[] = {
    param("p", LOOM_VALUE_FLOAT, "0.05", "minimum probability relative to the top token, in [0, 1]"),
};

}  // namespace

const loom_component_desc min_p_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "min-p", "1.0.0",
    "Masks tokens less probable than p times the most probable one", kParams, 1,
    LOOM_THREADING_SERIAL, &kVtable};

}  // namespace loomp::samplers
