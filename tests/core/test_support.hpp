// Helpers shared by the core suites.
#pragma once

#include <string>

#include "loom/core/instance.hpp"
#include "loom/sampler.h"

namespace loom::test {

// Runs one row through a sampler that selects; returns the token and writes the probe's
// logprob slot (the swap probe reports its apply() count there).
inline int32_t apply_selecting(Instance &s, float *logprob = nullptr) {
  float logits[4] = {0, 1, 2, 3};
  int64_t shape[2] = {1, 4};
  DLTensor t{};
  t.data = logits;
  t.device = {kDLCPU, 0};
  t.ndim = 2;
  t.dtype = {kDLFloat, 32, 1};
  t.shape = shape;
  int64_t seq = 0;
  uint64_t key = 1, counter = 0;
  int32_t token = -1;
  float lp = 0;
  loom_sampling_batch b{};
  b.struct_size = sizeof(b);
  b.n_rows = 1;
  b.vocab_size = 4;
  b.logits = &t;
  b.seq_ids = &seq;
  b.rng_key = &key;
  b.rng_counter = &counter;
  b.tokens_out = &token;
  b.logprobs_out = &lp;
  s.check(s.vtable<loom_sampler_vtable>()->apply(s.handle(), &b), "apply");
  if (logprob) *logprob = lp;
  return token;
}

inline std::string plugin_dir(const char *sub) { return std::string(LOOM_TEST_PLUGIN_DIR) + "/" + sub; }

} // namespace loom::test
