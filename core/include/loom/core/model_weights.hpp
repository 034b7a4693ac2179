// loom::ModelWeights: a checkpoint's tensors checked against the model's config and converted to
// float32 host memory, by canonical name.
//
// Every tensor the architecture needs must be present with exactly the shape the config implies;
// a tensor the architecture does not use is an error (a checkpoint for another model), except
// known non-weight buffers (rotary inv_freq, GPT-2's attention mask buffers). Weights stored as
// F32, F16 or BF16 load; other dtypes are refused. Names: Llama-family names as in the
// checkpoint; GPT-2 names without the optional "transformer." prefix.
// Errors: loom::Error (runtime) "file: tensor: cause". Thread-safety: immutable after load().
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "loom/core/model_config.hpp"
#include "loom/core/safetensors.hpp"

namespace loom {

struct HostWeight {
  std::vector<int64_t> shape;
  std::vector<float> values; // row-major
};

class ModelWeights {
 public:
  static ModelWeights load(const ModelConfig &config, const SafetensorsIndex &checkpoint);
  // Weights made in memory (random initialisation); the caller provides every expected tensor.
  static ModelWeights from_map(std::map<std::string, HostWeight, std::less<>> weights);
  // Throws loom::Error naming the tensor when absent.
  const HostWeight &at(std::string_view name) const;
  bool contains(std::string_view name) const { return weights_.find(name) != weights_.end(); }
  // Moves a tensor out (for a consumer that keeps its own copy); throws when absent.
  HostWeight take(std::string_view name);
  size_t size() const { return weights_.size(); }

 private:
  std::map<std::string, HostWeight, std::less<>> weights_;
};

// The names and shapes the architecture needs, for checks and for writers of checkpoints.
std::map<std::string, std::vector<int64_t>> expected_weights(const ModelConfig &config);

} // namespace loom
