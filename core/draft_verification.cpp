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

// Checks that row i of the target's (p) or the proposal's (q) probabilities covers the V tokens
// with finite values >= 0.
template <typename T> void check_row(std::span<const T> row, size_t V, const char *which, size_t i) {
  const std::string name = std::string("sampled-draft verification: ") + which + " row " + std::to_string(i);
  if (row.size() != V)
    throw runtime_error(name + " has " + std::to_string(row.size()) + " entries for a vocabulary of " + std::to_string(V));
  for (T x : row)
    if (!(x >= T(0)) || !std::isfinite(x)) throw runtime_error(name + " holds " + std::to_string(x) + ", not a probability");
}

} // namespace

double verification_uniform(uint64_t key, uint64_t counter, uint64_t stream) {
  const uint64_t x = mix(mix(mix(key) ^ counter) ^ (stream * 0xd1b54a32d192ed03ull));
  return static_cast<double>(x >> 11) * 0x1.0p-53;
}

void probabilities_of(std::span<const float> logits, std::span<double> p) {
  if (p.size() != logits.size())
    throw runtime_error("sampled-draft verification: a row of " + std::to_string(logits.size()) + " logits and " +
                        std::to_string(p.size()) + " probabilities");
  // NaN is an error, as in the samplers (argmax_row in plugins/samplers/sampler_common.hpp
  // refuses a NaN logit): it fails the request rather than turning into NaN probabilities, which
  // would keep every draft.
  float mx = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < logits.size(); ++i) {
    if (std::isnan(logits[i]))
      throw runtime_error("sampled-draft verification: logit " + std::to_string(i) + " is NaN");
    mx = std::max(mx, logits[i]);
  }
  if (mx == -std::numeric_limits<float>::infinity())
    throw runtime_error("sampled-draft verification: every logit is -inf after filtering; nothing to select");
  if (mx == std::numeric_limits<float>::infinity()) {
    // (a temperature near 0 or a huge logit bias): softmax's limit, uniform over the +inf
    // entries; exp(x - mx) would be exp(inf - inf) = NaN there.
    double n = 0.0;
    for (float x : logits) n += x == mx ? 1.0 : 0.0;
    for (size_t i = 0; i < logits.size(); ++i) p[i] = logits[i] == mx ? 1.0 / n : 0.0;
    return;
  }
  double total = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    p[i] = logits[i] == -std::numeric_limits<float>::infinity() ? 0.0 : std::exp(static_cast<double>(logits[i]) - mx);
    total += p[i];
  }
  for (double &x : p) x /= total; // (total >= 1: the max contributes exp(0))
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
  // Every row over one vocabulary, every draft in it, every value a finite probability: a NaN
  // would make the comparisons below false and keep or reject drafts silently.
  const size_t V = p[0].size();
  if (V == 0) throw runtime_error("sampled-draft verification: an empty vocabulary");
  for (size_t i = 0; i <= k; ++i) {
    check_row<double>(p[i], V, "target", i);
    if (i == k) break;
    check_row<float>(q[i], V, "proposal", i);
    if (drafts[i] < 0 || static_cast<size_t>(drafts[i]) >= V)
      throw runtime_error("sampled-draft verification: draft " + std::to_string(i) + " is token " + std::to_string(drafts[i]) +
                          ", outside the vocabulary of " + std::to_string(V));
  }
  tokens.clear();
  std::vector<double> residual;
  for (size_t i = 0; i < k; ++i) {
    const size_t d = static_cast<size_t>(drafts[i]);
    const double pd = p[i][d], qd = q[i][d];
    if (verification_uniform(key, counters[i], 0) * qd < pd) { // kept with probability min(1, p/q)
      tokens.push_back(drafts[i]);
      continue;
    }
    residual.resize(V);
    double total = 0.0;
    for (size_t t = 0; t < V; ++t) {
      residual[t] = std::max(0.0, p[i][t] - static_cast<double>(q[i][t]));
      total += residual[t];
    }
    // Rounding: p and q each sum to 1 only within rounding (q is float), so where p ~= q the
    // residual is made of rounding errors. That matters at the rounding level only: a rejection
    // there happens with probability sum max(0, q - p), itself about that small. A residual of
    // exactly 0 means p <= q everywhere, that is p == q within rounding, where min(1, p/q) is 1
    // but for rounding: the draft stands. (The inputs are checked finite above, so total is
    // never NaN here.)
    if (total == 0.0) {
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
