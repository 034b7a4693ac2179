// Scheduler (core/scheduler.cpp): continuous batching under the token and sequence budgets,
// chunked and whole prefill, preemption by recomputation, prefix caching through the scheduler,
// input errors, and whole serving runs against a fake model whose next token is a function of
// the sequence's tokens: every request must end with exactly the tokens it gets alone, and every
// work item must find the right KV (a model of the pool's contents) for the positions before it.
#include <catch2/catch.hpp>

#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "kv_pool_model.hpp"
#include "loom/core/error.hpp"
#include "loom/core/kv_blocks.hpp"
#include "loom/core/scheduler.hpp"

using loom::KvBlockManager;
using loom::KvBlockOptions;
using loom::SchedulePlan;
using loom::Scheduler;
using loom::SchedulerOptions;

namespace {

// The fake model: the next token is a hash of all tokens so far; 0 mod 97 is the stop token.
int32_t next_token(const std::vector<int32_t> &tokens) {
  return int32_t(loom::test::prefix_fingerprints(tokens).back() % 1000);
}
bool is_stop(int32_t token) { return token % 97 == 0; }

std::vector<int32_t> generate_alone(std::vector<int32_t> tokens, int64_t max_new) {
  for (int64_t g = 0; g < max_new; ++g) {
    const int32_t t = next_token(tokens);
    tokens.push_back(t);
    if (is_stop(t)) break;
  }
  return tokens;
}

struct Request {
  int64_t id;
  std::vector<int32_t> prompt;
  int64_t max_new;
  int arrival_step;
};

struct RunResult {
  std::map<int64_t, std::vector<int32_t>> finished;
  std::string trace; // every plan, for determinism
  int64_t computed_tokens = 0;
  int64_t preemptions = 0;
  bool mixed_step = false; // a step that decoded one sequence while prefilling another
  loom::KvBlockStats stats;
};

std::string describe(const SchedulePlan &plan) {
  std::ostringstream o;
  for (const auto &w : plan.work) o << w.seq << '@' << w.first_position << '+' << w.n_tokens << (w.samples ? "s " : " ");
  for (const auto &c : plan.copies) o << 'c' << c.src << '>' << c.dst << ' ';
  for (int64_t p : plan.preempted) o << 'p' << p << ' ';
  return o.str();
}

// Serves `requests` (sorted by arrival step) to the end, checking every plan on the way.
RunResult serve(SchedulerOptions so, KvBlockOptions ko, const std::vector<Request> &requests) {
  KvBlockManager blocks(ko);
  Scheduler sched(so, blocks);
  loom::test::KvPoolModel pool(ko.n_blocks, ko.block_size);
  std::map<int64_t, int64_t> max_new;
  RunResult r;
  size_t next = 0;
  for (int step = 0; next < requests.size() || !sched.idle(); ++step) {
    REQUIRE(step < 100000);
    for (; next < requests.size() && requests[next].arrival_step <= step; ++next) {
      sched.add(requests[next].id, requests[next].prompt, requests[next].max_new);
      max_new[requests[next].id] = requests[next].max_new;
    }
    const SchedulePlan plan = sched.schedule();
    r.trace += describe(plan) + "\n";
    INFO("step " << step << ": " << describe(plan));
    REQUIRE(!plan.work.empty()); // something waits or runs, and nothing can wait forever
    REQUIRE(plan.n_tokens <= so.max_batched_tokens);
    REQUIRE(sched.running() <= so.max_seqs);
    int32_t sum = 0;
    bool decodes = false, prefills = false;
    std::set<int64_t> in_plan;
    pool.apply(plan.copies);
    for (const auto &w : plan.work) {
      REQUIRE(in_plan.insert(w.seq).second);
      const auto &tokens = sched.tokens(w.seq);
      const auto &table = blocks.table(w.seq);
      REQUIRE(w.n_tokens >= 1);
      REQUIRE(w.first_position + w.n_tokens <= int64_t(tokens.size()));
      REQUIRE(w.samples == (w.first_position + w.n_tokens == int64_t(tokens.size())));
      REQUIRE(pool.check(table, tokens, w.first_position).empty()); // attends to its own prefix
      pool.write(table, tokens, w.first_position, w.first_position + w.n_tokens);
      sum += w.n_tokens;
      (w.n_tokens == 1 && w.first_position > 0 ? decodes : prefills) = true;
    }
    for (int64_t p : plan.preempted) REQUIRE(in_plan.count(p) == 0);
    REQUIRE(sum == plan.n_tokens);
    r.computed_tokens += sum;
    r.mixed_step = r.mixed_step || (decodes && prefills);
    for (const auto &w : plan.work) {
      if (!w.samples) continue;
      const int32_t t = next_token(sched.tokens(w.seq));
      sched.append(w.seq, t);
      if (sched.generated(w.seq) == max_new[w.seq] || is_stop(t)) {
        r.finished[w.seq] = sched.tokens(w.seq);
        sched.finish(w.seq);
      }
    }
  }
  r.preemptions = sched.preemptions();
  r.stats = blocks.stats();
  return r;
}

// `n` requests, `per_step` arriving each step; half start with a shared 8-token system prompt.
std::vector<Request> make_requests(int n, int per_step, int64_t max_prompt, int64_t max_new, uint32_t seed) {
  std::mt19937 rng(seed);
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  const std::vector<int32_t> system{11, 12, 13, 14, 15, 16, 17, 18};
  std::vector<Request> out;
  for (int i = 0; i < n; ++i) {
    Request q{i, {}, uniform(1, max_new), i / per_step};
    if (i % 2 == 0) q.prompt = system;
    const int64_t len = uniform(1, max_prompt - int64_t(q.prompt.size()));
    for (int64_t k = 0; k < len; ++k) q.prompt.push_back(int32_t(uniform(0, 999)));
    out.push_back(q);
  }
  return out;
}

void check_work(const loom::ScheduledWork &w, int64_t seq, int64_t first, int32_t n, bool samples) {
  INFO("work item of sequence " << w.seq);
  CHECK(w.seq == seq);
  CHECK(w.first_position == first);
  CHECK(w.n_tokens == n);
  CHECK(w.samples == samples);
}

void check_against_alone(const RunResult &r, const std::vector<Request> &requests) {
  REQUIRE(r.finished.size() == requests.size());
  for (const Request &q : requests) {
    INFO("request " << q.id);
    CHECK(r.finished.at(q.id) == generate_alone(q.prompt, q.max_new));
  }
}

} // namespace

