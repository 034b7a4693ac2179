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
// most likely tokens (at most kMaxTopLogprobs), most likely first, ties by the smaller id. The
// normaliser is summed in double. Rows with +inf entries: those share the probability (each
// log(1 / count)), the rest get -inf. Rows with a NaN, or with every entry -inf: NaN (the row
// says nothing); alternatives then rank numbers before NaN. One pass over the row, no allocation
// beyond the result.
TokenLogprob token_logprob(std::span<const float> row, int32_t token, int32_t top);

} // namespace loom
