// The boundary between sdpa's CUDA host code (sdpa_cuda.cpp, C++20) and its kernels
// (sdpa_cuda.cu, C++17). Only built when LOOM_HAVE_CUDA.
//
// Ownership: a Problem borrows device pointers owned by the caller of forward(). The launcher
// keeps no state and enqueues on `stream` without waiting.
#ifndef LOOM_PLUGINS_ATTENTION_SDPA_CUDA_KERNELS_HPP
#define LOOM_PLUGINS_ATTENTION_SDPA_CUDA_KERNELS_HPP

#include <cuda_runtime_api.h>

#include <cstdint>

#include "loom_kv_format.hpp"

namespace loomp::sdpa {
using namespace loomp::kvcache;  // the block format flash shares (loom_kv_format.hpp)

struct CudaProblem {
  bool bf16 = false;  // element type of q, k, v and out: bfloat16, else float32
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int block_size = 0;  // B, a power of two
  KvGeometry kv{};     // the cache's block format (loom_kv_format.hpp)
  int window = 0;
  int causal = 1;
  float scale = 0.0f;
  int n_tokens = 0, n_seqs = 0, table_cols = 0;
  int64_t pool_blocks = 0;
  int64_t bytes_per_block = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  const int32_t* seq_offsets = nullptr;
  const int32_t* seq_positions = nullptr;
  const int32_t* block_table = nullptr;
  uint8_t* pool = nullptr;
};

// Appends k/v to the cache (quantized for int8/fp8), then computes attention for every (token,
// head), reading the cache back as float. Returns the first
// launch error.
cudaError_t launch_cuda(const CudaProblem& p, cudaStream_t stream);

}  // namespace loomp::sdpa

#endif
