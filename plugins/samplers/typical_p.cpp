// Sampler `typical-p` (locally typical sampling; Meister et al. 2022, as in HF transformers'
// TypicalLogitsWarper and llama.cpp): with H the entropy of the row's softmax, orders tokens
// by |(-log p_i) - H| ascending (ties by lower token id) and keeps the smallest prefix whose
// probability mass reaches p, and at least min_keep tokens; masks the rest with -inf.
// p = 1 keeps everything. Masked (-inf) tokens have probability zero and are never kept back;
// +inf logits share all the probability (softmax's limit, see logit_weight).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "sampler_common.hpp"

namespace loomp::samplers {
namespace {

struct TypicalP : Base {
  double p;
  int64_t min_keep;
  TypicalP(const loom_host_api* h, loom_host_ctx* c)
      : Base(h, c), p(cfg_float(h, c, "p")), min_keep(cfg_int(h, c, "min_keep")) {
    if (!(p > 0.0 && p <= 1.0)) invalid_param("p", "typical-p: p must be in (0, 1], got " + std::to_string(p));
    if (min_keep < 1) invalid_param("min_keep", "typical-p: min_keep must be >= 1, got " + std::to_string(min_keep));
  }

  void apply(const loom_sampling_batch& b) {
    const Rows rows = cpu_rows(&b, "typical-p");
    if (p >= 1.0 || min_keep >= rows.vocab) return;  // keeps everything
    std::vector<int32_t> idx;
    std::vector<double> prob(static_cast<size_t>(rows.vocab)), dev(static_cast<size_t>(rows.vocab));
    for (int64_t r = 0; r < rows.n; ++r) {
      float* x = rows.row(r);
      const float mx = x[argmax_row(x, rows.vocab, r)];
      const double total = row_weights(x, rows.vocab, mx, prob);
      const double log_total = std::log(total);
      // Entropy H = -sum p log p over the finite tokens, log p = x - max - log(total) (a +inf
      // max: -log n for its n +inf entries, -inf for the rest, whose 0 log 0 adds nothing).
      double entropy = 0.0;
      idx.clear();
      for (int64_t i = 0; i < rows.vocab; ++i) {
        if (x[i] == -INFINITY) continue;
        prob[i] /= total;
        dev[i] = log_logit_weight(x[i], mx) - log_total;  // log p, for now
        if (prob[i] > 0.0) entropy -= prob[i] * dev[i];
        idx.push_back(static_cast<int32_t>(i));
      }
      for (int32_t i : idx) dev[i] = std::fabs(-dev[i] - entropy);
      std::sort(idx.begin(), idx.end(),
                [&](int32_t a, int32_t c) { return dev[a] < dev[c] || (dev[a] == dev[c] && a < c); });
      size_t keep = idx.size();  // rounding: keep every finite token if the mass never reaches p
      double cum = 0.0;
      for (size_t i = 0; i < idx.size(); ++i) {
        cum += prob[idx[i]];
        if (cum >= p && static_cast<int64_t>(i) + 1 >= min_keep) { keep = i + 1; break; }
      }
      for (size_t i = keep; i < idx.size(); ++i) x[idx[i]] = -INFINITY;
    }
  }
};

constexpr loom_sampler_vtable kVtable = make_vtable<TypicalP>(0);
constexpr loom_param_desc kParams[] = {
    param("p", LOOM_VALUE_FLOAT, "0.95", "probability mass of the kept typical set, in (0, 1]; 1 disables"),
    param("min_keep", LOOM_VALUE_INT, "1", "minimum number of tokens kept (>= 1)"),
};

}  // namespace

const loom_component_desc typical_p_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "typical-p", "1.0.0",
    "Locally typical sampling: keeps tokens whose surprise is closest to the entropy up to mass p",
    kParams, 2, LOOM_THREADING_SERIAL, &kVtable};

}  // namespace loomp::samplers
