// Private to core: the log-probabilities a served request asks for (ServeRequest::logprobs):
// each generated token's log-probability under the model's distribution at its position, and
// the most likely alternatives there. "The model's distribution" is the softmax of the raw
// logits, before any sampler link (temperature, penalties, masks) rewrote them, as vLLM reports
// by default, so the numbers do not depend on the request's sampling parameters.
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <span>

#include "loom/core/runtime.hpp"

namespace loom {

// `token`'s log-probability in `row` (one position's logits over the vocabulary) and the `top`
// most likely tokens (at most kMaxTopLogprobs), most likely first, ties by the smaller id.
// Log-softmax in double. A row with a NaN, or with no finite maximum, gives NaN log-probabilities
// (the row says nothing), +inf entries share the probability equally.
TokenLogprob token_logprob(std::span<const float> row, int32_t token, int32_t top);

} // namespace loom
