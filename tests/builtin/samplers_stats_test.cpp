// Statistical tests of the sampler chain: each filter followed by `dist`, drawn 100,000 times
// with distinct Philox counters from one fixed logit row, against the filtered distribution
// computed here independently, with a chi-square goodness-of-fit test. Philox is deterministic,
// so these tests are too; a wrong filter (or a biased draw) fails them (see the negative control).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "builtin_test_util.hpp"

namespace {

constexpr int kDraws = 100000;

// A fixed row of 24 logits with distinct values and no near-ties at the thresholds used below.
const std::vector<float> kRow{1.9f,  -0.4f, 0.7f,  2.6f,  -1.3f, 0.1f,  1.2f, -2.2f,
                              0.45f, 3.1f,  -0.9f, 1.55f, -3.0f, 0.95f, 2.2f, -1.7f,
                              -0.1f, 0.3f,  -2.6f, 1.75f, -0.65f, 2.9f, -1.1f, 0.6f};

std::vector<double> softmax(const std::vector<float> &x, double t = 1.0) {
  double mx = -INFINITY;
  for (float v : x) mx = std::max(mx, static_cast<double>(v) / t);
  std::vector<double> p(x.size());
  double s = 0;
  for (size_t i = 0; i < x.size(); ++i) s += p[i] = std::exp(static_cast<double>(x[i]) / t - mx);
  for (auto &v : p) v /= s;
  return p;
}
// Keeps only `keep` (others 0) and renormalises.
std::vector<double> restrict_to(std::vector<double> p, const std::vector<bool> &keep) {
  double s = 0;
  for (size_t i = 0; i < p.size(); ++i) s += keep[i] ? p[i] : 0.0;
  for (size_t i = 0; i < p.size(); ++i) p[i] = keep[i] ? p[i] / s : 0.0;
  return p;
}
std::vector<size_t> order_by(const std::vector<double> &key) {  // ascending key, then id
  std::vector<size_t> idx(key.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return key[a] < key[b]; });
  return idx;
}

// Regularised upper incomplete gamma Q(a, x) (Numerical Recipes gammq): the chi-square
// survival function is Q(df / 2, chi2 / 2).
double gamma_q(double a, double x) {
  if (x <= 0) return 1.0;
  const double gln = std::lgamma(a);
  if (x < a + 1) {  // series for P
    double ap = a, sum = 1.0 / a, del = sum;
    for (int n = 0; n < 1000; ++n) {
      ap += 1;
      del *= x / ap;
      sum += del;
      if (std::fabs(del) < std::fabs(sum) * 1e-15) break;
    }
    return 1.0 - sum * std::exp(-x + a * std::log(x) - gln);
  }
  double b = x + 1 - a, c = 1.0 / 1e-300, d = 1.0 / b, h = d;  // continued fraction for Q
  for (int i = 1; i < 1000; ++i) {
    const double an = -i * (i - a);
    b += 2;
    d = an * d + b;
    if (std::fabs(d) < 1e-300) d = 1e-300;
    c = b + an / c;
    if (std::fabs(c) < 1e-300) c = 1e-300;
    d = 1.0 / d;
    const double del = d * c;
    h *= del;
    if (std::fabs(del - 1.0) < 1e-15) break;
  }
  return std::exp(-x + a * std::log(x) - gln) * h;
}

// Chi-square p-value of observed counts against expected probabilities; bins expected below 5
// draws are pooled. Zero-probability tokens are checked separately by the caller.
double chi_square_p(const std::vector<int> &observed, const std::vector<double> &p, int n) {
  double chi2 = 0, pool_e = 0, pool_o = 0;
  int bins = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] <= 0) continue;
    const double e = p[i] * n;
    if (e < 5) {
      pool_e += e;
      pool_o += observed[i];
      continue;
    }
    chi2 += (observed[i] - e) * (observed[i] - e) / e;
    ++bins;
  }
  if (pool_e > 0) {
    chi2 += (pool_o - pool_e) * (pool_o - pool_e) / pool_e;
    ++bins;
  }
  REQUIRE(bins >= 2);
  return gamma_q((bins - 1) / 2.0, chi2 / 2.0);
}

