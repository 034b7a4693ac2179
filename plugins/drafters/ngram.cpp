// Drafter component `ngram`: prompt lookup decoding. The last n tokens of a sequence's context
// (n from max_ngram down to min_ngram) are looked for earlier in the context; the tokens that
// followed their latest earlier occurrence are the drafts. Costs no model: it pays off where the
// output copies its input (rewriting, editing, extraction, code).
//
// Stateless: every call reads the whole context, so nothing is kept per sequence. The search is
// O(context * n) per sequence and call, microseconds for contexts of a few thousand tokens.
#include <algorithm>
#include <string>

#include "drafter_glue.hpp"

namespace loomp::drafters {
namespace {

struct Ngram {
  const loom_host_api* host;
  loom_host_ctx* ctx;
  int32_t max_ngram = 0, min_ngram = 0;

  Ngram(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c) {
    const int64_t hi = cfg_int(h, c, "max_ngram"), lo = cfg_int(h, c, "min_ngram");
    if (hi < 1 || hi > 64) invalid_param("max_ngram", "max_ngram must be between 1 and 64, got " + std::to_string(hi));
    if (lo < 1 || lo > hi)
      invalid_param("min_ngram", "min_ngram must be between 1 and max_ngram (" + std::to_string(hi) + "), got " +
                                     std::to_string(lo));
    max_ngram = static_cast<int32_t>(hi);
    min_ngram = static_cast<int32_t>(lo);
  }

  // Drafts for one context into out (at most max_draft); returns how many.
  int32_t lookup(const int32_t* x, int32_t len, int32_t max_draft, int32_t* out) const {
    for (int32_t n = std::min(max_ngram, len - 1); n >= min_ngram; --n) {
      const int32_t* tail = x + len - n;
      // The latest start i < len - n whose n tokens equal the tail (the tail itself excluded),
      // so that at least one token follows the match.
      for (int32_t i = len - n - 1; i >= 0; --i) {
        if (!std::equal(tail, tail + n, x + i)) continue;
        const int32_t from = i + n, count = std::min(max_draft, len - from);
        std::copy(x + from, x + from + count, out);
        return count;
      }
    }
    return 0;
  }

  void propose(const loom_draft_batch& b) {
    for (int32_t s = 0; s < b.n_seqs; ++s) {
      b.n_out[s] = 0;
      if (b.context[s] == nullptr || b.context_len[s] < 2 || b.max_draft[s] < 1) continue;
      const int32_t max_draft = std::min(b.max_draft[s], b.stride);
      b.n_out[s] = lookup(b.context[s], b.context_len[s], max_draft, b.draft_out + static_cast<size_t>(s) * b.stride);
    }
  }

  void release(int64_t) {}
};

constexpr loom_param_desc kParams[] = {
    {sizeof(loom_param_desc), "max_ngram", LOOM_VALUE_INT, 0, "3", "longest suffix of the context looked up (1 to 64)"},
    {sizeof(loom_param_desc), "min_ngram", LOOM_VALUE_INT, 0, "1", "shortest suffix tried before giving up (1 to max_ngram)"},
};

}  // namespace

extern const loom_component_desc ngram_desc;
const loom_component_desc ngram_desc = {
    sizeof(loom_component_desc), LOOM_KIND_DRAFTER, "ngram", "1.0.0",
    "Prompt lookup: drafts the continuation of the context's last n-gram where it occurred before",
    kParams, 2, LOOM_THREADING_SERIAL, &DrafterGlue<Ngram>::kVtable};

}  // namespace loomp::drafters
