#include "token_logprobs.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace loom {

TokenLogprob token_logprob(std::span<const float> row, int32_t token, int32_t top) {
  TokenLogprob out;
  out.token = token;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  double max = -std::numeric_limits<double>::infinity();
  bool has_nan = false;
  int64_t infinite = 0; // +inf entries: softmax's limit puts all the mass on them, equally
  for (float x : row) {
    if (std::isnan(x)) has_nan = true;
    else if (x == std::numeric_limits<float>::infinity()) ++infinite;
    else max = std::max(max, static_cast<double>(x));
  }
  // log p(i): log-softmax, or -log(count) for the +inf entries (and -inf for the rest) when some
  // are +inf; NaN when nothing finite or infinite fixes the distribution.
  double log_sum = nan;
  if (!has_nan && infinite == 0 && std::isfinite(max)) {
    double sum = 0;
    for (float x : row) sum += std::exp(static_cast<double>(x) - max);
    log_sum = max + std::log(sum);
  }
  const auto logp = [&](int32_t i) -> double {
    if (has_nan) return nan;
    const float x = row[static_cast<size_t>(i)];
    if (infinite > 0) return x == std::numeric_limits<float>::infinity() ? -std::log(static_cast<double>(infinite))
                                                                          : -std::numeric_limits<double>::infinity();
    return static_cast<double>(x) - log_sum;
  };
  const int32_t vocab = static_cast<int32_t>(row.size());
  out.logprob = token >= 0 && token < vocab ? static_cast<float>(logp(token)) : static_cast<float>(nan);
  const int32_t k = std::clamp<int32_t>(top, 0, std::min<int32_t>(kMaxTopLogprobs, vocab));
  if (k == 0) return out;
  // The k largest logits (NaN sorts last), ties by id: a partial sort of the ids.
  std::vector<int32_t> ids(static_cast<size_t>(vocab));
  for (int32_t i = 0; i < vocab; ++i) ids[static_cast<size_t>(i)] = i;
  const auto before = [&](int32_t a, int32_t b) {
    const float x = row[static_cast<size_t>(a)], y = row[static_cast<size_t>(b)];
    const bool x_nan = std::isnan(x), y_nan = std::isnan(y);
    if (x_nan != y_nan) return y_nan; // numbers before NaN
    if (x_nan) return a < b;
    return x > y || (x == y && a < b);
  };
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), before);
  out.top.reserve(static_cast<size_t>(k));
  for (int32_t i = 0; i < k; ++i) out.top.emplace_back(ids[static_cast<size_t>(i)], static_cast<float>(logp(ids[static_cast<size_t>(i)])));
  return out;
}

} // namespace loom