// Runs `filter` then `dist` over kDraws copies of kRow (key 2024, counters 0..kDraws-1).
std::vector<int> draw(const std::string &filter_toml) {
  auto rt = bt::runtime("[[sampler]]\n" + filter_toml + "\n\n[[sampler]]\nuse = \"dist\"\n");
  const int64_t vocab = static_cast<int64_t>(kRow.size());
  std::vector<float> many;
  many.reserve(static_cast<size_t>(kDraws) * kRow.size());
  for (int i = 0; i < kDraws; ++i) many.insert(many.end(), kRow.begin(), kRow.end());
  bt::Tensor<float> logits({kDraws, vocab}, std::move(many));
  std::vector<int64_t> seq(kDraws);
  std::vector<uint64_t> key(kDraws, 2024), counter(kDraws);
  std::iota(counter.begin(), counter.end(), uint64_t{0});
  std::iota(seq.begin(), seq.end(), int64_t{0});
  std::vector<int32_t> tokens(kDraws, -1);
  std::vector<const int32_t *> hist(kDraws, nullptr);
  std::vector<int32_t> hist_len(kDraws, 0);
  loom_sampling_batch b{};
  b.struct_size = sizeof(b);
  b.n_rows = kDraws;
  b.vocab_size = static_cast<int32_t>(vocab);
  b.logits = logits.dl();
  b.seq_ids = seq.data();
  b.history = hist.data();
  b.history_len = hist_len.data();
  b.rng_key = key.data();
  b.rng_counter = counter.data();
  b.tokens_out = tokens.data();
  for (const char *slot : {"sampler[0]", "sampler[1]"}) {
    auto &s = rt->pipeline().at(slot);
    INFO(slot);
    REQUIRE(s.vtable<loom_sampler_vtable>()->apply(s.handle(), &b) == LOOM_OK);
  }
  std::vector<int> counts(kRow.size(), 0);
  for (int32_t t : tokens) {
    REQUIRE(t >= 0);
    REQUIRE(t < vocab);
    ++counts[static_cast<size_t>(t)];
  }
  return counts;
}

// Filtered-out tokens never appear, and the rest fit `expected` at significance 1e-4.
void check_fit(const std::vector<int> &counts, const std::vector<double> &expected) {
  int kept = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    INFO("token " << i);
    if (expected[i] == 0.0) CHECK(counts[i] == 0);
    else ++kept;
  }
  const double pv = chi_square_p(counts, expected, kDraws);
  INFO("kept " << kept << " tokens, chi-square p-value " << pv);
  CHECK(pv > 1e-4);
}

} // namespace

TEST_CASE("temperature then dist follows softmax(x / t)", "[samplers][stats]") {
  check_fit(draw("use = \"temperature\"\nt = 0.7"), softmax(kRow, 0.7));
}

TEST_CASE("top-k then dist follows the k most probable tokens, renormalised", "[samplers][stats]") {
  const auto p = softmax(kRow);
  std::vector<double> neg(p.size());
  for (size_t i = 0; i < p.size(); ++i) neg[i] = -p[i];
  const auto order = order_by(neg);
  std::vector<bool> keep(p.size(), false);
  for (size_t i = 0; i < 6; ++i) keep[order[i]] = true;
  check_fit(draw("use = \"top-k\"\nk = 6"), restrict_to(p, keep));
}

TEST_CASE("top-p then dist follows the nucleus, renormalised", "[samplers][stats]") {
  const double top_p = 0.85;
  const auto p = softmax(kRow);
  std::vector<double> neg(p.size());
  for (size_t i = 0; i < p.size(); ++i) neg[i] = -p[i];
  const auto order = order_by(neg);
  std::vector<bool> keep(p.size(), false);
  double cum = 0;
  for (size_t i : order) {
    keep[i] = true;
    cum += p[i];
    if (cum >= top_p) break;
  }
  REQUIRE(cum - top_p > 1e-4); // the fixture is not on a boundary
  const auto expected = restrict_to(p, keep);
  const auto counts = draw("use = \"top-p\"\np = 0.85");
  check_fit(counts, expected);
  // Negative control: the same draws do not fit the unfiltered distribution.
  CHECK(chi_square_p(counts, p, kDraws) < 1e-4);
}

TEST_CASE("min-p then dist keeps tokens at least p times the top probability", "[samplers][stats]") {
  const auto p = softmax(kRow);
  const double top = *std::max_element(p.begin(), p.end());
  std::vector<bool> keep(p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    REQUIRE(std::fabs(p[i] - 0.08 * top) > 1e-6);
    keep[i] = p[i] >= 0.08 * top;
  }
  check_fit(draw("use = \"min-p\"\np = 0.08"), restrict_to(p, keep));
}

TEST_CASE("typical-p then dist keeps the locally typical set", "[samplers][stats]") {
  const double mass = 0.5;
  const auto p = softmax(kRow);
  double entropy = 0;
  for (double v : p) entropy -= v * std::log(v);
  std::vector<double> dev(p.size());
  for (size_t i = 0; i < p.size(); ++i) dev[i] = std::fabs(-std::log(p[i]) - entropy);
  const auto order = order_by(dev);
  std::vector<bool> keep(p.size(), false);
  double cum = 0;
  for (size_t i : order) {
    keep[i] = true;
    cum += p[i];
    if (cum >= mass) break;
  }
  REQUIRE(cum - mass > 1e-4);
  // The typical set is not a nucleus: it leaves out the most probable token (9) of this row
  // while keeping less probable ones (11, 19).
  CHECK_FALSE(keep[9]);
  CHECK(keep[11]);
  CHECK(keep[19]);
  check_fit(draw("use = \"typical-p\"\np = 0.5"), restrict_to(p, keep));
}
