#include "loom/core/draft_verification.hpp"

#include <cmath>
#include <limits>
#include <string>

#include "loom/core/error.hpp"

namespace loom {
namespace {

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Draws an index from weights w (>= 0, positive sum) with uniform u, walking in id order.
int32_t draw(std::span<const double> w, double total, double u) {
  double target = u * total, acc = 0.0;
  int32_t last = -1;
  for (size_t i = 0; i < w.size(); ++i) {
    if (w[i] <= 0.0) continue;
    acc += w[i];
    last = static_cast<int32_t>(i);
    if (target < acc) return last;
  }
  return last; // (rounding left target at the very end: the last token with weight)
}

} // namespace

double verification_uniform(uint64_t key, uint64_t counter, uint64_t stream) {
  const uint64_t x = mix(mix(mix(key) ^ counter) ^ (stream * 0xd1b54a32d192ed03ull));
  return static_cast<double>(x >> 11) * 0x1.0p-53;
}

void probabilities_of(std::span<const float> logits, std::span<double> p) {
  float mx = -std::numeric_limits<float>::infinity();
  for (float x : logits) {
    if (std::isnan(x)) throw runtime_error("sampled-draft verification: a logit is NaN");
    mx = std::max(mx, x);
  }
  if (mx == -std::numeric_limits<float>::infinity())
    throw runtime_error("sampled-draft verification: every logit is -inf after filtering; nothing to select");
  double total = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    p[i] = logits[i] == -std::numeric_limits<float>::infinity() ? 0.0 : std::exp(static_cast<double>(logits[i]) - mx);
    total += p[i];
  }
  for (double &x : p) x /= total;
}

bool normalise_proposal(std::span<float> q, int32_t token) {
  if (token < 0 || static_cast<size_t>(token) >= q.size()) return false;
  double total = 0.0;
  for (float x : q) {
    if (!std::isfinite(x) || x < 0.0f) return false;
    total += x;
  }
  if (!(total > 0.0) || !(q[static_cast<size_t>(token)] > 0.0f)) return false;
  for (float &x : q) x = static_cast<float>(x / total);
  return q[static_cast<size_t>(token)] > 0.0f;
}

int32_t verify_sampled_drafts(std::span<const std::vector<double>> p, std::span<const std::vector<float>> q,
                              std::span<const int32_t> drafts, uint64_t key, std::span<const uint64_t> counters,
                              std::vector<int32_t> &tokens) {
  const size_t k = drafts.size();
  if (p.size() != k + 1 || q.size() != k || counters.size() != k + 1)
    throw runtime_error("sampled-draft verification: " + std::to_string(k) + " drafts need " + std::to_string(k + 1) +
                        " target rows and " + std::to_string(k) + " proposal rows");
  tokens.clear();
  std::vector<double> residual;
  for (size_t i = 0; i < k; ++i) {
    const size_t d = static_cast<size_t>(drafts[i]);
    const double pd = p[i][d], qd = q[i][d];
    if (verification_uniform(key, counters[i], 0) * qd < pd) { // kept with probability min(1, p/q)
      tokens.push_back(drafts[i]);
      continue;
    }
    residual.resize(p[i].size());
    double total = 0.0;
    for (size_t t = 0; t < residual.size(); ++t) {
      residual[t] = std::max(0.0, p[i][t] - static_cast<double>(q[i][t]));
      total += residual[t];
    }
    if (!(total > 0.0)) { // p <= q everywhere: p == q within rounding, so the draft stands
      tokens.push_back(drafts[i]);
      continue;
    }
    tokens.push_back(draw(residual, total, verification_uniform(key, counters[i], 1)));
    return static_cast<int32_t>(i);
  }
  tokens.push_back(draw(p[k], 1.0, verification_uniform(key, counters[k], 1)));
  return static_cast<int32_t>(k);
}

} // namespace loom
