// [Quantizers] item 4: what int8, fp8 and int4 weights (round-to-nearest and AWQ) cost in accuracy,
// end to end on the CPU with float32 compute, so the weights are the only change.
//
// usage: loom_quant_accuracy [MODEL_DIR [HELD_OUT_TEXT [CALIBRATION_TEXT]]]
//   defaults: models/tiny-kjv, tests/fixtures/text/kjv_heldout.txt (held-out verses) and
//   tests/fixtures/text/kjv_calibration.txt (training verses, for AWQ's scale search)
//
// For each weight format the runtime is built from a manifest ([quantizer] use = ...; [model]
// dtype = "float32"; sdpa attention with a float32 cache) and the model is scored on the
// held-out text (bench/perplexity.hpp). The baseline is the checkpoint's own weights (bf16 for
// the default model). Also printed per format: the mean over linears of the relative weight
// error |W - W~| / |W| and output error |x (W - W~)^T| / |x W^T| on calibration rows, as the
// CPU backend measured and logged them per layer (stderr). Prints a Markdown table (the one in
// BENCHMARKS.md).
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "calibration.hpp"
#include "cpu_backend.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/core/tokenizer.hpp"
#include "perplexity.hpp"

namespace fs = std::filesystem;

namespace {

constexpr int64_t kCalibrationTokens = 2048;

struct Format {
  std::string label;
  std::string quantizer; // the [quantizer] table's body; empty: none
  double bits = 16;      // stored bits per weight, scales and zero points included
  bool calibrated = false;
};

std::string manifest(const fs::path &model, const std::string &quantizer) {
  std::string m = "[loom]\ndevice = \"cpu\"\nthreads = 2\n[model]\npath = \"" + model.string() +
                  "\"\ndtype = \"float32\"\n[attention]\nuse = \"sdpa\"\nblock_size = 16\n[[sampler]]\nuse = \"greedy\"\n";
  if (!quantizer.empty()) m += "[quantizer]\n" + quantizer;
  return m;
}

}  // namespace

int main(int argc, char **argv) {
  const fs::path src(LOOM_SOURCE_DIR);
  const fs::path model = argc > 1 ? fs::path(argv[1]) : src / "models/tiny-kjv";
  const fs::path text = argc > 2 ? fs::path(argv[2]) : src / "tests/fixtures/text/kjv_heldout.txt";
  const fs::path calibration = argc > 3 ? fs::path(argv[3]) : src / "tests/fixtures/text/kjv_calibration.txt";
  try {
    const loom::ModelConfig config = loom::load_model_config(model);
    const auto tokenizer = loom::Tokenizer::load(model);
    if (!tokenizer) throw std::runtime_error(model.string() + " has no tokenizer");
    const bench::HeldOut held_out = bench::load_held_out(text, *tokenizer, config);
    loom::Manifest calib;
    calib.source_name = "<quant_accuracy>";
    calib.calibration_path = calibration;
    calib.calibration_tokens = kCalibrationTokens;
    const auto sequences = loom::calibration_sequences(calib, tokenizer.get(), config.max_positions);

    std::vector<Format> formats = {{"bf16 (checkpoint)", "", 16, false},
                                   {"int8 per-channel", "use = \"int8\"\n", 8, false},
                                   // fp8 also rounds the activations (dynamic scales): its
                                   // perplexity includes that, the logged errors (dequantized
                                   // weights on float activations) do not.
                                   {"fp8 E4M3 per-channel, per-token activations", "use = \"fp8\"\n", 8, false},
                                   {"fp8 E4M3 per-tensor, per-tensor activations",
                                    "use = \"fp8\"\nweight_scale = \"per-tensor\"\nactivation_scale = \"per-tensor\"\n", 8,
                                    false}};
    for (int group : {128, 64, 32}) {
      bool divides = true; // every linear's input width (hidden and intermediate sizes)
      for (int64_t in : {config.hidden_size, config.intermediate_size, config.n_heads * config.head_dim})
        divides = divides && in % group == 0;
      if (!divides) continue;
      const double bits = 4.0 + (32.0 + 8.0) / group; // float32 scale + uint8 zero per group
      const std::string g = "group_size = " + std::to_string(group) + "\n";
      formats.push_back({"int4 g" + std::to_string(group) + " RTN", "use = \"int4\"\n" + g, bits, false});
      formats.push_back({"int4 g" + std::to_string(group) + " AWQ", "use = \"int4\"\nmethod = \"awq\"\n" + g, bits, true});
    }

    std::printf("held-out text: %s, %lld tokens in %zu windows; calibration: %s, %lld tokens in %zu sequences; "
                "float32 compute, float32 KV cache\n\n",
                text.filename().c_str(), static_cast<long long>(held_out.tokens), held_out.windows.size(),
                calibration.filename().c_str(), static_cast<long long>(kCalibrationTokens), sequences.size());
    std::printf("| weights | bits per weight | perplexity | vs bf16 | mean weight error | mean output error |\n");
    std::printf("| --- | ---: | ---: | ---: | ---: | ---: |\n");
    double base = 0;
    for (const Format &f : formats) {
      auto rt = loom::Runtime::from_string(manifest(model, f.quantizer), "<quant_accuracy>");
      loom::CpuBackendOptions options;
      options.dtype = loom::ComputeDtype::float32;
      options.threads = 2;
      options.source_name = "<quant_accuracy>";
      if (f.calibrated || !f.quantizer.empty()) options.calibration = sequences; // output errors for all
      loom::CpuBackend backend(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(model)),
                               rt->pipeline(), options);
      int64_t scored = 0;
      const double ppl = bench::perplexity(backend, held_out, config.vocab_size, scored);
      if (f.quantizer.empty()) base = ppl;
      double we = 0, oe = 0;
      const auto &errors = backend.quantization_errors();
      for (const auto &e : errors) {
        we += e.weight_error;
        oe += e.output_error;
      }
      const auto n = static_cast<double>(errors.size());
      if (errors.empty())
        std::printf("| %s | %.2f | %.4f | %+.3f%% | - | - |\n", f.label.c_str(), f.bits, ppl, 100.0 * (ppl / base - 1.0));
      else
        std::printf("| %s | %.2f | %.4f | %+.3f%% | %.3e | %.3e |\n", f.label.c_str(), f.bits, ppl,
                    100.0 * (ppl / base - 1.0), we / n, oe / n);
      std::fflush(stdout);
    }
  } catch (const std::exception &e) {
    std::fprintf(stderr, "loom_quant_accuracy: %s\n", e.what());
    return 1;
  }
  return 0;
}
