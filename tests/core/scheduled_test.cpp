// Runs served through [scheduler] (core/serving.cpp: continuous batching, chunked
// prefill, a paged KV pool with prefix caching, preemption by recomputation) against the same
// prompts run alone: every request must get exactly the tokens it gets alone, whatever joined or
// left the batch around it, however its prompt was chunked, whether its prefix came from the
// cache, and whether it was preempted and recomputed. On the CPU with the default model.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom/core/error.hpp"
#include "loom/core/request_queue.hpp"
#include "loom/core/runtime.hpp"

namespace fs = std::filesystem;

namespace {

const fs::path kKjv = fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv";

std::string ids_toml(const std::vector<int32_t> &ids) { return nlohmann::json(ids).dump(); }

std::string base_manifest(const std::string &chain = "[[sampler]]\nuse = \"greedy\"\n") {
  return "[loom]\ndevice = \"cpu\"\nthreads = 2\nseed = 11\n[model]\npath = \"" + kKjv.string() +
         "\"\n[attention]\nuse = \"sdpa\"\nblock_size = 4\n" + chain;
}

// `n` prompts of 1 to 40 tokens, some sharing long prefixes, some identical; and each one's steps.
struct Requests {
  std::vector<std::vector<int32_t>> prompts;
  std::vector<int64_t> steps;
  std::string run_table() const {
    // (Appends only: GCC 12 warns falsely about `"literal" + std::string` here.)
    std::string list = "[", counts = "[";
    for (size_t i = 0; i < prompts.size(); ++i) {
      if (i > 0) {
        list.append(", ");
        counts.append(", ");
      }
      list.append(ids_toml(prompts[i]));
      counts.append(std::to_string(steps[i]));
    }
    std::string out = "[run]\nstop_tokens = []\nprompts = ";
    out.append(list).append("]\nprompt_steps = ").append(counts).append("]\n");
    return out;
  }
};

Requests make_requests(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_int_distribution<int32_t> token(3, 1999), length(1, 40), steps(1, 24);
  Requests r;
  std::vector<int32_t> shared(32);
  for (auto &t : shared) t = token(g);
  for (size_t i = 0; i < n; ++i) {
    std::vector<int32_t> p;
    if (i % 4 == 1) p.assign(shared.begin(), shared.begin() + 8 + static_cast<long>(i % 24)); // a shared prefix
    if (i % 8 == 5 && i > 0) p = r.prompts[i - 4];                                              // identical prompts
    const int32_t extra = p.empty() ? length(g) : static_cast<int32_t>(i % 3);
    for (int32_t k = 0; k < extra; ++k) p.push_back(token(g));
    r.prompts.push_back(p);
    r.steps.push_back(steps(g));
  }
  return r;
}

// `n` requests of 20, 21, ... random tokens (ids 3-250: every fixture's vocabulary), 40 steps each.
Requests long_requests(int n, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_int_distribution<int32_t> token(3, 250);
  Requests reqs;
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> p(static_cast<size_t>(20 + i));
    for (auto &t : p) t = token(g);
    reqs.prompts.push_back(p);
    reqs.steps.push_back(40);
  }
  return reqs;
}

// The error a manifest's run ends with ("no error" when it runs).
std::string error_of(const std::string &toml) {
  try {
    loom::Runtime::from_string(toml, "m.toml")->run();
  } catch (const loom::Error &e) {
    return std::string(e.what());
  }
  return std::string("no error");
}

std::vector<std::vector<int32_t>> tokens_of(const loom::RunResult &r) {
  std::vector<std::vector<int32_t>> out;
  for (const auto &s : r.sequences) out.push_back(s.tokens);
  return out;
}

// Each request of `reqs` run alone (no scheduler), under `chain`.
std::vector<std::vector<int32_t>> alone(const Requests &reqs, const std::string &chain = "[[sampler]]\nuse = \"greedy\"\n") {
  std::vector<std::vector<int32_t>> out;
  for (size_t i = 0; i < reqs.prompts.size(); ++i)
    out.push_back(loom::Runtime::from_string(base_manifest(chain) + "[run]\nstop_tokens = []\nprompt = " +
                                             ids_toml(reqs.prompts[i]) + "\nsteps = " + std::to_string(reqs.steps[i]) + "\n")
                      ->run()
                      .tokens);
  return out;
}

} // namespace

