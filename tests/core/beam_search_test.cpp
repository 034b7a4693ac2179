// Beam search through the runtime on the CPU (core/beam_search.cpp over the tiny fixtures):
// width 1 against greedy, wider beams against a host loop with no KV cache that recomputes every
// prefix on the reference model (so the cache copies and reordering are checked), batches
// against prompts alone, the log-probability against greedy's, manifest errors, and
// transformers' own beam search outputs when tests/fixtures/models/beam_golden.json exists.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../builtin/beam_host_loop.hpp"
#include "loom/core/error.hpp"
#include "loom/core/reference_model.hpp"
#include "loom/core/runtime.hpp"

namespace fs = std::filesystem;

namespace {

const fs::path kModels = fs::path(LOOM_SOURCE_DIR) / "tests/fixtures/models";
const char *const kFixtures[] = {"tiny-llama", "tiny-llama3-tied", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"};

nlohmann::json read_json(const fs::path &p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

std::string ids(const std::vector<int32_t> &v) { return nlohmann::json(v).dump(); }

std::string manifest(const std::string &model, const std::string &sampler, const std::string &run) {
  return "[model]\npath = \"" + (kModels / model).string() + "\"\n[attention]\nuse = \"sdpa\"\nblock_size = 4\n" +
         sampler + "[run]\n" + run;
}

std::string beams(int width, const std::string &lp = "1.0", const std::string &early = "false") {
  return "[[sampler]]\nuse = \"beam-search\"\nwidth = " + std::to_string(width) + "\nlength_penalty = " + lp +
         "\nearly_stopping = \"" + early + "\"\n";
}

const std::string kGreedy = "[[sampler]]\nuse = \"greedy\"\n";

const loom::ReferenceModel &reference(const std::string &name) {
  static std::map<std::string, loom::ReferenceModel> models;
  auto it = models.find(name);
  if (it == models.end()) it = models.emplace(name, loom::ReferenceModel::load(kModels / name)).first;
  return it->second;
}

// The reference model's logits after `prefix`.
bt::Model model_of(const std::string &name) {
  return [name](const std::vector<int32_t> &prefix) {
    auto all = reference(name).forward(prefix);
    const size_t vocab = all.size() / prefix.size();
    return std::vector<float>(all.end() - static_cast<std::ptrdiff_t>(vocab), all.end());
  };
}

// Sum of log p(token) over `generated` after `prompt`, from the reference model.
double total_logprob(const std::string &name, const std::vector<int32_t> &prompt, const std::vector<int32_t> &generated) {
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), generated.begin(), generated.end());
  auto logits = reference(name).forward(all);
  const size_t vocab = logits.size() / all.size();
  double sum = 0;
  for (size_t i = 0; i < generated.size(); ++i) {
    const float *row = logits.data() + (prompt.size() - 1 + i) * vocab;
    double mx = -INFINITY, s = 0;
    for (size_t v = 0; v < vocab; ++v) mx = std::max(mx, static_cast<double>(row[v]));
    for (size_t v = 0; v < vocab; ++v) s += std::exp(row[v] - mx);
    sum += row[generated[i]] - mx - std::log(s);
  }
  return sum;
}

std::vector<std::vector<int32_t>> prompts_of(const std::string &name) {
  std::vector<std::vector<int32_t>> out;
  const auto golden = read_json(kModels / name / "golden.json");
  for (const auto &c : golden["cases"]) out.push_back(c["input_ids"].get<std::vector<int32_t>>());
  REQUIRE(!out.empty());
  return out;
}

} // namespace

TEST_CASE("beam search of width 1 is greedy decoding", "[model][beams]") {
  for (const char *name : kFixtures)
    for (const auto &prompt : prompts_of(name))
      for (const char *stop : {"", "stop_tokens = []\n"}) {
        INFO(name << " " << ids(prompt) << " " << stop);
        const std::string run = "prompt = " + ids(prompt) + "\nsteps = 16\n" + stop;
        auto greedy = loom::Runtime::from_string(manifest(name, kGreedy, run))->run();
        // "false" with a positive length penalty ends as greedy does: an end token on top ends
        // the only beam, and no running beam can beat it at the same length.
        auto beam = loom::Runtime::from_string(manifest(name, beams(1), run))->run();
        CHECK(beam.tokens == greedy.tokens);
        CHECK(beam.stopped == greedy.stopped);
        if (*stop) // without end tokens every early-stopping mode runs to the last step
          CHECK(loom::Runtime::from_string(manifest(name, beams(1, "0.0", "never"), run))->run().tokens == greedy.tokens);
      }
}

