// Skinny products for decode steps: y[T, out] = x[T, in] W[out, in]^T for a handful of tokens
// (T <= gemv_max_tokens(in)), bfloat16 weights, float32 accumulation, with the neighbouring
// element-wise work fused in: the norm that produces x (prologue) and the operation that
// consumes y (epilogue). At batch 1 the cuBLAS GEMM of a decode step reaches about 0.9-2.3 TB/s
// of the H100's 3.35 and each separate norm, SwiGLU or RoPE launch costs several microseconds;
// this kernel streams each weight row once at close to copy bandwidth and saves those launches.
//
// Numerics match the unfused path (loom/kernels/model.hpp + cuBLAS) except for the order of the
// float32 sums of the dot products: the prologue is the same code as add_bias_norm_cuda and
// rounds the normalised row to bfloat16 as that kernel stores it; every epilogue rounds the
// product to bfloat16 where the unfused path stores it, before it adds biases or applies an
// activation.
//
// Conventions as loom/kernels/model.hpp: device pointers, one enqueue on `stream`, a
// cudaError_t as int. `programmatic` launches the kernel as a programmatic dependent launch
// (Hopper and newer): it may start while the previous kernel on the stream finishes, reads its
// weights early, and waits for that kernel before it touches activations; pass false on older
// GPUs. Capturable in CUDA graphs. Thread-safety: none needed; no state is kept.
#pragma once

#include <cstdint>

namespace loom::kernels {

// Where x comes from.
enum class GemvPrologue {
  act,         // x = act, bfloat16 [T, in]
  rms_norm,    // x = bf16(RMSNorm(resid) * norm_w)
  layer_norm,  // x = bf16(LayerNorm(resid) * norm_w + norm_b)
};

// What is done with y (r: an output row, t: a token).
enum class GemvEpilogue {
  // out_f32[t, r] += y + bias[r] (bias optional): an output projection adding into the
  // float32 residual stream.
  add_f32,
  // out_f32[t, r] = y: logits.
  store_f32,
  // W = [gate; up] ([2 I, in]); out_act[t, j] = bf16(silu(bf16(y[j])) * bf16(y[I + j])), j < I.
  swiglu,
  // out_act[t, r] = bf16(gelu_tanh(bf16(y) + bias[r])): GPT-2's c_fc.
  bias_gelu,
  // W = [q heads; k heads; v heads] ([(Hq + 2 Hkv) D, in]): y rounded to bf16, plus bias
  // (optional), q and k rotated by RoPE at positions[t] when cos_sin is not null (rotate-half
  // pairs (i, i + D/2), cos_sin [max_positions, D/2, 2]), written to q [T, Hq, D],
  // k [T, Hkv, D], v [T, Hkv, D]: qkv_bias_rope_split_cuda's output.
  rope_split,
};

struct GemvArgs {
  int32_t tokens = 0;  // T
  int32_t in = 0;      // a multiple of 8
  int32_t out = 0;     // rows of W
  const void* weight = nullptr;  // [out, in] bfloat16, 16-byte aligned
  const float* bias = nullptr;   // [out] float32, optional
  // Prologue inputs.
  const void* act = nullptr;       // act: [T, in] bfloat16, 16-byte aligned
  float* resid = nullptr;          // norms: [T, in] float32 (written only with embed_table)
  const float* norm_w = nullptr;   // norms: [in]
  const float* norm_b = nullptr;   // layer_norm: [in]
  float eps = 0.0f;
  // Embedding lookup, fused (norm prologues only): when embed_table is not null, input row t is
  // embed_table[tokens_ids[t]] (+ embed_pos_table[positions[t]]), both [*, in] bfloat16, instead
  // of resid, and the kernel writes the rows (float32) to resid, where the residual stream
  // starts: the first layer's GEMV does embed_rows_cuda's work. T <= gemv_max_embed_tokens(in).
  const int32_t* tokens_ids = nullptr;
  const void* embed_table = nullptr;
  const void* embed_pos_table = nullptr;
  // Epilogue outputs.
  float* out_f32 = nullptr;  // add_f32, store_f32: [T, out]
  // add_f32: out = out * resid_scale + W x (+ bias). Tensor parallel: 1 / the group's size, so
  // that the group's sum of the partial products counts the residual once (exact for powers of
  // two: the same bits as scaling first).
  float resid_scale = 1.0f;
  void* out_act = nullptr;   // swiglu: [T, out / 2]; bias_gelu: [T, out]; bfloat16
  // rope_split.
  const float* cos_sin = nullptr;
  const int32_t* positions = nullptr;  // [T]; also read by the embedding lookup
  int32_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
  void *q = nullptr, *k = nullptr, *v = nullptr;
};

// The largest T the kernel takes for rows of `in` values (its input rows are staged in shared
// memory as bfloat16); 0 when in is not a multiple of 8.
int32_t gemv_max_tokens(int32_t in);

// The largest T with the fused embedding lookup (it stages one float32 row more).
int32_t gemv_max_embed_tokens(int32_t in);

// Enqueues one fused GEMV. Valid pairs: act + add_f32; rms_norm or layer_norm + store_f32,
// swiglu, bias_gelu or rope_split. Other pairs, T outside [1, gemv_max_tokens(in)], or shapes
// the epilogue cannot split return cudaErrorInvalidValue without launching.
int gemv_bf16_cuda(const GemvArgs& args, GemvPrologue prologue, GemvEpilogue epilogue, bool programmatic,
                   void* stream);

}  // namespace loom::kernels
