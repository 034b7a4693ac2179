// Private to core: the calibration token sequences an activation-aware quantizer sees
// ([model] calibration in a manifest, loom/core/manifest.hpp).
#pragma once

#include <cstdint>
#include <vector>

#include "loom/core/manifest.hpp"
#include "loom/core/tokenizer.hpp"

namespace loom {

// The manifest's calibration text, one passage a line, each encoded with BOS and packed whole
// into sequences of at most min(calibration_length, max_positions) tokens (a longer line is cut
// into pieces of that length), until calibration_tokens tokens are taken. Empty when the
// manifest names no calibration file. Throws a manifest error naming model.calibration when the
// file cannot be read, holds no text, or the model has no tokenizer (`tokenizer` null).
std::vector<std::vector<int32_t>> calibration_sequences(const Manifest &manifest, const Tokenizer *tokenizer,
                                                        int64_t max_positions);

} // namespace loom
