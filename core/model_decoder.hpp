// Private to core: what `loom run` drives, one token at a time, through the pipeline's plugins.
//
// The model is either a Hugging Face model directory ([model] path: Llama, Qwen2, Mistral or
// GPT-2 weights, checked against their config) or, without [model], a Llama-shaped model with
// seeded random weights of the [run] geometry. Every linear goes through the quantizer plugin
// when there is one, every targeted module through the adapter plugins, attention through the
// attention plugin over a paged KV cache, the logits through the parallel plugin's all-reduce
// and the sampler chain. Norms, rotary embeddings and activations are core's (the numerics of
// ReferenceModel, which tests compare with transformers).
// Ownership: borrows the manifest and pipeline; the Runtime keeps one decoder for its lifetime,
// so quantized weights and adapter sites are made once. Installs swap hooks for attention,
// quantizer and adapters on its first run and removes them, under the step lock, when
// destroyed. Thread-safety: one thread drives it; swaps from other threads land between steps.
#pragma once

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "host_tensor.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/tokenizer.hpp"
#include "loom/loom_plugin_api.h"

namespace loom {

class ModelDecoder {
 public:
  ModelDecoder(const Manifest &manifest, Pipeline &pipeline, const std::atomic<bool> &cancelled);
  ~ModelDecoder();
  ModelDecoder(const ModelDecoder &) = delete;
  ModelDecoder &operator=(const ModelDecoder &) = delete;

  void retrieve(RunResult &result);
  void call_tools(RunResult &result);
  void generate(int64_t steps, const TokenCallback &on_token, RunResult &result);
  const ModelConfig &config() const { return config_; }
  std::optional<std::string> decode(const std::vector<int32_t> &ids) const;
  const std::vector<int32_t> &prompt() const { return prompt_; }

 private:
  struct Linear {
    std::string name;                 // module name adapters match ("model.layers.0.self_attn.q_proj")
    detail::HostTensor<float> weight; // [out, in]
    detail::HostTensor<float> bias;   // [out], or no elements
    loom_qweight *qweight = nullptr;  // owned by the quantizer instance
    std::vector<std::pair<const Instance *, loom_adapter_site *>> sites;
  };
  struct Layer {
    std::unique_ptr<Linear> q, k, v, o, up, down, gate; // gate: gated (SiLU) MLPs only
    std::vector<float> norm1, norm1_bias, norm2, norm2_bias;
  };

  void build(ModelWeights weights);
  loom_attention_config attention_config() const;
  loom_kv_layout prepare_attention(Instance &attention) const;
  void allocate_kv(const loom_kv_layout &layout);
  void ensure_ready(int64_t max_positions);
  std::vector<loom_qweight *> quantize_all(Instance &quantizer);
  void free_qweights(Instance &quantizer, const std::vector<loom_qweight *> &weights);
  std::vector<loom_adapter_site *> attach_all(Instance &adapter);
  void install_hooks();

  // y[n, out] = x[n, in] W^T + b through the quantizer and adapters.
  void linear(Linear &lin, detail::HostTensor<float> &x, detail::HostTensor<float> &y);
  void norm(const std::vector<float> &w, const std::vector<float> &b, const float *x, float *y) const;
  // Runs one token at `pos` through the model; returns logits [1, vocab].
  detail::HostTensor<float> forward(int32_t token, int32_t pos);
  // The text `generated` adds after the prompt into *text, cut before the first stop string;
  // true when a stop string was found. Needs the tokenizer.
  bool generated_text(const std::vector<int32_t> &generated, std::string *text) const;
  int32_t sample(detail::HostTensor<float> &logits, const std::vector<int32_t> &history, uint64_t step);

  const Manifest &manifest_;
  Pipeline &pipeline_;
  const std::atomic<bool> &cancelled_;
  ModelConfig config_;
  int64_t max_positions_ = 0;
  std::vector<float> embedding_; // [vocab, hidden]
  std::vector<float> positions_; // GPT-2's learned positions [max_positions, hidden]
  std::vector<float> final_norm_, final_norm_bias_;
  std::vector<double> inv_freq_;
  std::vector<Layer> layers_;
  std::unique_ptr<Linear> lm_head_;
  std::unique_ptr<Tokenizer> tokenizer_; // null when the model has none
  std::vector<int32_t> prompt_;          // token ids
  std::vector<int32_t> stop_tokens_;
  std::vector<Linear *> linears_; // every linear, in a fixed order
  loom_kv_layout layout_{};
  std::vector<detail::HostTensor<uint8_t>> kv_pools_; // per layer [blocks, bytes_per_block]
  detail::HostTensor<int32_t> block_table_;            // [1, blocks]
  std::shared_ptr<Instance> quantizer_;                 // the one that made the qweights
  bool ready_ = false;
};

} // namespace loom
