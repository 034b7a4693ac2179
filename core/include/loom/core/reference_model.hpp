// loom::ReferenceModel: the plain CPU float32 forward pass of every supported architecture,
// written for clarity (shapes in comments, one function per operation), checked against
// Hugging Face transformers by tests/core/reference_model_test.cpp. It is the numerics contract
// the optimised CPU and CUDA paths are compared with; it recomputes the whole sequence each call.
// Thread-safety: const methods may run concurrently.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"

namespace loom {

class ReferenceModel {
 public:
  ReferenceModel(ModelConfig config, ModelWeights weights);
  // config.json and model.safetensors (or a sharded index) from a Hugging Face model directory.
  static ReferenceModel load(const std::filesystem::path &model_dir);

  // Logits [tokens.size(), vocab_size], row-major, for every position of `tokens`.
  std::vector<float> forward(const std::vector<int32_t> &tokens) const;
  // The greedy continuation of `prompt` (argmax, first index on ties), `n` tokens.
  std::vector<int32_t> greedy(const std::vector<int32_t> &prompt, int n) const;

  const ModelConfig &config() const { return config_; }

 private:
  ModelConfig config_;
  ModelWeights weights_;
  std::vector<double> inv_freq_; // [head_dim / 2] rotary frequencies, llama3 scaling applied
};

// Rotary frequencies [head_dim / 2] as transformers computes them (float32 base ** (2i / D)),
// with llama3 scaling applied when the config asks for it.
std::vector<double> rope_inv_freq(const ModelConfig &config);

} // namespace loom
