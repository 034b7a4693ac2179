// The host-side half of loom_quant_gemv.cuh: the launch arguments and the shared-memory bound,
// in plain C++ so that a quantizer's .cpp (compiled without nvcc) can fill them. See the .cuh
// for the kernel. Header-only, Loom-free.
#pragma once

#include <algorithm>
#include <cstdint>

namespace loomp::qgemv {

constexpr int kMaxTokens = 4;            // register accumulators: 2 streams x T per lane
constexpr int64_t kSmemBytes = 48 * 1024;  // staged input rows, bfloat16

enum Input : int { input_act = 0, input_rms_norm = 1 };
enum Output : int { output_store = 0, output_add = 1, output_swiglu = 2, output_rope_qkv = 3 };

struct Args {
  const void* codes = nullptr;        // [out, row_pieces] 16-byte pieces, 16-byte aligned
  int row_pieces = 0;                 // in / weights per piece
  const float* scales = nullptr;      // the format's: int8 [out], int4 [out, groups]
  const uint8_t* zeros = nullptr;     // int4 [out, groups]
  int groups = 1, group_pieces = 1;   // int4: groups per row, pieces per group
  const float* act_scale = nullptr;   // [in]: inputs are divided by it, or null
  const void* x = nullptr;            // [tokens, in]: bf16/f32 activation, or f32 residual
  bool x_bf16 = false;
  int input = input_act;
  const float* norm_w = nullptr;      // input_rms_norm: [in]
  float eps = 0.0f;
  const float* bias = nullptr;        // [out], added to the product (not with SwiGLU), or null
  void* y = nullptr;                  // [tokens, out] (out / 2 for SwiGLU)
  bool y_bf16 = false;
  int output = output_store;
  int tokens = 0, out = 0, in = 0;
  // output_rope_qkv: rows are q | k | v heads; q and k rotated at positions by cos_sin
  // [P, head_dim / 2, 2], then written to q [T, heads, D], k and v [T, kv_heads, D] (y's dtype).
  const float* cos_sin = nullptr;
  const int32_t* positions = nullptr;
  int heads = 0, kv_heads = 0, head_dim = 0;
  void *q = nullptr, *k = nullptr, *v = nullptr;
  bool stage_f32 = false;             // stage inputs as float32 (a float32 caller), else bfloat16
  bool split = false;                 // set by the launcher: units are the two halves of one row
};

// The prefill path (launch_tiled in the .cuh): each block of weight rows is dequantized to
// bfloat16 into `scratch` and multiplied by cuBLAS. `cublas` is a cublasHandle_t whose workspace
// the owner set (so that a CUDA graph capture never allocates); all null until set up.
struct Tiled {
  void* cublas = nullptr;
  void* scratch = nullptr;            // device memory, scratch_bytes
  int64_t scratch_bytes = 0;
};
// Fewer tokens: the GEMV, a launch (one pass over the weights) per 4 tokens. Dequantizing every
// weight costs more than a dozen passes (H100: batch-16 decode through the prefill path ran at a
// tenth of the GEMV's speed), so this path is for prefills.
constexpr int kTiledMinTokens = 64;
constexpr int64_t kTiledScratchBytes = 32 << 20;  // dequantized rows per GEMM
constexpr int64_t kTiledWorkspaceBytes = 32 << 20;

// Shared memory for `tokens` staged rows of `row_pieces` pieces of `per` weights each, values of
// `value_bytes` (the staging rounds a row up to whole 32-piece blocks).
inline int64_t smem_bytes(int row_pieces, int per, int tokens, int64_t value_bytes) {
  return static_cast<int64_t>((row_pieces + 31) / 32) * 32 * per * value_bytes * tokens;
}

// The most tokens one launch takes for a row of `row_pieces` pieces (0: the row is too long).
inline int max_tokens(int row_pieces, int per, bool stage_f32) {
  if (row_pieces <= 0) return 0;
  return static_cast<int>(
      std::min<int64_t>(kMaxTokens, kSmemBytes / smem_bytes(row_pieces, per, 1, stage_f32 ? 4 : 2)));
}

}  // namespace loomp::qgemv
