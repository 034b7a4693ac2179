// Log-probabilities of served requests (ServeRequest::logprobs, core/token_logprobs.cpp): the
// first generated token's against transformers' logits for the default model
// (tests/fixtures/models/tiny-kjv-golden.json, made by make_default_model_golden.py), the raw
// distribution whatever the request's sampler chain, streamed as they come, the same with
// speculative drafts, and the edge cases of the computation itself.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom/core/error.hpp"
#include "loom/core/request_queue.hpp"
#include "loom/core/runtime.hpp"
#include "token_logprobs.hpp"

namespace fs = std::filesystem;

namespace {

const fs::path kKjv = fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv";
const fs::path kGolden = fs::path(LOOM_SOURCE_DIR) / "tests/fixtures/models/tiny-kjv-golden.json";

std::string manifest(const std::string &extra = "") {
  return "[loom]\ndevice = \"cpu\"\nthreads = 2\nseed = 3\n[model]\npath = \"" + kKjv.string() +
         "\"\n[attention]\nuse = \"sdpa\"\nblock_size = 4\n[[sampler]]\nuse = \"greedy\"\n[run]\nprompt = [1]\n"
         "stop_tokens = []\n[scheduler]\nmax_seqs = 4\n" + extra;
}

struct Served {
  loom::SequenceResult result;
  std::vector<loom::TokenLogprob> streamed;
  std::string error;
};

// Serves `requests` (their on_done / on_logprob are set here) and returns what each got.
std::vector<Served> serve(loom::Runtime &rt, std::vector<loom::ServeRequest> requests, loom::SchedulerStats *stats = nullptr,
                          int64_t max_positions = 128) {
  std::vector<Served> out(requests.size());
  loom::RequestQueue queue;
  for (size_t i = 0; i < requests.size(); ++i) {
    loom::ServeRequest &r = requests[i];
    r.on_logprob = [&out, i](int64_t index, const loom::TokenLogprob &lp) {
      if (index == static_cast<int64_t>(out[i].streamed.size())) out[i].streamed.push_back(lp);
    };
    r.on_done = [&out, i](const loom::SequenceResult &result, const std::string &error) {
      out[i].result = result;
      out[i].error = error;
    };
    queue.submit(std::move(r));
  }
  queue.close();
  const loom::SchedulerStats s = rt.serve(queue, max_positions);
  if (stats) *stats = s;
  return out;
}

std::vector<double> log_softmax(const std::vector<double> &x) {
  const double m = *std::max_element(x.begin(), x.end());
  double s = 0;
  for (double v : x) s += std::exp(v - m);
  std::vector<double> out;
  for (double v : x) out.push_back(v - m - std::log(s));
  return out;
}

void check_consistent(const Served &s, int32_t top) {
  REQUIRE(s.result.logprobs.size() == s.result.tokens.size());
  for (size_t i = 0; i < s.result.tokens.size(); ++i) {
    INFO("token " << i);
    const loom::TokenLogprob &lp = s.result.logprobs[i];
    CHECK(lp.token == s.result.tokens[i]);
    CHECK(lp.logprob <= 0.0f);
    REQUIRE(lp.top.size() == static_cast<size_t>(top));
    for (size_t k = 1; k < lp.top.size(); ++k) CHECK(lp.top[k - 1].second >= lp.top[k].second);
    // The token is one of the alternatives exactly when it is at least as likely as the last.
    const auto it = std::find_if(lp.top.begin(), lp.top.end(), [&](const auto &t) { return t.first == lp.token; });
    if (it != lp.top.end()) CHECK(it->second == lp.logprob);
    else if (!lp.top.empty()) CHECK(lp.logprob <= lp.top.back().second);
  }
}

nlohmann::json golden_cases() {
  std::ifstream in(kGolden);
  REQUIRE(in);
  return nlohmann::json::parse(in)["cases"];
}

// `n` requests for `prompt`, each up to max_new tokens.
std::vector<loom::ServeRequest> requests_for(const std::vector<int32_t> &prompt, size_t n, int64_t max_new) {
  std::vector<loom::ServeRequest> requests(n);
  for (auto &r : requests) {
    r.prompt = prompt;
    r.max_new_tokens = max_new;
  }
  return requests;
}

// `top` lists the most likely tokens of the log-distribution `ref`, with its values.
void check_top(const std::vector<std::pair<int32_t, float>> &top, const std::vector<double> &ref) {
  std::vector<int32_t> order(ref.size());
  for (size_t k = 0; k < order.size(); ++k) order[k] = static_cast<int32_t>(k);
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(top.size()), order.end(),
                    [&](int32_t a, int32_t b) { return ref[static_cast<size_t>(a)] > ref[static_cast<size_t>(b)]; });
  for (size_t k = 0; k < top.size(); ++k) {
    INFO("alternative " << k);
    CHECK(top[k].first == order[k]);
    CHECK(top[k].second == Approx(ref[static_cast<size_t>(order[k])]).margin(2e-4));
  }
}

} // namespace

