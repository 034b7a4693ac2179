// Private to core: the CPU model backend.
//
// Weights are float32 or bfloat16 (ComputeDtype) in [out, in] row-major layout; activations,
// norms and accumulation are float32. Every linear is one [T, in] x [in, out] product over the
// whole ragged batch: through the pipeline's quantizer when there is one (quantizers get a
// float32 copy of the weight, made on demand from bfloat16), else through core's blocked kernel
// (blocks of rows x output features, 8 float32 lanes per output, GCC/clang vector extensions,
// an AVX2 build of the same loops chosen at run time on x86-64), split over the thread pool by
// rows and output features. Each output is computed by one thread in one fixed order, so
// results do not depend on the thread count, the batch composition or the instruction set
// (no FMA contraction in ISO C++ mode). Adapters add their deltas to every linear they target.
// Norms, rotary embeddings and activations are transformer_ops.hpp's, row-parallel for large
// batches. Attention is the pipeline's attention plugin, called once per layer with the whole
// batch over a paged KV cache: slot s of the cache owns blocks [s * M, (s + 1) * M) of every
// layer's pool, M = ceil(max_positions / block_size). Only the last token of each sequence goes
// through the final norm and the LM head.
//
// Weights in place (as llama.cpp uses its mmapped GGUF): a tensor the backend reads as stored
// (every Llama-family linear and embedding, norms, biases, GPT-2's wte and wpe) is read straight
// from the checkpoint's read-only mapping when the file holds it in the dtype the backend reads
// (BF16 linears with bfloat16 weights; F32 linears with float32 weights; F32 norms, biases and
// positions, always read as float32) at an address aligned for that type. Everything else is the
// backend's own copy: dtype conversions (F16 -> bf16 or f32, BF16 -> f32, F32 -> bf16), GPT-2's
// Conv1D weights transposed to [out, in] and split into q/k/v (with their biases), tensors the
// file leaves misaligned (safetensors does not promise alignment; typed reads of them would be
// undefined), and weights made in memory. bytes_in_place() and bytes_copied() say how much of
// each. The backend holds the mappings (shared_ptr), so the files must not be truncated or
// rewritten while it lives: see loom/core/mapped_file.hpp (SIGBUS on a truncated mapping).
// Quantizers get a float32 copy of each weight and keep their own derived copy, as before.
//
// Ownership: owns the weights (or the mappings they point into), KV pools, scratch and thread
// pool; borrows the pipeline, whose instances outlive it. Installs swap hooks for attention,
// quantizer and adapters on its first reserve() and removes them (under the step lock) when
// destroyed. Thread-safety: one thread drives it, under the pipeline's step lock; the pool's
// workers only run core's loops.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "host_tensor.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/loom_plugin_api.h"
#include "model_backend.hpp"
#include "thread_pool.hpp"

namespace loom {

class TensorShards;
class PipelineStages;

struct CpuBackendOptions {
  ComputeDtype dtype = ComputeDtype::float32;
  int32_t threads = 0;     // 0 = one per hardware thread
  std::string source_name; // the manifest, for errors
  // Token sequences run through the float weights once, before a quantizer quantizes, so that
  // it gets each linear's inputs as calibration activations (see calibration.hpp).
  std::vector<std::vector<int32_t>> calibration;
  // Tensor parallelism ([Parallel]): the config and weights given are this rank's
  // (TensorShards::local_config / local_weights); forward() sums the row-parallel outputs and the
  // embedding over the tensor group and gathers the vocabulary-split logits, so every rank
  // returns the whole model's logits. Null or a group of one: the whole model.
  std::shared_ptr<const TensorShards> tensor;
  // Pipeline parallelism ([Parallel]): this rank's stage. The backend holds the stage's layers
  // (and their KV cache; the embedding on the first stage, the final norm and head on the last),
  // takes its input from the previous stage and hands its output to the next; the last stage's
  // logits are broadcast, so every stage returns them. Null or one stage: the whole model.
  std::shared_ptr<const PipelineStages> pipeline;
};

// How far one quantized linear is from its float weights: |W - W~| / |W| (Frobenius), and
// |x (W - W~)^T| / |x W^T| over up to kErrorRows calibration rows x (0 rows: no output error).
struct QuantizationError {
  std::string module;
  double weight_error = 0, output_error = 0;
  int64_t rows = 0;
};

class CpuBackend final : public ModelBackend {
 public:
  // Takes the tensors out of `weights`: in place where they can be (see above), else converting
  // linears and embeddings to options.dtype.
  CpuBackend(const ModelConfig &config, ModelWeights weights, Pipeline &pipeline, const CpuBackendOptions &options);
  ~CpuBackend() override;
  CpuBackend(const CpuBackend &) = delete;
  CpuBackend &operator=(const CpuBackend &) = delete;

