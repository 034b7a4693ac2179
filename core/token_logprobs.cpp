#include "token_logprobs.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

namespace loom {

namespace {

// Whether logit (x, a) ranks before (y, b): larger first, numbers before NaN, ties by id.
bool ranks_before(float x, int32_t a, float y, int32_t b) {
  const bool x_nan = std::isnan(x), y_nan = std::isnan(y);
  if (x_nan != y_nan) return y_nan;
  if (x_nan) return a < b;
  return x > y || (x == y && a < b);
}

} // namespace

TokenLogprob token_logprob(std::span<const float> row, int32_t token, int32_t top) {
  TokenLogprob out;
  out.token = token;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const int32_t vocab = static_cast<int32_t>(row.size());
  const int32_t k = std::clamp<int32_t>(top, 0, std::min<int32_t>(kMaxTopLogprobs, vocab));
  // One pass: the maximum, NaN and +inf counts, and the k best (id, logit) kept sorted in a small
  // array (insertion: k <= 20).
  float max = -inf;
  bool has_nan = false;
  int64_t infinite = 0;
  std::array<std::pair<int32_t, float>, kMaxTopLogprobs> best{};
  int32_t kept = 0;
  // The token's rank: 1 + the tokens before it in the order of `top` (counted in the same pass).
  const bool known = token >= 0 && token < vocab;
  const float own = known ? row[static_cast<size_t>(token)] : 0.0f;
  int64_t before = 0;
  for (int32_t i = 0; i < vocab; ++i) {
    const float x = row[static_cast<size_t>(i)];
    if (known) before += ranks_before(x, i, own, token);
    if (std::isnan(x)) has_nan = true;
    else if (x == inf) ++infinite;
    else max = std::max(max, x);
    if (k == 0 || (kept == k && !ranks_before(x, i, best[static_cast<size_t>(k - 1)].second, best[static_cast<size_t>(k - 1)].first)))
      continue;
    int32_t at = kept < k ? kept++ : k - 1;
    while (at > 0 && ranks_before(x, i, best[static_cast<size_t>(at - 1)].second, best[static_cast<size_t>(at - 1)].first)) {
      best[static_cast<size_t>(at)] = best[static_cast<size_t>(at - 1)];
      --at;
    }
    best[static_cast<size_t>(at)] = {i, x};
  }
  // log p(i): log-softmax, or -log(count) for the +inf entries (and -inf for the rest) when some
  // are +inf; NaN when nothing finite or infinite fixes the distribution.
  double log_sum = nan;
  if (!has_nan && infinite == 0 && std::isfinite(max)) {
    double sum = 0;
    for (float x : row) sum += static_cast<double>(std::exp(x - max));
    log_sum = static_cast<double>(max) + std::log(sum);
  }
  const auto logp = [&](float x) -> float {
    if (has_nan) return static_cast<float>(nan);
    if (infinite > 0) return x == inf ? static_cast<float>(-std::log(static_cast<double>(infinite))) : -inf;
    return static_cast<float>(static_cast<double>(x) - log_sum);
  };
  out.logprob = known ? logp(own) : static_cast<float>(nan);
  out.rank = known ? before + 1 : 0;
  out.top.reserve(static_cast<size_t>(kept));
  for (int32_t i = 0; i < kept; ++i) out.top.emplace_back(best[static_cast<size_t>(i)].first, logp(best[static_cast<size_t>(i)].second));
  return out;
}

} // namespace loom
