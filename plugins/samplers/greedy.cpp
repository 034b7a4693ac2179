// Sampler `greedy`: selects the argmax of each row (first index on ties).
// CPU logits: a plain loop. CUDA logits: the host's kernels extension (argmax_rows), so the
// row never leaves the GPU, or argmax_rows_to when the host wants the tokens left on the device
// (tokens_device); log-probabilities, when asked for, copy the rows to the host.
#include <vector>

#include "sampler_common.hpp"

namespace loomp::samplers {
namespace {

struct Greedy : Base {
  using Base::Base;

  void apply(const loom_sampling_batch& b) {
    if (b.tokens_out == nullptr) invalid("greedy: tokens_out is NULL");
    float* logprobs = logprobs_of(b);
    const DLTensor& t = *b.logits;
    if (t.device.device_type == kDLCPU) {
      const Rows rows{data_of<float>(t), b.n_rows, b.vocab_size};
      for (int64_t r = 0; r < rows.n; ++r) {
        const float* x = rows.row(r);
        const int64_t best = argmax_row(x, rows.vocab, r);
        b.tokens_out[r] = static_cast<int32_t>(best);
        if (logprobs) logprobs[r] = static_cast<float>(log_softmax_row(x, rows.vocab, x[best])(x[best]));
      }
      return;
    }
    if (t.device.device_type != kDLCUDA)
      unsupported("greedy: logits must be on the CPU or CUDA");
    const auto* k = static_cast<const loom_host_kernels*>(
        host->get_extension ? host->get_extension(ctx, LOOM_HOST_KERNELS_EXTENSION) : nullptr);
    if (k == nullptr || !LOOM_HAS_FIELD(k, loom_host_kernels, argmax_rows) || k->argmax_rows == nullptr)
      unsupported("greedy: logits are on CUDA but the host does not offer " LOOM_HOST_KERNELS_EXTENSION);
    // The host asked for the tokens on the device (so that it can queue the next step before
    // they reach the CPU) and nothing needs the rows here: leave them there.
    DLTensor* on_device = tokens_device_of(b);
    if (on_device != nullptr && logprobs == nullptr && LOOM_HAS_FIELD(k, loom_host_kernels, argmax_rows_to) &&
        k->argmax_rows_to != nullptr) {
      const loom_status s = k->argmax_rows_to(ctx, b.logits, on_device);
      if (s != LOOM_OK) fail(s, "greedy: host argmax_rows_to failed");
      return;
    }
    const loom_status s = k->argmax_rows(ctx, b.logits, b.tokens_out);
    if (s != LOOM_OK) fail(s, "greedy: host argmax_rows failed");
    if (logprobs) {
      // Rare path (logprobs requested on the GPU): bring the rows over and finish on the CPU.
      std::vector<float> host_rows(static_cast<size_t>(b.n_rows) * static_cast<size_t>(b.vocab_size));
      const loom_status cs = host->memcpy(ctx, host_rows.data(), DLDevice{kDLCPU, 0}, data_of<float>(t),
                                          t.device, host_rows.size() * sizeof(float));
      if (cs != LOOM_OK) fail(cs, "greedy: copying logits to the host for logprobs failed");
      for (int64_t r = 0; r < b.n_rows; ++r) {
        const float* x = host_rows.data() + r * b.vocab_size;
        const int32_t tok = b.tokens_out[r];
        if (tok < 0 || tok >= b.vocab_size) fail(LOOM_ERR_INTERNAL, "greedy: argmax_rows returned an out-of-range token");
        const int64_t best = argmax_row(x, b.vocab_size, r);
        logprobs[r] = static_cast<float>(log_softmax_row(x, b.vocab_size, x[best])(x[tok]));
      }
    }
  }
};

constexpr loom_sampler_vtable kVtable =
    make_vtable<Greedy>(LOOM_SAMPLER_SELECTS | LOOM_SAMPLER_RUNS_ON_CUDA | LOOM_SAMPLER_DEVICE_TOKENS);

}  // namespace

const loom_component_desc greedy_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "greedy", "1.0.0",
    "Selects the highest logit of each row (first index on ties); CPU and CUDA",
    nullptr, 0, LOOM_THREADING_SERIAL, &kVtable};

}  // namespace loomp::samplers