  void reserve(int32_t max_seqs, int64_t max_positions) override;
  DLTensor *forward(const StepBatch &batch) override;
  std::vector<float> embed(const StepBatch &batch, bool mean_pool) override;
  void copy_slot(int32_t src_slot, int32_t dst_slot, int64_t positions) override;
  BlockPool reserve_blocks(int32_t max_seqs, int64_t max_positions, int64_t n_blocks, uint64_t kv_bytes) override;
  void copy_blocks(const std::vector<std::pair<int32_t, int32_t>> &src_dst) override;
  DLDevice device() const override { return {kDLCPU, 0}; }
  std::string describe() const override;

  ComputeDtype dtype() const { return options_.dtype; }
  int32_t threads() const { return pool_.size(); }
  // Weight bytes read in place from the checkpoint's mappings, and weight bytes held as the
  // backend's own copies (the KV cache, scratch and quantizers' copies are not counted). A tied
  // embedding counts once.
  uint64_t bytes_in_place() const { return bytes_in_place_; }
  uint64_t bytes_copied() const { return bytes_copied_; }
  // The first weight byte of the linear named `module` (adapter names: "model.layers.0.mlp.up_proj",
  // "h.0.attn.c_attn.q", "lm_head"), nullptr when there is none; for tests that check where a
  // weight lives.
  const void *weight_data(std::string_view module) const;
  // Writes the model with its linears as the quantizer stores them to out_dir/model.safetensors
  // (`loom quantize`): every other tensor of `source` (the checkpoint this backend was loaded
  // from) as stored, each linear's exported tensors as "<module>.<suffix>", and the
  // loom.quantization metadata (QuantizedCheckpoint). Quantizes first when reserve() has not.
  // Throws loom::Error without a quantizer, for GPT-2, or when the quantizer cannot export.
  void export_quantized(const SafetensorsIndex &source, const std::filesystem::path &out_dir);
  // The quantizer's error on each linear, in linear order, as the last quantization (at the
  // first reserve, or a quantizer swap) measured and logged it; empty without a quantizer.
  const std::vector<QuantizationError> &quantization_errors() const { return quantization_errors_; }
  static constexpr int64_t kErrorRows = 64;
  // Folds `adapter`'s delta into the base weights of the linears it is attached to (the plugin's
  // merge), so that the sequences using it run at the base model's cost; the other sequences get
  // the delta taken out of their rows again (its forward into scratch, subtracted). The weights
  // as they were are kept and put back by unmerge, bit for bit. One merged adapter at a time.
  // Throws loom::Error when the adapter has no merge, a targeted linear is quantized, or another
  // adapter is merged. Call under the pipeline's step lock.
  bool runs_adapters() const override { return true; }
  void merge_adapter(const Instance &adapter) override;
  void unmerge_adapter(const Instance &adapter) override;
  const Instance *merged_adapter() const { return merged_; }

