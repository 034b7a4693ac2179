// Sampler `no-repeat-ngram`: bans (sets to -inf) every token that would complete an n-gram
// already present in the row's history (HF transformers' NoRepeatNGramLogitsProcessor): with
// the history h[0..L), the last n-1 tokens h[L-n+1..L) are the prefix; for every earlier
// position i with h[i..i+n-1) == prefix, token h[i+n-1] is banned. n = 1 bans every token in
// the history. Nothing is banned while L < n (no n-gram is complete yet) -- transformers
// checks L + 1 < n, the same thing.
#include <cmath>
#include <cstring>

#include "sampler_common.hpp"

namespace loomp::samplers {
namespace {

struct NoRepeatNgram : Base {
  int64_t n;
  NoRepeatNgram(const loom_host_api* h, loom_host_ctx* c) : Base(h, c), n(cfg_int(h, c, "n")) {
    if (n < 1) invalid_param("n", "no-repeat-ngram: n must be >= 1, got " + std::to_string(n));
  }

  void apply(const loom_sampling_batch& b) {
    const Rows rows = cpu_rows(&b, "no-repeat-ngram");
    require_history(b, "no-repeat-ngram");
    for (int64_t r = 0; r < rows.n; ++r) {
      const HistoryView h = history_of(b, r, "no-repeat-ngram");
      if (h.len < n) continue;
      float* x = rows.row(r);
      const int32_t* prefix = h.tokens + (h.len - (n - 1));
      const size_t prefix_bytes = static_cast<size_t>(n - 1) * sizeof(int32_t);
      // Every complete n-gram h[i..i+n) with i + n <= L.
      for (int64_t i = 0; i + n <= h.len; ++i)
        if (prefix_bytes == 0 || std::memcmp(h.tokens + i, prefix, prefix_bytes) == 0)
          x[h.tokens[i + n - 1]] = -INFINITY;
    }
  }
};

constexpr loom_sampler_vtable kVtable = make_vtable<NoRepeatNgram>(LOOM_SAMPLER_USES_HISTORY);
constexpr loom_param_desc kParams[] = {
    param("n", LOOM_VALUE_INT, "3", "n-gram size (>= 1): no n-gram of the history may occur twice"),
};

}  // namespace

const loom_component_desc no_repeat_ngram_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "no-repeat-ngram", "1.0.0",
    "Bans tokens that would repeat an n-gram of the history", kParams, 1, LOOM_THREADING_SERIAL,
    &kVtable};

}  // namespace loomp::samplers
