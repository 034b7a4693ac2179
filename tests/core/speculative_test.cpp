// Speculative decoding ([drafter], core/serving.cpp): drafts verified by the target in one
// forward pass must never change what is generated. Greedy and seeded sampling runs with the
// ngram and draft-model drafters give exactly the tokens of runs without them, over many prompts,
// with batching, chunked prefill, preemption and a drafter that fails; chi-square tests on a
// tiny vocabulary check that sampled outputs keep the target's distribution, with point-mass
// drafts and with drafts sampled from a q of the drafter's (min(1, p/q)); q rows a drafter
// leaves unwritten never carry an earlier step's q; the verification rule's edge cases (+inf
// and NaN logits, rows and drafts out of bounds) and the scheduler's draft bookkeeping are
// checked on their own. On the CPU with the default model (and a perturbed
// copy of it as a draft model that disagrees now and then).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom/core/draft_verification.hpp"
#include "loom/core/error.hpp"
#include "loom/core/kv_blocks.hpp"
#include "loom/core/request_queue.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/scheduler.hpp"

namespace fs = std::filesystem;

namespace {

const fs::path kKjv = fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv";

std::string base_manifest(const std::string &chain = "[[sampler]]\nuse = \"greedy\"\n") {
  return "[loom]\ndevice = \"cpu\"\nthreads = 2\nseed = 11\n[model]\npath = \"" + kKjv.string() +
         "\"\n[attention]\nuse = \"sdpa\"\nblock_size = 4\n" + chain;
}

// A draft model that mostly agrees with the default model: a copy whose last MLP's weights have
// their low mantissa bits scrambled (bfloat16, so a relative change of up to ~6%).
fs::path perturbed_draft_model() {
  const fs::path dir = fs::temp_directory_path() / "loom-speculative-draft";
  fs::create_directories(dir);
  for (const char *f : {"config.json", "generation_config.json", "tokenizer.model"})
    fs::copy_file(kKjv / f, dir / f, fs::copy_options::overwrite_existing);
  std::ifstream in(kKjv / "model.safetensors", std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t header = 0;
  std::memcpy(&header, bytes.data(), 8);
  const auto meta = nlohmann::json::parse(std::string(bytes.data() + 8, header));
  const auto &t = meta.at("model.layers.3.mlp.down_proj.weight");
  REQUIRE(t.at("dtype") == "BF16");
  const size_t begin = 8 + header + t.at("data_offsets")[0].get<size_t>(), end = 8 + header + t.at("data_offsets")[1].get<size_t>();
  std::mt19937 g(3);
  for (size_t i = begin; i < end; i += 2) bytes[i] = static_cast<char>(static_cast<uint8_t>(bytes[i]) ^ (g() & 0x0f));
  std::ofstream(dir / "model.safetensors", std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return dir;
}

const std::vector<std::string> kPrompts = {
    "And God said",
    "In the beginning",
    "Blessed are the",
    "And the LORD spake unto Moses, saying, Speak unto the children of Israel, and say unto them",
    "The LORD is my shepherd; I shall not want.",
    "For God so loved the world,",
    "And it came to pass, when men began to multiply on the face of the earth,",
    "Repeat after me: the words of the LORD are pure words. The words of the LORD are",
    "Thou shalt",
    "And Jesus answered and said unto them,",
    "Hear, O Israel:",
    "And the earth was without form, and void; and darkness was upon the face of the deep. And the earth was",
    "Honour thy father and thy mother:",
    "And he said unto them, Go ye into all the world,",
    "Now the serpent was more subtil than any beast of the field",
    "Let there be light: and there was light. Let there be light: and there was",
    "The fear of the LORD is the beginning of wisdom",
    "And Noah",
    "Behold, I stand at the door, and knock:",
    "Jesus wept.",
    "I am the way, the truth, and the life:",
    "Vanity of vanities, saith the Preacher, vanity of vanities; all is",
    "And Abraham begat Isaac; and Isaac begat Jacob; and Jacob begat",
    "Give us this day",
};

std::string run_table(int steps, const std::string &stop_tokens = "[]") {
  std::string list;
  for (size_t i = 0; i < kPrompts.size(); ++i) list.append(i ? ", " : "").append(nlohmann::json(kPrompts[i]).dump());
  std::string out = "[run]\nstop_tokens = " + stop_tokens + "\nsteps = ";
  out.append(std::to_string(steps)).append("\nprompts = [").append(list).append("]\n");
  return out;
}

std::vector<std::vector<int32_t>> tokens_of(const loom::RunResult &r) {
  std::vector<std::vector<int32_t>> out;
  for (const auto &s : r.sequences) out.push_back(s.tokens);
  return out;
}

} // namespace

TEST_CASE("the scheduler gives a decode its drafts' room and counts only accepted drafts", "[speculative][scheduler]") {
  loom::KvBlockManager blocks(loom::KvBlockOptions{32, 4, true});
  loom::SchedulerOptions options;
  options.max_batched_tokens = 64;
  loom::Scheduler s(options, blocks);
  s.add(1, {5, 6, 7}, 10);
  auto plan = s.schedule(); // prefill
  REQUIRE(plan.work.size() == 1);
  s.append(1, 8);
  REQUIRE(s.decoding() == std::vector<int64_t>{1});
  CHECK_THROWS_AS(s.propose_draft(1, 9), loom::Error); // 9 drafts + its own token pass max_new_tokens
  CHECK_THROWS_AS(s.propose_draft(2, 1), loom::Error);
  s.propose_draft(1, 3);
  plan = s.schedule();
  REQUIRE(plan.work.size() == 1);
  CHECK(plan.work[0].n_tokens == 4);
  CHECK(plan.work[0].draft == 3);
  CHECK(plan.work[0].samples);
  CHECK(plan.work[0].first_position == 3);
  CHECK(blocks.table(1).size() == 2); // positions 0..6
  CHECK_THROWS_AS(s.accept_drafts(1, std::vector<int32_t>{1, 2, 3, 4}.data(), 4), loom::Error);
  const std::vector<int32_t> kept = {9, 10};
  s.accept_drafts(1, kept.data(), 2);
  s.append(1, 11);
  CHECK(s.tokens(1) == std::vector<int32_t>{5, 6, 7, 8, 9, 10, 11});
  CHECK(s.generated(1) == 4);
  // The next plan decodes from the last token: the rejected draft's position is written again.
  plan = s.schedule();
  REQUIRE(plan.work.size() == 1);
  CHECK(plan.work[0].first_position == 6);
  CHECK(plan.work[0].n_tokens == 1);
  CHECK(plan.work[0].draft == 0);
  CHECK_THROWS_AS(s.accept_drafts(1, kept.data(), 1), loom::Error); // no drafts ran
  s.append(1, 12);
  // A step budget that leaves room for only part of the drafts trims them.
  loom::KvBlockManager small_blocks(loom::KvBlockOptions{32, 4, true});
  options.max_batched_tokens = 3;
  loom::Scheduler tight(options, small_blocks);
  tight.add(1, {5}, 10);
  tight.schedule();
  tight.append(1, 6);
  tight.propose_draft(1, 5);
  plan = tight.schedule();
  CHECK(plan.work[0].draft == 2);
  CHECK(plan.work[0].n_tokens == 3);
  // Every decoding sequence gets its own token before any gets drafts; drafts stay within the
  // rows the backend holds (max_rows - max_seqs per plan); drafts proposed for a plan are gone
  // from the next.
  loom::KvBlockManager blocks3(loom::KvBlockOptions{32, 4, true});
  options.max_batched_tokens = 4;
  options.max_seqs = 2;
  loom::Scheduler fair(options, blocks3);
  // Two sequences prefilled and decoding, each proposing 3 drafts, then planned.
  const auto two_drafting = [](loom::Scheduler &sched) {
    sched.add(1, {5}, 10);
    sched.add(2, {6}, 10);
    sched.schedule(); // both prefills
    sched.append(1, 7);
    sched.append(2, 8);
    sched.propose_draft(1, 3);
    sched.propose_draft(2, 3);
    return sched.schedule();
  };
  plan = two_drafting(fair);
  REQUIRE(plan.work.size() == 2);
  CHECK(plan.work[0].seq == 1);
  CHECK(plan.work[0].draft == 2); // 4 tokens: 1 + 2 drafts, and 1 kept for sequence 2
  CHECK(plan.work[1].seq == 2);
  CHECK(plan.work[1].draft == 0);
  fair.append(1, 9);
  fair.append(2, 10);
  plan = fair.schedule(); // no proposals: plain decodes
  REQUIRE(plan.work.size() == 2);
  CHECK(plan.work[0].draft + plan.work[1].draft == 0);
  fair.append(1, 11);
  fair.append(2, 12);
  loom::KvBlockManager blocks4(loom::KvBlockOptions{32, 4, true});
  options.max_batched_tokens = 64;
  options.max_rows = 3; // one draft row beyond the two sequences
  loom::Scheduler rows(options, blocks4);
  plan = two_drafting(rows);
  REQUIRE(plan.work.size() == 2);
  CHECK(plan.work[0].draft + plan.work[1].draft == 1);
}

TEST_CASE("greedy decoding with drafts gives exactly the tokens of decoding without them", "[speculative][model]") {
  const fs::path draft = perturbed_draft_model();
  const auto plain = loom::Runtime::from_string(base_manifest() + "[scheduler]\n" + run_table(40))->run();
  const auto expected = tokens_of(plain);
  struct Config {
    std::string tables;
    bool rejects; // some drafts are rejected
  };
  const std::string draft_model = "[drafter]\nuse = \"draft-model\"\nmodel = \"" + draft.string() + "\"\n";
  for (const Config &c : {
           Config{"[scheduler]\n[drafter]\nuse = \"ngram\"\n", true},
           Config{"[scheduler]\nspeculative_tokens = 6\nspeculative_adaptive = true\n[drafter]\nuse = \"ngram\"\nmax_ngram = 2\n", true},
           Config{"[scheduler]\nspeculative_tokens = 3\n" + draft_model, true},
           // Adaptive k; small steps (drafts trimmed by the budget, prompts chunked); a pool so small
           // that sequences are preempted; a drafter with fewer slots than sequences.
           Config{"[scheduler]\nspeculative_adaptive = true\nmax_seqs = 8\nmax_batched_tokens = 12\nkv_blocks = 48\n" + draft_model +
                      "max_seqs = 3\n",
                  true},
           // No [scheduler]: a [drafter] alone serves the run through it.
           Config{"[drafter]\nuse = \"ngram\"\n", true},
       }) {
    INFO(c.tables);
    std::vector<std::vector<int32_t>> streamed(kPrompts.size());
    auto rt = loom::Runtime::from_string(base_manifest() + c.tables + run_table(40));
    const loom::RunResult r = rt->run(0, nullptr, [&](int32_t seq, int32_t step, int32_t token) {
      CHECK(step == static_cast<int32_t>(streamed[static_cast<size_t>(seq)].size()));
      streamed[static_cast<size_t>(seq)].push_back(token);
      return true;
    });
    CHECK(tokens_of(r) == expected);
    CHECK(streamed == expected);
    CHECK(r.scheduler.drafted_tokens > 0);
    CHECK(r.scheduler.accepted_tokens > 0);
    CHECK((r.scheduler.accepted_tokens < r.scheduler.drafted_tokens) == c.rejects);
    CHECK(r.scheduler.drafter_failures == 0);
    // Fewer forward passes than without drafts: the point of it (with room in the pool and the
    // step budget; the tight configuration preempts and chunks instead).
    if (c.tables.find("kv_blocks") == std::string::npos) CHECK(r.scheduler.steps < plain.scheduler.steps);
    int64_t drafted = 0, accepted = 0;
    for (const auto &s : r.scheduler.step_log) {
      drafted += s.drafted;
      accepted += s.accepted;
    }
    CHECK(drafted == r.scheduler.drafted_tokens);
    CHECK(accepted == r.scheduler.accepted_tokens);
  }
}

TEST_CASE("seeded sampling with drafts gives the tokens of sampling without them", "[speculative][model]") {
  const std::string chain = "[[sampler]]\nuse = \"temperature\"\nt = 0.8\n[[sampler]]\nuse = \"top-k\"\nk = 40\n"
                            "[[sampler]]\nuse = \"repetition-penalty\"\npenalty = 1.1\n[[sampler]]\nuse = \"dist\"\n";
  const auto expected = tokens_of(loom::Runtime::from_string(base_manifest(chain) + "[scheduler]\n" + run_table(32))->run());
  const fs::path draft = perturbed_draft_model();
  for (const std::string &drafter : {std::string("[drafter]\nuse = \"ngram\"\n"),
                                     "[drafter]\nuse = \"draft-model\"\nmodel = \"" + draft.string() + "\"\n"}) {
    INFO(drafter);
    const auto r = loom::Runtime::from_string(base_manifest(chain) + "[scheduler]\n" + drafter + run_table(32))->run();
    CHECK(tokens_of(r) == expected);
    CHECK(r.scheduler.accepted_tokens > 0);
    CHECK(r.scheduler.accepted_tokens < r.scheduler.drafted_tokens);
  }
}

TEST_CASE("draft-model with a temperature samples its drafts where the chain samples", "[speculative][model]") {
  // temperature > 0: a sequence whose chain draws from a distribution gets drafts drawn from the
  // draft model's softmax and verified against it (min(1, p/q)), so a draft model close to the
  // target keeps far more of them than greedy drafts, which a sampled token matches only when it
  // is the argmax; a greedy chain is offered no q, so its drafts stay greedy and its tokens those
  // of decoding without drafts.
  const std::string chain = "[[sampler]]\nuse = \"temperature\"\nt = 1.0\n[[sampler]]\nuse = \"dist\"\n";
  const fs::path draft = perturbed_draft_model();
  const std::string drafter = "[drafter]\nuse = \"draft-model\"\nmodel = \"" + draft.string() + "\"\n";
  const auto greedy_drafts = loom::Runtime::from_string(base_manifest(chain) + "[scheduler]\n" + drafter + run_table(32))->run();
  const auto sampled_drafts =
      loom::Runtime::from_string(base_manifest(chain) + "[scheduler]\n" + drafter + "temperature = 1.0\nseed = 3\n" + run_table(32))->run();
  const auto rate = [](const loom::RunResult &r) {
    return static_cast<double>(r.scheduler.accepted_tokens) / static_cast<double>(r.scheduler.drafted_tokens);
  };
  INFO("kept: greedy drafts " << rate(greedy_drafts) << ", sampled drafts " << rate(sampled_drafts));
  REQUIRE(greedy_drafts.scheduler.drafted_tokens > 100);
  REQUIRE(sampled_drafts.scheduler.drafted_tokens > 100);
  CHECK(rate(sampled_drafts) > rate(greedy_drafts) + 0.2);
  CHECK(sampled_drafts.scheduler.accepted_tokens < sampled_drafts.scheduler.drafted_tokens);
  for (const auto &s : sampled_drafts.sequences) {
    CHECK(s.tokens.size() == 32);
    for (int32_t token : s.tokens) CHECK((token >= 0 && token < 2000));
  }
  const auto plain = tokens_of(loom::Runtime::from_string(base_manifest() + "[scheduler]\n" + run_table(32))->run());
  const auto greedy_chain =
      loom::Runtime::from_string(base_manifest() + "[scheduler]\n" + drafter + "temperature = 1.0\n" + run_table(32))->run();
  CHECK(tokens_of(greedy_chain) == plain);
  CHECK(greedy_chain.scheduler.accepted_tokens > 0);
  CHECK_THROWS_WITH(loom::Runtime::from_string(base_manifest() + drafter + "temperature = -1.0\n[run]\nprompt = \"a\"\n"),
                    Catch::Contains("temperature"));
}

TEST_CASE("chains with per-sequence state verify drafts row by row and keep their tokens", "[speculative][model]") {
  // A grammar (its state: where the text is in the grammar) and mirostat (its state: mu) change
  // with every accepted token, so a row after drafts is sampled only once the rows before it
  // gave the drafts and the chain accepted them: the tokens are those of decoding without drafts.
  // (The grammar's text may end: the end token 2 then stops the sequence.)
  const fs::path draft = perturbed_draft_model();
  for (const std::string &chain : {std::string("[[sampler]]\nuse = \"grammar\"\ngrammar = 'root ::= [a-zA-Z ,.]*'\n"
                                               "[[sampler]]\nuse = \"greedy\"\n"),
                                   std::string("[[sampler]]\nuse = \"mirostat-v2\"\ntau = 3.0\neta = 0.5\n")}) {
    INFO(chain);
    const auto plain = loom::Runtime::from_string(base_manifest(chain) + "[scheduler]\n" + run_table(32, "[2]"))->run();
    const auto expected = tokens_of(plain);
    for (const std::string &drafter : {std::string("[drafter]\nuse = \"ngram\"\n"),
                                       "[drafter]\nuse = \"draft-model\"\nmodel = \"" + draft.string() + "\"\n"}) {
      INFO(drafter);
      const auto r = loom::Runtime::from_string(base_manifest(chain) + "[scheduler]\n" + drafter + run_table(32, "[2]"))->run();
      CHECK(tokens_of(r) == expected);
      CHECK(r.scheduler.accepted_tokens > 0);
      CHECK(r.scheduler.accepted_tokens < r.scheduler.drafted_tokens);
      // (sampling keeps fewer drafts: some sequence of the batch still runs every step)
      if (chain.find("greedy") != std::string::npos) CHECK(r.scheduler.steps < plain.scheduler.steps);
    }
  }
}

TEST_CASE("a drafter that fails costs its drafts, never a request", "[speculative][model]") {
  // The draft model's vocabulary (2000) is larger than the target's (the synthetic model's 16):
  // every propose() fails, and the run goes on without drafts.
  const std::string synthetic = "[loom]\ndevice = \"cpu\"\nseed = 3\n[run]\nvocab_size = 16\nhidden_size = 32\nn_heads = 2\n"
                                "n_kv_heads = 1\nn_layers = 2\nsteps = 12\nprompts = [[1, 2, 3, 1, 2], [4, 5, 6]]\n"
                                "[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n[scheduler]\n";
  const auto expected = tokens_of(loom::Runtime::from_string(synthetic)->run());
  const auto r = loom::Runtime::from_string(synthetic + "[drafter]\nuse = \"draft-model\"\nmodel = \"" + kKjv.string() + "\"\n")->run();
  CHECK(tokens_of(r) == expected);
  CHECK(r.scheduler.drafter_failures > 0);
  CHECK(r.scheduler.drafted_tokens == 0);
  CHECK(r.scheduler.drafter_error.find("vocabulary") != std::string::npos);
}

TEST_CASE("bad drafter tables are refused naming the key", "[speculative][manifest]") {
  try {
    loom::Runtime::from_string(base_manifest() + "[drafter]\nuse = \"ngram\"\nmax_ngram = 2\nmin_ngram = 3\n[run]\nprompt = \"a\"\n");
    FAIL("accepted min_ngram > max_ngram");
  } catch (const loom::Error &e) {
    CHECK(std::string(e.what()).find("drafter.min_ngram") != std::string::npos);
  }
  try {
    loom::Runtime::from_string(base_manifest() + "[drafter]\nuse = \"draft-model\"\nmodel = \"no/such/model\"\n[run]\nprompt = \"a\"\n");
    FAIL("accepted a missing draft model");
  } catch (const loom::Error &e) {
    CHECK(std::string(e.what()).find("no/such/model") != std::string::npos);
  }
  CHECK_THROWS_WITH(loom::Runtime::from_string(base_manifest() + "[scheduler]\nspeculative_tokens = 9\nspeculative_max_tokens = 4\n"
                                                                 "[run]\nprompt = \"a\"\n"),
                    Catch::Contains("speculative_tokens"));
}

namespace {

// A synthetic model over 8 tokens and a repetitive prompt, sampled at temperature 1.5.
std::string synthetic_manifest(const std::string &loom_extra = "") {
  return "[loom]\ndevice = \"cpu\"\nseed = 5\n" + loom_extra +
         "[run]\nvocab_size = 8\nhidden_size = 32\nn_heads = 2\n"
         "n_kv_heads = 1\nn_layers = 2\nprompt = [1, 2, 3, 1, 2, 3, 1, 2]\n"
         "[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"temperature\"\nt = 1.5\n"
         "[[sampler]]\nuse = \"dist\"\n[scheduler]\nmax_seqs = 64\n";
}

// n requests of that prompt with seeds first_seed.., 3 tokens each (or max_new_tokens, up to 8).
std::vector<std::vector<int32_t>> serve_synthetic(const std::string &manifest, int n, uint64_t first_seed,
                                                  loom::SchedulerStats *stats, int64_t max_new_tokens = 3) {
  auto rt = loom::Runtime::from_string(manifest);
  loom::RequestQueue queue;
  std::vector<std::vector<int32_t>> out(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    loom::ServeRequest r;
    r.prompt = {1, 2, 3, 1, 2, 3, 1, 2};
    r.max_new_tokens = max_new_tokens;
    r.seed = first_seed + static_cast<uint64_t>(i);
    r.on_done = [&out, i](const loom::SequenceResult &res, const std::string &error) {
      REQUIRE(error.empty());
      out[static_cast<size_t>(i)] = res.tokens;
    };
    queue.submit(std::move(r));
  }
  queue.close();
  *stats = rt->serve(queue, 16);
  return out;
}

// Two-sample chi-square over the 64 cells of the pairs (2nd, 3rd token), equal sample sizes:
// whether the two samples may come from one distribution (p > 0.001).
void check_same_distribution(const std::vector<std::vector<int32_t>> &x, const std::vector<std::vector<int32_t>> &y) {
  REQUIRE(x.size() == y.size());
  std::map<int, double> a, b;
  for (size_t i = 0; i < x.size(); ++i) {
    REQUIRE(x[i].size() == 3);
    REQUIRE(y[i].size() == 3);
    a[x[i][1] * 8 + x[i][2]] += 1;
    b[y[i][1] * 8 + y[i][2]] += 1;
  }
  double chi2 = 0;
  int cells = 0;
  for (int c = 0; c < 64; ++c) {
    const double u = a[c], v = b[c];
    if (u + v == 0) continue;
    chi2 += (u - v) * (u - v) / (u + v);
    ++cells;
  }
  // The 0.999 quantile of chi-square with cells - 1 degrees of freedom (Wilson-Hilferty).
  const double k = cells - 1, z = 3.0902;
  const double critical = k * std::pow(1 - 2 / (9 * k) + z * std::sqrt(2 / (9 * k)), 3);
  INFO("chi2 " << chi2 << " over " << cells << " cells, critical " << critical);
  CHECK(cells > 16);
  CHECK(chi2 < critical);
}

} // namespace

TEST_CASE("sampled outputs with drafts keep the target's distribution (chi-square)", "[speculative][model]") {
  // Prompt lookup drafts most steps of the repetitive prompt and the target rejects many drafts.
  // 4,000 requests with seeds 0..3999 sample 3 tokens each, with drafts and without; the pairs
  // (2nd, 3rd token), where drafts were verified, must follow the same distribution as 4,000
  // requests without drafts of other seeds, and each seed's tokens are those it gets without.
  const int n = 4000;
  loom::SchedulerStats with_stats, without_stats, other_stats;
  const auto with = serve_synthetic(synthetic_manifest() + "[drafter]\nuse = \"ngram\"\n", n, 0, &with_stats);
  const auto same_seeds = serve_synthetic(synthetic_manifest(), n, 0, &without_stats);
  const auto other_seeds = serve_synthetic(synthetic_manifest(), n, 100000, &other_stats);
  CHECK(with == same_seeds);
  CHECK(with_stats.drafted_tokens > 1000);
  CHECK(with_stats.accepted_tokens > 100);
  CHECK(with_stats.drafted_tokens - with_stats.accepted_tokens > 100);
  check_same_distribution(with, other_seeds);
}

TEST_CASE("sampled drafts verified against their q keep the distribution and more drafts", "[speculative][model]") {
  // A test drafter (tests/plugins/misc.c, "sampled-drafts") draws every draft from q(t) =
  // (t + 1) / 36, unlike the target's p, and gives q with them (ABI 1.10) or not (give_q =
  // false: point masses). Verified with min(1, p/q) and the residual max(0, p - q), the output
  // must still follow p (chi-square against requests without drafts), and the rule must keep
  // more drafts than point-mass verification of the same drafts (sum min(p, q) > sum p q).
  const int n = 4000;
  const std::string misc = "plugin_paths = [" + nlohmann::json((fs::path(LOOM_TEST_PLUGIN_DIR) / "misc").string()).dump() + "]\n";
  loom::SchedulerStats q_stats, point_stats, other_stats;
  const auto with_q = serve_synthetic(synthetic_manifest(misc) + "[drafter]\nuse = \"sampled-drafts\"\n", n, 0, &q_stats);
  const auto point = serve_synthetic(synthetic_manifest(misc) + "[drafter]\nuse = \"sampled-drafts\"\ngive_q = false\n", n, 0,
                                     &point_stats);
  const auto other_seeds = serve_synthetic(synthetic_manifest(), n, 100000, &other_stats);
  REQUIRE(q_stats.drafted_tokens > 1000);
  REQUIRE(point_stats.drafted_tokens > 1000);
  const double q_rate = static_cast<double>(q_stats.accepted_tokens) / static_cast<double>(q_stats.drafted_tokens);
  const double point_rate = static_cast<double>(point_stats.accepted_tokens) / static_cast<double>(point_stats.drafted_tokens);
  INFO("kept with q " << q_rate << ", as point masses " << point_rate);
  CHECK(q_rate > point_rate + 0.1);
  CHECK(q_stats.drafted_tokens - q_stats.accepted_tokens > 100); // rejections drew from the residual
  check_same_distribution(with_q, other_seeds);
  check_same_distribution(point, other_seeds);
}

TEST_CASE("with a drafter, a request whose own chain fails fails alone", "[speculative][model]") {
  // A chain without a selecting link selects nothing: that request ends with the error, once,
  // and the request beside it, which verifies drafts, completes.
  auto rt = loom::Runtime::from_string(base_manifest() + "[scheduler]\n[drafter]\nuse = \"ngram\"\n[run]\nprompt = \"x\"\n");
  const std::vector<int32_t> prompt = rt->encode_text("Let there be light: and there was light. Let there be light:", "prompt");
  loom::RequestQueue queue;
  int done = 0;
  std::string failure;
  std::vector<int32_t> good;
  loom::ServeRequest bad;
  bad.prompt = prompt;
  bad.max_new_tokens = 16;
  bad.samplers = rt->make_samplers({"use = \"temperature\"\nt = 1.0\n"}, "bad");
  bad.on_done = [&](const loom::SequenceResult &, const std::string &error) {
    ++done;
    failure = error;
  };
  loom::ServeRequest ok;
  ok.prompt = prompt;
  ok.max_new_tokens = 16;
  ok.on_done = [&](const loom::SequenceResult &r, const std::string &error) {
    ++done;
    CHECK(error.empty());
    good = r.tokens;
  };
  queue.submit(std::move(ok));
  queue.submit(std::move(bad));
  queue.close();
  const loom::SchedulerStats stats = rt->serve(queue, 128);
  CHECK(done == 2);
  CHECK(failure.find("sampling") != std::string::npos);
  CHECK(!good.empty());
  CHECK(stats.drafted_tokens > 0);
}

TEST_CASE("q rows a drafter leaves unwritten are never an earlier step's q", "[speculative][model]") {
  // stale_q: the test drafter writes q into every row offered at its first call but gives no q
  // there (q_given 0), then claims q_given at every later call without writing q. The host
  // marks the offered rows (a NaN first entry) before each call, so those rows are no
  // distribution and the drafts
  // verify as point masses: each seed's tokens are exactly those it gets without drafts. (Rows
  // left from the first call would be a valid q, verified with min(1, p/q): other draws.)
  const int n = 48;
  const std::string misc = "plugin_paths = [" + nlohmann::json((fs::path(LOOM_TEST_PLUGIN_DIR) / "misc").string()).dump() + "]\n";
  loom::SchedulerStats stale_stats, plain_stats;
  const auto stale = serve_synthetic(synthetic_manifest(misc) + "[drafter]\nuse = \"sampled-drafts\"\nstale_q = true\n", n, 0,
                                     &stale_stats, 8);
  const auto plain = serve_synthetic(synthetic_manifest(), n, 0, &plain_stats, 8);
  REQUIRE(stale_stats.drafted_tokens > 100);
  CHECK(stale_stats.accepted_tokens < stale_stats.drafted_tokens);
  CHECK(stale == plain);
}

TEST_CASE("sampled-draft verification: +inf logits, NaN and bad rows", "[speculative][verification]") {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> logits = {0.0f, inf, 1.0f, 2.0f};
  std::vector<double> p(4);
  loom::probabilities_of(logits, p);
  CHECK(p == std::vector<double>{0.0, 1.0, 0.0, 0.0});
  loom::probabilities_of(std::vector<float>{inf, 5.0f, -inf, inf}, p);
  CHECK(p == std::vector<double>{0.5, 0.0, 0.0, 0.5});
  CHECK_THROWS_WITH(loom::probabilities_of(std::vector<float>{0.0f, std::nanf(""), 1.0f, 2.0f}, p), Catch::Contains("NaN"));
  CHECK_THROWS_WITH(loom::probabilities_of(std::vector<float>{-inf, -inf, -inf, -inf}, p), Catch::Contains("-inf"));
  CHECK_THROWS(loom::probabilities_of(std::vector<float>{0.0f, 1.0f}, p)); // (p is 4 long)

  // Logits {0, +inf, 1, 2} at every row, drafts {0, 2} from a uniform q: p is a point mass on
  // token 1, so draft 0 is rejected (p(0) = 0) and the residual max(0, p - q) gives token 1,
  // whatever the random numbers.
  const std::vector<int32_t> drafts = {0, 2};
  const std::vector<std::vector<float>> q(2, std::vector<float>(4, 0.25f));
  const std::vector<uint64_t> counters = {7, 8, 9};
  for (uint64_t key : std::initializer_list<uint64_t>{0, 1, 12345}) {
    std::vector<std::vector<double>> rows(3, std::vector<double>(4));
    for (auto &row : rows) loom::probabilities_of(logits, row);
    std::vector<int32_t> tokens;
    CHECK(loom::verify_sampled_drafts(rows, q, drafts, key, counters, tokens) == 0);
    CHECK(tokens == std::vector<int32_t>{1});
  }

  // Bounds: rows of other lengths, drafts outside the vocabulary and values that are no
  // probabilities are errors, never reads past a row or NaN comparisons.
  const std::vector<std::vector<double>> good_p(3, std::vector<double>(4, 0.25));
  std::vector<int32_t> tokens;
  CHECK(loom::verify_sampled_drafts(good_p, q, drafts, 1, counters, tokens) >= 0);
  const auto fails = [&](const std::vector<std::vector<double>> &pp, const std::vector<std::vector<float>> &qq,
                         const std::vector<int32_t> &dd, const char *what) {
    CHECK_THROWS_WITH(loom::verify_sampled_drafts(pp, qq, dd, 1, counters, tokens), Catch::Contains(what));
  };
  fails(good_p, {std::vector<float>(4, 0.25f), std::vector<float>(3, 1.0f / 3)}, drafts, "proposal row 1 has 3 entries");
  fails(good_p, {std::vector<float>(5, 0.2f), std::vector<float>(5, 0.2f)}, drafts, "proposal row 0 has 5 entries");
  fails({std::vector<double>(4, 0.25), std::vector<double>(5, 0.2), std::vector<double>(4, 0.25)}, q, drafts,
        "target row 1 has 5 entries");
  fails(good_p, q, {0, 4}, "token 4, outside the vocabulary of 4");
  fails(good_p, q, {-1, 2}, "token -1, outside");
  fails(good_p, {std::vector<float>(4, 0.25f), {0.25f, std::nanf(""), 0.25f, 0.25f}}, drafts, "proposal row 1");
  fails({std::vector<double>(4, 0.25), std::vector<double>(4, 0.25), {0.5, std::nan(""), 0.5, 0.0}}, q, drafts, "target row 2");
  fails(good_p, q, {0}, "2 target rows");
}