TEST_CASE("token_logprob: log-softmax, the top alternatives by logit then id, +inf and NaN rows", "[logprobs]") {
  const std::vector<float> row = {1.0f, 3.0f, 3.0f, -2.0f, 0.5f};
  const loom::TokenLogprob lp = loom::token_logprob(row, 4, 3);
  const std::vector<double> ref = log_softmax({1.0, 3.0, 3.0, -2.0, 0.5});
  CHECK(lp.token == 4);
  CHECK(lp.logprob == Approx(ref[4]).margin(1e-6));
  CHECK(lp.rank == 4); // after 1, 2 (tied: the smaller id first) and 0
  CHECK(loom::token_logprob(row, 2, 0).rank == 2);
  CHECK(loom::token_logprob(row, 1, 0).rank == 1);
  CHECK(loom::token_logprob(row, 3, 0).rank == 5);
  CHECK(loom::token_logprob(row, 9, 0).rank == 0); // outside the vocabulary: unknown
  REQUIRE(lp.top.size() == 3);
  CHECK(lp.top[0].first == 1); // tie between 1 and 2: the smaller id first
  CHECK(lp.top[1].first == 2);
  CHECK(lp.top[2].first == 0);
  CHECK(lp.top[2].second == Approx(ref[0]).margin(1e-6));
  CHECK(loom::token_logprob(row, 0, 50).top.size() == 5);  // at most the vocabulary
  CHECK(loom::token_logprob(row, 0, 0).top.empty());
  const float inf = std::numeric_limits<float>::infinity();
  const loom::TokenLogprob with_inf = loom::token_logprob(std::vector<float>{inf, 0.0f, inf}, 2, 3);
  CHECK(with_inf.logprob == Approx(std::log(0.5)));
  CHECK(with_inf.top[0].first == 0);
  CHECK(with_inf.top[2].second == -inf);
  const loom::TokenLogprob with_nan = loom::token_logprob(std::vector<float>{0.0f, std::nanf(""), 1.0f}, 2, 3);
  CHECK(std::isnan(with_nan.logprob));
  CHECK(with_nan.top[0].first == 2); // numbers first, NaN last
  CHECK(with_nan.top[2].first == 1);
  CHECK(std::isnan(loom::token_logprob(row, 7, 0).logprob)); // outside the vocabulary
}

TEST_CASE("served log-probabilities are transformers' at the first token and the raw distribution's whatever the chain",
          "[logprobs][scheduler][model]") {
  auto rt = loom::Runtime::from_string(manifest());
  for (const auto &c : golden_cases()) {
    const std::vector<int32_t> prompt = c["input_ids"].get<std::vector<int32_t>>();
    const std::vector<int32_t> greedy = c["greedy"].get<std::vector<int32_t>>();
    const std::vector<double> ref = log_softmax(c["logits"].back().get<std::vector<double>>());
    INFO(c["prompt"].get<std::string>());
    std::vector<loom::ServeRequest> requests = requests_for(prompt, 4, 12);
    requests[0].logprobs = 5;
    // A chain of its own that rewrites the logits (temperature 0.25): the log-probabilities stay
    // the model's.
    requests[1].logprobs = 5;
    requests[1].samplers = rt->make_samplers({"use = \"temperature\"\nt = 0.25", "use = \"greedy\""}, "test");
    requests[2].logprobs = 0;
    requests[3].logprobs = -1;
    const std::vector<Served> got = serve(*rt, std::move(requests));
    for (const Served &s : got) {
      CHECK(s.error.empty());
      CHECK(s.result.tokens == std::vector<int32_t>(greedy.begin(), greedy.begin() + 12));
    }
    for (int i : {0, 1, 2}) {
      INFO("request " << i);
      check_consistent(got[static_cast<size_t>(i)], i == 2 ? 0 : 5);
      CHECK(got[static_cast<size_t>(i)].streamed.size() == got[static_cast<size_t>(i)].result.logprobs.size());
      for (size_t k = 0; k < got[static_cast<size_t>(i)].streamed.size(); ++k) {
        CHECK(got[static_cast<size_t>(i)].streamed[k].logprob == got[static_cast<size_t>(i)].result.logprobs[k].logprob);
        CHECK(got[static_cast<size_t>(i)].streamed[k].top == got[static_cast<size_t>(i)].result.logprobs[k].top);
      }
      const loom::TokenLogprob &first = got[static_cast<size_t>(i)].result.logprobs.at(0);
      CHECK(first.logprob == Approx(ref[static_cast<size_t>(greedy[0])]).margin(2e-4));
      // The top alternatives are transformers' most likely tokens, with its log-probabilities.
      check_top(first.top, ref);
    }
    // Greedy: each token is the most likely one.
    for (const loom::TokenLogprob &lp : got[0].result.logprobs) CHECK(lp.top.at(0).first == lp.token);
    CHECK(got[1].result.logprobs.size() == 12);
    for (size_t k = 0; k < 12; ++k) CHECK(got[1].result.logprobs[k].logprob == Approx(got[0].result.logprobs[k].logprob).margin(1e-6));
    CHECK(got[3].result.logprobs.empty());
    CHECK(got[3].streamed.empty());
  }
}

