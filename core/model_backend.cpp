// make_backend: the device picks the backend, the manifest and the checkpoint pick its dtype.
#include "model_backend.hpp"
#include "pipeline_stages.hpp"
#include "tensor_shards.hpp"

#include <algorithm>
#include <cmath>

#include "cpu_backend.hpp"
#if LOOM_HAVE_CUDA
#include "cuda_backend.hpp"
#endif
#include "loom/core/error.hpp"
#include "loom/core/instance.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/quantizer.h"

namespace loom {

void ModelBackend::refuse_merge(const Instance &adapter) const {
  throw runtime_error("merge " + adapter.slot() + ": the " + describe() + " backend runs no adapters");
}

std::vector<float> ModelBackend::embed(const StepBatch &, bool) {
  throw runtime_error("embeddings: the " + describe() + " backend does not compute them");
}

loom_attention_config attention_config_for(const ModelConfig &config, int64_t max_positions, DLDataType dtype,
                                           DLDevice device) {
  loom_attention_config c{};
  c.struct_size = sizeof(c);
  c.n_layers = static_cast<int32_t>(config.n_layers);
  c.n_heads = static_cast<int32_t>(config.n_heads);
  c.n_kv_heads = static_cast<int32_t>(config.n_kv_heads);
  c.head_dim = static_cast<int32_t>(config.head_dim);
  c.max_positions = static_cast<int32_t>(max_positions);
  c.sliding_window = static_cast<int32_t>(config.sliding_window);
  c.softmax_scale = 1.0f / std::sqrt(static_cast<float>(config.head_dim));
  c.dtype = dtype;
  c.device = device;
  return c;
}

loom_kv_layout prepare_attention_layout(Instance &attention, loom_attention_config config) {
  loom_kv_layout layout{};
  layout.struct_size = sizeof(layout);
  layout.window = config.sliding_window;
  attention.check(attention.vtable<loom_attention_vtable>()->prepare(attention.handle(), &config, &layout), "prepare");
  if (layout.window < 0) throw runtime_error(attention.slot() + " (" + attention.desc().name + "): prepare reported a negative window");
  if (layout.block_size < 0 || layout.block_size > (1 << 20) || (layout.block_size > 0 && layout.bytes_per_block == 0) ||
      layout.bytes_per_block > (uint64_t{1} << 32))
    throw runtime_error(attention.slot() + " (" + attention.desc().name + "): prepare reported an absurd KV layout");
  return layout;
}

void fill_block_table(const StepBatch &batch, int64_t cols, int64_t pool_blocks, int32_t block_size, int32_t *table,
                      const std::string &source_name) {
  const int64_t S = batch.n_seqs();
  if (batch.table_cols <= 0) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t slot = batch.seq_slots[static_cast<size_t>(s)];
      if ((slot + 1) * cols > pool_blocks)
        throw runtime_error(source_name + ": step batch sequence " + std::to_string(s) + " names KV slot " +
                            std::to_string(slot) + ", outside the cache (the backend is in paged mode: pass block tables)");
      for (int64_t j = 0; j < cols; ++j) table[s * cols + j] = static_cast<int32_t>(slot * cols + j);
    }
    return;
  }
  const int64_t given = batch.table_cols;
  if (given > cols || batch.block_tables.size() != static_cast<size_t>(S * given))
    throw runtime_error(source_name + ": step batch block tables of " + std::to_string(given) + " columns for " +
                        std::to_string(S) + " sequences (" + std::to_string(batch.block_tables.size()) +
                        " entries; at most " + std::to_string(cols) + " columns)");
  for (int64_t s = 0; s < S; ++s) {
    // Columns past the batch's tables name the sequence's first block: written data (a kernel
    // may load a masked tile that reaches past the last position, and a masked score still
    // multiplies the value it loads), as serving pads its tables (core/serving.cpp).
    const int32_t filler = given > 0 ? batch.block_tables[static_cast<size_t>(s * given)] : 0;
    const int64_t last = static_cast<int64_t>(batch.seq_positions[static_cast<size_t>(s)]) +
                         (batch.seq_offsets[static_cast<size_t>(s) + 1] - batch.seq_offsets[static_cast<size_t>(s)]);
    if (last > given * block_size)
      throw runtime_error(source_name + ": step batch sequence " + std::to_string(s) + " reaches position " +
                          std::to_string(last - 1) + ", past its block table of " + std::to_string(given) + " blocks");
    for (int64_t j = 0; j < cols; ++j) {
      const int32_t b = j < given ? batch.block_tables[static_cast<size_t>(s * given + j)] : filler;
      if (b < 0 || b >= pool_blocks)
        throw runtime_error(source_name + ": step batch sequence " + std::to_string(s) + " names KV block " +
                            std::to_string(b) + ", outside the pool of " + std::to_string(pool_blocks));
      table[s * cols + j] = b;
    }
  }
}

