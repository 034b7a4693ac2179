// Private to core: where a model's forward pass runs. The decoder's generation loop (prompts,
// sampling, stop rules, streaming) is the same for every backend; a backend owns the weights in
// its own layout and the KV cache, and runs a ragged batch of new tokens through the model.
//
// Backends: CpuBackend (float32 or bfloat16 weights, float32 accumulation, several threads;
// linears through the quantizer and adapter plugins) and CudaBackend (cuBLAS GEMMs, fused
// kernels, KV cache on the device, decode steps replayed from CUDA graphs). Both call the
// pipeline's attention plugin over a paged KV cache.
//
// Ownership: a backend borrows the pipeline (whose instances outlive it) and owns everything it
// allocates. Thread-safety: one thread drives a backend, under the pipeline's step lock.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <dlpack/dlpack.h>

#include "loom/attention.h"
#include "loom/quantizer.h"

namespace loom {

class Instance;

// One forward pass: the new tokens of S sequences packed along one token dimension.
struct StepBatch {
  std::vector<int32_t> tokens;        // [T] token ids
  std::vector<int32_t> seq_offsets;   // [S+1]: the tokens of sequence s are [off[s], off[s+1])
  std::vector<int32_t> seq_positions; // [S]: position of each sequence's first new token
  std::vector<int32_t> seq_slots;     // [S]: the KV-cache slot (0 .. max_seqs-1) each sequence owns
  // Paged mode (after ModelBackend::reserve_blocks; seq_slots then unused): row s's pool blocks
  // are block_tables[s * table_cols + j], j < table_cols, position p in block p / block_size.
  std::vector<int32_t> block_tables;
  int32_t table_cols = 0;
  // A decode step (one token per sequence) whose tokens the sampler wrote on the device, at
  // ModelBackend::token_feed(n_seqs()); `tokens` then holds n_seqs() placeholders.
  bool tokens_fed = false;
  // Sequences share blocks and read keys others of the batch write (speculative verification):
  // passed to attention as loom_attention_batch.shared_blocks.
  bool shared_blocks = false;
  // Which adapters each sequence runs with ([PEFT] multi-adapter serving): empty, every adapter
  // of the pipeline for every sequence (a manifest's run); else [S] entries, each kEveryAdapter,
  // kNoAdapter (the base model) or k >= 0: only the pipeline's k-th adapter
  // (Pipeline::list(LOOM_KIND_ADAPTER) order at this step).
  std::vector<int32_t> seq_adapters;
  static constexpr int32_t kEveryAdapter = -1, kNoAdapter = -2;
  int32_t n_seqs() const { return static_cast<int32_t>(seq_positions.size()); }
  int32_t n_tokens() const { return static_cast<int32_t>(tokens.size()); }
};

// The precision a backend computes in; "auto" keeps the checkpoint's (bf16/fp16 -> bf16 on
// CUDA; the CPU stores bf16 weights as bf16 and accumulates in float32).
enum class ComputeDtype { float32, bfloat16 };

class ModelBackend {
 public:
  virtual ~ModelBackend() = default;
  // Sizes the KV cache for `max_seqs` sequences of up to `max_positions` positions each and
  // (re)prepares the attention plugin. Cheap when the cache is already large enough. Makes
  // one-time state (quantized weights, adapter sites, swap hooks) on the first call.
  virtual void reserve(int32_t max_seqs, int64_t max_positions) = 0;
  // Runs the batch and returns the float32 logits [S, vocab] of each sequence's last new token,
  // on device(); the tensor is owned by the backend and valid until the next forward().
  virtual DLTensor *forward(const StepBatch &batch) = 0;
  // Where the next decode step of `seqs` sequences can find its tokens on device(): int32
  // [seqs], to be written by the sampler (ordered on the device's compute stream) and read by a
  // forward() of a batch with tokens_fed. The decoder queues that step before the tokens reach
  // the host, so the device never waits for it. nullptr when the backend takes tokens from the
  // host only (the CPU backend). Valid until the next forward() or reserve().
  virtual int32_t *token_feed(int32_t seqs) {
    (void)seqs;
    return nullptr;
  }
  // Makes KV slot `dst` hold what slot `src` holds for positions [0, positions), for beam
  // search (core/beam_search.cpp): a beam that continues another beam takes a copy of its
  // cache. Both slots must lie within what reserve() sized (plan_slot_copy checks it).
  virtual void copy_slot(int32_t src_slot, int32_t dst_slot, int64_t positions) = 0;
  // Paged mode, for the scheduler (core/serving.cpp): one pool of KV blocks per layer shared by
  // every sequence through StepBatch::block_tables, for batches of up to `max_seqs` sequences of
  // up to `max_positions` positions. The pool holds `n_blocks` blocks, or when n_blocks is 0 as
  // many as `kv_bytes` holds (0: the backend's default budget: most of the GPU's free memory,
  // or on the CPU what max_seqs whole sequences need, at most 1 GiB). Returns the pool's block size and block count. reserve() goes
  // back to the slot layout. Throws when even a minimal pool does not fit.
  struct BlockPool {
    int32_t block_size = 0;
    int64_t n_blocks = 0;
    int32_t window = 0; // the attention plugin's sliding window (loom_kv_layout.window); 0: none
  };
  virtual BlockPool reserve_blocks(int32_t max_seqs, int64_t max_positions, int64_t n_blocks, uint64_t kv_bytes) = 0;
  // Copies whole KV blocks (every layer) src -> dst, in order, ordered before the next forward
  // pass (copy-on-write of a shared block). Paged mode only.
  virtual void copy_blocks(const std::vector<std::pair<int32_t, int32_t>> &src_dst) = 0;
  // [PEFT] merge/unmerge while serving: folds the adapter's delta into the base weights (the
  // sequences that use it then run at the base model's cost; the others get the delta taken out
  // again), and puts the weights back exactly. Under the step lock. Backends without adapters
  // refuse.
  virtual bool runs_adapters() const { return false; } // adapters apply (per sequence) here
  // Whether a row runs with at most one adapter (CUDA's gathered kernels), so that a request
  // without a choice cannot run while several adapters are loaded.
  virtual bool one_adapter_per_row() const { return false; }
  virtual void merge_adapter(const Instance &adapter) { refuse_merge(adapter); }
  virtual void unmerge_adapter(const Instance &adapter) { refuse_merge(adapter); }
  // Embeddings ([embedding], DESIGN.md "Embeddings"): runs the batch (each sequence's tokens
  // from position 0 in its own KV slot, as a prefill) and returns [S, hidden] float32 on the
  // host: per sequence, the mean over its tokens (mean_pool) or its last token of the final
  // norm's output, the hidden state the head reads. The KV slots' contents are then the
  // batch's. Backends without it throw loom::Error naming what to do instead.
  virtual std::vector<float> embed(const StepBatch &batch, bool mean_pool);
  virtual DLDevice device() const = 0;
  // A short description for logs and benchmarks ("cpu float32 x2 threads", "cuda:0 bfloat16").
  virtual std::string describe() const = 0;

