// [PEFT] item 4 on the CPU: several LoRA adapters over one base model, chosen per request and
// batched together (each row masked to its own adapter); adapters loaded, unloaded, merged and
// unmerged while the runtime serves, with no request failing. Every request must get exactly the
// greedy tokens it gets run alone with only its adapter. The adapters are the PEFT interop
// fixtures (tests/fixtures/peft: one trained by Loom, one written by peft) on the default model.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <optional>
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

const fs::path kSource = LOOM_SOURCE_DIR;
const fs::path kKjv = kSource / "models/tiny-kjv";

// The [[adapter]] table (without its header) of one fixture adapter; "prefix": a prefix-tuning
// adapter of 5 virtual tokens with seeded random keys and values.
std::string lora_table(const std::string &fixture) {
  if (fixture == "prefix") return "use = \"prefix\"\nnum_virtual_tokens = 5\nseed = 9\n";
  return "use = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\nweights = \"" +
         (kSource / "tests/fixtures/peft" / fixture).string() + "\"\n";
}

// The default model on the CPU with the named adapters ({name, fixture}), in this order.
std::string manifest(const std::vector<std::pair<std::string, std::string>> &adapters, const std::string &tail) {
  std::string text = "[loom]\ndevice = \"cpu\"\nthreads = 2\nseed = 3\n[model]\npath = \"" + kKjv.string() +
                     "\"\n[attention]\nuse = \"sdpa\"\nblock_size = 4\n[[sampler]]\nuse = \"greedy\"\n";
  for (const auto &[name, fixture] : adapters) text += "[[adapter]]\nname = \"" + name + "\"\n" + lora_table(fixture);
  return text + tail;
}

struct Prompts {
  std::vector<std::vector<int32_t>> ids;
  std::vector<int64_t> steps;
};

// `n` prompts of 6 to 20 tokens, every third one starting with the same 12 tokens (so that
// requests with different adapters share prefixes the cache must keep apart).
Prompts make_prompts(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_int_distribution<int32_t> token(3, 1999), length(6, 20), steps(4, 16);
  std::vector<int32_t> shared(12);
  for (auto &t : shared) t = token(g);
  Prompts p;
  for (size_t i = 0; i < n; ++i) {
    std::vector<int32_t> ids;
    if (i % 3 == 0) ids = shared;
    for (int32_t k = length(g); k > 0; --k) ids.push_back(token(g));
    p.ids.push_back(ids);
    p.steps.push_back(steps(g));
  }
  return p;
}

// Each prompt's greedy tokens with only `adapters` in the pipeline (a fixed batch, no scheduler).
std::vector<std::vector<int32_t>> alone(const Prompts &p, const std::vector<std::pair<std::string, std::string>> &adapters) {
  std::string prompts = "[", steps = "[";
  for (size_t i = 0; i < p.ids.size(); ++i) {
    prompts.append(i ? ", " : "").append(nlohmann::json(p.ids[i]).dump());
    steps.append(i ? ", " : "").append(std::to_string(p.steps[i]));
  }
  std::string run = "[run]\nstop_tokens = []\nprompts = ";
  run.append(prompts).append("]\nprompt_steps = ").append(steps).append("]\n");
  const loom::RunResult r = loom::Runtime::from_string(manifest(adapters, run))->run();
  std::vector<std::vector<int32_t>> out;
  for (const auto &s : r.sequences) out.push_back(s.tokens);
  return out;
}

const std::pair<std::string, std::string> kBible{"bible", "loom-lora"}, kPeft{"peft", "peft-lora"}, kPrefix{"pre", "prefix"};

// Expected tokens per choice: unset (every adapter), "" (none), "bible", "peft".
std::map<std::string, std::vector<std::vector<int32_t>>> expectations(const Prompts &p) {
  std::map<std::string, std::vector<std::vector<int32_t>>> e;
  e["*"] = alone(p, {kBible, kPeft});
  e[""] = alone(p, {});
  e["bible"] = alone(p, {kBible});
  e["peft"] = alone(p, {kPeft});
  return e;
}

std::string key_of(const std::optional<std::string> &choice) { return choice ? *choice : "*"; }

// A request for prompt i with `choice`, recording its tokens and error.
struct Outcome {
  std::string choice;
  size_t prompt = 0;
  std::vector<int32_t> tokens;
  std::string error;
  bool done = false;
};

loom::ServeRequest request(const Prompts &p, size_t i, const std::optional<std::string> &choice, Outcome &out) {
  out.choice = key_of(choice);
  out.prompt = i;
  loom::ServeRequest r;
  r.prompt = p.ids[i];
  r.max_new_tokens = p.steps[i];
  r.adapter = choice;
  r.on_done = [&out](const loom::SequenceResult &result, const std::string &error) {
    out.tokens = result.tokens;
    out.error = error;
    out.done = true;
  };
  return r;
}

} // namespace

