// libloom-samplers through the runtime: every component on hand-computed cases.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <map>
#include <string_view>

#include "../../plugins/samplers/philox.hpp"
#include "builtin_test_util.hpp"

namespace {

// One call of a sampler's apply() over `logits` [rows, vocab].
struct Batch {
  bt::Tensor<float> logits;
  std::vector<int64_t> seq_ids;
  std::vector<std::vector<int32_t>> hist;
  std::vector<const int32_t *> hist_ptr;
  std::vector<int32_t> hist_len;
  std::vector<uint64_t> key, counter;
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  loom_sampling_batch b{};

  Batch(int64_t rows, int64_t vocab, std::vector<float> x)
      : logits({rows, vocab}, std::move(x)), seq_ids(rows), hist(rows), hist_len(rows), key(rows, 7),
        counter(rows, 0), tokens(rows, -1), logprobs(rows, 0.0f) {}

  const loom_sampling_batch &get() {
    hist_ptr.clear();
    for (size_t r = 0; r < hist.size(); ++r) {
      hist_ptr.push_back(hist[r].data());
      hist_len[r] = static_cast<int32_t>(hist[r].size());
    }
    b = loom_sampling_batch{};
    b.struct_size = sizeof(b);
    b.n_rows = static_cast<int32_t>(logits.shape[0]);
    b.vocab_size = static_cast<int32_t>(logits.shape[1]);
    b.logits = logits.dl();
    b.seq_ids = seq_ids.data();
    b.history = hist_ptr.data();
    b.history_len = hist_len.data();
    b.rng_key = key.data();
    b.rng_counter = counter.data();
    b.tokens_out = tokens.data();
    b.logprobs_out = logprobs.data();
    return b;
  }
};

loom_status apply(loom::Instance &in, Batch &batch) {
  return in.vtable<loom_sampler_vtable>()->apply(in.handle(), &batch.get());
}

bool masked(float x) { return std::isinf(x) && x < 0; }

} // namespace

TEST_CASE("philox4x32-10 matches Random123 known-answer vectors", "[samplers]") {
  using namespace loomp::philox;
  CHECK(philox4x32_10({0, 0, 0, 0}, {0, 0}) == Counter{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u});
  CHECK(philox4x32_10({~0u, ~0u, ~0u, ~0u}, {~0u, ~0u}) ==
        Counter{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu});
  CHECK(philox4x32_10({0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u}) ==
        Counter{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});
  const float u = uniform01(1, 2);
  CHECK(u >= 0.0f);
  CHECK(u < 1.0f);
}

