// [Batching] item 5, Loom's side: serves a fixed set of requests through the runtime's
// continuous-batching scheduler ([scheduler], core/serving.cpp) and prints one JSON
// line per batch limit: output tokens/s, time to first token and inter-token latency (p50, p99).
//
// usage: loom_serve_bench MODEL_DIR REQUESTS_JSON [--batches 32,64,128] [--max-batched-tokens N]
//                         [--attention flash] [--device cuda]
// REQUESTS_JSON: {"prompts": [[ids...], ...], "output_lens": [n, ...]} (bench/serve_vs_hf.py
// writes it). Every request arrives at time 0 (an offline batch, as in vLLM's throughput
// benchmark), greedy, no stop token: each generates exactly its output_len tokens.
//
// Timing: each batch limit runs twice in one runtime; the second run is reported (the first makes
// the one-time state: weights on the device, cuBLAS handles, the decode CUDA graphs of each batch
// size). Times are host wall-clock at the token callback, which runs after each step's tokens
// reach the host. TTFT of a request = its first token's time - the run's start; ITL = the gaps
// between a request's consecutive tokens; throughput = all output tokens / the run's time.
// full_decode_steps: [seconds, KV positions] of each step that decoded the full batch and nothing
// else (the scheduler's step log), for the decode-step roofline of serve_vs_hf.py.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_args.hpp"
#include "loom/core/error.hpp"
#include "loom/core/runtime.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double at = p * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(at);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (at - static_cast<double>(lo));
}

} // namespace

int main(int argc, char **argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL_DIR REQUESTS_JSON [--batches 32,64,128] [--max-batched-tokens N] "
                         "[--attention flash] [--device cuda]\n", argv[0]);
    return 2;
  }
  const std::string model = argv[1];
  std::vector<int> batches = {32, 64, 128};
  int max_batched_tokens = 8192;
  std::string attention = "flash", device = "cuda";
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string key = argv[i], value = argv[i + 1];
    if (key == "--batches") batches = loom_bench::parse_int_list(value);
    else if (key == "--max-batched-tokens") max_batched_tokens = std::stoi(value);
    else if (key == "--attention") attention = value;
    else if (key == "--device") device = value;
    else {
      std::fprintf(stderr, "unknown option %s\n", key.c_str());
      return 2;
    }
  }
  nlohmann::json requests;
  {
    std::ifstream in(argv[2]);
    if (!in) {
      std::fprintf(stderr, "cannot read %s\n", argv[2]);
      return 2;
    }
    requests = nlohmann::json::parse(in);
  }
  const auto prompts = requests.at("prompts").get<std::vector<std::vector<int32_t>>>();
  const auto output_lens = requests.at("output_lens").get<std::vector<int64_t>>();
  if (prompts.size() != output_lens.size() || prompts.empty()) {
    std::fprintf(stderr, "%s: prompts and output_lens differ in length\n", argv[2]);
    return 2;
  }
  std::string run = "[run]\nstop_tokens = []\nprompts = " + nlohmann::json(prompts).dump() +
                    "\nprompt_steps = " + nlohmann::json(output_lens).dump() + "\n";
  try {
    for (int batch : batches) {
      const std::string manifest = "[loom]\ndevice = \"" + device + "\"\n[model]\npath = \"" + model +
                                   "\"\ndtype = \"bfloat16\"\n[attention]\nuse = \"" + attention +
                                   "\"\nblock_size = 16\n[[sampler]]\nuse = \"greedy\"\n[scheduler]\nmax_seqs = " +
                                   std::to_string(batch) + "\nmax_batched_tokens = " + std::to_string(max_batched_tokens) +
                                   "\n" + run;
      auto rt = loom::Runtime::from_string(manifest, "serve_bench");
      for (int rep = 0; rep < 2; ++rep) {
        std::vector<std::vector<double>> times(prompts.size());
        const auto start = Clock::now();
        const loom::RunResult r = rt->run(0, nullptr, [&](int32_t seq, int32_t, int32_t) {
          times[static_cast<size_t>(seq)].push_back(std::chrono::duration<double>(Clock::now() - start).count());
          return true;
        });
        const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
        if (rep == 0) continue;
        std::vector<double> ttft, itl;
        int64_t generated = 0;
        for (size_t i = 0; i < times.size(); ++i) {
          generated += static_cast<int64_t>(times[i].size());
          if (static_cast<int64_t>(times[i].size()) != output_lens[i]) {
            std::fprintf(stderr, "request %zu generated %zu tokens, not %lld\n", i, times[i].size(),
                         static_cast<long long>(output_lens[i]));
            return 1;
          }
          ttft.push_back(times[i].front());
          for (size_t t = 1; t < times[i].size(); ++t) itl.push_back(times[i][t] - times[i][t - 1]);
        }
        // Decode steps at the full batch: every sequence of the batch limit decodes one token and
        // nothing prefills, after a step that also sampled (a prefill-only step does not wait for
        // the device, so its work would spill into the next step's time). [seconds, context].
        nlohmann::json full_decode = nlohmann::json::array();
        const auto &log = r.scheduler.step_log;
        for (size_t s = 1; s < log.size(); ++s)
          if (log[s].sequences == batch && log[s].tokens == batch && log[s].sampled == batch && log[s - 1].sampled > 0)
            full_decode.push_back({log[s].seconds, log[s].context});
        nlohmann::json out = {{"side", "loom"},
                              {"batch", batch},
                              {"requests", prompts.size()},
                              {"output_tokens", generated},
                              {"seconds", seconds},
                              {"output_tok_s", static_cast<double>(generated) / seconds},
                              {"ttft_p50_ms", 1e3 * percentile(ttft, 0.5)},
                              {"ttft_p99_ms", 1e3 * percentile(ttft, 0.99)},
                              {"itl_p50_ms", 1e3 * percentile(itl, 0.5)},
                              {"itl_p99_ms", 1e3 * percentile(itl, 0.99)},
                              {"steps", r.scheduler.steps},
                              {"preemptions", r.scheduler.preemptions},
                              {"kv_blocks", r.scheduler.kv_blocks},
                              {"full_decode_steps", full_decode},
                              {"backend", rt->backend_description()}};
        std::printf("%s\n", out.dump().c_str());
        std::fflush(stdout);
      }
    }
  } catch (const loom::Error &e) {
    std::fprintf(stderr, "loom_serve_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
