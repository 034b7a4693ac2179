// Sampler `dist`: draws a token from softmax(logits) of each row with the counter-based
// Philox-4x32-10 keyed by (rng_key[row], rng_counter[row]); see philox.hpp for the convention.
// Masked (-inf) tokens have probability zero; when a row holds +inf logits (a temperature near
// 0, a huge logit bias) they share all of it evenly (softmax's limit), and a NaN logit is an error
// on the CPU (argmax_row). CPU or CUDA: the same u, weights and walk in id order (sums on the
// device run in another order, so a draw within rounding of a cumulative boundary may land one
// token apart; +inf rows sum exactly); tokens left on the device when the host asks for that. On
// candidate rows (ABI 1.3) the sums run in the CPU's order: the CPU's tokens exactly.
#include <cmath>

#include <vector>

#include "sampler_common.hpp"
#include "samplers_cuda.hpp"

namespace loomp::samplers {
namespace {

struct Dist : Base {
  DeviceScratch scratch;
  Dist(const loom_host_api* h, loom_host_ctx* c) : Base(h, c), scratch(h, c) {}

  void apply(const loom_sampling_batch& b) {
    if (b.tokens_out == nullptr) invalid("dist: tokens_out is NULL");
    if (b.n_rows > 0 && (b.rng_key == nullptr || b.rng_counter == nullptr))
      invalid("dist: rng_key and rng_counter are required");
    float* logprobs = logprobs_of(b);
    std::vector<float> host_rows;
    Rows rows{nullptr, b.n_rows, b.vocab_size};
#if LOOM_SAMPLERS_CUDA
    if (on_cuda(b)) {
      if (const auto cand = candidate_rows(b, "dist"); cand && b.candidates->active != 0)
        return apply_candidates(b, *cand, logprobs);
    }
    if (on_cuda(b) && logprobs == nullptr) return apply_cuda(b);
    if (on_cuda(b)) {
      // Rare path (log-probabilities asked for on the GPU): draw from a host copy of the rows.
      host_rows.resize(static_cast<size_t>(b.n_rows) * static_cast<size_t>(b.vocab_size));
      const loom_status cs = host->memcpy(ctx, host_rows.data(), DLDevice{kDLCPU, 0}, data_of<float>(*b.logits),
                                          b.logits->device, host_rows.size() * sizeof(float));
      if (cs != LOOM_OK) fail(cs, "dist: copying logits to the host for logprobs failed");
      rows.data = host_rows.data();
    } else {
      rows = cpu_rows(&b, "dist");
    }
#else
    rows = cpu_rows(&b, "dist");  // refuses device logits: this build has no CUDA path
#endif
    for (int64_t r = 0; r < rows.n; ++r) {
      double logp = 0.0;
      b.tokens_out[r] = static_cast<int32_t>(draw_row(rows.row(r), rows.vocab, r, b.rng_key[r], b.rng_counter[r], &logp));
      if (logprobs) logprobs[r] = static_cast<float>(logp);
    }
  }

#if LOOM_SAMPLERS_CUDA
  // The draw over candidate rows (ABI 1.3): the CPU's sums in the CPU's order, so the CPU's
  // tokens; log-probabilities come back with the tokens when asked for.
  void apply_candidates(const loom_sampling_batch& b, const cuda::CandidateRows& cand, float* logprobs) {
    if (b.n_rows == 0) return;
    const DeviceRows d = device_rows(b, host, ctx, "dist");
    int32_t* device_tokens = device_tokens_of(b);
    void* s = scratch.get(b.logits->device, cuda::candidates_dist_scratch_bytes(b.n_rows), "dist");
    check_cuda(cuda::candidates_dist(cand, b.n_rows, uniforms(b).data(), s, scratch.staging, device_tokens, b.tokens_out,
                                     logprobs, d.stream),
               "dist");
    if (device_tokens == nullptr || logprobs != nullptr) check_selected(b);
  }

  std::vector<float> uniforms(const loom_sampling_batch& b) const {
    std::vector<float> u(static_cast<size_t>(b.n_rows));
    for (int32_t r = 0; r < b.n_rows; ++r) u[static_cast<size_t>(r)] = philox::uniform01(b.rng_key[r], b.rng_counter[r]);
    return u;
  }
  static int32_t* device_tokens_of(const loom_sampling_batch& b) {
    DLTensor* on_device = tokens_device_of(b);
    if (on_device == nullptr) return nullptr;
    if (!is_i32(on_device->dtype) || on_device->ndim != 1 || on_device->shape[0] != b.n_rows ||
        on_device->device.device_type != kDLCUDA || on_device->data == nullptr)
      invalid("dist: tokens_device must be [n_rows] int32 on the logits' device");
    return data_of<int32_t>(*on_device);
  }
  static void check_selected(const loom_sampling_batch& b) {
    for (int32_t r = 0; r < b.n_rows; ++r)
      if (b.tokens_out[r] < 0)
        invalid("row " + std::to_string(r) + ": every logit is -inf after filtering; nothing to select");
  }

  // The same draw on the device: u per row from Philox here (bit-identical to the CPU's), the
  // weights, sums and the walk in id order there. Tokens stay on the device when the host gave
  // tokens_device; otherwise the few tokens are copied back (the only wait).
  void apply_cuda(const loom_sampling_batch& b) {
    if (b.n_rows == 0) return;
    const DeviceRows d = device_rows(b, host, ctx, "dist");
    int32_t* device_tokens = device_tokens_of(b);
    void* s = scratch.get(b.logits->device, cuda::dist_scratch_bytes(b.n_rows, b.vocab_size), "dist");
    check_cuda(cuda::dist(d.data, b.n_rows, b.vocab_size, uniforms(b).data(), s, scratch.staging, device_tokens,
                          b.tokens_out, d.stream), "dist");
    if (device_tokens == nullptr) check_selected(b);
  }
#endif
};

constexpr loom_sampler_vtable kVtable =
    make_vtable<Dist>(LOOM_SAMPLER_SELECTS | LOOM_SAMPLER_CATEGORICAL | LOOM_SAMPLER_USES_RNG | kRunsOnCuda | kReadsCandidates |
                      (LOOM_SAMPLERS_CUDA ? static_cast<uint32_t>(LOOM_SAMPLER_DEVICE_TOKENS) : 0u));

}  // namespace

const loom_component_desc dist_desc = {
    sizeof(loom_component_desc), LOOM_KIND_SAMPLER, "dist", "1.0.0",
    "Samples a token from softmax of the (masked) logits with counter-based Philox-4x32-10",
    nullptr, 0, LOOM_THREADING_SERIAL, &kVtable};

}  // namespace loomp::samplers