TEST_CASE("greedy picks the first maximum and reports its log-probability", "[samplers]") {
  auto rt = bt::runtime("[[sampler]]\nuse = \"greedy\"\n");
  auto &g = rt->pipeline().at("sampler[0]");
  CHECK((g.vtable<loom_sampler_vtable>()->flags & LOOM_SAMPLER_SELECTS) != 0);
  Batch b(2, 4, {1, 3, 3, 2, -1, -5, -0.5f, -INFINITY});
  REQUIRE(apply(g, b) == LOOM_OK);
  CHECK(b.tokens == std::vector<int32_t>{1, 2});
  const double lse = std::log(std::exp(1.0) + 2 * std::exp(3.0) + std::exp(2.0));
  CHECK(b.logprobs[0] == Approx(3.0 - lse).epsilon(1e-5));

  Batch dead(1, 3, {-INFINITY, -INFINITY, -INFINITY});
  CHECK(apply(g, dead) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(g.last_error(), Catch::Contains("-inf"));
}

TEST_CASE("samplers validate the logits tensor", "[samplers]") {
  auto rt = bt::runtime("[[sampler]]\nuse = \"top-k\"\nk = 2\n");
  auto &s = rt->pipeline().at("sampler[0]");
  Batch b(1, 4, {1, 2, 3, 4});
  b.get();
  b.b.vocab_size = 5; // shape [1, 4] no longer matches
  CHECK(s.vtable<loom_sampler_vtable>()->apply(s.handle(), &b.b) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(s.last_error(), Catch::Contains("shape"));

  b.get();
  b.logits.t.dtype = DLDataType{kDLFloat, 16, 1};
  CHECK(s.vtable<loom_sampler_vtable>()->apply(s.handle(), &b.b) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(s.last_error(), Catch::Contains("float32"));

  Batch cm(2, 2, {1, 2, 3, 4});
  cm.get();
  int64_t strides[2] = {1, 2}; // column-major
  cm.logits.t.strides = strides;
  CHECK(s.vtable<loom_sampler_vtable>()->apply(s.handle(), &cm.b) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(s.last_error(), Catch::Contains("contiguous"));

  Batch nan(1, 3, {1.0f, std::nanf(""), 2.0f});
  CHECK(apply(s, nan) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(s.last_error(), Catch::Contains("NaN"));

  b.get();
  b.logits.t.device = DLDevice{kDLCUDA, 0};
  CHECK(s.vtable<loom_sampler_vtable>()->apply(s.handle(), &b.b) == LOOM_ERR_UNSUPPORTED);
  CHECK_THAT(s.last_error(), Catch::Contains("CPU"));
}

TEST_CASE("temperature divides logits by t and refuses t <= 0", "[samplers]") {
  auto rt = bt::runtime("[[sampler]]\nuse = \"temperature\"\nt = 2.0\n");
  auto &s = rt->pipeline().at("sampler[0]");
  Batch b(1, 3, {4, -2, -INFINITY});
  REQUIRE(apply(s, b) == LOOM_OK);
  CHECK(b.logits.v[0] == 2.0f);
  CHECK(b.logits.v[1] == -1.0f);
  CHECK(masked(b.logits.v[2]));

  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"temperature\"\nt = 0.0\n"), Catch::Contains("greedy"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"temperature\"\nt = -1.0\n"), Catch::Contains("t must"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"temperature\"\ntemp = 1.0\n"), Catch::Contains("temp"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"temperature\"\nt = \"hot\"\n"), Catch::Contains("t"));
  CHECK(bt::build_error("[[sampler]]\nuse = \"temperature\"\n").empty()); // default t = 1.0
}

TEST_CASE("top-k keeps exactly k tokens, lower ids first on ties", "[samplers]") {
  auto rt = bt::runtime("[[sampler]]\nuse = \"top-k\"\nk = 3\n");
  auto &s = rt->pipeline().at("sampler[0]");
  Batch b(2, 6, {5, 1, 4, 4, 3, 2, /* row 2: all tied */ 1, 1, 1, 1, 1, 1});
  REQUIRE(apply(s, b) == LOOM_OK);
  const std::vector<bool> keep0{true, false, true, true, false, false};
  const std::vector<bool> keep1{true, true, true, false, false, false};
  for (int i = 0; i < 6; ++i) {
    CHECK(masked(b.logits.v[i]) == !keep0[i]);
    CHECK(masked(b.logits.v[6 + i]) == !keep1[i]);
  }
  CHECK(b.logits.v[0] == 5.0f); // kept values are untouched

  auto off = bt::runtime("[[sampler]]\nuse = \"top-k\"\nk = 0\n");
  Batch all(1, 4, {1, 2, 3, 4});
  REQUIRE(apply(off->pipeline().at("sampler[0]"), all) == LOOM_OK);
  CHECK(all.logits.v == std::vector<float>{1, 2, 3, 4});
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"top-k\"\nk = 2.5\n"), Catch::Contains("k"));
}

TEST_CASE("top-p keeps the smallest prefix reaching p, and at least min_keep", "[samplers]") {
  // Probabilities 0.15, 0.5, 0.05, 0.3 (shuffled on purpose): sorted 0.5, 0.3 reach 0.8 >= 0.7.
  const std::vector<float> logits{std::log(0.15f), std::log(0.5f), std::log(0.05f), std::log(0.3f)};
  {
    auto rt = bt::runtime("[[sampler]]\nuse = \"top-p\"\np = 0.7\n");
    Batch b(1, 4, logits);
    REQUIRE(apply(rt->pipeline().at("sampler[0]"), b) == LOOM_OK);
    CHECK(masked(b.logits.v[0]));
    CHECK(!masked(b.logits.v[1]));
    CHECK(masked(b.logits.v[2]));
    CHECK(!masked(b.logits.v[3]));
  }
  {
    auto rt = bt::runtime("[[sampler]]\nuse = \"top-p\"\np = 0.7\nmin_keep = 3\n");
    Batch b(1, 4, logits);
    REQUIRE(apply(rt->pipeline().at("sampler[0]"), b) == LOOM_OK);
    CHECK(!masked(b.logits.v[0]));
    CHECK(masked(b.logits.v[2]));
  }
  {
    // 1000 equal tokens with p = 0.9: exactly the first 900 ids (beyond the first partial sort).
    auto rt = bt::runtime("[[sampler]]\nuse = \"top-p\"\np = 0.9\n");
    Batch b(1, 1000, std::vector<float>(1000, 0.0f));
    REQUIRE(apply(rt->pipeline().at("sampler[0]"), b) == LOOM_OK);
    int kept = 0;
    for (int i = 0; i < 1000; ++i) kept += masked(b.logits.v[i]) ? 0 : 1;
    CHECK(kept == 900);
    CHECK(!masked(b.logits.v[899]));
    CHECK(masked(b.logits.v[900]));
  }
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"top-p\"\np = 1.5\n"), Catch::Contains("p must"));
}

TEST_CASE("min-p masks tokens below p times the top probability", "[samplers]") {
  auto rt = bt::runtime("[[sampler]]\nuse = \"min-p\"\np = 0.1\n");
  // probabilities 0.5, 0.3, 0.04, 0.16: threshold 0.05 masks only token 2.
  Batch b(1, 4, {std::log(0.5f), std::log(0.3f), std::log(0.04f), std::log(0.16f)});
  REQUIRE(apply(rt->pipeline().at("sampler[0]"), b) == LOOM_OK);
  CHECK(!masked(b.logits.v[0]));
  CHECK(!masked(b.logits.v[1]));
  CHECK(masked(b.logits.v[2]));
  CHECK(!masked(b.logits.v[3]));
}

