// Quantizers on the CPU backend: [model] calibration (text -> packed token sequences -> each
// linear's inputs handed to the quantizer), the per-linear quantization error the backend
// measures and logs, and the errors of a missing or unreadable calibration.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include "../../core/calibration.hpp"
#include "quant_test_support.hpp"
#include "../../core/cpu_backend.hpp"
#include "loom/core/error.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/core/tokenizer.hpp"

namespace fs = std::filesystem;

namespace {

using quant_test::kCalibration;
using quant_test::kKjv;

std::string manifest(const std::string &model_extra, const std::string &quantizer) {
  return "[loom]\ndevice = \"cpu\"\n[model]\npath = \"" + kKjv.string() + "\"\n" + model_extra +
         "[run]\nprompt = \"And God said\"\nsteps = 8\n[attention]\nuse = \"sdpa\"\nblock_size = 16\n"
         "[[sampler]]\nuse = \"greedy\"\n[quantizer]\n" +
         quantizer;
}

std::string run_error(const std::string &text) {
  try {
    loom::Runtime::from_string(text, "calib.toml")->run();
  } catch (const loom::Error &e) {
    return e.what();
  }
  return "";
}

size_t total(const std::vector<std::vector<int32_t>> &seqs) {
  return std::accumulate(seqs.begin(), seqs.end(), size_t{0}, [](size_t n, const auto &s) { return n + s.size(); });
}

// A backend of its own over a runtime's pipeline, quantizing at its first reserve.
struct Quantized {
  std::unique_ptr<loom::Runtime> rt;
  loom::ModelConfig config = loom::load_model_config(kKjv);
  std::unique_ptr<loom::CpuBackend> backend;
  Quantized(const std::string &quantizer, bool calibrated) {
    rt = loom::Runtime::from_string(manifest("", quantizer), "calib.toml");
    const auto options = quant_test::options("calib.toml", calibrated ? 600 : 0, 200, config.max_positions);
    backend = std::make_unique<loom::CpuBackend>(
        config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(kKjv)), rt->pipeline(), options);
    backend->reserve(1, 32);
  }
};

} // namespace

TEST_CASE("calibration text is packed in whole lines up to the token budget", "[quant][calibration]") {
  const fs::path file = fs::temp_directory_path() / "loom_calibration_test.txt";
  std::string long_line;
  for (int i = 0; i < 60; ++i) long_line += "and the LORD spake unto Moses ";
  {
    std::ofstream out(file);
    out << "In the beginning God created the heaven and the earth.\n\n   \nAnd God said, Let there be light.\n"
        << long_line << "\nAmen.\n";
  }
  auto tokenizer = loom::Tokenizer::load(kKjv);
  REQUIRE(tokenizer);
  const auto first = tokenizer->encode("In the beginning God created the heaven and the earth.", true);
  const auto second = tokenizer->encode("And God said, Let there be light.", true);
  const auto longer = tokenizer->encode(long_line, true);
  const auto last = tokenizer->encode("Amen.", true);
  REQUIRE(longer.size() > 64);
  loom::Manifest m;
  m.source_name = "t.toml";
  m.calibration_path = file;
  m.calibration_length = 64;
  m.calibration_tokens = 1 << 20;
  const auto all = loom::calibration_sequences(m, tokenizer.get(), 512);
  CHECK(total(all) == first.size() + second.size() + longer.size() + last.size());
  for (const auto &s : all) CHECK(s.size() <= 64);
  // The two short lines share the first sequence; the long one starts its own and is cut.
  std::vector<int32_t> both = first;
  both.insert(both.end(), second.begin(), second.end());
  CHECK(all.front() == both);
  CHECK(all[1] == std::vector<int32_t>(longer.begin(), longer.begin() + 64));
  CHECK(all[1].front() == first.front()); // BOS

  m.calibration_tokens = 30; // the budget cuts mid-line
  CHECK(total(loom::calibration_sequences(m, tokenizer.get(), 512)) == 30);
  m.calibration_length = 1000; // the model's context bounds a sequence too
  m.calibration_tokens = 1 << 20;
  for (const auto &s : loom::calibration_sequences(m, tokenizer.get(), 40)) CHECK(s.size() <= 40);
  fs::remove(file);

  m.calibration_path = file; // now missing
  CHECK_THROWS_WITH(loom::calibration_sequences(m, tokenizer.get(), 512),
                    Catch::Contains("t.toml: model.calibration") && Catch::Contains("cannot read"));
  m.calibration_path = kCalibration;
  CHECK_THROWS_WITH(loom::calibration_sequences(m, nullptr, 512), Catch::Contains("tokenizer"));
  m.calibration_path = fs::temp_directory_path() / "loom_calibration_blank.txt";
  std::ofstream(m.calibration_path) << "\n \n";
  CHECK_THROWS_WITH(loom::calibration_sequences(m, tokenizer.get(), 512), Catch::Contains("holds no text"));
  fs::remove(m.calibration_path);
}

TEST_CASE("the backend hands each linear its inputs and measures every quantized linear", "[quant][calibration]") {
  Quantized awq("use = \"int4\"\ngroup_size = 64\nmethod = \"awq\"\n", true);
  const auto &errors = awq.backend->quantization_errors();
  // 7 linears a layer and the head.
  REQUIRE(errors.size() == static_cast<size_t>(awq.config.n_layers * 7 + 1));
  CHECK(errors.front().module == "model.layers.0.self_attn.q_proj");
  CHECK(errors.back().module == "lm_head");
  for (const auto &e : errors) {
    INFO(e.module);
    CHECK(e.rows == loom::CpuBackend::kErrorRows);
    CHECK(e.weight_error > 0.01);
    CHECK(e.weight_error < 0.2);
    CHECK(e.output_error > 0.0);
    CHECK(e.output_error < 0.2);
  }
  // int8 is an order of magnitude closer; without calibration there is no output error.
  Quantized int8("use = \"int8\"\n", false);
  const auto &e8 = int8.backend->quantization_errors();
  REQUIRE(e8.size() == errors.size());
  for (size_t i = 0; i < e8.size(); ++i) {
    CHECK(e8[i].rows == 0);
    CHECK(e8[i].output_error == 0.0);
    CHECK(e8[i].weight_error < errors[i].weight_error / 5);
  }
}

TEST_CASE("AWQ runs from the manifest's calibration and says when there is none", "[quant][calibration]") {
  const std::string awq = "use = \"int4\"\ngroup_size = 64\nmethod = \"awq\"\n";
  const std::string calibration = "calibration = \"" + kCalibration.string() + "\"\ncalibration_tokens = 300\n";
  auto rt = loom::Runtime::from_string(manifest(calibration, awq), "calib.toml");
  const auto r = rt->run();
  CHECK(r.tokens.size() == 8);
  CHECK_THAT(run_error(manifest("", awq)), Catch::Contains("model.calibration") && Catch::Contains("q_proj"));
  CHECK_THAT(run_error(manifest("calibration = \"/nonexistent/calib.txt\"\n", awq)),
             Catch::Contains("calib.toml: model.calibration") && Catch::Contains("cannot read"));
  CHECK_THAT(run_error(manifest(calibration + "calibration_tokens = 0\n", awq)), Catch::Contains("calibration_tokens"));
  CHECK_THAT(run_error(manifest("calibration_tokenz = 5\n", awq)), Catch::Contains("calibration_tokenz"));
}
