// Sampler `top-p` (nucleus): keeps the smallest prefix of tokens, by probability descending,
// whose cumulative probability reaches p, and at least min_keep tokens; masks the rest. +inf
// logits share all the probability (softmax's limit, see logit_weight).
// The sort is partial and grows geometrically: the nucleus is usually a few dozen tokens out of
// a vocabulary of tens of thousands, so sorting everything would waste most of the work.
// CUDA: a radix descent over (logit desc, id asc) with the same weights exp(x - max) in
// double, summed in another order: at an exact boundary the kept sets may differ by a token.
// On candidate rows (ABI 1.3) the sums run in the CPU's order: the CPU's nucleus exactly.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "sampler_common.hpp"
#include "samplers_cuda.hpp"

namespace loomp::samplers {
namespace {

struct TopP : Base {
  double p;
  int64_t min_keep;
  DeviceScratch scratch;
  TopP(const loom_host_api* h, loom_host_ctx* c)
      : Base(h, c), p(cfg_float(h, c, "p")), min_keep(cfg_int(h, c, "min_keep")), scratch(h, c) {
    if (!(p > 0.0 && p <= 1.0)) invalid_param("p", "top-p: p must be in (0, 1], got " + std::to_string(p));
    if (min_keep < 1) invalid_param("min_keep", "top-p: min_keep must be >= 1, got " + std::to_string(min_keep));
  }

  void apply(const loom_sampling_batch& b) {
#if LOOM_SAMPLERS_CUDA
    if (on_cuda(b)) {
      const DeviceRows d = device_rows(b, host, ctx, "top-p");
      if (p >= 1.0 || min_keep >= b.vocab_size || b.n_rows == 0) return;
      if (const auto cand = candidate_rows(b, "top-p"); cand && b.candidates->active != 0) {
        check_cuda(cuda::candidates_top_p(*cand, b.n_rows, p, min_keep, d.stream), "top-p");
        return;
      }
      void* s = scratch.get(b.logits->device, cuda::select_scratch_bytes(b.n_rows, b.vocab_size, true), "top-p");
      check_cuda(cuda::top_p(d.data, b.n_rows, b.vocab_size, p, min_keep, s,
                             scratch.must_zero(b.n_rows, b.vocab_size), d.stream), "top-p");
      return;
    }
#endif
    const Rows rows = cpu_rows(&b, "top-p");
    if (p >= 1.0 || min_keep >= rows.vocab) return;  // keeps everything: nothing to sort
    std::vector<int32_t> idx(static_cast<size_t>(rows.vocab));
    std::vector<double> prob(static_cast<size_t>(rows.vocab));
    for (int64_t r = 0; r < rows.n; ++r) {
      float* x = rows.row(r);
      const float mx = x[argmax_row(x, rows.vocab, r)];
      const double total = row_weights(x, rows.vocab, mx, prob);
      std::iota(idx.begin(), idx.end(), 0);
      // By (logit desc, id asc), the CUDA paths' order: probability desc wherever exp() tells the
      // logits apart, and the same order among weights that tie at 0 (underflow, or the finite
      // logits of a row whose max is +inf, which min_keep may still keep).
      const auto better = [x](int32_t a, int32_t c) { return x[a] > x[c] || (x[a] == x[c] && a < c); };
      const double target = p * total;
      int64_t sorted = 0, keep = 0;
      double cum = 0.0;
      while (keep == 0) {
        const int64_t m = std::min<int64_t>(rows.vocab, std::max<int64_t>(64, 2 * sorted));
        std::partial_sort(idx.begin() + sorted, idx.begin() + m, idx.end(), better);
        for (int64_t i = sorted; i < m; ++i) {
          cum += prob[idx[i]];
          if (cum >= target && i + 1 >= min_keep) { keep = i + 1; break; }
        }
        sorted = m;
        if (keep == 0 && sorted == rows.vocab) keep = rows.vocab;  // rounding: keep everything
      }
      for (int64_t i = keep; i < rows.vocab; ++i) x[idx[i]] = -INFINITY;
    }
  }
};

constexpr loom_sampler_vtable kVtable = make_vtable<TopP>(kRunsOnCuda | kReadsCandidates);
constexpr loom_param_desc kParams[] = {
    param("p", LOOM_VALUE_FLOAT, "0.9", "cumulative probability of the kept nucleus, in (0, 1]"),
    param("min_keep", LOOM_VALUE_INT, "1", "minimum number of tokens kept (>= 1)"),
};

}  // namespace

const loom_component_desc top_p_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "top-p", "1.0.0",
    "Nucleus filter: keeps the most probable tokens up to cumulative probability p",
    kParams, 2, LOOM_THREADING_SERIAL, &kVtable};

}  // namespace loomp::samplers