TEST_CASE("repetition-penalty follows llama.cpp over the last_n window", "[samplers]") {
  auto rt = bt::runtime("[[sampler]]\nuse = \"repetition-penalty\"\npenalty = 2.0\nfrequency = 0.5\n"
                        "presence = 0.25\nlast_n = 4\n");
  auto &s = rt->pipeline().at("sampler[0]");
  CHECK((s.vtable<loom_sampler_vtable>()->flags & LOOM_SAMPLER_USES_HISTORY) != 0);
  Batch b(1, 4, {2.0f, -1.0f, 0.5f, 3.0f});
  b.hist[0] = {0, 1, 1, 3, 3, 3}; // window = {1, 3, 3, 3}: token 0 fell out of it
  REQUIRE(apply(s, b) == LOOM_OK);
  CHECK(b.logits.v[0] == 2.0f);
  CHECK(b.logits.v[1] == Approx(-1.0 * 2 - 0.5 * 1 - 0.25));
  CHECK(b.logits.v[2] == 0.5f);
  CHECK(b.logits.v[3] == Approx(3.0 / 2 - 0.5 * 3 - 0.25));

  Batch bad(1, 4, {0, 0, 0, 0});
  bad.hist[0] = {9};
  CHECK(apply(s, bad) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(s.last_error(), Catch::Contains("vocabulary"));
}

TEST_CASE("dist is reproducible per (key, counter) and follows softmax", "[samplers]") {
  auto rt = bt::runtime("[[sampler]]\nuse = \"dist\"\n");
  auto &s = rt->pipeline().at("sampler[0]");
  CHECK((s.vtable<loom_sampler_vtable>()->flags & LOOM_SAMPLER_USES_RNG) != 0);
  const std::vector<float> logits{0.0f, 1.0f, -INFINITY, 2.0f};
  std::vector<double> p{std::exp(0.0), std::exp(1.0), 0.0, std::exp(2.0)};
  double total = p[0] + p[1] + p[3];
  for (auto &x : p) x /= total;

  Batch one(1, 4, logits);
  one.key[0] = 42;
  one.counter[0] = 1234;
  REQUIRE(apply(s, one) == LOOM_OK);
  const int32_t first = one.tokens[0];
  Batch again(1, 4, logits);
  again.key[0] = 42;
  again.counter[0] = 1234;
  REQUIRE(apply(s, again) == LOOM_OK);
  CHECK(again.tokens[0] == first);
  CHECK(again.logprobs[0] == Approx(std::log(p[first])).epsilon(1e-5));

  const int n = 20000;
  std::vector<float> many;
  for (int i = 0; i < n; ++i) many.insert(many.end(), logits.begin(), logits.end());
  Batch b(n, 4, many);
  for (int i = 0; i < n; ++i) {
    b.key[i] = 42;
    b.counter[i] = static_cast<uint64_t>(i);
  }
  REQUIRE(apply(s, b) == LOOM_OK);
  std::map<int32_t, int> freq;
  for (int32_t t : b.tokens) ++freq[t];
  CHECK(freq[2] == 0);
  for (int t : {0, 1, 3}) CHECK(static_cast<double>(freq[t]) / n == Approx(p[t]).margin(0.015));

  Batch dead(1, 2, {-INFINITY, -INFINITY});
  CHECK(apply(s, dead) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(s.last_error(), Catch::Contains("-inf"));
}

namespace {

// `n` rows of `logits` through the links of `rt`'s chain in order, row i drawn with counter i.
// Returns the batch (tokens, log-probabilities, rewritten rows).
Batch run_chain(loom::Runtime &rt, const std::vector<float> &logits, int n) {
  std::vector<float> many;
  for (int i = 0; i < n; ++i) many.insert(many.end(), logits.begin(), logits.end());
  Batch b(n, static_cast<int64_t>(logits.size()), many);
  for (int i = 0; i < n; ++i) {
    b.key[i] = 42;
    b.counter[i] = static_cast<uint64_t>(i);
    b.seq_ids[i] = 1000 + i;
  }
  for (auto &link : rt.pipeline().list(LOOM_KIND_SAMPLER)) {
    const loom_status s = apply(*link, b);
    INFO(link->desc().name << ": " << link->last_error());
    REQUIRE(s == LOOM_OK);
  }
  return b;
}

} // namespace

TEST_CASE("+inf logits take all the probability: dist and chains draw only them, evenly", "[samplers][inf]") {
  // A +inf logit (a temperature near 0, a huge logit bias) made exp(x - max) NaN and the draw
  // fell through to the last finite token. Softmax's limit: uniform over the +inf entries.
  const std::vector<float> one_inf{0.0f, INFINITY, 1.0f, 2.0f};
  const std::vector<float> two_inf{0.0f, INFINITY, 1.0f, INFINITY, -INFINITY};
  const std::string dist = "[[sampler]]\nuse = \"dist\"\n";
  const std::vector<std::string> chains = {
      dist,
      "[[sampler]]\nuse = \"temperature\"\nt = 0.7\n[[sampler]]\nuse = \"top-p\"\np = 0.9\n" + dist,
      "[[sampler]]\nuse = \"top-k\"\nk = 3\n[[sampler]]\nuse = \"min-p\"\np = 0.05\n"
      "[[sampler]]\nuse = \"typical-p\"\np = 0.95\n" + dist,
      "[[sampler]]\nuse = \"mirostat-v2\"\ntau = 5.0\n", // mu = 10 bits keeps both +inf entries
  };
  const int n = 4000;
  for (const std::string &toml : chains) {
    INFO(toml);
    auto rt = bt::runtime(toml);
    Batch one = run_chain(*rt, one_inf, n);
    for (int i = 0; i < n; ++i) {
      REQUIRE(one.tokens[i] == 1);
      REQUIRE(one.logprobs[i] == 0.0f);
    }
    Batch two = run_chain(*rt, two_inf, n);
    std::map<int32_t, int> freq;
    for (int i = 0; i < n; ++i) {
      ++freq[two.tokens[i]];
      REQUIRE(two.logprobs[i] == Approx(std::log(0.5)).epsilon(1e-6));
    }
    CHECK(freq.size() == 2);
    CHECK(static_cast<double>(freq[1]) / n == Approx(0.5).margin(0.03));
    CHECK(static_cast<double>(freq[3]) / n == Approx(0.5).margin(0.03));
  }
  // The +inf made by the multiply itself: 1/t = 1e38, so 5 * 1e38 and 4 * 1e38 overflow.
  auto cold = bt::runtime("[[sampler]]\nuse = \"temperature\"\nt = 1e-38\n" + dist);
  Batch one = run_chain(*cold, {0.0f, 5.0f, 1.0f, 2.0f}, n);
  CHECK(one.logits.v[1] == INFINITY);
  for (int i = 0; i < n; ++i) REQUIRE(one.tokens[i] == 1);
  Batch two = run_chain(*cold, {0.0f, 5.0f, 1.0f, 4.0f}, n);
  std::map<int32_t, int> freq;
  for (int32_t t : two.tokens) ++freq[t];
  CHECK(freq.size() == 2);
  CHECK(static_cast<double>(freq[1]) / n == Approx(0.5).margin(0.03));

  // NaN stays an error, +inf or not.
  auto rt = bt::runtime(dist);
  Batch nan(1, 3, {INFINITY, std::nanf(""), 1.0f});
  CHECK(apply(rt->pipeline().at("sampler[0]"), nan) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(rt->pipeline().at("sampler[0]").last_error(), Catch::Contains("NaN"));
}

TEST_CASE("filters, greedy and mirostat weigh +inf logits as softmax's limit", "[samplers][inf]") {
  const auto kept = [](const std::string &toml, const std::vector<float> &logits) {
    auto rt = bt::runtime(toml);
    Batch b(1, static_cast<int64_t>(logits.size()), logits);
    REQUIRE(apply(rt->pipeline().at("sampler[0]"), b) == LOOM_OK);
    std::vector<int> out;
    for (size_t i = 0; i < logits.size(); ++i)
      if (!masked(b.logits.v[i])) {
        CHECK(b.logits.v[i] == logits[i]);
        out.push_back(static_cast<int>(i));
      }
    return out;
  };
  const float inf = INFINITY;
  // top-p: each of the four +inf entries weighs 1/4, so p = 0.5 keeps the first two by id; past
  // them min_keep takes the finite ones by logit (as the CUDA path ranks), not by id.
  CHECK(kept("[[sampler]]\nuse = \"top-p\"\np = 0.5\n", {0, inf, 1, inf, inf, inf}) == std::vector<int>{1, 3});
  CHECK(kept("[[sampler]]\nuse = \"top-p\"\np = 0.5\nmin_keep = 4\n", {0, inf, 3, inf, 1}) ==
        std::vector<int>{1, 2, 3, 4});
  // typical-p: entropy log 2, every +inf entry exactly typical, the finite ones infinitely surprising.
  CHECK(kept("[[sampler]]\nuse = \"typical-p\"\np = 0.5\n", {0, inf, 1, inf}) == std::vector<int>{1});
  CHECK(kept("[[sampler]]\nuse = \"typical-p\"\np = 0.9\n", {0, inf, 1, inf}) == std::vector<int>{1, 3});
  CHECK(kept("[[sampler]]\nuse = \"min-p\"\np = 0.1\n", {0, inf, 1, inf}) == std::vector<int>{1, 3});

  auto g = bt::runtime("[[sampler]]\nuse = \"greedy\"\n");
  Batch b(2, 4, {0, inf, 1, inf, 0, inf, 1, 2});
  REQUIRE(apply(g->pipeline().at("sampler[0]"), b) == LOOM_OK);
  CHECK(b.tokens == std::vector<int32_t>{1, 1});
  CHECK(b.logprobs[0] == Approx(std::log(0.5)).epsilon(1e-6));
  CHECK(b.logprobs[1] == 0.0f);

  // mirostat: the second +inf entry's surprise is 1 bit; mu = 0.5 masks it (the first maximum
  // always survives), and the finite entries' infinite surprise masks them under any mu.
  auto m = bt::runtime("[[sampler]]\nuse = \"mirostat-v2\"\ntau = 0.25\n");
  Batch mb(1, 4, {0, inf, 1, inf});
  REQUIRE(apply(m->pipeline().at("sampler[0]"), mb) == LOOM_OK);
  CHECK(mb.tokens[0] == 1);
  CHECK(mb.logprobs[0] == 0.0f);
  CHECK(masked(mb.logits.v[0]));
  CHECK(masked(mb.logits.v[2]));
  CHECK(masked(mb.logits.v[3]));

  // temperature refuses a t whose 1/t overflows (0 * inf would be NaN); 1e-38 is still fine.
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"temperature\"\nt = 1e-40\n"), Catch::Contains("too small"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"temperature\"\nt = 1e-50\n"), Catch::Contains("greedy"));
  CHECK(bt::build_error("[[sampler]]\nuse = \"temperature\"\nt = 1e-38\n").empty());
}

TEST_CASE("a chain of top-k then greedy runs in manifest order", "[samplers]") {
  auto rt = bt::runtime("[[sampler]]\nuse = \"top-k\"\nk = 1\n\n[[sampler]]\nuse = \"greedy\"\n");
  Batch b(1, 3, {0.5f, 2.0f, 1.0f});
  REQUIRE(apply(rt->pipeline().at("sampler[0]"), b) == LOOM_OK);
  REQUIRE(apply(rt->pipeline().at("sampler[1]"), b) == LOOM_OK);
  CHECK(b.tokens[0] == 1);
  CHECK(b.logprobs[0] == Approx(0.0).margin(1e-6)); // the only token left
}

TEST_CASE("greedy selects on CUDA logits through the host kernels extension", "[samplers][cuda]") {
  auto rt = bt::runtime("[[sampler]]\nuse = \"greedy\"\n");
  auto &g = rt->pipeline().at("sampler[0]");
  const loom_host_api *host = g.host();
  const DLDevice cuda{kDLCUDA, 0};
  Batch b(2, 5, {0.5f, 2.0f, 2.0f, -1.0f, 0.0f, -3.0f, -2.0f, -INFINITY, -1.0f, -1.5f});
  const std::vector<float> host_logits = b.logits.v;
  const size_t bytes = host_logits.size() * sizeof(float);
  void *dev = nullptr;
  if (host->device_alloc(g.ctx(), cuda, bytes, 0, &dev) != LOOM_OK) {
    WARN("skipped: no CUDA device (" << g.last_error() << ")");
    return;
  }
  REQUIRE(host->memcpy(g.ctx(), dev, cuda, host_logits.data(), DLDevice{kDLCPU, 0}, bytes) == LOOM_OK);
  b.get();
  b.logits.t.data = dev;
  b.logits.t.device = cuda;
  const loom_status s = g.vtable<loom_sampler_vtable>()->apply(g.handle(), &b.b);
  INFO(g.last_error());
  CHECK(s == LOOM_OK);
  CHECK(b.tokens == std::vector<int32_t>{1, 3});
  const double lse0 = std::log(std::exp(0.5) + 2 * std::exp(2.0) + std::exp(-1.0) + std::exp(0.0));
  CHECK(b.logprobs[0] == Approx(2.0 - lse0).epsilon(1e-5));

  // Filters without a device path refuse CUDA logits rather than reading device memory.
  auto rt2 = bt::runtime("[[sampler]]\nuse = \"typical-p\"\np = 0.5\n");
  auto &k = rt2->pipeline().at("sampler[0]");
  CHECK(k.vtable<loom_sampler_vtable>()->apply(k.handle(), &b.b) == LOOM_ERR_UNSUPPORTED);
  host->device_free(g.ctx(), cuda, dev);
}

// ---- typical-p, penalties, logit-bias, no-repeat-ngram, mirostat-v2 ----

namespace {

bool on_cuda_unsupported(loom::Instance &s) {
  Batch b(1, 4, {1, 2, 3, 4});
  b.get();
  b.logits.t.device = DLDevice{kDLCUDA, 0}; // never dereferenced: refused before any read
  const bool refused = s.vtable<loom_sampler_vtable>()->apply(s.handle(), &b.b) == LOOM_ERR_UNSUPPORTED;
  return refused && s.last_error().find("CPU") != std::string::npos;
}

std::map<int64_t, double> mirostat_state(loom::Instance &s) {
  loom::HostBuffer buf;
  const char *format = nullptr;
  REQUIRE(s.vtable<loom_sampler_vtable>()->life.export_state(s.handle(), &format, buf.abi()) == LOOM_OK);
  REQUIRE(std::string(format) == "loom.sampler.mirostat-v2/1");
  const std::string_view v = buf.view();
  uint64_t n = 0;
  REQUIRE(v.size() >= sizeof n);
  std::memcpy(&n, v.data(), sizeof n);
  REQUIRE(v.size() == sizeof n + n * 16);
  std::map<int64_t, double> out;
  for (uint64_t i = 0; i < n; ++i) {
    int64_t seq = 0;
    double mu = 0;
    std::memcpy(&seq, v.data() + 8 + 16 * i, 8);
    std::memcpy(&mu, v.data() + 16 + 16 * i, 8);
    out[seq] = mu;
  }
  return out;
}

} // namespace

TEST_CASE("typical-p keeps the tokens closest to the entropy, not the most probable", "[samplers]") {
  // p = 0.5, 0.3, 0.15, 0.05: H = 1.1422 nats; |-ln p - H| = 0.449, 0.062, 0.755, 1.854, so the
  // typical order is 1, 0, 2, 3 (top-p's would be 0, 1, 2, 3).
  const std::vector<float> logits{std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  const auto kept = [&](const std::string &params) {
    auto rt = bt::runtime("[[sampler]]\nuse = \"typical-p\"\n" + params);
    Batch b(1, 4, logits);
    REQUIRE(apply(rt->pipeline().at("sampler[0]"), b) == LOOM_OK);
    std::vector<int> out;
    for (int i = 0; i < 4; ++i)
      if (!masked(b.logits.v[i])) {
        CHECK(b.logits.v[i] == logits[i]); // kept values are untouched
        out.push_back(i);
      }
    return out;
  };
  CHECK(kept("p = 0.25\n") == std::vector<int>{1});
  CHECK(kept("p = 0.5\n") == std::vector<int>{0, 1});
  CHECK(kept("p = 0.9\n") == std::vector<int>{0, 1, 2});
  CHECK(kept("p = 0.25\nmin_keep = 3\n") == std::vector<int>{0, 1, 2});
  CHECK(kept("p = 1.0\n") == std::vector<int>{0, 1, 2, 3});

  auto rt = bt::runtime("[[sampler]]\nuse = \"typical-p\"\np = 0.5\n");
  CHECK(on_cuda_unsupported(rt->pipeline().at("sampler[0]")));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"typical-p\"\np = 0.0\n"), Catch::Contains("p must be in (0, 1]"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"typical-p\"\np = 1.5\n"), Catch::Contains("p must be in (0, 1]"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"typical-p\"\nmin_keep = 0\n"), Catch::Contains("min_keep"));
}