TEST_CASE("64 different prompts served together get the greedy tokens each gets alone", "[scheduler][model]") {
  const Requests reqs = make_requests(64, 1);
  const auto expected = alone(reqs);
  struct Config {
    std::string table;
    bool preempts;
    bool hits; // a prefix is cached before a request with it is admitted (not all in one step)
    int max_seqs; // the table's
  };
  // Batch limits well below 64 (requests join as others leave), prefill chunks of a few tokens
  // mixed with decode, with and without prefix caching, and a pool so small that sequences are
  // preempted and recomputed; and every request in the first step (nothing cached yet).
  for (const Config &c : {Config{"max_seqs = 16\nmax_batched_tokens = 24\n", false, true, 16},
                          Config{"max_seqs = 64\nmax_batched_tokens = 2048\n", false, false, 64},
                          Config{"max_seqs = 8\nmax_batched_tokens = 64\nprefix_caching = false\n", false, false, 8},
                          Config{"max_seqs = 8\nmax_batched_tokens = 64\nchunked_prefill = false\n", false, true, 8},
                          Config{"max_seqs = 32\nmax_batched_tokens = 40\nkv_blocks = 40\n", true, true, 32}}) {
    INFO(c.table);
    std::vector<std::vector<int32_t>> streamed(reqs.prompts.size());
    auto rt = loom::Runtime::from_string(base_manifest() + "[scheduler]\n" + c.table + reqs.run_table());
    const loom::RunResult r = rt->run(0, nullptr, [&](int32_t seq, int32_t step, int32_t token) {
      CHECK(step == static_cast<int32_t>(streamed[static_cast<size_t>(seq)].size()));
      streamed[static_cast<size_t>(seq)].push_back(token);
      return true;
    });
    REQUIRE(r.scheduler.used);
    CHECK(tokens_of(r) == expected);
    CHECK(streamed == expected);
    CHECK((r.scheduler.preemptions > 0) == c.preempts);
    CHECK((r.scheduler.cached_tokens > 0) == c.hits); // the shared prefixes and identical prompts hit
    CHECK((r.scheduler.prefix_cache_hit_rate > 0.0) == c.hits);
    // The step log: a record per step, a sampled row per generated token, the batch limit held.
    REQUIRE(r.scheduler.step_log.size() == static_cast<size_t>(r.scheduler.steps));
    int64_t sampled = 0, generated = 0, fed = 0, prompt_tokens = 0;
    for (const loom::StepRecord &s : r.scheduler.step_log) {
      CHECK(s.sequences <= c.max_seqs);
      CHECK(s.seconds > 0.0);
      sampled += s.sampled;
      fed += s.tokens;
    }
    for (const auto &t : expected) generated += static_cast<int64_t>(t.size());
    for (const auto &p : reqs.prompts) prompt_tokens += static_cast<int64_t>(p.size());
    CHECK(sampled == generated);
    // Every prompt token and every generated token but the last is fed at least once (more when
    // a prefix cache miss or a preemption recomputes, fewer when the cache hits).
    if (!c.hits && !c.preempts) CHECK(fed == prompt_tokens + generated - static_cast<int64_t>(reqs.prompts.size()));
  }
}

TEST_CASE("a request preempted and resumed gets the tokens of one that was not", "[scheduler][model]") {
  // A pool of 24 blocks of 4 positions for requests that each grow to ~60 positions: at most one
  // or two fit at a time once they decode, so the scheduler preempts and recomputes; seeded
  // sampling (each row's random numbers are its own sequence's step) must give the same tokens.
  Requests reqs;
  std::mt19937 g(5);
  std::uniform_int_distribution<int32_t> token(3, 1999);
  for (int i = 0; i < 6; ++i) {
    std::vector<int32_t> p(static_cast<size_t>(20 + 3 * i));
    for (auto &t : p) t = token(g);
    reqs.prompts.push_back(p);
    reqs.steps.push_back(40);
  }
  const std::string chain = "[[sampler]]\nuse = \"temperature\"\nt = 0.9\n[[sampler]]\nuse = \"top-k\"\nk = 40\n"
                            "[[sampler]]\nuse = \"dist\"\n";
  const auto expected = alone(reqs, chain);
  auto roomy = loom::Runtime::from_string(base_manifest(chain) + "[scheduler]\n" + reqs.run_table())->run();
  CHECK(roomy.scheduler.preemptions == 0);
  CHECK(tokens_of(roomy) == expected);
  auto tight = loom::Runtime::from_string(base_manifest(chain) + "[scheduler]\nkv_blocks = 24\n" + reqs.run_table())->run();
  CHECK(tight.scheduler.preemptions > 0);
  CHECK(tokens_of(tight) == expected);
}