void check_block_copies(const std::vector<std::pair<int32_t, int32_t>> &src_dst, bool paged, int64_t pool_blocks,
                        const std::string &source_name) {
  if (!paged) throw runtime_error(source_name + ": copy_blocks outside paged mode");
  for (const auto &[src, dst] : src_dst)
    if (src < 0 || dst < 0 || src >= pool_blocks || dst >= pool_blocks)
      throw runtime_error(source_name + ": copy_blocks(" + std::to_string(src) + ", " + std::to_string(dst) +
                          ") outside the pool of " + std::to_string(pool_blocks) + " blocks");
}

uint64_t paged_pool_blocks(const loom_kv_layout &layout, int64_t n_layers, int64_t positions, int64_t n_blocks,
                           uint64_t kv_bytes, uint64_t default_blocks, const std::string &attention) {
  const uint64_t per_block = layout.bytes_per_block * static_cast<uint64_t>(n_layers);
  const uint64_t blocks = n_blocks > 0 ? static_cast<uint64_t>(n_blocks) : kv_bytes > 0 ? kv_bytes / per_block : default_blocks;
  // One sequence at a time must fit: all its positions, or under a sliding window about the
  // window (the scheduler checks each request's own span).
  const int64_t span = layout.window > 0 ? std::min<int64_t>(positions, layout.window + 1) : positions;
  const uint64_t one_seq = static_cast<uint64_t>((span + layout.block_size - 1) / layout.block_size);
  if (blocks < one_seq)
    throw runtime_error(attention + ": a KV pool of " + std::to_string(blocks) + " blocks cannot hold one sequence of " +
                        std::to_string(span) + " positions (" + std::to_string(one_seq) + " blocks)");
  return blocks;
}

SlotCopy plan_slot_copy(int32_t src_slot, int32_t dst_slot, int64_t positions, int32_t max_seqs, int64_t max_positions,
                        int64_t blocks_per_seq, const loom_kv_layout &layout, const std::string &source_name) {
  if (src_slot < 0 || dst_slot < 0 || src_slot >= max_seqs || dst_slot >= max_seqs || positions < 0 ||
      positions > max_positions)
    throw runtime_error(source_name + ": copy_slot(" + std::to_string(src_slot) + ", " + std::to_string(dst_slot) + ", " +
                        std::to_string(positions) + ") is outside the KV cache of " + std::to_string(max_seqs) +
                        " slots of " + std::to_string(max_positions) + " positions");
  if (src_slot == dst_slot || layout.block_size <= 0 || positions == 0) return {};
  const uint64_t per_slot = static_cast<uint64_t>(blocks_per_seq) * layout.bytes_per_block;
  const uint64_t blocks = static_cast<uint64_t>((positions + layout.block_size - 1) / layout.block_size);
  return {static_cast<uint64_t>(src_slot) * per_slot, static_cast<uint64_t>(dst_slot) * per_slot,
          blocks * layout.bytes_per_block};
}