TEST_CASE("penalties apply frequency, presence and repetition over the last_n window", "[samplers]") {
  const std::vector<float> logits{2.0f, -1.0f, 0.5f, 3.0f, 1.0f};
  const std::vector<int32_t> hist{0, 1, 1, 3, 3, 3, 4};
  const auto run = [&](const std::string &params) {
    auto rt = bt::runtime("[[sampler]]\nuse = \"penalties\"\n" + params);
    auto &s = rt->pipeline().at("sampler[0]");
    CHECK((s.vtable<loom_sampler_vtable>()->flags & LOOM_SAMPLER_USES_HISTORY) != 0);
    Batch b(1, 5, logits);
    b.hist[0] = hist;
    REQUIRE(apply(s, b) == LOOM_OK);
    return b.logits.v;
  };
  // window {1, 1, 3, 3, 3, 4}: logit -= 0.5 * count + 0.25 * present
  CHECK(run("frequency_penalty = 0.5\npresence_penalty = 0.25\nlast_n = 6\n") ==
        std::vector<float>{2.0f, -2.25f, 0.5f, 1.25f, 0.25f});
  // repetition first (divide positive, multiply negative by 2), then frequency / presence
  CHECK(run("frequency_penalty = 0.5\npresence_penalty = 0.25\nrepetition_penalty = 2.0\nlast_n = 6\n") ==
        std::vector<float>{2.0f, -3.25f, 0.5f, -0.25f, -0.25f});
  // last_n = 0: the whole history, so token 0 is penalised too
  CHECK(run("frequency_penalty = 0.5\npresence_penalty = 0.25\n") ==
        std::vector<float>{1.25f, -2.25f, 0.5f, 1.25f, 0.25f});
  // negative penalties encourage repetition
  CHECK(run("presence_penalty = -1.0\nlast_n = 1\n") == std::vector<float>{2.0f, -1.0f, 0.5f, 3.0f, 2.0f});

  {
    auto rt = bt::runtime("[[sampler]]\nuse = \"penalties\"\npresence_penalty = 1.0\n");
    auto &s = rt->pipeline().at("sampler[0]");
    Batch bad(1, 4, {0, 0, 0, 0});
    bad.hist[0] = {9};
    CHECK(apply(s, bad) == LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(s.last_error(), Catch::Contains("vocabulary"));
    Batch masked_row(1, 2, {-INFINITY, 1.0f});
    masked_row.hist[0] = {0, 0};
    REQUIRE(apply(s, masked_row) == LOOM_OK);
    CHECK(masked(masked_row.logits.v[0]));
    CHECK(on_cuda_unsupported(s));
  }
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"penalties\"\nlast_n = -1\n"), Catch::Contains("last_n"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"penalties\"\nrepetition_penalty = 0.0\n"),
             Catch::Contains("repetition_penalty"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"penalties\"\nfrequency_penalty = nan\n"),
             Catch::Contains("frequency_penalty"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"penalties\"\npresence_penalty = inf\n"),
             Catch::Contains("presence_penalty"));
}