TEST_CASE("beam search through the runtime equals a host loop without a KV cache", "[model][beams]") {
  // The runtime prefills once, copies KV slots and reorders beams; the loop here recomputes every
  // prefix on the reference model and only follows parents_out. Same hypotheses, or core's
  // bookkeeping is wrong.
  struct Config {
    int width;
    const char *lp, *early, *stop;
  };
  const Config configs[] = {{4, "1.0", "false", ""}, {3, "0.0", "never", "stop_tokens = []\n"},
                            {4, "2.0", "never", "stop_tokens = [2, 7, 9]\n"}, {2, "1.0", "true", "stop_tokens = [5, 11]\n"}};
  for (const char *name : {"tiny-llama", "tiny-gpt2", "tiny-mistral"})
    for (const Config &c : configs) {
      INFO(name << ": width " << c.width << ", length_penalty " << c.lp << ", early_stopping " << c.early << ", " << c.stop);
      const auto prompts = prompts_of(name);
      std::string list = "[";
      for (size_t i = 0; i < prompts.size(); ++i) list += (i ? ", " : "") + ids(prompts[i]);
      list += "]";
      auto rt = loom::Runtime::from_string(manifest(name, beams(c.width, c.lp, c.early),
                                                    "prompts = " + list + "\nsteps = 12\n" + c.stop));
      std::vector<std::vector<int32_t>> streamed(prompts.size());
      auto got = rt->run(0, {}, [&](int32_t seq, int32_t step, int32_t token) {
        CHECK(step == static_cast<int32_t>(streamed[static_cast<size_t>(seq)].size()));
        streamed[static_cast<size_t>(seq)].push_back(token);
        return true;
      });
      std::vector<int32_t> ends = {2};
      if (std::string(c.stop).find('[') != std::string::npos)
        ends = nlohmann::json::parse(std::string(c.stop).substr(std::string(c.stop).find('['))).get<std::vector<int32_t>>();
      auto &link = rt->pipeline().at("sampler[0]");
      for (size_t i = 0; i < prompts.size(); ++i) {
        auto want = bt::run_beams(link, model_of(name), {prompts[i]}, 256, ends, 12);
        CHECK(got.sequences[i].tokens == want[0].tokens);
        CHECK(streamed[i] == got.sequences[i].tokens);
        CHECK(got.sequences[i].stopped ==
              (!want[0].tokens.empty() && std::find(ends.begin(), ends.end(), want[0].tokens.back()) != ends.end()));
      }
    }
}

TEST_CASE("a batch of beam searches gives every prompt what it gets alone", "[model][beams][batch]") {
  const std::vector<std::vector<int32_t>> prompts = {{1, 17, 42, 99, 3}, {5}, {9, 9, 9, 9, 9, 9, 9}};
  for (const char *name : kFixtures) {
    INFO(name);
    const std::string sampler = "[[sampler]]\nuse = \"repetition-penalty\"\npenalty = 1.3\n" + beams(3, "1.0", "never");
    std::string list = "[";
    for (size_t i = 0; i < prompts.size(); ++i) list += (i ? ", " : "") + ids(prompts[i]);
    list += "]";
    auto batch = loom::Runtime::from_string(manifest(name, sampler, "prompts = " + list + "\nsteps = 10\n"))->run();
    REQUIRE(batch.sequences.size() == prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      auto alone = loom::Runtime::from_string(manifest(name, sampler, "prompt = " + ids(prompts[i]) + "\nsteps = 10\n"))->run();
      CHECK(batch.sequences[i].tokens == alone.tokens);
      CHECK(batch.sequences[i].stopped == alone.stopped);
    }
    CHECK(batch.tokens == batch.sequences[0].tokens);
  }
}