TEST_CASE("log-probabilities with speculative drafts are those without, and out-of-range counts are refused",
          "[logprobs][scheduler][model]") {
  // A prompt that repeats itself, so that the ngram drafter proposes and drafts are kept.
  std::vector<int32_t> prompt = {1};
  for (int r = 0; r < 4; ++r) prompt.insert(prompt.end(), {300, 391, 394, 324, 336});
  std::vector<std::vector<loom::TokenLogprob>> results;
  for (const std::string extra : {"", "speculative_tokens = 4\n[drafter]\nuse = \"ngram\"\n"}) {
    INFO(extra);
    auto rt = loom::Runtime::from_string(manifest(extra));
    std::vector<loom::ServeRequest> requests(3);
    for (auto &r : requests) {
      r.prompt = prompt;
      r.max_new_tokens = 16;
      r.logprobs = 3;
    }
    requests[1].logprobs = loom::kMaxTopLogprobs + 1;
    requests[2].logprobs = -2;
    loom::SchedulerStats stats;
    const std::vector<Served> got = serve(*rt, std::move(requests), &stats);
    if (!extra.empty()) CHECK(stats.accepted_tokens > 0); // drafts were kept, so their rows gave tokens
    CHECK(got[0].error.empty());
    check_consistent(got[0], 3);
    CHECK(got[0].streamed.size() == 16);
    CHECK(got[1].error.find("logprobs 21") != std::string::npos);
    CHECK(got[2].error.find("logprobs -2") != std::string::npos);
    CHECK(got[1].result.tokens.empty());
    results.push_back(got[0].result.logprobs);
  }
  REQUIRE(results[0].size() == results[1].size());
  for (size_t k = 0; k < results[0].size(); ++k) {
    INFO("token " << k);
    CHECK(results[1][k].token == results[0][k].token);
    CHECK(results[1][k].logprob == Approx(results[0][k].logprob).margin(1e-4));
    for (size_t a = 0; a < results[0][k].top.size(); ++a) CHECK(results[1][k].top[a].first == results[0][k].top[a].first);
  }
}

TEST_CASE("prompt log-probabilities are transformers' at every prompt position", "[logprobs][scheduler][model]") {
  auto rt = loom::Runtime::from_string(manifest());
  for (const auto &c : golden_cases()) {
    const std::vector<int32_t> prompt = c["input_ids"].get<std::vector<int32_t>>();
    INFO(c["prompt"].get<std::string>());
    std::vector<loom::ServeRequest> requests = requests_for(prompt, 3, 3);
    requests[0].prompt_logprobs = 5;
    requests[1].prompt_logprobs = 0;
    requests[1].logprobs = 2; // both kinds at once
    const std::vector<Served> got = serve(*rt, std::move(requests));
    for (const Served &s : got) CHECK(s.error.empty());
    CHECK(got[0].result.tokens == got[2].result.tokens); // the rows of its own change no token
    CHECK(got[2].result.prompt_logprobs.empty());
    for (int i : {0, 1}) {
      const auto &entries = got[static_cast<size_t>(i)].result.prompt_logprobs;
      REQUIRE(entries.size() == prompt.size() - 1);
      for (size_t p = 0; p + 1 < prompt.size(); ++p) {
        INFO("request " << i << ", prompt position " << p);
        const std::vector<double> ref = log_softmax(c["logits"][p].get<std::vector<double>>());
        const loom::TokenLogprob &e = entries[p];
        CHECK(e.token == prompt[p + 1]);
        CHECK(e.logprob == Approx(ref[static_cast<size_t>(prompt[p + 1])]).margin(2e-4));
        REQUIRE(e.top.size() == (i == 0 ? 5u : 0u));
        check_top(e.top, ref);
      }
    }
    CHECK(got[1].result.logprobs.size() == 3);
  }
}