TEST_CASE("Scheduler batches continuously within its budgets", "[scheduler]") {
  const auto requests = make_requests(12, 2, 40, 12, 7);
  const SchedulerOptions so{4, 16, true};
  const RunResult r = serve(so, {256, 4, true}, requests);
  check_against_alone(r, requests);
  CHECK(r.mixed_step); // a request joined while others decoded
  CHECK(r.preemptions == 0);
}

TEST_CASE("Scheduler chunks a long prefill and samples only its last chunk", "[scheduler]") {
  KvBlockManager blocks({64, 4, true});
  Scheduler sched({8, 16, true}, blocks);
  std::vector<int32_t> prompt(50);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = int32_t(i);
  sched.add(1, prompt, 4);
  for (int64_t first : {0, 16, 32}) {
    const SchedulePlan p = sched.schedule();
    REQUIRE(p.work.size() == 1);
    check_work(p.work[0], 1, first, 16, false);
    CHECK_THROWS_AS(sched.append(1, 5), loom::Error); // nothing was sampled
  }
  SchedulePlan p = sched.schedule();
  REQUIRE(p.work.size() == 1);
  check_work(p.work[0], 1, 48, 2, true);
  sched.append(1, 5);
  CHECK(sched.generated(1) == 1);

  // A request arriving now shares the step with the decode; the prefix cache holds 12 blocks of
  // the same prompt, so it computes only the last 2 tokens.
  sched.add(2, prompt, 4);
  p = sched.schedule();
  REQUIRE(p.work.size() == 2);
  check_work(p.work[0], 1, 50, 1, true);
  check_work(p.work[1], 2, 48, 2, true);
  CHECK(p.n_tokens == 3);

  // A long one arriving during decodes gets the budget the decodes leave: 2 + 14 tokens.
  sched.append(1, 6);
  sched.append(2, 6);
  std::vector<int32_t> other(40, 3);
  sched.add(3, other, 4);
  p = sched.schedule();
  REQUIRE(p.work.size() == 3);
  check_work(p.work[2], 3, 0, 14, false);
  CHECK(p.n_tokens == 16);
}