TEST_CASE("width 4 finds a continuation at least as likely as greedy's", "[model][beams]") {
  // Without end tokens and with length_penalty 0, a hypothesis' score is its total
  // log-probability over the same 16 tokens; the test recomputes both from the reference model.
  size_t better = 0, cases = 0;
  for (const char *name : kFixtures)
    for (const auto &prompt : prompts_of(name)) {
      INFO(name << " " << ids(prompt));
      const std::string run = "prompt = " + ids(prompt) + "\nsteps = 16\nstop_tokens = []\n";
      auto greedy = loom::Runtime::from_string(manifest(name, kGreedy, run))->run();
      auto beam = loom::Runtime::from_string(manifest(name, beams(4, "0.0", "never"), run))->run();
      REQUIRE(beam.tokens.size() == 16);
      const double g = total_logprob(name, prompt, greedy.tokens), b = total_logprob(name, prompt, beam.tokens);
      INFO("greedy " << g << ", beam " << b);
      CHECK(b >= g - 1e-4);
      ++cases;
      if (b > g + 1e-4) ++better;
    }
  INFO(better << " of " << cases << " beam continuations are strictly more likely than greedy's");
  CHECK(better > 0); // the tiny models are not so peaked that beams never help
}

TEST_CASE("beam search configurations are checked", "[model][beams][manifest]") {
  auto error_of = [](const std::string &m) -> std::string {
    try {
      loom::Runtime::from_string(m, "<test>")->run();
    } catch (const loom::Error &e) {
      return e.what();
    }
    return "";
  };
  const std::string run = "prompt = [1, 2, 3]\nsteps = 4\n";
  CHECK_THAT(error_of(manifest("tiny-llama", "[[sampler]]\nuse = \"beam-search\"\nwidth = 0\n", run)),
             Catch::Contains("<test>:8:") && Catch::Contains(": sampler[0].width") && Catch::Contains("width must be >= 1, got 0"));
  CHECK_THAT(error_of(manifest("tiny-llama", "[[sampler]]\nuse = \"beam-search\"\nearly_stopping = \"sometimes\"\n", run)),
             Catch::Contains("sampler[0].early_stopping") && Catch::Contains("\"true\", \"false\" or \"never\""));
  CHECK_THAT(error_of(manifest("tiny-llama", "[[sampler]]\nuse = \"beam-search\"\nearly_stopping = false\n", run)),
             Catch::Contains("sampler[0].early_stopping") && Catch::Contains("expected a string"));
  // Not last in the chain: the link after it would select again.
  CHECK_THAT(error_of(manifest("tiny-llama", beams(2) + kGreedy, run)), Catch::Contains("beam-search"));
  CHECK_THAT(error_of(manifest("../../../models/tiny-kjv", beams(2), run + "stop = [\"x\"]\n")),
             Catch::Contains("run.stop: stop strings are not supported with beam search"));
}

// Hidden ("[.golden]"): CTest runs it as its own test, core_beam_golden_test, which is reported
// as skipped (exit 77; this Catch2 2.13 has no SKIP) while the golden file is absent.
TEST_CASE("beam search matches transformers' generate(num_beams=4)", "[.golden][model][beams]") {
  // tests/fixtures/make_beam_golden.py writes the file on a machine with torch and transformers.
  const fs::path path = kModels / "beam_golden.json";
  if (!fs::exists(path)) {
    std::cout << "skipped: no " << path.string() << " (run tests/fixtures/make_beam_golden.py to make it)" << std::endl;
    std::exit(77);
  }
  const auto golden = read_json(path);
  size_t compared = 0;
  for (const auto &c : golden["cases"]) {
    const std::string name = c["model"], early = c["early_stopping"].is_string() ? c["early_stopping"].get<std::string>()
                                                                                  : (c["early_stopping"].get<bool>() ? "true" : "false");
    const auto prompt = c["input_ids"].get<std::vector<int32_t>>();
    const auto expected = c["generated"].get<std::vector<int32_t>>();
    INFO(name << " " << ids(prompt) << ": num_beams " << c["num_beams"] << ", length_penalty " << c["length_penalty"]
              << ", early_stopping " << early);
    auto rt = loom::Runtime::from_string(manifest(name, beams(c["num_beams"].get<int>(), c["length_penalty"].dump(), early),
                                                  "prompt = " + ids(prompt) + "\nsteps = " + c["max_new_tokens"].dump() +
                                                      "\nstop_tokens = " + c["eos_token_id"].dump() + "\n"));
    CHECK(rt->run().tokens == expected);
    ++compared;
  }
  CHECK(compared > 0);
}