TEST_CASE("requests with different adapters in one batch get the tokens each gets alone with its adapter",
          "[peft][serve]") {
  const Prompts p = make_prompts(12, 21);
  const auto expected = expectations(p);
  // The adapters matter (else this test could not fail): each changes some prompt's tokens.
  CHECK(expected.at("bible") != expected.at(""));
  CHECK(expected.at("peft") != expected.at(""));
  CHECK(expected.at("bible") != expected.at("peft"));

  auto rt = loom::Runtime::from_string(manifest({kBible, kPeft}, "[scheduler]\nmax_seqs = 8\nmax_batched_tokens = 48\n"
                                                                 "[run]\nprompt = [1]\nstop_tokens = []\n"));
  loom::RequestQueue queue;
  const std::vector<std::optional<std::string>> choices{std::string("bible"), std::string("peft"), std::string(""),
                                                        std::nullopt};
  // Every prompt under every choice: 48 requests, rows of all four kinds in the same steps, and
  // the same prompts (and the shared prefix) under different adapters.
  std::vector<Outcome> outcomes(p.ids.size() * choices.size());
  for (size_t i = 0; i < p.ids.size(); ++i)
    for (size_t c = 0; c < choices.size(); ++c)
      queue.submit(request(p, i, choices[c], outcomes[i * choices.size() + c]));
  Outcome unknown;
  queue.submit(request(p, 0, std::string("shakespeare"), unknown));
  queue.close();
  const loom::SchedulerStats stats = rt->serve(queue, 64);
  CHECK(stats.cached_tokens > 0); // the same adapter's shared prefixes still hit
  for (const Outcome &o : outcomes) {
    INFO("prompt " << o.prompt << " with adapter '" << o.choice << "'");
    CHECK(o.done);
    CHECK(o.error.empty());
    CHECK(o.tokens == expected.at(o.choice)[o.prompt]);
  }
  CHECK(unknown.done);
  CHECK(unknown.tokens.empty());
  CHECK(unknown.error == "adapter 'shakespeare' is not loaded (loaded: bible, peft)");
}

TEST_CASE("adapters load, merge, unmerge and unload while serving, and no request fails", "[peft][serve]") {
  const Prompts p = make_prompts(9, 5);
  const auto expected = expectations(p);
  auto rt = loom::Runtime::from_string(manifest({}, "[scheduler]\nmax_seqs = 6\nmax_batched_tokens = 32\n"
                                                    "[run]\nprompt = [1]\nstop_tokens = []\n"));
  loom::RequestQueue queue;
  std::vector<Outcome> outcomes(64);
  size_t next = 0;
  std::atomic<int64_t> tokens_seen{0};
  std::string producer_error;
  Outcome late; // names "bible" after its unload
  auto submit = [&](size_t i, const std::optional<std::string> &choice) {
    loom::ServeRequest r = request(p, i % p.ids.size(), choice, outcomes.at(next++));
    r.on_token = [&](int64_t, int32_t) {
      ++tokens_seen;
      return true;
    };
    queue.submit(std::move(r));
  };
  // Waits until the server has produced `more` tokens since the call (so the requests before it
  // are running when the pipeline changes).
  auto progress = [&](int64_t more) {
    const int64_t target = tokens_seen.load() + more;
    for (int k = 0; k < 20000 && tokens_seen.load() < target; ++k) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  };
  std::thread producer([&] {
    try {
      for (size_t i = 0; i < 3; ++i) submit(i, std::string(""));
      progress(4);
      rt->load_adapter("bible", lora_table("loom-lora"));
      for (size_t i = 0; i < 6; ++i) submit(i, i % 2 ? std::optional<std::string>(std::string("bible")) : std::string(""));
      progress(6);
      rt->merge_adapter("bible"); // its rows run on the merged weights, the others take it out again
      for (size_t i = 3; i < 9; ++i) submit(i, i % 2 ? std::optional<std::string>(std::string("bible")) : std::string(""));
      progress(6);
      rt->load_adapter("peft", lora_table("peft-lora"));
      for (size_t i = 0; i < 6; ++i) submit(i, i % 3 == 0 ? std::string("peft") : i % 3 == 1 ? std::string("bible") : std::string(""));
      progress(6);
      rt->unmerge_adapter("bible");
      for (size_t i = 2; i < 8; ++i) submit(i, i % 2 ? std::string("bible") : std::string("peft"));
      progress(2);
      rt->unload_adapter("bible"); // waits for the bible requests in flight
      queue.submit(request(p, 1, std::string("bible"), late));
      for (size_t i = 0; i < 4; ++i) submit(i, std::string("peft"));
    } catch (const std::exception &e) {
      producer_error = e.what();
    }
    queue.close();
  });
  rt->serve(queue, 64);
  producer.join();
  CHECK(producer_error.empty());
  INFO(producer_error);
  CHECK(next == 31);
  for (size_t k = 0; k < next; ++k) {
    const Outcome &o = outcomes[k];
    INFO("request " << k << ": prompt " << o.prompt << " with adapter '" << o.choice << "'");
    CHECK(o.done);
    CHECK(o.error.empty());
    CHECK(o.tokens == expected.at(o.choice)[o.prompt]);
  }
  CHECK(late.done);
  CHECK(late.error == "adapter 'bible' is not loaded (loaded: peft)");
}

