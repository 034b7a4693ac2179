// [Batching] item 1: what storing the KV cache as bf16, int8 or fp8 (sdpa's kv_dtype) costs in
// accuracy, end to end on the CPU with float32 compute, so the cache dtype is the only change.
//
// usage: loom_kv_dtype_accuracy [MODEL_DIR [TEXT_FILE]]
//   defaults: models/tiny-kjv and tests/fixtures/text/kjv_heldout.txt (held-out verses)
//
// For each kv_dtype ("auto" = the float32 cache, then bf16, int8, fp8) the runtime is built
// from a manifest ([attention] use = "sdpa", kv_dtype = ...; [model] dtype = "float32"), and
//  - perplexity on the text (bench/perplexity.hpp);
//  - greedy agreement: the first verse of each window as a prompt, 256 greedy tokens after each
//    through Runtime::run() (stop tokens off), compared position by position with the float32
//    cache's tokens; also, per prompt, the first position where they part.
// Prints a Markdown table (the one in BENCHMARKS.md).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "cpu_backend.hpp"
#include "perplexity.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/core/tokenizer.hpp"

namespace fs = std::filesystem;

namespace {

constexpr int kSteps = 256;

std::string manifest(const fs::path &model, const std::string &kv, const std::string &prompt) {
  // A TOML literal string: the verses hold no apostrophes, and the prompts are checked below.
  return "[loom]\ndevice = \"cpu\"\nthreads = 2\n[model]\npath = \"" + model.string() +
         "\"\ndtype = \"float32\"\n[attention]\nuse = \"sdpa\"\nblock_size = 16\nkv_dtype = \"" + kv +
         "\"\n[[sampler]]\nuse = \"greedy\"\n[run]\nprompt = '" + prompt + "'\nsteps = " + std::to_string(kSteps) +
         "\nstop_tokens = []\n";
}

struct Row {
  std::string kv;
  double ppl = 0;
  int64_t scored = 0;
  std::vector<std::vector<int32_t>> tokens;  // per prompt
};

}  // namespace

int main(int argc, char **argv) {
  const fs::path src(LOOM_SOURCE_DIR);
  const fs::path model = argc > 1 ? fs::path(argv[1]) : src / "models/tiny-kjv";
  const fs::path text = argc > 2 ? fs::path(argv[2]) : src / "tests/fixtures/text/kjv_heldout.txt";
  try {
    const loom::ModelConfig config = loom::load_model_config(model);
    const auto tokenizer = loom::Tokenizer::load(model);
    if (!tokenizer) throw std::runtime_error(model.string() + " has no tokenizer");
    const bench::HeldOut held_out = bench::load_held_out(text, *tokenizer, config);
    const auto &windows = held_out.windows;
    const auto &prompts = held_out.first_verses;  // the first verse of each window
    const int64_t text_tokens = held_out.tokens;
    for (const auto &p : prompts)
      if (p.find('\'') != std::string::npos) throw std::runtime_error("a prompt holds an apostrophe: " + p);

    std::vector<Row> rows;
    for (const std::string kv : {"auto", "bf16", "int8", "fp8"}) {
      Row r;
      r.kv = kv;
      {
        // Perplexity over a backend of its own on this runtime's pipeline (its sdpa instance).
        auto rt = loom::Runtime::from_string(manifest(model, kv, prompts[0]), "<kv_dtype_accuracy>");
        loom::CpuBackendOptions options;
        options.dtype = loom::ComputeDtype::float32;
        options.threads = 2;
        options.source_name = "<kv_dtype_accuracy>";
        loom::CpuBackend backend(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(model)),
                                 rt->pipeline(), options);
        r.ppl = bench::perplexity(backend, held_out, config.vocab_size, r.scored);
      }
      for (const auto &p : prompts) r.tokens.push_back(loom::Runtime::from_string(manifest(model, kv, p), "<kv_dtype_accuracy>")->run().tokens);
      rows.push_back(std::move(r));
      std::fprintf(stderr, "%s done\n", kv.c_str());
    }

    std::printf("held-out text: %s, %lld tokens in %zu windows, %lld scored; greedy: %d tokens after each of %zu prompts\n\n",
                text.filename().c_str(), static_cast<long long>(text_tokens), windows.size(),
                static_cast<long long>(rows[0].scored), kSteps, prompts.size());
    std::printf("| kv_dtype | bytes per token per layer | perplexity | vs float32 | greedy tokens equal to float32's | first differing step, per prompt |\n");
    std::printf("| --- | --- | --- | --- | --- | --- |\n");
    const auto &base = rows[0].tokens;
    for (const Row &r : rows) {
      // Bytes per (token, layer): keys and values of every kv head, scales included.
      const int64_t kv_row = 2LL * config.n_kv_heads;
      const int64_t bytes = r.kv == "auto"   ? kv_row * config.head_dim * 4
                            : r.kv == "bf16" ? kv_row * config.head_dim * 2
                                             : kv_row * (config.head_dim + 4);
      size_t equal = 0, total = 0;
      std::string firsts;
      for (size_t k = 0; k < base.size(); ++k) {
        const size_t n = std::min(r.tokens[k].size(), base[k].size());
        size_t first = n;
        for (size_t i = 0; i < n; ++i) {
          if (r.tokens[k][i] == base[k][i]) ++equal;
          else first = std::min(first, i);
        }
        total += base[k].size();
        firsts += (k ? ", " : "") + (first == n ? std::string("none") : std::to_string(first));
      }
      std::printf("| %s | %lld | %.4f | %+.3f%% | %zu / %zu | %s |\n", r.kv == "auto" ? "auto (float32)" : r.kv.c_str(),
                  static_cast<long long>(bytes), r.ppl, 100.0 * (r.ppl / rows[0].ppl - 1.0), equal, total,
                  firsts.c_str());
    }
  } catch (const std::exception &e) {
    std::fprintf(stderr, "loom_kv_dtype_accuracy: %s\n", e.what());
    return 1;
  }
  return 0;
}
