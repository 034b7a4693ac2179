// [Speculative] item 5: batch-1 decode with and without drafts, through the runtime's serving
// loop. For every prompt of a JSONL file ({"workload": name, "prompt": text}), one request at a
// time (max_seqs = 1), `--steps` greedy tokens with no stop token, under each mode: plain
// decoding, prompt lookup (ngram) and a draft model, each with k = --k drafts per step (and the
// draft model with adaptive k). A request's decode rate is (tokens - 1) / (time of its last token
// - time of its first), so the prefill is left out. Prints, per workload and mode, the median
// decode rate over the prompts, the speed-up over plain decoding (median of the per-prompt
// ratios), the acceptance rate, the mean tokens per target forward pass, and how many prompts
// got exactly the plain tokens; then one JSON line per row.
// --temperature T > 0 samples instead (temperature T, then `dist`, seed 0 for every request)
// and adds a mode whose draft model samples its drafts at T, verified against their q
// (min(1, p/q)); its tokens follow the same distribution, not the plain run's draws.
//
// usage: loom_speculative_bench --target DIR --draft DIR --prompts FILE [--steps 128] [--k 4]
//        [--device cuda] [--attention flash] [--draft-attention sdpa] [--repeat 1] [--ids OUT.jsonl]
//        [--temperature 0]
// --ids writes each prompt's token ids and its plain greedy tokens ({"workload", "prompt_ids",
// "tokens"}), for bench/speculative_vs_hf.py's peer runs on the same inputs.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom/core/error.hpp"
#include "loom/core/request_queue.hpp"
#include "loom/core/runtime.hpp"

