// Verification of sampled drafts (speculative decoding with a drafter that draws its drafts from
// a distribution q of its own, loom_draft_batch.q_out, ABI 1.10): the rejection-sampling rule of
// Leviathan et al. (2023) and Chen et al. (2023). Draft d_i is kept with probability
// min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn from max(0, p_i - q_i)
// renormalised; when every draft is kept, one more token is drawn from p_k. The tokens then
// follow the target's distribution p exactly, whatever q is.
//
// Randomness is counter-based, as the samplers' (loom/sampler.h): a pure function of (key,
// counter, stream), so a seeded request verifies alike on CPU and CUDA and whatever else is in
// its batch. Pure functions over host memory; thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace loom {

// A uniform double in [0, 1) from (key, counter, stream) (SplitMix64 finalisers chained).
double verification_uniform(uint64_t key, uint64_t counter, uint64_t stream);

// Probabilities of a row of logits as a categorical sampler reads them: softmax, masked (-inf)
// tokens at 0; when some logits are +inf, uniform over those (softmax's limit). p must be as
// long as the row. Throws loom::Error when every logit is -inf or one is NaN (as the samplers
// refuse NaN), so p is always a distribution.
void probabilities_of(std::span<const float> logits, std::span<double> p);

// Checks a drafter's proposal distribution for draft `token` and renormalises it in place: every
// entry finite and >= 0, a positive sum, q(token) > 0. False when it is not a distribution (the
// host then verifies the draft as a point mass).
bool normalise_proposal(std::span<float> q, int32_t token);

// The rule above. p: k + 1 rows of the target's probabilities (row i after drafts 0..i-1), q: k
// rows, drafts: k tokens, counters: k + 1 (row i's RNG counter). Writes into `tokens` the kept
// drafts and then the one token of the target's (k + 1 tokens when every draft was kept, else
// kept + 1); returns how many drafts were kept. Throws loom::Error, before drawing anything, when
// the rows differ in length, a draft lies outside [0, vocabulary) or a value is negative or not
// finite.
int32_t verify_sampled_drafts(std::span<const std::vector<double>> p, std::span<const std::vector<float>> q,
                              std::span<const int32_t> drafts, uint64_t key, std::span<const uint64_t> counters,
                              std::vector<int32_t> &tokens);

} // namespace loom