TEST_CASE("repetition-penalty still works after sharing the window helpers", "[samplers]") {
  auto rt = bt::runtime("[[sampler]]\nuse = \"repetition-penalty\"\npenalty = 2.0\nlast_n = -1\n");
  Batch b(2, 3, {2.0f, -1.0f, 1.0f, 2.0f, -1.0f, 1.0f});
  b.hist[0] = {0, 1};
  b.hist[1] = {};
  REQUIRE(apply(rt->pipeline().at("sampler[0]"), b) == LOOM_OK);
  CHECK(b.logits.v == std::vector<float>{1.0f, -2.0f, 1.0f, 2.0f, -1.0f, 1.0f});
}

TEST_CASE("logit-bias adds per-token biases and bans", "[samplers]") {
  auto rt = bt::runtime("[[sampler]]\nuse = \"logit-bias\"\n"
                        "bias = [{ token = 1, value = -2.5 }, { token = 3, value = 1 }, { token = 2, value = -inf }]\n"
                        "ban = [0]\n");
  auto &s = rt->pipeline().at("sampler[0]");
  Batch b(2, 5, {1, 2, 3, 4, 5, 0, 0, 0, 0, 0});
  REQUIRE(apply(s, b) == LOOM_OK);
  const std::vector<float> row0(b.logits.v.begin(), b.logits.v.begin() + 5);
  const std::vector<float> row1(b.logits.v.begin() + 5, b.logits.v.end());
  CHECK(masked(row0[0]));
  CHECK(row0[1] == -0.5f);
  CHECK(masked(row0[2]));
  CHECK(row0[3] == 5.0f);
  CHECK(row0[4] == 5.0f);
  CHECK(masked(row1[0]));
  CHECK(row1[1] == -2.5f);
  CHECK(row1[3] == 1.0f);

  Batch small(1, 3, {0, 0, 0}); // token 3 is outside a vocabulary of 3
  CHECK(apply(s, small) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(s.last_error(), Catch::Contains("token id 3") && Catch::Contains("vocabulary"));
  CHECK(on_cuda_unsupported(s));

  CHECK(bt::build_error("[[sampler]]\nuse = \"logit-bias\"\n").empty()); // empty tables: a no-op
  const std::string head = "[[sampler]]\nuse = \"logit-bias\"\n";
  CHECK_THAT(bt::build_error(head + "bias = [{ token = -1, value = 1.0 }]\n"), Catch::Contains("bias[0].token"));
  CHECK_THAT(bt::build_error(head + "bias = [{ token = 1, value = 1.0 }, { token = 2, value = nan }]\n"),
             Catch::Contains("bias[1].value"));
  CHECK_THAT(bt::build_error(head + "bias = [{ token = 1, value = inf }]\n"), Catch::Contains("bias[0].value"));
  CHECK_THAT(bt::build_error(head + "bias = [{ token = 1 }]\n"), Catch::Contains("bias[0].value is missing"));
  CHECK_THAT(bt::build_error(head + "bias = [{ value = 1.0 }]\n"), Catch::Contains("bias[0].token is missing"));
  CHECK_THAT(bt::build_error(head + "bias = [{ token = 1.5, value = 1.0 }]\n"), Catch::Contains("bias[0].token"));
  CHECK_THAT(bt::build_error(head + "bias = [13]\n"), Catch::Contains("bias[0] must be a table"));
  CHECK_THAT(bt::build_error(head + "bias = [{ token = 4, value = 1.0 }, { token = 4, value = 2.0 }]\n"),
             Catch::Contains("more than once"));
  CHECK_THAT(bt::build_error(head + "ban = [\"x\"]\n"), Catch::Contains("ban[0]"));
  CHECK_THAT(bt::build_error(head + "ban = [3, -2]\n"), Catch::Contains("ban[1]"));
  CHECK_THAT(bt::build_error(head + "bias = 3\n"), Catch::Contains("bias"));
}

TEST_CASE("no-repeat-ngram bans tokens completing an n-gram of the history", "[samplers]") {
  const auto banned = [](int n, std::vector<int32_t> hist) {
    auto rt = bt::runtime("[[sampler]]\nuse = \"no-repeat-ngram\"\nn = " + std::to_string(n) + "\n");
    Batch b(1, 6, std::vector<float>(6, 0.5f));
    b.hist[0] = std::move(hist);
    REQUIRE(apply(rt->pipeline().at("sampler[0]"), b) == LOOM_OK);
    std::vector<int> out;
    for (int i = 0; i < 6; ++i) {
      if (masked(b.logits.v[i])) out.push_back(i);
      else CHECK(b.logits.v[i] == 0.5f);
    }
    return out;
  };
  CHECK(banned(2, {1, 2, 3, 1, 2, 1}) == std::vector<int>{2});        // prefix (1): bigrams (1,2) twice
  CHECK(banned(2, {1, 2, 1, 4, 3, 1}) == std::vector<int>{2, 4});     // prefix (1): (1,2), (1,4)
  CHECK(banned(3, {1, 2, 3, 1, 2}) == std::vector<int>{3});           // prefix (1,2): (1,2,3)
  CHECK(banned(3, {1, 2, 3, 2, 1}).empty());                          // prefix (2,1) never seen
  CHECK(banned(3, {1, 2}).empty());                                   // no complete trigram yet
  CHECK(banned(1, {4, 0, 4}) == std::vector<int>{0, 4});              // unigrams: every seen token
  CHECK(banned(4, {5, 5, 5, 5}) == std::vector<int>{5});
  CHECK(banned(2, {}).empty());

  auto rt = bt::runtime("[[sampler]]\nuse = \"no-repeat-ngram\"\nn = 2\n");
  auto &s = rt->pipeline().at("sampler[0]");
  CHECK((s.vtable<loom_sampler_vtable>()->flags & LOOM_SAMPLER_USES_HISTORY) != 0);
  Batch two(2, 4, std::vector<float>(8, 0.0f)); // rows keep their own histories
  two.hist[0] = {0, 1, 0};
  two.hist[1] = {2, 3, 2};
  REQUIRE(apply(s, two) == LOOM_OK);
  for (int i = 0; i < 8; ++i) CHECK(masked(two.logits.v[i]) == (i == 1 || i == 4 + 3));
  Batch bad(1, 4, {0, 0, 0, 0});
  bad.hist[0] = {1, 7};
  CHECK(apply(s, bad) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(s.last_error(), Catch::Contains("vocabulary"));
  CHECK(on_cuda_unsupported(s));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"no-repeat-ngram\"\nn = 0\n"), Catch::Contains("n must be >= 1"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"no-repeat-ngram\"\nn = -2\n"), Catch::Contains("n must be >= 1"));
}