TEST_CASE("prefix caching reuses the KV blocks of a shared prefix", "[scheduler][model]") {
  // Eight requests with one 48-token system prefix: the first computes it, the others find its
  // twelve full blocks in the cache (one at a time, max_seqs = 1, so the first has finished).
  std::mt19937 g(9);
  std::uniform_int_distribution<int32_t> token(3, 1999);
  std::vector<int32_t> prefix(48);
  for (auto &t : prefix) t = token(g);
  Requests reqs;
  for (int i = 0; i < 8; ++i) {
    auto p = prefix;
    for (int k = 0; k <= i; ++k) p.push_back(token(g));
    reqs.prompts.push_back(p);
    reqs.steps.push_back(6);
  }
  const auto expected = alone(reqs);
  auto r = loom::Runtime::from_string(base_manifest() + "[scheduler]\nmax_seqs = 1\n" + reqs.run_table());
  const auto result = r->run();
  CHECK(tokens_of(result) == expected);
  CHECK(result.scheduler.cached_tokens == 7 * 48);
  CHECK(result.scheduler.prompt_tokens == 8 * 48 + 36);
  const auto metrics = r->metrics().snapshot();
  REQUIRE(metrics.count("scheduler.prefix_cache_hit_rate") == 1);
  CHECK(metrics.at("scheduler.prefix_cache_hit_rate").value == Approx(result.scheduler.prefix_cache_hit_rate));
}

TEST_CASE("under a sliding window a request holds only the blocks its window reads", "[scheduler][model][window]") {
  // tiny-mistral attends to its last 4 positions. Requests of 20-27 prompt tokens and 40 steps
  // span 15-17 blocks of 4, more than the pool's 10: they fit only because each drops the blocks
  // behind its window as it goes; each must get exactly the tokens it gets alone.
  const fs::path mistral = fs::path(LOOM_SOURCE_DIR) / "tests/fixtures/models/tiny-mistral";
  const std::string head = "[loom]\ndevice = \"cpu\"\nthreads = 2\n[model]\npath = \"" + mistral.string() +
                           "\"\n[attention]\nuse = \"sdpa\"\nblock_size = 4\n[[sampler]]\nuse = \"greedy\"\n";
  const Requests reqs = long_requests(8, 17);
  std::vector<std::vector<int32_t>> expected;
  for (size_t i = 0; i < reqs.prompts.size(); ++i)
    expected.push_back(loom::Runtime::from_string(head + "[run]\nstop_tokens = []\nprompt = " + ids_toml(reqs.prompts[i]) +
                                                  "\nsteps = 40\n")
                           ->run()
                           .tokens);
  for (const char *table : {"kv_blocks = 10\nmax_batched_tokens = 8\n", "kv_blocks = 10\nmax_batched_tokens = 8\nprefix_caching = false\n"}) {
    INFO(table);
    const auto r = loom::Runtime::from_string(head + "[scheduler]\n" + table + reqs.run_table())->run();
    CHECK(tokens_of(r) == expected);
  }
}

TEST_CASE("an attention plugin's own sliding_window frees blocks the same way", "[scheduler][model][window]") {
  // tiny-llama has no window; sdpa's sliding_window = 6 gives it one (reported to the host
  // through loom_kv_layout.window, ABI 1.4), so requests of 60 positions fit a pool of 40.
  const fs::path llama = fs::path(LOOM_SOURCE_DIR) / "tests/fixtures/models/tiny-llama";
  auto head = [&](int window) {
    return "[loom]\ndevice = \"cpu\"\nthreads = 2\n[model]\npath = \"" + llama.string() +
           "\"\n[attention]\nuse = \"sdpa\"\nblock_size = 4\nsliding_window = " + std::to_string(window) +
           "\n[[sampler]]\nuse = \"greedy\"\n";
  };
  const Requests reqs = long_requests(6, 23);
  std::vector<std::vector<int32_t>> windowed, full;
  for (size_t i = 0; i < reqs.prompts.size(); ++i)
    for (int window : {6, 0}) {
      auto tokens = loom::Runtime::from_string(head(window) + "[run]\nstop_tokens = []\nprompt = " + ids_toml(reqs.prompts[i]) +
                                               "\nsteps = 40\n")
                        ->run()
                        .tokens;
      (window > 0 ? windowed : full).push_back(tokens);
    }
  CHECK(windowed != full); // the window changes what the model sees
  const auto r = loom::Runtime::from_string(head(6) + "[scheduler]\nkv_blocks = 10\nmax_batched_tokens = 8\n" +
                                            reqs.run_table())
                     ->run();
  CHECK(tokens_of(r) == windowed);
}