TEST_CASE("prompt log-probabilities of a long prompt span steps, bypass the prefix cache and match one-token requests",
          "[logprobs][scheduler][model]") {
  // 300 prompt tokens: three steps of kPromptLogprobRows rows; the same prompt served before
  // fills the prefix cache, which must not stand in for positions the request has to compute.
  std::vector<int32_t> prompt = {1};
  for (int i = 1; i < 300; ++i) prompt.push_back(static_cast<int32_t>(200 + (i * 37) % 1500));
  auto rt = loom::Runtime::from_string(manifest("max_batched_tokens = 512\n"));
  {
    std::vector<loom::ServeRequest> warm(1);
    warm[0].prompt = prompt;
    warm[0].max_new_tokens = 1;
    REQUIRE(serve(*rt, std::move(warm), nullptr, 512)[0].error.empty());
  }
  std::vector<loom::ServeRequest> requests(2);
  requests[0].prompt = prompt;
  requests[0].max_new_tokens = 2;
  requests[0].prompt_logprobs = loom::kMaxTopLogprobs;
  // on_prompt_logprobs: once, with every entry, before the first token (a host streams them
  // ahead of the reply).
  std::vector<std::vector<loom::TokenLogprob>> reported;
  size_t reported_before_first_token = SIZE_MAX;
  requests[0].on_prompt_logprobs = [&](const std::vector<loom::TokenLogprob> &e) { reported.push_back(e); };
  requests[0].on_token = [&](int64_t index, int32_t) {
    if (index == 0) reported_before_first_token = reported.size();
    return true;
  };
  requests[1].prompt = {1, 300, 391};
  requests[1].max_new_tokens = 2;
  requests[1].on_prompt_logprobs = [&](const std::vector<loom::TokenLogprob> &) { FAIL("a request without prompt_logprobs was reported"); };
  loom::SchedulerStats stats;
  const std::vector<Served> got = serve(*rt, std::move(requests), &stats, 512);
  REQUIRE(got[0].error.empty());
  const auto &entries = got[0].result.prompt_logprobs;
  REQUIRE(entries.size() == prompt.size() - 1);
  REQUIRE(reported.size() == 1);
  CHECK(reported_before_first_token == 1);
  REQUIRE(reported[0].size() == entries.size());
  for (size_t p = 0; p < entries.size(); ++p) {
    CHECK(reported[0][p].token == entries[p].token);
    CHECK(reported[0][p].logprob == entries[p].logprob);
  }
  for (size_t p = 0; p + 1 < prompt.size(); ++p) CHECK(entries[p].token == prompt[p + 1]);
  CHECK(stats.steps >= 3);
  // Position p's distribution is the first generated token's of the prompt's first p + 1
  // tokens (across the steps' boundaries at 128 and 256).
  for (const size_t p : {size_t{0}, size_t{1}, size_t{126}, size_t{127}, size_t{128}, size_t{255}, size_t{256}, size_t{298}}) {
    INFO("prompt position " << p);
    std::vector<loom::ServeRequest> one(1);
    one[0].prompt.assign(prompt.begin(), prompt.begin() + static_cast<std::ptrdiff_t>(p) + 1);
    one[0].max_new_tokens = 1;
    one[0].logprobs = loom::kMaxTopLogprobs;
    const Served s = serve(*rt, std::move(one), nullptr, 512)[0];
    REQUIRE(s.result.logprobs.size() == 1);
    const loom::TokenLogprob &want = s.result.logprobs[0];
    REQUIRE(entries[p].top.size() == want.top.size());
    for (size_t k = 0; k < want.top.size(); ++k) {
      CHECK(entries[p].top[k].first == want.top[k].first);
      CHECK(entries[p].top[k].second == Approx(want.top[k].second).margin(1e-4));
    }
  }
}

TEST_CASE("prompt log-probabilities: out-of-range counts are refused, a one-token prompt has none", "[logprobs][scheduler][model]") {
  auto rt = loom::Runtime::from_string(manifest());
  std::vector<loom::ServeRequest> requests(3);
  for (auto &r : requests) {
    r.prompt = {1, 300, 391};
    r.max_new_tokens = 2;
  }
  requests[0].prompt_logprobs = loom::kMaxTopLogprobs + 1;
  requests[1].prompt_logprobs = -2;
  requests[2].prompt = {1};
  requests[2].prompt_logprobs = 3;
  const std::vector<Served> got = serve(*rt, std::move(requests));
  CHECK(got[0].error.find("prompt_logprobs 21") != std::string::npos);
  CHECK(got[0].result.request_error);
  CHECK(got[1].error.find("prompt_logprobs -2") != std::string::npos);
  CHECK(got[2].error.empty());
  CHECK(got[2].result.prompt_logprobs.empty());
  CHECK(got[2].result.tokens.size() == 2);
}
