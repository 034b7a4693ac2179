// libloom-samplers through the runtime: every component on hand-computed cases.
#include <catch2/catch.hpp>

#include <cmath>
#include <map>

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
  auto rt2 = bt::runtime("[[sampler]]\nuse = \"top-k\"\nk = 2\n");
  auto &k = rt2->pipeline().at("sampler[0]");
  CHECK(k.vtable<loom_sampler_vtable>()->apply(k.handle(), &b.b) == LOOM_ERR_UNSUPPORTED);
  host->device_free(g.ctx(), cuda, dev);
}