loom_qweight *import_quantized_module(Instance &quantizer, const QuantizedModule &module, const std::string &name,
                                      const std::string &checkpoint_quantizer, DLDevice device,
                                      const std::string &source_name) {
  struct Copy {
    std::string name;
    std::vector<uint8_t> bytes;
    std::vector<int64_t> shape;
    DLTensor t{};
  };
  std::vector<std::unique_ptr<Copy>> copies;
  for (const auto &[suffix, w] : module.tensors) {
    const std::optional<DLDataType> dt = dl_dtype(w.dtype);
    if (!dt)
      throw runtime_error(source_name + ": " + name + "." + suffix + ": dtype " + dtype_name(w.dtype) +
                          " cannot be handed to a quantizer");
    auto c = std::make_unique<Copy>();
    c->name = name + "." + suffix;
    const auto *p = reinterpret_cast<const uint8_t *>(w.bytes.data());
    c->bytes.assign(p, p + w.bytes.size());
    c->shape = w.shape;
    c->t.data = c->bytes.data();
    c->t.device = {kDLCPU, 0};
    c->t.ndim = static_cast<int32_t>(c->shape.size());
    c->t.dtype = *dt;
    c->t.shape = c->shape.data();
    copies.push_back(std::move(c));
  }
  std::vector<loom_named_tensor> named;
  for (auto &c : copies) named.push_back({sizeof(loom_named_tensor), c->name.c_str(), &c->t});
  loom_qweight *q = nullptr;
  quantizer.check(quantizer.vtable<loom_quantizer_vtable>()->import_weight(quantizer.handle(), named.data(),
                                                                           static_cast<uint32_t>(named.size()),
                                                                           module.metadata.c_str(), device, &q),
                  ("import " + name + " (quantized by '" + checkpoint_quantizer + "')").c_str());
  return q;
}

std::unique_ptr<ModelBackend> make_backend(const ModelConfig &config, ModelWeights weights, Pipeline &pipeline,
                                           const BackendOptions &options) {
  // Tensor parallel ([Parallel]): this rank's slices of the model (tensor_shards.hpp).
  // Pipeline parallel: this rank's stage of the model (pipeline_stages.hpp).
  std::shared_ptr<const TensorShards> shards;
  std::shared_ptr<const PipelineStages> stages;
  if (auto parallel = pipeline.list(LOOM_KIND_PARALLEL); !parallel.empty()) {
    // (The CUDA backend keeps the vocabulary whole: its embedding lookups and head read the table.)
    auto planned = std::make_shared<TensorShards>(*parallel.front(), config, options.device.device_type == kDLCUDA);
    if (planned->size() > 1) shards = std::move(planned);
    auto staged = std::make_shared<PipelineStages>(*parallel.front(), config);
    if (staged->stages() > 1) stages = std::move(staged);
  }
  if (stages && options.device.device_type != kDLCPU)
    throw runtime_error(options.source_name + ": [parallel] pipeline parallel inference runs on the CPU backend so far "
                                              "(set loom.device = \"cpu\")");
  switch (options.device.device_type) {
  case kDLCUDA: {
#if LOOM_HAVE_CUDA
    if (!options.calibration.empty())
      throw runtime_error(options.source_name + ": [model] calibration: calibration activations are captured by the CPU "
                                                "backend only; quantize ahead of time with `loom quantize` (it runs on the "
                                                "CPU) and load that checkpoint with loom.device = \"cuda\"");
    // "auto" as on the CPU: float32 checkpoints compute in float32, the others in bfloat16.
    CudaBackendOptions cuda;
    cuda.device = options.device;
    cuda.dtype = options.dtype.value_or(options.half_checkpoint ? ComputeDtype::bfloat16 : ComputeDtype::float32);
    cuda.source_name = options.source_name;
    if (!shards) return make_cuda_backend(config, std::move(weights), pipeline, cuda);
    cuda.tensor = shards;
    return make_cuda_backend(shards->local_config(), shards->local_weights(weights), pipeline, cuda);
#else
    throw runtime_error(options.source_name + ": loom.device: this build has no CUDA");
#endif
  }
  case kDLCPU: {
    CpuBackendOptions cpu;
    // "auto" keeps the checkpoint's precision: bfloat16 and float16 checkpoints compute with
    // bfloat16 weights (float16 rounded to bfloat16), float32 checkpoints with float32 weights.
    cpu.dtype = options.dtype.value_or(options.half_checkpoint ? ComputeDtype::bfloat16 : ComputeDtype::float32);
    cpu.threads = options.threads;
    cpu.source_name = options.source_name;
    cpu.calibration = options.calibration;
    cpu.pipeline = stages;
    if (!shards) return std::make_unique<CpuBackend>(config, std::move(weights), pipeline, cpu);
    cpu.tensor = shards;
    return std::make_unique<CpuBackend>(shards->local_config(), shards->local_weights(weights), pipeline, cpu);
  }
  default:
    throw runtime_error(options.source_name + ": no model backend for device type " +
                        std::to_string(static_cast<int>(options.device.device_type)));
  }
}

} // namespace loom
