// Flash: one attention instance. Host side of the plugin: checks the config and every batch,
// plans the launches and enqueues them on the host's current stream.
//
// Ownership: the instance owns the decode scratch (device memory from host->device_alloc, made
// at prepare() and freed by the next prepare() or the destructor) and, for int8/fp8 caches, the
// prefill scratch (the dequantized view prefill reads: allocated at the first prefill that needs
// more than it holds, after waiting for the stream, and freed likewise); it borrows the host
// table and context for its whole life. Every tensor of a batch is the caller's.
// Thread-safety: none of its own; the component is LOOM_THREADING_SERIAL, so the host never
// calls one instance from two threads at once.
// CUDA graphs: a decode forward() only enqueues kernels (no allocation, synchronisation or read
// of device data), and its launch geometry depends on n_tokens, n_seqs, the block table's width
// and the prepared config alone, so a captured forward replays correctly when the positions,
// offsets, tables or tensors it points to change in device memory. A prefill forward() over an
// int8/fp8 cache may grow the prefill scratch (allocation and a stream wait), so prefill steps
// of quantized caches are not capturable; decode steps are.
#ifndef LOOM_PLUGINS_ATTENTION_FLASH_ATTENTION_HPP
#define LOOM_PLUGINS_ATTENTION_FLASH_ATTENTION_HPP

#include <cstdint>

#include "flash_launch.hpp"
#include "loom/loom_plugin_api.h"

namespace loomp::flash {

class FlashAttention {
 public:
  FlashAttention(const loom_host_api* host, loom_host_ctx* ctx);
  ~FlashAttention();
  FlashAttention(const FlashAttention&) = delete;
  FlashAttention& operator=(const FlashAttention&) = delete;

  void prepare(const loom_attention_config& config, loom_kv_layout& layout);
  void forward(const loom_attention_batch& batch);

  const loom_host_api* host() const { return host_; }
  loom_host_ctx* ctx() const { return ctx_; }

 private:
  void check_config(const loom_attention_config& c) const;
  void allocate_scratch(const loom_attention_config& c);
  void release_scratch();
  void release_prefill_scratch();
  void run_quantized_prefill(const Problem& p, cudaStream_t stream);
  DecodePlan plan_decode(int n_tokens, int table_cols) const;

  const loom_host_api* host_;
  loom_host_ctx* ctx_;
  int block_size_;
  int32_t window_ = 0;  // sliding_window: 0 applies the model's (config.sliding_window)
  bool kv_bf16_ = false;  // kv_dtype = "bf16": refused at prepare() unless the compute dtype is bf16
  KvFormat kv_format_ = KvFormat::bf16;  // int8 or fp8: quantized cache; else the compute dtype
  bool prepared_ = false;
  loom_attention_config cfg_{};
  Problem prepared_problem_{};  // the config part of every launch
  uint64_t bytes_per_block_ = 0;
  int sm_count_ = 1;
  DecodeFit decode_narrow_, decode_wide_;  // from configure_decode at prepare()
  void* scratch_ = nullptr;
  DLDevice scratch_device_{kDLCPU, 0};
  int64_t scratch_rows_ = 0;  // (token, head, split) partial rows the scratch holds
  void* prefill_scratch_ = nullptr;  // quantized caches: table [S, M] then S * M unquantized blocks
  size_t prefill_scratch_bytes_ = 0;
  DLDevice prefill_device_{kDLCPU, 0};
};

}  // namespace loomp::flash

#endif
