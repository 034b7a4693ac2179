// The element-wise and row kernels of a transformer forward pass on CUDA, fused where a pass
// over memory can be saved: embedding lookup, bias + residual + norm, bias + rotary embedding
// + q/k/v split, SwiGLU, bias + GELU. The GEMMs between them are cuBLAS's (core/cuda_backend).
//
// Conventions: every pointer is device memory; activations ("act") are float32 or bfloat16
// (Dtype), the residual stream is always float32, norm weights, biases and rotary tables are
// float32. Shapes in comments, row-major. Each call only enqueues on `stream` (a cudaStream_t
// passed as void*) and returns a cudaError_t as int (0: launched); kernel faults surface at the
// next synchronisation. Nothing here allocates or synchronises, so every call may be captured
// in a CUDA graph. Thread-safety: calls on different streams/buffers are independent.
#pragma once

#include <cstdint>

namespace loom::kernels {

enum class Dtype { f32, bf16 };

// A linear's product computed in `count` parts split along its inputs (split-K), float32, part p
// at data + p * stride with the layout the unsplit product would have. A kernel given parts adds
// their sum where it would otherwise read the product, so the split needs no reduction kernel of
// its own. count 0: none.
struct SplitParts {
  const float* data = nullptr;
  int32_t count = 0;
  int64_t stride = 0;
};

// x[T, H] (float32) = table[tokens[t]] (+ pos_table[positions[t]] when pos_table is not null).
// table: [vocab, H] and pos_table: [max_positions, H], both of `dtype`.
int embed_rows_cuda(const int32_t* tokens, const int32_t* positions, int32_t n_tokens, int32_t hidden,
                    const void* table, const void* pos_table, Dtype dtype, float* x, void* stream);

// For each output row r (n_rows of them), with src = row_index ? row_index[r] : r:
//   x[src] += pending_bias (when not null; written back: the bias of the linear that last added
//   into the residual stream), then out[r] = norm(x[src]) as `dtype`, where norm is
//   RMSNorm (w * x / sqrt(mean(x^2) + eps)) when b is null, else LayerNorm ((x - mean) /
//   sqrt(var + eps) * w + b). x: [*, H] float32; w, b, pending_bias: [H] float32; out: [n_rows, H].
//   Rows of up to 4096 values that are a multiple of 256 are held in registers (one memory
//   latency a row); others take two more passes over the row.
// programmatic (here and below): launched as a programmatic dependent launch (sm_90+), scheduled
// while the kernel before it in the stream finishes; the kernel waits for that one before it
// reads or writes anything, so the result is the same either way.
// parts (optional): the product of the linear that last wrote into the residual, [*, H] per
// part and indexed as x is; x[src] += their sum first (before pending_bias, written back).
int add_bias_norm_cuda(float* x, const int32_t* row_index, int32_t n_rows, int32_t hidden, const float* pending_bias,
                       const float* w, const float* b, float eps, void* out, Dtype dtype, void* stream,
                       bool programmatic = false, SplitParts parts = {});

// qkv: [T, (Hq + 2 Hkv) * D] of `dtype`, the fused projection's output (q heads, then k, then v).
// Adds bias ([(Hq + 2 Hkv) * D] float32, optional), rotates q and k by the rotary embedding at
// positions[t] when cos_sin is not null (rotate-half pairs (i, i + D/2); cos_sin:
// [max_positions, D/2, 2] float32 = (cos, sin) of the angle), and writes q: [T, Hq, D],
// k: [T, Hkv, D], v: [T, Hkv, D] of `dtype`. D must be even and at most 1024.
// parts (optional): the projection as split-K parts ([T, (Hq + 2 Hkv) * D] float32 each), read
// instead of qkv (which may then be null).
int qkv_bias_rope_split_cuda(const void* qkv, const float* bias, const float* cos_sin, const int32_t* positions,
                             int32_t n_tokens, int32_t n_heads, int32_t n_kv_heads, int32_t head_dim, void* q, void* k,
                             void* v, Dtype dtype, void* stream, bool programmatic = false, SplitParts parts = {});

// gate_up: [T, 2 I] (gate columns [0, I), up columns [I, 2 I)) -> out: [T, I] = silu(gate) * up.
int swiglu_cuda(const void* gate_up, int32_t n_tokens, int32_t inter, void* out, Dtype dtype, void* stream);

// x: [T, I] in place: x = gelu_tanh(x + bias) (GPT-2's gelu_new); bias [I] float32 (optional).
int bias_gelu_cuda(void* x, const float* bias, int32_t n_tokens, int32_t inter, Dtype dtype, void* stream);

// x[n] += add[n], float32 (a product computed elsewhere added into the residual stream).
int add_f32_cuda(float* x, const float* add, int64_t n, void* stream);

// out[n] (bfloat16) = round-to-nearest-even(in[n]) (float32), for uploading weights.
int f32_to_bf16_cuda(const float* in, int64_t n, void* out, void* stream);

}  // namespace loom::kernels
