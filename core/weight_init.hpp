// Private to core: a model's starting weights for pretraining ([train] init = "random"), as
// transformers initialises a fresh model: matrices and embeddings from N(0, std^2) (GPT-2's
// residual projections, c_proj, from N(0, (std / sqrt(2 layers))^2)), norm weights 1, biases 0.
// The normal values come from a seeded generator of our own (splitmix64 and Box-Muller), so the
// same seed gives the same weights on every machine and standard library.
#pragma once

#include <cstdint>

#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"

namespace loom {

ModelWeights random_initial_weights(const ModelConfig &config, uint64_t seed, double std);

}  // namespace loom