TEST_CASE("Scheduler without chunked prefill schedules a prompt whole or not at all", "[scheduler]") {
  KvBlockManager blocks({64, 4, true});
  Scheduler sched({8, 16, false}, blocks);
  CHECK_THROWS_WITH(sched.add(1, std::vector<int32_t>(20, 3), 1), Catch::Contains("sequence 1"));
  sched.add(2, std::vector<int32_t>(10, 3), 4);
  sched.add(3, std::vector<int32_t>(10, 4), 4);
  SchedulePlan p = sched.schedule();
  REQUIRE(p.work.size() == 1); // 10 + 10 > 16: request 3 waits rather than being split
  check_work(p.work[0], 2, 0, 10, true);
  CHECK(sched.waiting() == 1);
  sched.append(2, 1);
  p = sched.schedule();
  REQUIRE(p.work.size() == 2);
  check_work(p.work[1], 3, 0, 10, true);
  CHECK(p.n_tokens == 11);
}

TEST_CASE("Scheduler respects max_seqs", "[scheduler]") {
  KvBlockManager blocks({64, 4, true});
  Scheduler sched({2, 64, true}, blocks);
  for (int64_t id = 0; id < 4; ++id) sched.add(id, {int32_t(id), 1, 2}, 3);
  const SchedulePlan p = sched.schedule();
  CHECK(p.work.size() == 2);
  CHECK(sched.running() == 2);
  CHECK(sched.waiting() == 2);
}

TEST_CASE("Scheduler preempts by recomputation when the pool runs short", "[scheduler]") {
  // 20 blocks of 4: 80 positions for up to 16 sequences of up to 30 + 24 tokens.
  const auto requests = make_requests(64, 4, 30, 24, 42);
  SECTION("chunked prefill, prefix caching") {
    const RunResult r = serve({16, 64, true}, {20, 4, true}, requests);
    check_against_alone(r, requests);
    CHECK(r.preemptions > 0);
    CHECK(r.stats.hit_tokens > 0);
  }
  SECTION("whole prefills") {
    const RunResult r = serve({16, 64, false}, {20, 4, true}, requests);
    check_against_alone(r, requests);
    CHECK(r.preemptions > 0);
  }
  SECTION("no prefix caching, small blocks, tight token budget") {
    const RunResult r = serve({16, 8, true}, {40, 2, false}, requests);
    check_against_alone(r, requests);
    CHECK(r.preemptions > 0);
    CHECK(r.stats.hit_tokens == 0);
  }
  SECTION("a pool that holds one request at a time") {
    const auto few = make_requests(8, 8, 20, 12, 3);
    const RunResult r = serve({8, 64, true}, {8, 4, true}, few);
    check_against_alone(r, few);
    CHECK(r.preemptions > 0);
  }
}

TEST_CASE("Scheduler plans are deterministic", "[scheduler]") {
  const auto requests = make_requests(32, 3, 30, 16, 9);
  const RunResult a = serve({8, 32, true}, {16, 4, true}, requests);
  const RunResult b = serve({8, 32, true}, {16, 4, true}, requests);
  CHECK(a.trace == b.trace);
  CHECK(a.finished == b.finished);
}

TEST_CASE("Scheduler reuses cached prefixes", "[scheduler]") {
  KvBlockManager blocks({64, 16, true});
  Scheduler sched({8, 2048, true}, blocks);
  std::vector<int32_t> prompt(64);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = int32_t(i * 7 % 1000);
  sched.add(1, prompt, 2);
  SchedulePlan p = sched.schedule();
  REQUIRE(p.work.size() == 1);
  CHECK(p.work[0].n_tokens == 64);
  sched.append(1, 1);

  SECTION("a longer prompt with the same prefix computes only its tail") {
    auto longer = prompt;
    for (int32_t t : {900, 901, 902, 903, 904, 905, 906, 907}) longer.push_back(t);
    sched.add(2, longer, 2);
    p = sched.schedule();
    REQUIRE(p.work.size() == 2);
    check_work(p.work[1], 2, 64, 8, true);
    CHECK(blocks.stats().hit_tokens == 64);
  }
  SECTION("the same prompt recomputes its last token into a copy while the first one runs") {
    sched.add(2, prompt, 2);
    p = sched.schedule();
    REQUIRE(p.work.size() == 2);
    check_work(p.work[1], 2, 63, 1, true);
    REQUIRE(p.copies.size() == 1);
    CHECK(p.copies[0].src == blocks.table(1)[3]);
    CHECK(p.copies[0].dst == blocks.table(2)[3]);
  }
  SECTION("after the first one finished, the same prompt reuses its blocks in place") {
    sched.finish(1);
    sched.add(2, prompt, 2);
    p = sched.schedule();
    REQUIRE(p.work.size() == 1);
    check_work(p.work[0], 2, 63, 1, true);
    CHECK(p.copies.empty());
  }
}