 private:
  [[noreturn]] void refuse_merge(const Instance &adapter) const;
};

// What copy_slot moves in each layer's pool: slot s owns blocks [s * M, (s + 1) * M), and
// position p lives in block p / B whatever the plugin's layout inside a block, so whole blocks
// carry positions. Shared by the backends; throws when the slots or positions lie outside the
// cache, and gives bytes = 0 when there is nothing to copy.
struct SlotCopy {
  uint64_t src_offset = 0, dst_offset = 0, bytes = 0;
};
// The [S, cols] block table a forward pass gives attention: in slot mode sequence s's blocks are
// slot * cols + j; in paged mode the batch's own tables (checked against the pool's `pool_blocks`),
// the columns past them naming the sequence's first block: positions are checked against the
// table's length, but a kernel may load (masked) a tile past the last position, so every entry
// names a block the sequence has written (serving pads its rows the same way).
// Throws on a table entry outside the pool or a sequence whose positions pass its table.
void fill_block_table(const StepBatch &batch, int64_t cols, int64_t pool_blocks, int32_t block_size, int32_t *table,
                      const std::string &source_name);

SlotCopy plan_slot_copy(int32_t src_slot, int32_t dst_slot, int64_t positions, int32_t max_seqs, int64_t max_positions,
                        int64_t blocks_per_seq, const loom_kv_layout &layout, const std::string &source_name);

// Checks copy_blocks' arguments: paged mode, every (src, dst) block inside the pool.
void check_block_copies(const std::vector<std::pair<int32_t, int32_t>> &src_dst, bool paged, int64_t pool_blocks,
                        const std::string &source_name);

// Blocks of a paged KV pool: `n_blocks` when given, else `kv_bytes` over a block's bytes in all
// `n_layers` layers, else `default_blocks`. Throws (naming `attention`) when one sequence of
// `positions` (or, under a sliding window, about the window) does not fit.
uint64_t paged_pool_blocks(const loom_kv_layout &layout, int64_t n_layers, int64_t positions, int64_t n_blocks,
                           uint64_t kv_bytes, uint64_t default_blocks, const std::string &attention);

class Pipeline;
class ModelWeights;
struct ModelConfig;
struct QuantizedModule;

// The quantizer's weight, on `device`, for a linear that a `loom quantize` checkpoint stores
// quantized (its tensors copied out of the mapping first: safetensors promises no alignment and
// the plugin reads typed values). Throws loom::Error naming the module and the checkpoint's
// quantizer when the plugin refuses it. Shared by the backends.
loom_qweight *import_quantized_module(Instance &quantizer, const QuantizedModule &module, const std::string &name,
                                      const std::string &checkpoint_quantizer, DLDevice device,
                                      const std::string &source_name);

// What make_backend needs besides the model: the device and the manifest's choices.
struct BackendOptions {
  DLDevice device{kDLCPU, 0};
  std::optional<ComputeDtype> dtype; // [model] dtype; nullopt = "auto" (the checkpoint's precision)
  bool half_checkpoint = false;      // the checkpoint stores bfloat16 or float16 weights
  int32_t threads = 0;               // [loom] threads for the CPU backend; 0 = one per hardware thread
  std::string source_name;           // the manifest, for errors
  // Token sequences whose linear-layer inputs the quantizer gets as calibration activations
  // ([model] calibration); empty: none.
  std::vector<std::vector<int32_t>> calibration;
};

// The backend for options.device, owning `weights` (consumed) from now on (model_backend.cpp).
// Throws loom::Error.
// What the attention plugin is prepared with for `config`: its geometry, the cache's length, the
// dtype of q/k/v/out and the device they live on (shared by every backend).
loom_attention_config attention_config_for(const ModelConfig &config, int64_t max_positions, DLDataType dtype,
                                           DLDevice device);
// Prepares `attention` with `config` (the layout's window preset to the model's) and returns the
// KV layout it reports; throws, naming the component, on a negative window or an absurd layout.
// A block size of 0 (the component keeps no cache) passes: callers that need a cache say so.
loom_kv_layout prepare_attention_layout(Instance &attention, loom_attention_config config);

std::unique_ptr<ModelBackend> make_backend(const ModelConfig &config, ModelWeights weights, Pipeline &pipeline,
                                           const BackendOptions &options);

} // namespace loom