 private:
  // Sizes the KV cache: slot mode (max_seqs slots of max_positions), or paged mode (a pool of
  // n_blocks blocks, or as many as kv_bytes holds when n_blocks is 0). Prepares attention and
  // makes the one-time state on the first call.
  void size_cache(int32_t max_seqs, int64_t max_positions, bool paged, int64_t n_blocks, uint64_t kv_bytes);
  // Values the backend reads: `data` points into a checkpoint mapping (in place) or into `own`.
  // Move-only; a moved vector keeps its buffer, so `data` stays valid across moves.
  template <class T> struct Values {
    const T *data = nullptr;
    size_t size = 0;
    std::vector<T> own;
    Values() = default;
    explicit Values(std::vector<T> values) : own(std::move(values)) {
      data = own.data();
      size = own.size();
    }
    Values(const T *borrowed, size_t n) : data(borrowed), size(n) {}
    Values(Values &&) noexcept = default;
    Values &operator=(Values &&) noexcept = default;
    Values(const Values &) = delete;
    Values &operator=(const Values &) = delete;
    bool empty() const { return size == 0; }
    const T &operator[](size_t i) const { return data[i]; }
  };
  struct Linear {
    std::string name;            // module name adapters match ("model.layers.0.self_attn.q_proj")
    int64_t out = 0, in = 0;
    Values<float> w32;           // [out, in] when the dtype is float32
    Values<uint16_t> w16;        // [out, in] bfloat16 bits when the dtype is bfloat16
    Values<float> bias;          // [out], or empty
    loom_qweight *qweight = nullptr; // owned by the quantizer instance
    int32_t index = -1;              // position in linears_
    // Set when the checkpoint stores this linear quantized (`loom quantize`): the quantizer
    // imports these tensors instead of quantizing w32/w16, which are then empty (except a tied
    // head's, which lookups read). Points into checkpoint_quantization_.
    const QuantizedModule *imported = nullptr;
    // The linear whose input rows this one always gets too (k and v: q's; gate: up's), or null.
    const Linear *same_input = nullptr;
    std::vector<std::pair<const Instance *, loom_adapter_site *>> sites;
    // A block's output (adapter ABI 1.6 block sites: "model.layers.0.self_attn"), not a linear:
    // no weights, in == out == hidden; only its sites are used.
    bool block = false;
    // A layer's attention-prefix site (ABI 1.6 prefix tuning, "model.layers.0.self_attn"): no
    // weights; in = hidden, out = 2 * kv width; only its sites are used.
    bool prefix = false;
    // While an adapter is merged into w32/w16: the weights as they were.
    Values<float> unmerged32;
    Values<uint16_t> unmerged16;
  };
  // Which rows of this step run with an adapter (StepBatch::seq_adapters): the token rows of the
  // layers' linears and the sequence rows of the LM head, as int32 masks (the adapter ABI's
  // row_mask); `any`/`all` say whether some or all rows are on.
  struct AdapterRows {
    const Instance *instance = nullptr;
    std::vector<int32_t> tokens, seqs;
    bool tokens_any = false, tokens_all = false, seqs_any = false, seqs_all = false;
  };
  struct Layer {
    std::unique_ptr<Linear> q, k, v, o, up, down, gate; // gate: gated (SiLU) MLPs only
    std::unique_ptr<Linear> attn_block, mlp_block;      // block sites after o and down
    std::unique_ptr<Linear> attn_prefix;                // prefix-tuning site (Llama family)
    Values<float> norm1, norm1_bias, norm2, norm2_bias;
  };

  void build(ModelWeights weights);
  // The tensor `name` as T (float: F32; uint16_t: BF16 bits), in place when the file holds it in
  // that dtype at an aligned address, else converted into a copy. Empty when absent and optional.
  template <class T> Values<T> adopt(ModelWeights &weights, const std::string &name, bool optional = false);
  // A copy the backend made (counted in bytes_copied()).
  template <class T> Values<T> owned(std::vector<T> values);
  // A linear over a stored [out, in] weight, or over float32 values laid out so.
  std::unique_ptr<Linear> make_linear(std::string name, ModelWeights &weights, const std::string &weight,
                                      Values<float> bias);
  std::unique_ptr<Linear> make_linear(std::string name, int64_t out, int64_t in, std::vector<float> weight,
                                      Values<float> bias);
  loom_attention_config attention_config() const;
  loom_kv_layout prepare_attention(Instance &attention) const;
  std::vector<loom_qweight *> quantize_all(Instance &quantizer);
  // The float forward over options_.calibration, recording every linear's inputs (captured_).
  void capture_calibration();
  void capture(const Linear &lin, const float *x, int64_t n);
  // The quantizer's weight for a linear the checkpoint stores quantized.
  loom_qweight *import_linear(Instance &quantizer, const Linear &lin);
  // Measures and logs how far `q` (the quantizer's weight for `lin`) is from lin's weights.
  QuantizationError measure(Instance &quantizer, const Linear &lin, const loom_qweight *q, const float *w);
  void free_qweights(Instance &quantizer, const std::vector<loom_qweight *> &weights);
  std::vector<loom_adapter_site *> attach_all(Instance &adapter);
  void install_hooks();
  // The step's AdapterRows from batch.seq_adapters (cleared when it is empty: every adapter on
  // every row).
  void plan_adapter_rows(const StepBatch &batch);
  // Adds (or, for a merged adapter, takes out) the deltas of lin's adapters on the rows that use
  // them.
  void apply_adapters(Linear &lin, float *x, int64_t n, float *y);
  // A block's output `out` [T, hidden] through the adapters on its block site (`kept`: scratch
  // for the output before them, their input).
  void block_adapters(Linear &block, float *out, int64_t n);
  // Prefix tuning: the rows of this step at a sequence's virtual positions (below its prefix
  // adapter's virtual tokens) get that adapter's keys and values for layer `layer` in k and v
  // (after RoPE: they are used as they are). See plan_adapter_rows.
  void prefix_rows(Layer &layer, float *k, float *v);

