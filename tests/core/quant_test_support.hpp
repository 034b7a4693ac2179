// Shared by the quantizer suites of core_model_test: CPU backend options (float32, 2 threads)
// with calibration sequences from the default model's calibration text, as the manifest's
// [model] calibration would give them.
#pragma once

#include <filesystem>
#include <string>

#include "../../core/calibration.hpp"
#include "../../core/cpu_backend.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/tokenizer.hpp"

namespace quant_test {

inline const std::filesystem::path kKjv = std::filesystem::path(LOOM_SOURCE_DIR) / "models/tiny-kjv";
inline const std::filesystem::path kCalibration =
    std::filesystem::path(LOOM_SOURCE_DIR) / "tests/fixtures/text/kjv_calibration.txt";

// Backend options named `source`; calibrated with `tokens` tokens of kCalibration in sequences of
// at most `length` when tokens > 0.
inline loom::CpuBackendOptions options(const std::string &source, int64_t tokens, int64_t length, int64_t max_positions) {
  loom::CpuBackendOptions o;
  o.dtype = loom::ComputeDtype::float32;
  o.threads = 2;
  o.source_name = source;
  if (tokens > 0) {
    loom::Manifest m;
    m.source_name = source;
    m.calibration_path = kCalibration;
    m.calibration_tokens = tokens;
    m.calibration_length = length;
    auto tokenizer = loom::Tokenizer::load(kKjv);
    o.calibration = loom::calibration_sequences(m, tokenizer.get(), max_positions);
  }
  return o;
}

} // namespace quant_test
