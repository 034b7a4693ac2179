// Private to core: what `loom run` drives until the engine loads real models.
//
// A seeded decoder with random weights of the manifest's [run] geometry (embedding, per layer
// RMSNorm -> q/k/v projections -> attention plugin -> output projection with a residual, then
// RMSNorm -> LM head). Every linear goes through the quantizer plugin when there is one, every
// targeted module through the adapter plugins, the logits through the parallel plugin's
// all-reduce and the sampler chain. Tokens carry no meaning: the point is the pipeline.
// Ownership: borrows the manifest and pipeline (the Runtime keeps one decoder for its lifetime,
// so quantized weights and adapter sites are made once); installs swap hooks for attention,
// quantizer and adapters on its first run and removes them, under the step lock, when destroyed.
// Thread-safety: one thread drives it; swaps from other threads land between steps.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "host_tensor.hpp"
#include "loom/core/runtime.hpp"
#include "loom/loom_plugin_api.h"

namespace loom {

class SyntheticDecoder {
 public:
  SyntheticDecoder(const Manifest &manifest, Pipeline &pipeline, const std::atomic<bool> &cancelled);
  ~SyntheticDecoder();
  SyntheticDecoder(const SyntheticDecoder &) = delete;
  SyntheticDecoder &operator=(const SyntheticDecoder &) = delete;

  void retrieve(RunResult &result);
  void call_tools(RunResult &result);
  void generate(int64_t steps, const TokenCallback &on_token, RunResult &result);

 private:
  struct Linear {
    std::string name; // Hugging Face module name
    detail::HostTensor<float> weight; // [out, in]
    loom_qweight *qweight = nullptr;  // owned by the quantizer instance
    std::vector<std::pair<const Instance *, loom_adapter_site *>> sites;
  };
  struct Layer {
    std::unique_ptr<Linear> q, k, v, o;
  };

  void build_weights();
  // Makes the pipeline's instances ready for a run of `max_positions` (caller holds the step
  // lock): attention prepared and KV allocated, weights quantized, adapters attached, hooks set.
  void ensure_ready(int64_t max_positions);
  loom_attention_config attention_config() const;
  loom_kv_layout prepare_attention(Instance &attention) const;
  void allocate_kv(const loom_kv_layout &layout);
  std::vector<loom_qweight *> quantize_all(Instance &quantizer);
  void free_qweights(Instance &quantizer, const std::vector<loom_qweight *> &weights);
  std::vector<loom_adapter_site *> attach_all(Instance &adapter);
  void install_hooks();

  // y[n, out] = x[n, in] W^T through the quantizer and adapters.
  void linear(Linear &lin, detail::HostTensor<float> &x, detail::HostTensor<float> &y);
  // Runs one token at `pos` through the model; returns logits [1, vocab].
  detail::HostTensor<float> forward(int32_t token, int32_t pos);
  int32_t sample(detail::HostTensor<float> &logits, const std::vector<int32_t> &history, uint64_t step);

  const Manifest &manifest_;
  Pipeline &pipeline_;
  const std::atomic<bool> &cancelled_;
  int64_t vocab_, hidden_, heads_, kv_heads_, head_dim_, n_layers_, max_positions_;
  detail::HostTensor<float> embedding_; // [vocab, hidden]
  std::vector<Layer> layers_;
  std::unique_ptr<Linear> lm_head_;
  loom_kv_layout layout_{};
  std::vector<detail::HostTensor<uint8_t>> kv_pools_; // per layer [blocks, bytes_per_block]
  detail::HostTensor<int32_t> block_table_;            // [1, blocks]
  std::shared_ptr<Instance> quantizer_;                 // the one that made the qweights
  bool ready_ = false;
};

} // namespace loom
