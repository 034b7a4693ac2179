#include "loom/core/sampler_chain.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "loom/core/error.hpp"
#include "loom/core/host_context.hpp"

namespace loom {

namespace {
uint32_t flags_of(const Instance &s) { return s.vtable<loom_sampler_vtable>()->flags; }
} // namespace

SamplerChain::SamplerChain() {
  const char *env = std::getenv("LOOM_SAMPLER_CANDIDATES");
  enabled_ = !(env != nullptr && std::strcmp(env, "0") == 0);
}

SamplerChain::~SamplerChain() { release(); }

void SamplerChain::release() {
  if (memory_ != nullptr) device_free(device_, memory_);
  memory_ = nullptr;
  rows_ = 0;
}

bool SamplerChain::reserve(DLDevice device, int64_t rows) {
  if (memory_ != nullptr && device.device_type == device_.device_type && device.device_id == device_.device_id &&
      rows <= rows_)
    return true;
  release();
  const int64_t grown = std::max<int64_t>(rows, 32);
  const size_t pair_bytes = static_cast<size_t>(grown) * kCapacity * sizeof(int32_t);
  std::string error;
  if (device_alloc(device, 2 * pair_bytes + static_cast<size_t>(grown) * sizeof(int32_t), 256, &memory_, error) !=
      LOOM_OK) {
    memory_ = nullptr;  // the chain runs dense; nothing is lost but time
    return false;
  }
  device_ = device;
  rows_ = grown;
  return true;
}

void SamplerChain::densify(const loom_sampling_batch &b) {
  std::string error;
  if (!device_scatter_candidates(static_cast<float *>(b.logits->data), b.n_rows, b.vocab_size,
                                 static_cast<const int32_t *>(ids_.data), static_cast<const float *>(values_.data),
                                 static_cast<const int32_t *>(count_.data), kCapacity, b.logits->device, error))
    throw runtime_error("sampler chain: turning candidate rows back into dense rows: " + error);
}

void SamplerChain::pay_scale(const loom_sampling_batch &b) {
  if (candidates_.dense_scale == 1.0f) return;
  std::string error;
  if (!device_scale(static_cast<float *>(b.logits->data), int64_t{b.n_rows} * b.vocab_size, candidates_.dense_scale,
                    b.logits->device, error))
    throw runtime_error("sampler chain: applying a deferred temperature scale to the dense rows: " + error);
  candidates_.dense_scale = 1.0f;
}

void SamplerChain::apply(const std::vector<std::shared_ptr<Instance>> &chain, loom_sampling_batch b, const char *hint) {
  used_ = false;
  // Candidates are offered on a device, when some link reads them; the logits must be the
  // plain contiguous rows the scatter kernel writes back.
  const bool any_reader = std::any_of(chain.begin(), chain.end(), [](const std::shared_ptr<Instance> &s) {
    return (flags_of(*s) & LOOM_SAMPLER_CANDIDATES) != 0;
  });
  // (At most 65535 rows: the kernels put rows on the grid's y dimension.)
  const bool offer = enabled_ && any_reader && b.n_rows > 0 && b.n_rows <= 65535 && b.logits != nullptr &&
                     b.logits->device.device_type == kDLCUDA && b.logits->byte_offset == 0 &&
                     reserve(b.logits->device, b.n_rows);
  if (offer) {
    ids_shape_[0] = b.n_rows;
    ids_shape_[1] = kCapacity;
    count_shape_[0] = b.n_rows;
    auto *base = static_cast<char *>(memory_);
    const size_t pair_bytes = static_cast<size_t>(rows_) * kCapacity * sizeof(int32_t);
    ids_ = DLTensor{base, device_, 2, DLDataType{kDLInt, 32, 1}, ids_shape_, nullptr, 0};
    values_ = DLTensor{base + pair_bytes, device_, 2, DLDataType{kDLFloat, 32, 1}, ids_shape_, nullptr, 0};
    count_ = DLTensor{base + 2 * pair_bytes, device_, 1, DLDataType{kDLInt, 32, 1}, count_shape_, nullptr, 0};
    candidates_ = loom_sampling_candidates{sizeof(loom_sampling_candidates), kCapacity, &ids_, &values_, &count_, 0, 1.0f};
  }
  const int32_t *tokens = b.tokens_out;
  for (auto &s : chain) {
    if (tokens != nullptr && std::any_of(tokens, tokens + b.n_rows, [](int32_t t) { return t != -1; }))
      throw runtime_error(s->slot() + " (" + s->desc().name + "): follows a sampler that already selected a token; " +
                          hint);
    const uint32_t flags = flags_of(*s);
    const bool reads = (flags & LOOM_SAMPLER_CANDIDATES) != 0;
    if (offer && candidates_.active != 0 && !reads) {
      densify(b);
      candidates_.active = 0;
    }
    // A scale a link deferred is paid before a link that would read the rows without it.
    if (offer && candidates_.active == 0 && !(reads && (flags & LOOM_SAMPLER_DENSE_SCALE) != 0)) pay_scale(b);
    b.candidates = offer && reads ? &candidates_ : nullptr;
    s->check(s->vtable<loom_sampler_vtable>()->apply(s->handle(), &b), "apply");
    if (offer && candidates_.active != 0) {
      used_ = true;
      candidates_.dense_scale = 1.0f;  // the candidates hold scaled logits; the dense rows are stale
    }
    if (offer && !(candidates_.dense_scale > 0.0f && std::isfinite(candidates_.dense_scale)))
      throw runtime_error(s->slot() + " (" + s->desc().name + "): left candidates->dense_scale at " +
                          std::to_string(candidates_.dense_scale) + " (it must be a finite number > 0)");
  }
  if (offer && candidates_.active == 0) pay_scale(b);  // the dense rows as the chain left them
}

} // namespace loom