TEST_CASE("adapter management refuses what it cannot do, by name", "[peft][serve]") {
  auto rt = loom::Runtime::from_string(manifest({kBible}, "[run]\nprompt = [1]\n"));
  CHECK_THROWS_WITH(rt->load_adapter("bible", lora_table("peft-lora")), Catch::Contains("add bible: the slot is taken"));
  CHECK_THROWS_WITH(rt->load_adapter("x", "use = \"lora\"\nr = 0\ntarget_modules = [\"q_proj\"]\n"),
                    Catch::Contains("r must be in [1, 65536]"));
  CHECK_THROWS_WITH(rt->unload_adapter("attention"), Catch::Contains("unload attention: the slot holds a attention"));
  CHECK_THROWS_WITH(rt->merge_adapter("nothing"), Catch::Contains("no component in slot 'nothing'"));
  rt->merge_adapter("bible");
  rt->load_adapter("peft", lora_table("peft-lora"));
  CHECK_THROWS_WITH(rt->merge_adapter("peft"), Catch::Contains("bible is merged already"));
  rt->unload_adapter("bible"); // unmerges as it leaves
  rt->merge_adapter("peft");
  rt->unmerge_adapter("peft");
  const auto tokens = rt->run().tokens;
  CHECK(tokens == loom::Runtime::from_string(manifest({kPeft}, "[run]\nprompt = [1]\n"))->run().tokens);
}

TEST_CASE("a prefix adapter chosen per request: its requests and others in one batch get their tokens alone",
          "[peft][serve]") {
  // Requests with the prefix adapter carry its 5 virtual tokens before their prompts (KV
  // positions holding its keys and values); the others do not; one batch holds both kinds, and
  // the prefix blocks of one request serve the next (the same adapter's domain).
  const Prompts p = make_prompts(8, 13);
  std::map<std::string, std::vector<std::vector<int32_t>>> expected;
  expected["pre"] = alone(p, {kPrefix});
  expected["bible"] = alone(p, {kBible});
  expected[""] = alone(p, {});
  expected["*"] = alone(p, {kPrefix, kBible});
  CHECK(expected.at("pre") != expected.at(""));
  auto rt = loom::Runtime::from_string(manifest({kPrefix, kBible}, "[scheduler]\nmax_seqs = 6\nmax_batched_tokens = 40\n"
                                                                    "[run]\nprompt = [1]\nstop_tokens = []\n"));
  loom::RequestQueue queue;
  const std::vector<std::optional<std::string>> choices{std::string("pre"), std::string("bible"), std::string(""), std::nullopt};
  std::vector<Outcome> outcomes(p.ids.size() * choices.size());
  for (size_t i = 0; i < p.ids.size(); ++i)
    for (size_t c = 0; c < choices.size(); ++c) queue.submit(request(p, i, choices[c], outcomes[i * choices.size() + c]));
  queue.close();
  const loom::SchedulerStats stats = rt->serve(queue, 64);
  CHECK(stats.cached_tokens >= 4 * static_cast<int64_t>(p.ids.size() - 1));  // (the first full block of placeholders)
  for (const Outcome &o : outcomes) {
    INFO("prompt " << o.prompt << " with adapter '" << o.choice << "'");
    CHECK(o.error.empty());
    CHECK(o.tokens == expected.at(o.choice)[o.prompt]);
  }
  // A second prefix adapter in the same pipeline is refused, naming both.
  auto two = loom::Runtime::from_string(manifest({kPrefix, {"pre2", "prefix"}}, "[run]\nprompt = [1]\nsteps = 2\n"));
  CHECK_THROWS_WITH(two->run(), Catch::Contains("pre: pre2 is a prefix adapter already; one per pipeline"));
}