TEST_CASE("Scheduler rejects invalid input", "[scheduler]") {
  KvBlockManager blocks({4, 4, true}); // 16 positions
  CHECK_THROWS_AS(Scheduler({0, 16, true}, blocks), loom::Error);
  CHECK_THROWS_AS(Scheduler({4, 0, true}, blocks), loom::Error);
  Scheduler sched({4, 16, true}, blocks);
  sched.add(1, {1, 2, 3}, 2);
  CHECK_THROWS_WITH(sched.add(1, {4}, 1), Catch::Contains("sequence 1"));
  CHECK_THROWS_WITH(sched.add(2, {}, 1), Catch::Contains("sequence 2") && Catch::Contains("empty"));
  CHECK_THROWS_WITH(sched.add(3, std::vector<int32_t>(10, 1), 7), Catch::Contains("sequence 3"));
  CHECK_NOTHROW(sched.add(4, std::vector<int32_t>(10, 1), 6)); // exactly the pool
  CHECK_THROWS_AS(sched.add(5, {1}, -1), loom::Error);
  CHECK_THROWS_AS(sched.append(1, 9), loom::Error); // waiting: nothing sampled
  CHECK_THROWS_AS(sched.finish(99), loom::Error);
  CHECK_THROWS_AS(sched.tokens(99), loom::Error);
  CHECK_THROWS_AS(sched.generated(99), loom::Error);

  SchedulePlan p = sched.schedule();
  REQUIRE(p.work.size() == 2);
  sched.append(1, 7);
  CHECK_THROWS_AS(sched.append(1, 8), loom::Error); // one token per sampling step
  p = sched.schedule();
  sched.append(1, 8);
  p = sched.schedule();
  CHECK_THROWS_WITH(sched.append(1, 9), Catch::Contains("max_new_tokens"));

  SECTION("finish works for running and waiting requests alike") {
    sched.finish(1);
    sched.finish(4);
    CHECK(sched.idle());
    CHECK(blocks.free_blocks() == blocks.total_blocks());
  }
}

TEST_CASE("token_rows sequences get prefill chunks within the step's rows, chunked whatever chunked_prefill says",
          "[scheduler]") {
  for (const bool chunked : {true, false}) {
    INFO("chunked_prefill " << chunked);
    KvBlockOptions bo;
    bo.n_blocks = 64;
    bo.block_size = 4;
    KvBlockManager blocks(bo);
    SchedulerOptions o;
    o.max_seqs = 4;
    o.max_batched_tokens = 64;
    o.chunked_prefill = chunked;
    o.token_rows = 8;
    Scheduler s(o, blocks);
    s.add(1, std::vector<int32_t>(20, 5), 2, 0, true);
    s.add(2, std::vector<int32_t>(6, 7), 2, 0, true);
    s.add(3, std::vector<int32_t>(10, 9), 2); // an ordinary one beside them
    // Each step's work items as (seq, tokens, samples).
    using Item = std::tuple<int64_t, int32_t, bool>;
    const auto items = [&s] {
      std::vector<Item> out;
      for (const auto &w : s.schedule().work) out.emplace_back(w.seq, w.n_tokens, w.samples);
      return out;
    };
    // 1 gets the step's 8 rows; 2 keeps its place; 3 goes on past it.
    CHECK(items() == std::vector<Item>{{1, 8, false}, {3, 10, true}});
    CHECK(items() == std::vector<Item>{{1, 8, false}});
    // 1's last 4, then 2 gets the 4 rows left.
    CHECK(items() == std::vector<Item>{{1, 4, true}, {2, 4, false}});
  }
  KvBlockOptions bo;
  bo.n_blocks = 16;
  bo.block_size = 4;
  KvBlockManager blocks(bo);
  Scheduler none(SchedulerOptions{}, blocks);
  CHECK_THROWS_WITH(none.add(1, {1, 2, 3}, 2, 0, true), Catch::Contains("a row per prefill token"));
}
