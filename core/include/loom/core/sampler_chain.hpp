// Runs a sampler chain (the pipeline's [[sampler]] links, in order) over one sampling batch.
//
// Why a class: on a device the chain may hand rows from link to link in sparse form (ABI 1.3
// candidates, plugin-api/loom/sampler.h): after top-k a row is a few dozen tokens, and the links
// that understand candidates (LOOM_SAMPLER_CANDIDATES) then touch those instead of a 128k-entry
// row each. The runner owns the candidate buffers (device memory, grown with the batch and kept
// between calls), offers them to those links only, and turns active candidates back into dense
// rows before a link without the flag (a device kernel, ordered on the compute stream).
// Links flagged LOOM_SAMPLER_DENSE_SCALE may also leave a multiply of the dense rows owed
// (temperature, which top-k then applies as it reads): the runner pays it before any other link
// and at the end. LOOM_SAMPLER_CANDIDATES=0 in the environment turns the offer off (dense rows
// throughout).
//
// Ownership: the batch, the logits and the chain's instances are the caller's. Thread-safety: one
// thread uses a runner at a time (the decoder's, or a benchmark's).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "loom/core/instance.hpp"
#include "loom/loom_plugin_api.h"

namespace loom {

class SamplerChain {
 public:
  // Entries per row the candidate buffers hold: top-k with a larger k stays dense.
  static constexpr int32_t kCapacity = 1024;

  // Offers candidates as LOOM_SAMPLER_CANDIDATES says (anything but "0": yes).
  SamplerChain();
  // Offers candidates or not, whatever the environment says (benchmarks compare the two).
  explicit SamplerChain(bool offer_candidates) : enabled_(offer_candidates) {}
  ~SamplerChain();
  SamplerChain(const SamplerChain &) = delete;
  SamplerChain &operator=(const SamplerChain &) = delete;

  // Applies every link of `chain` to `b` in order. A link after one that already selected a
  // token (b.tokens_out not all -1) is an error; `hint` says which link must come last. Throws
  // loom::Error with the link's slot and message when a link fails.
  void apply(const std::vector<std::shared_ptr<Instance>> &chain, loom_sampling_batch b, const char *hint);

  // Whether the last apply() handed rows between links as candidates (for tests and benchmarks).
  bool used_candidates() const { return used_; }

 private:
  // Candidate buffers for `rows` rows on `device`; false when they cannot be had (the chain then
  // runs dense).
  bool reserve(DLDevice device, int64_t rows);
  void densify(const loom_sampling_batch &b);
  // Applies a scale a link deferred (ABI 1.4 dense_scale) to the dense rows and clears it.
  void pay_scale(const loom_sampling_batch &b);
  void release();

  bool enabled_ = true;
  bool used_ = false;
  DLDevice device_{kDLCPU, 0};
  void *memory_ = nullptr;  // ids [rows, C] int32, then values [rows, C] float32, then count [rows] int32
  int64_t rows_ = 0;
  int64_t ids_shape_[2]{}, count_shape_[1]{};
  DLTensor ids_{}, values_{}, count_{};
  loom_sampling_candidates candidates_{};
};

} // namespace loom