TEST_CASE("requests that arrive while the runtime serves join the batch and get their tokens alone",
          "[scheduler][model][serve]") {
  // A producer thread submits 24 requests a few milliseconds apart while Runtime::serve runs on
  // this thread: each joins the running batch at a later step. The second half is submitted only
  // once the server has streamed a token, so those requests certainly arrive mid-run. Every
  // request must get its tokens alone; one whose callback says stop ends there; one too long for
  // the server is refused through on_done, and the others go on.
  const Requests reqs = make_requests(24, 7);
  const auto expected = alone(reqs);
  auto rt = loom::Runtime::from_string(base_manifest() + "[scheduler]\nmax_seqs = 6\nmax_batched_tokens = 32\n" +
                                       "[run]\nprompt = [1]\nstop_tokens = []\n");  // as alone() runs
  loom::RequestQueue queue;
  std::vector<std::vector<int32_t>> streamed(reqs.prompts.size()), done(reqs.prompts.size());
  std::vector<int> done_calls(reqs.prompts.size() + 1, 0);
  std::string refused;
  const size_t stopper = 5; // its callback stops it after 3 tokens
  std::vector<int64_t> ids;
  std::atomic<bool> streaming{false}; // a token has reached a callback
  bool waited = false;                // the producer saw it before the second half
  std::thread producer([&] {
    for (size_t i = 0; i < reqs.prompts.size(); ++i) {
      if (i == reqs.prompts.size() / 2) {
        for (int k = 0; k < 20000 && !streaming.load(); ++k) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        waited = streaming.load();
      }
      loom::ServeRequest r;
      r.prompt = reqs.prompts[i];
      r.max_new_tokens = reqs.steps[i];
      r.on_token = [&, i](int64_t index, int32_t token) {
        streaming = true;
        CHECK(index == static_cast<int64_t>(streamed[i].size()));
        streamed[i].push_back(token);
        return !(i == stopper && streamed[i].size() == 3);
      };
      r.on_done = [&, i](const loom::SequenceResult &out, const std::string &error) {
        CHECK(error.empty());
        CHECK(out.prompt == reqs.prompts[i]);
        done[i] = out.tokens;
        ++done_calls[i];
      };
      ids.push_back(queue.submit(std::move(r))); // (Catch's CHECK is for the main thread only)
      if (i == 10) { // too long for the server's 80 positions
        loom::ServeRequest big;
        big.prompt.assign(70, 5);
        big.max_new_tokens = 20;
        big.on_done = [&](const loom::SequenceResult &out, const std::string &error) {
          refused = error;
          CHECK(out.tokens.empty());
          ++done_calls.back();
        };
        queue.submit(std::move(big));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(3));
    }
    queue.close();
  });
  const loom::SchedulerStats stats = rt->serve(queue, 80);
  producer.join();
  CHECK(stats.used);
  CHECK(waited);
  // The step log shows it: after steps that sampled tokens, later steps still prefill newly
  // arrived prompts (a step feeds more tokens than it has sequences only when one prefills).
  const auto &log = stats.step_log;
  const auto first_sample = std::find_if(log.begin(), log.end(), [](const loom::StepRecord &r) { return r.sampled > 0; });
  REQUIRE(first_sample != log.end());
  CHECK(std::any_of(first_sample + 1, log.end(), [](const loom::StepRecord &r) { return r.tokens > r.sequences; }));
  for (const loom::StepRecord &r : log) CHECK(r.sequences <= 6); // max_seqs
  for (size_t i = 0; i < ids.size(); ++i) CHECK(ids[i] == static_cast<int64_t>(i <= 10 ? i : i + 1)); // in order
  CHECK(refused.find("positions in all at most") != std::string::npos);
  CHECK(done_calls == std::vector<int>(reqs.prompts.size() + 1, 1));
  for (size_t i = 0; i < reqs.prompts.size(); ++i) {
    INFO("request " << i);
    if (i == stopper) {
      CHECK(done[i] == std::vector<int32_t>(expected[i].begin(), expected[i].begin() + std::min<size_t>(3, expected[i].size())));
      continue;
    }
    CHECK(done[i] == expected[i]);
    CHECK(streamed[i] == expected[i]);
  }
  CHECK_THROWS_AS(queue.submit(loom::ServeRequest{}), loom::Error); // closed
}