namespace {

using Clock = std::chrono::steady_clock;

struct Prompt {
  std::string workload, text;
};

struct Outcome {
  std::vector<int32_t> tokens;
  double rate = 0; // decode tokens/s
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Serves `prompt` alone and times its tokens.
Outcome serve_one(loom::Runtime &rt, const std::vector<int32_t> &prompt, int steps, loom::SchedulerStats &stats) {
  loom::RequestQueue queue;
  std::vector<Clock::time_point> at;
  Outcome out;
  loom::ServeRequest r;
  r.prompt = prompt;
  r.max_new_tokens = steps;
  r.on_token = [&](int64_t, int32_t) {
    at.push_back(Clock::now());
    return true;
  };
  r.on_done = [&](const loom::SequenceResult &res, const std::string &error) {
    if (!error.empty()) throw loom::runtime_error("request refused: " + error);
    out.tokens = res.tokens;
  };
  queue.submit(std::move(r));
  queue.close();
  stats = rt.serve(queue, static_cast<int64_t>(prompt.size()) + steps);
  if (at.size() >= 2)
    out.rate = double(at.size() - 1) / std::chrono::duration<double>(at.back() - at.front()).count();
  return out;
}

} // namespace

int main(int argc, char **argv) {
  std::map<std::string, std::string> a{{"--steps", "128"},   {"--k", "4"},          {"--device", "cuda"},
                                       {"--attention", "flash"}, {"--draft-attention", "sdpa"}, {"--repeat", "1"},
                                       {"--temperature", "0"}};
  for (int i = 1; i + 1 < argc; i += 2) a[argv[i]] = argv[i + 1];
  for (const char *need : {"--target", "--draft", "--prompts"})
    if (!a.count(need)) {
      std::cerr << "usage: loom_speculative_bench --target DIR --draft DIR --prompts FILE [--steps N] [--k K] "
                   "[--device cuda] [--attention flash] [--draft-attention sdpa] [--repeat R] [--temperature T]\n";
      return 2;
    }
  try {
    const int steps = std::stoi(a["--steps"]), k = std::stoi(a["--k"]), repeat = std::stoi(a["--repeat"]);
    const double temperature = std::stod(a["--temperature"]);
    const std::string chain = temperature > 0 ? "[[sampler]]\nuse = \"temperature\"\nt = " + a["--temperature"] +
                                                    "\n[[sampler]]\nuse = \"dist\"\n"
                                              : "[[sampler]]\nuse = \"greedy\"\n";
    std::vector<Prompt> prompts;
    std::ifstream in(a["--prompts"]);
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) {
        const auto j = nlohmann::json::parse(line);
        prompts.push_back({j.at("workload").get<std::string>(), j.at("prompt").get<std::string>()});
      }
    if (prompts.empty()) throw loom::runtime_error(a["--prompts"] + ": no prompts");
    const std::string head = "[loom]\ndevice = " + nlohmann::json(a["--device"]).dump() + "\nseed = 0\n[model]\npath = " +
                             nlohmann::json(a["--target"]).dump() + "\n[attention]\nuse = " +
                             nlohmann::json(a["--attention"]).dump() + "\n" + chain + "[run]\nstop_tokens = []\n"
                             "prompt = \"x\"\n[scheduler]\nmax_seqs = 1\nspeculative_tokens = " + std::to_string(k) + "\n";
    const std::string draft_model = "[drafter]\nuse = \"draft-model\"\nmodel = " + nlohmann::json(a["--draft"]).dump() +
                                    "\nattention = " + nlohmann::json(a["--draft-attention"]).dump() + "\nmax_seqs = 1\n";
    struct Mode {
      std::string name, tables;
    };
    std::vector<Mode> modes = {{"plain", ""},
                               {"ngram k=" + std::to_string(k), "[drafter]\nuse = \"ngram\"\n"},
                               {"draft-model k=" + std::to_string(k), draft_model},
                               {"draft-model adaptive", "speculative_adaptive = true\n" + draft_model}};
    if (temperature > 0)
      modes.push_back({"draft-model sampled k=" + std::to_string(k), draft_model + "temperature = " + a["--temperature"] + "\n"});
    // results[mode][prompt]
    std::vector<std::vector<Outcome>> results(modes.size());
    std::vector<std::vector<loom::SchedulerStats>> stats(modes.size());
    std::string device;
    for (size_t m = 0; m < modes.size(); ++m) {
      auto rt = loom::Runtime::from_string(head + modes[m].tables, "speculative bench " + modes[m].name);
      device = rt->backend_description();
      loom::SchedulerStats warm;
      serve_one(*rt, rt->encode_text(prompts.front().text, "warm-up"), std::min(steps, 16), warm);
      for (const Prompt &p : prompts) {
        const auto ids = rt->encode_text(p.text, "prompt");
        Outcome best;
        loom::SchedulerStats best_stats;
        for (int r = 0; r < repeat; ++r) { // the fastest of `repeat` runs (the same tokens each time)
          loom::SchedulerStats s;
          Outcome o = serve_one(*rt, ids, steps, s);
          if (o.rate > best.rate) {
            best = std::move(o);
            best_stats = s;
          }
        }
        results[m].push_back(std::move(best));
        stats[m].push_back(best_stats);
      }
    }
    std::vector<std::string> workloads;
    for (const Prompt &p : prompts)
      if (std::find(workloads.begin(), workloads.end(), p.workload) == workloads.end()) workloads.push_back(p.workload);
    std::printf("device: %s; %zu prompts, %d %s tokens each, batch 1\n\n", device.c_str(), prompts.size(), steps,
                temperature > 0 ? ("sampled (temperature " + a["--temperature"] + ")").c_str() : "greedy");
    std::printf("| workload | mode | decode tokens/s (median) | speed-up vs plain (median) | acceptance | tokens per target pass | same tokens as plain |\n");
    std::printf("| --- | --- | ---: | ---: | ---: | ---: | ---: |\n");
    std::vector<nlohmann::json> lines;
    for (const std::string &w : workloads) {
      for (size_t m = 0; m < modes.size(); ++m) {
        std::vector<double> rates, ratios;
        int64_t drafted = 0, accepted = 0, passes = 0, tokens = 0, same = 0, count = 0;
        for (size_t i = 0; i < prompts.size(); ++i) {
          if (prompts[i].workload != w) continue;
          ++count;
          rates.push_back(results[m][i].rate);
          ratios.push_back(results[m][i].rate / results[0][i].rate);
          drafted += stats[m][i].drafted_tokens;
          accepted += stats[m][i].accepted_tokens;
          // (The first step is the prefill; every later one is a decode or verification pass.)
          passes += stats[m][i].steps - 1;
          tokens += static_cast<int64_t>(results[m][i].tokens.size()) - 1;
          same += results[m][i].tokens == results[0][i].tokens;
        }
        const double acceptance = drafted > 0 ? double(accepted) / double(drafted) : 0.0;
        const double per_pass = passes > 0 ? double(tokens) / double(passes) : 0.0;
        char accepted_cell[32] = "-";
        if (m > 0) std::snprintf(accepted_cell, sizeof accepted_cell, "%.1f%%", 100.0 * acceptance);
        std::printf("| %s | %s | %.1f | %.2fx | %s | %.2f | %lld of %lld |\n", w.c_str(), modes[m].name.c_str(), median(rates),
                    median(ratios), accepted_cell, per_pass, static_cast<long long>(same), static_cast<long long>(count));
        lines.push_back({{"workload", w}, {"mode", modes[m].name}, {"decode_tokens_per_s", median(rates)},
                         {"speedup", median(ratios)}, {"acceptance", acceptance}, {"tokens_per_pass", per_pass},
                         {"same_as_plain", same}, {"prompts", count}, {"device", device}});
      }
    }
    std::printf("\n");
    for (const auto &l : lines) std::printf("%s\n", l.dump().c_str());
    if (a.count("--ids")) {
      auto rt = loom::Runtime::from_string(head, "speculative bench ids");
      std::ofstream ids(a["--ids"]);
      for (size_t i = 0; i < prompts.size(); ++i)
        ids << nlohmann::json{{"workload", prompts[i].workload},
                              {"prompt_ids", rt->encode_text(prompts[i].text, "prompt")},
                              {"tokens", results[0][i].tokens}}.dump()
            << "\n";
    }
    return 0;
  } catch (const std::exception &e) {
    std::cerr << "loom_speculative_bench: " << e.what() << "\n";
    return 1;
  }
}