  // y[n, out] = x[n, in] W^T + b through the quantizer and adapters.
  void linear(Linear &lin, float *x, int64_t n, float *y);
  // The blocked kernel over core's own weights, split over the pool.
  void matmul(const Linear &lin, const float *x, int64_t n, float *y);
  // fn(row) for every row in [0, n), over the pool when the rows hold enough work.
  template <class F> void rows(int64_t n, int64_t work_per_row, F &&fn);
  void norm(const Values<float> &w, const Values<float> &b, const float *x, float *y) const;
  void embed_row(int32_t token, float *out) const;

  ModelConfig config_;
  Pipeline &pipeline_;
  CpuBackendOptions options_;
  detail::ThreadPool pool_;
  std::vector<std::shared_ptr<const MappedFile>> mappings_; // what in-place weights point into
  uint64_t bytes_in_place_ = 0, bytes_copied_ = 0;
  Values<float> positions_; // GPT-2's learned positions [max_positions, hidden]
  Values<float> final_norm_, final_norm_bias_;
  std::vector<double> inv_freq_;
  std::vector<Layer> layers_;
  std::unique_ptr<Linear> lm_head_;
  std::unique_ptr<Linear> embedding_; // [vocab, hidden]; null when tied (lm_head_'s weight serves)
  std::vector<Linear *> linears_;     // every linear, in a fixed order (quantizer and adapter sites)
  std::vector<Linear *> sited_;       // linears_, then every layer's blocks: where adapters attach

  // KV cache: per layer [max_seqs * blocks_per_seq, bytes_per_block].
  int32_t max_seqs_ = 0;
  int64_t max_positions_ = 0;
  int64_t blocks_per_seq_ = 0;
  int64_t pool_blocks_ = 0; // blocks in each layer's pool
  bool paged_ = false;      // reserve_blocks(): sequences name their blocks in the step batch
  std::pair<int64_t, uint64_t> pool_request_{-1, 0}; // reserve_blocks()'s (n_blocks, kv_bytes) of that pool
  loom_kv_layout layout_{};
  std::vector<detail::HostTensor<uint8_t>> kv_pools_;
  std::shared_ptr<Instance> quantizer_; // the one that made the qweights
  bool ready_ = false;
  // Calibration activations per linear ([rows, in] float32), kept for quantizer swaps; linears
  // fed the same input (Linear::same_input) share one buffer.
  std::vector<std::shared_ptr<std::vector<float>>> captured_;
  bool capturing_ = false;
  // embed(): the forward pass stops after the final norm and pools into embedded_.
  bool embedding_pass_ = false, embed_mean_ = true;
  std::vector<float> embedded_;
  std::vector<QuantizationError> quantization_errors_;
  std::shared_ptr<const QuantizedCheckpoint> checkpoint_quantization_; // null: a plain checkpoint

  // Scratch of the last forward, reused while the batch shape allows.
  std::vector<float> x_, h_, q_, k_, v_, attn_, proj_, up_, gate_, last_, last_h_, local_logits_;
  const TensorShards *tensor_ = nullptr;  // tensor parallel: options_.tensor when its group has several ranks
  const PipelineStages *stages_ = nullptr;  // pipeline parallel: options_.pipeline when it has several stages
  int64_t first_layer_ = 0;                 // the model's index of layers_[0]
  std::vector<int32_t> token_pos_;
  std::vector<AdapterRows> adapter_rows_; // this step's, empty: every adapter on every row
  const Instance *merged_ = nullptr;      // the adapter merged into the weights, if any
  std::vector<float> delta_;              // scratch for a merged adapter's delta
  std::vector<float> block_in_;           // scratch: a block's output before its adapters
  struct VirtualRow {
    int32_t row, position;
    const Instance *adapter;
  };
  std::vector<VirtualRow> virtual_rows_; // this step's rows at virtual positions (prefix tuning)
  detail::HostTensor<int32_t> offsets_, seq_positions_, block_table_;
  detail::HostTensor<float> logits_;
};

} // namespace loom