TEST_CASE("[scheduler] and run.prompt_steps are checked, by key", "[scheduler][manifest]") {
  const std::string run = "[run]\nprompts = [[5, 6], [7]]\nsteps = 4\n";
  CHECK(error_of(base_manifest() + "[scheduler]\nmax_seq = 4\n" + run).find("scheduler.max_seq: unknown key") !=
        std::string::npos);
  CHECK(error_of(base_manifest() + "[scheduler]\nmax_seqs = 0\n" + run).find("scheduler.max_seqs: must be between 1") !=
        std::string::npos);
  CHECK(error_of(base_manifest() + "[scheduler]\nprefix_caching = 1\n" + run).find("scheduler.prefix_caching: expected true or false") !=
        std::string::npos);
  CHECK(error_of(base_manifest() + "[run]\nprompts = [[5, 6], [7]]\nprompt_steps = [3]\n").find("run.prompt_steps: holds 1 counts for 2 prompts") !=
        std::string::npos);
  CHECK(error_of(base_manifest() + "[run]\nprompts = [[5, 6], [7]]\nprompt_steps = [3, 0]\n").find("run.prompt_steps[1]: must be between 1") !=
        std::string::npos);
  // A pool that cannot hold one whole request is refused before anything runs.
  CHECK(error_of(base_manifest() + "[scheduler]\nkv_blocks = 1\n" + run).find("blocks cannot hold one sequence") !=
        std::string::npos);
}

TEST_CASE("run.prompt_steps limits each prompt of a fixed batch too", "[scheduler][batch]") {
  const Requests reqs = make_requests(6, 3);
  auto r = loom::Runtime::from_string(base_manifest() + reqs.run_table())->run();
  CHECK(tokens_of(r) == alone(reqs));
}

TEST_CASE("run.n: samples per prompt, sample 0 the plain run, each sample with its own key", "[batch][scheduler][model]") {
  const std::string dist = "[[sampler]]\nuse = \"dist\"\n";
  const std::string run = "[run]\nstop_tokens = []\nprompts = [[5, 6, 7], [9]]\nsteps = 12\n";
  for (const std::string scheduler : {"", "[scheduler]\n"}) {
    INFO((scheduler.empty() ? "fixed batch" : "[scheduler]"));
    const auto plain = loom::Runtime::from_string(base_manifest(dist) + scheduler + run)->run();
    const auto three = loom::Runtime::from_string(base_manifest(dist) + scheduler + run + "n = 3\n")->run();
    REQUIRE(three.sequences.size() == 6);  // prompt-major: sequence p * 3 + j is sample j of prompt p
    for (size_t p = 0; p < 2; ++p) {
      CHECK(three.sequences[p * 3].prompt == plain.sequences[p].prompt);
      CHECK(three.sequences[p * 3].tokens == plain.sequences[p].tokens);  // sample 0: the manifest's seed
      CHECK(three.sequences[p * 3 + 1].prompt == plain.sequences[p].prompt);
      // The other samples draw with keys of their own (12 draws at temperature 1: they part).
      CHECK(three.sequences[p * 3 + 1].tokens != three.sequences[p * 3].tokens);
      CHECK(three.sequences[p * 3 + 2].tokens != three.sequences[p * 3 + 1].tokens);
    }
    // Greedy samples are all the same continuation.
    const auto greedy = loom::Runtime::from_string(base_manifest() + scheduler + run + "n = 2\n")->run();
    REQUIRE(greedy.sequences.size() == 4);
    CHECK(greedy.sequences[0].tokens == greedy.sequences[1].tokens);
    CHECK(greedy.sequences[2].tokens == greedy.sequences[3].tokens);
  }
  // prompt_steps counts per prompt, for each of its samples.
  const auto limited =
      loom::Runtime::from_string(base_manifest(dist) + run + "n = 2\nprompt_steps = [3, 5]\n")->run();
  REQUIRE(limited.sequences.size() == 4);
  CHECK(limited.sequences[1].tokens.size() == 3);
  CHECK(limited.sequences[3].tokens.size() == 5);
  CHECK(error_of(base_manifest(dist) + run + "n = 0\n").find("run.n: must be between 1 and 64") != std::string::npos);
  CHECK(error_of(base_manifest(dist) + run + "n = 65\n").find("run.n: must be between 1 and 64") != std::string::npos);
  CHECK(error_of(base_manifest("[[sampler]]\nuse = \"beam-search\"\nwidth = 2\n") + run + "n = 2\n").find("run.n: beam search") !=
        std::string::npos);
}