TEST_CASE("mirostat-v2 truncates by surprise, draws like dist and adapts mu per sequence", "[samplers]") {
  // p = 1/2, 1/4, 1/8, 1/8: surprises 1, 2, 3, 3 bits. tau = 1.25 -> mu starts at 2.5, which
  // masks tokens 2 and 3; the survivors renormalise to 2/3 and 1/3.
  const std::vector<float> logits{std::log(0.5f), std::log(0.25f), std::log(0.125f), std::log(0.125f)};
  const double tau = 1.25, eta = 2.0;
  auto rt = bt::runtime("[[sampler]]\nuse = \"mirostat-v2\"\ntau = 1.25\neta = 2.0\n");
  auto &s = rt->pipeline().at("sampler[0]");
  const auto *vt = s.vtable<loom_sampler_vtable>();
  CHECK((vt->flags & LOOM_SAMPLER_SELECTS) != 0);
  CHECK((vt->flags & LOOM_SAMPLER_USES_RNG) != 0);
  CHECK((vt->flags & LOOM_SAMPLER_RUNS_ON_CUDA) == 0);
  auto drt = bt::runtime("[[sampler]]\nuse = \"dist\"\n");
  auto &dist = drt->pipeline().at("sampler[0]");

  // Draws match `dist` on the truncated row, counter by counter; both survivors occur.
  uint64_t counter_of[2] = {~0ull, ~0ull};
  for (uint64_t c = 0; c < 64; ++c) {
    Batch m(1, 4, logits);
    m.seq_ids[0] = 100 + static_cast<int64_t>(c); // fresh sequences: mu = 2 tau for each
    m.counter[0] = c;
    REQUIRE(apply(s, m) == LOOM_OK);
    CHECK(masked(m.logits.v[2]));
    CHECK(masked(m.logits.v[3]));
    Batch d(1, 4, {logits[0], logits[1], -INFINITY, -INFINITY});
    d.counter[0] = c;
    REQUIRE(apply(dist, d) == LOOM_OK);
    CHECK(m.tokens[0] == d.tokens[0]);
    CHECK(m.logprobs[0] == Approx(std::log(m.tokens[0] == 0 ? 2.0 / 3 : 1.0 / 3)).epsilon(1e-5));
    if (counter_of[m.tokens[0]] == ~0ull) counter_of[m.tokens[0]] = c;
  }
  REQUIRE(counter_of[0] != ~0ull);
  REQUIRE(counter_of[1] != ~0ull);
  vt->release(s.handle(), -1);
  CHECK(mirostat_state(s).empty());

  // Rows of sequences 5 and 9 in one batch: 5 draws token 1, 9 draws token 0.
  Batch b(2, 4, {logits[0], logits[1], logits[2], logits[3], logits[0], logits[1], logits[2], logits[3]});
  b.seq_ids = {5, 9};
  b.counter = {counter_of[1], counter_of[0]};
  REQUIRE(apply(s, b) == LOOM_OK);
  REQUIRE(b.tokens == std::vector<int32_t>{1, 0});
  // Reproducible for the same (key, counter).
  Batch again(2, 4, std::vector<float>(b.logits.v.size()));
  std::copy(logits.begin(), logits.end(), again.logits.v.begin());
  std::copy(logits.begin(), logits.end(), again.logits.v.begin() + 4);
  again.seq_ids = {5, 9};
  again.counter = b.counter;
  REQUIRE(apply(s, again) == LOOM_OK);
  CHECK(again.tokens == b.tokens);

  // Nothing changes before accept(); accept updates only the accepted sequence.
  CHECK(mirostat_state(s).empty());
  REQUIRE(vt->accept(s.handle(), 5, 1) == LOOM_OK);
  const double mu5 = 2.5 - eta * (std::log2(3.0) - tau); // 2.5 - 2 * 0.33496 = 1.83007
  auto st = mirostat_state(s);
  REQUIRE(st.size() == 1);
  CHECK(st[5] == Approx(mu5).epsilon(1e-5));
  REQUIRE(vt->accept(s.handle(), 9, 0) == LOOM_OK);
  const double mu9 = 2.5 - eta * (std::log2(1.5) - tau); // 3.83007
  st = mirostat_state(s);
  CHECK(st[5] == Approx(mu5).epsilon(1e-5));
  CHECK(st[9] == Approx(mu9).epsilon(1e-5));
  // Accepting a token the link did not select (or with nothing pending) leaves mu alone.
  REQUIRE(vt->accept(s.handle(), 9, 3) == LOOM_OK);
  CHECK(mirostat_state(s)[9] == Approx(mu9).epsilon(1e-5));

  // The new mu drives the next truncation: seq 5 (mu 1.83 < 2 bits) keeps only token 0, seq 9
  // (mu 3.83 >= 3 bits) keeps all four.
  Batch next(2, 4, std::vector<float>(8));
  std::copy(logits.begin(), logits.end(), next.logits.v.begin());
  std::copy(logits.begin(), logits.end(), next.logits.v.begin() + 4);
  next.seq_ids = {5, 9};
  REQUIRE(apply(s, next) == LOOM_OK);
  CHECK(next.tokens[0] == 0);
  CHECK(next.logprobs[0] == Approx(0.0).margin(1e-6));
  for (int i = 1; i < 4; ++i) CHECK(masked(next.logits.v[i]));
  for (int i = 4; i < 8; ++i) CHECK(!masked(next.logits.v[i]));

  // fork copies, release forgets, import restores the exported state in a new instance.
  REQUIRE(vt->fork(s.handle(), 5, 11) == LOOM_OK);
  st = mirostat_state(s);
  CHECK(st[11] == st[5]);
  vt->release(s.handle(), 5);
  st = mirostat_state(s);
  CHECK(st.count(5) == 0);
  CHECK(st.count(11) == 1);
  CHECK(st.count(9) == 1);
  {
    auto rt2 = bt::runtime("[[sampler]]\nuse = \"mirostat-v2\"\ntau = 1.25\neta = 2.0\n");
    auto &s2 = rt2->pipeline().at("sampler[0]");
    loom::HostBuffer buf;
    const char *format = nullptr;
    REQUIRE(vt->life.export_state(s.handle(), &format, buf.abi()) == LOOM_OK);
    const auto *vt2 = s2.vtable<loom_sampler_vtable>();
    REQUIRE(vt2->life.import_state(s2.handle(), format, buf.view().data(), buf.view().size()) == LOOM_OK);
    CHECK(mirostat_state(s2) == st);
    CHECK(vt2->life.import_state(s2.handle(), "loom.sampler.other/1", buf.view().data(), buf.view().size()) ==
          LOOM_ERR_UNSUPPORTED);
    CHECK(vt2->life.import_state(s2.handle(), format, buf.view().data(), buf.view().size() - 1) ==
          LOOM_ERR_INVALID_ARGUMENT);
  }
  vt->release(s.handle(), -1);
  CHECK(mirostat_state(s).empty());
  CHECK(on_cuda_unsupported(s));

  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"mirostat-v2\"\ntau = -1.0\n"), Catch::Contains("tau"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"mirostat-v2\"\neta = 0.0\n"), Catch::Contains("eta"));
}

TEST_CASE("a bad sampler setting is reported at its key: file:line:col: slot.key", "[samplers][config]") {
  // The runtime's source name is "<test>", and bt::runtime puts three lines of [loom] first.
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"greedy\"\n[[sampler]]\nuse = \"top-p\"\np = 1.5\n"),
             Catch::StartsWith("<test>:8:5: sampler[1].p (top-p from") && Catch::Contains("p must be in (0, 1]"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"top-k\"\nk = -3\n"),
             Catch::StartsWith("<test>:6:5: sampler[0].k (top-k from") && Catch::Contains("k must be >= 0"));
  // A message about no single key stays at the table.
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"json-schema\"\n"),
             Catch::StartsWith("<test>:4:1: sampler[0] (json-schema from"));
}
