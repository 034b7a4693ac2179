// The CUDA kernels of training ([Training]): the backward passes of a decoder's row and
// element-wise operations, the attention softmax and its backward, cross-entropy, AdamW and the
// gradient norm. The GEMMs between them are cuBLAS's (core/cuda_trainer.cpp).
//
// Conventions: float32 throughout (the trainer's bf16 mode rounds GEMM operands only, with model.hpp's
// f32_to_bf16_cuda), every
// pointer is device memory, shapes in comments are row-major. Each call only enqueues on
// `stream` (a cudaStream_t as void*) and returns a cudaError_t as int (0: launched). Every
// kernel is deterministic: each output element is produced by one thread in a fixed order (no
// atomics), so a step gives the same bits on every run. Functions named *_backward ADD into
// the gradients they produce unless the comment says "writes". Thread-safety: calls on
// different streams/buffers are independent.
#pragma once

#include <cstdint>

namespace loom::kernels {

// y[n, H] = w * x * r with r[n] = 1 / sqrt(mean(x^2) + eps) (written: the backward's).
int rms_norm_forward_cuda(const float* x, const float* w, int32_t n, int32_t H, float eps, float* y, float* r,
                          void* stream);
// dx[n, H] += r w dy - x r^3 (w dy . x) / H; writes dw_rows[n, H] = dy x r (reduce it with
// column_sum_cuda for dw).
int rms_norm_backward_cuda(const float* dy, const float* x, const float* w, const float* r, int32_t n, int32_t H,
                           float* dx, float* dw_rows, void* stream);

// LayerNorm: y[n, H] = (x - mean) r w + b with r = 1 / sqrt(var + eps); writes mean[n], r[n].
int layer_norm_forward_cuda(const float* x, const float* w, const float* b, int32_t n, int32_t H, float eps, float* y,
                            float* mean, float* r, void* stream);
// With xh = (x - mean) r and g = w dy: dx += r (g - mean(g) - xh mean(g xh)); writes
// dw_rows[n, H] = dy xh (column_sum_cuda gives dw; the bias's gradient is the column sum of dy).
int layer_norm_backward_cuda(const float* dy, const float* x, const float* w, const float* mean, const float* r,
                             int32_t n, int32_t H, float* dx, float* dw_rows, void* stream);

// out[C] += sum over the n rows of m[n, C], each column summed in row order.
// Two passes: blocks of kColumnSumChunk rows write partial sums into scratch
// [ceil(n / kColumnSumChunk), C], then each column's partials are added in order.
constexpr int32_t kColumnSumChunk = 256;
int column_sum_cuda(const float* m, int32_t n, int32_t C, float* out, float* scratch, void* stream);

// Rotary embedding in place on v[T, heads, D] (rotate-half pairs (i, i + D/2)) at position
// t % seq_len of each row t; cos_sin: [seq_len, D/2, 2] (cos, sin). `inverse` rotates by the
// opposite angle (the backward).
int rope_cuda(float* v, int32_t T, int32_t heads, int32_t D, int32_t seq_len, const float* cos_sin, bool inverse,
              void* stream);

// Writes dst[B, heads * rep, n, D] from src's rows of B * n tokens, `stride` floats apart, each
// starting with [heads, D]: head h of dst is src's head h / rep (rep > 1 repeats the KV heads of
// grouped-query attention for their query heads).
int split_heads_cuda(const float* src, int64_t stride, int32_t B, int32_t n, int32_t heads, int32_t D, int32_t rep,
                     float* dst, void* stream);
// The reverse: dst's rows (`stride` floats apart, [heads, D] written at their start) = the sum
// over each group of `group` consecutive heads of src[B, heads * group, n, D], in head order.
int merge_heads_cuda(const float* src, int32_t B, int32_t n, int32_t heads, int32_t D, int32_t group, float* dst,
                     int64_t stride, void* stream);

// In place on rows of n scores (matrices [n, n] stacked, query i = row % n): key j is kept when
// j <= i and, with window > 0, i - j < window; the kept ones become their softmax, the others 0.
int causal_softmax_cuda(float* s, int64_t rows, int32_t n, int32_t window, void* stream);
// In place: dp becomes scale * p * (dp - sum_j p dp) per row (the softmax's backward times the
// score scale), reading only the keys causal_softmax_cuda kept (same n and window); 0 elsewhere.
int softmax_backward_cuda(const float* p, float* dp, int64_t rows, int32_t n, int32_t window, float scale, void* stream);

// Fused causal attention for training (kernels/cuda/flash_train.cu), bfloat16 tensor-core products
// with float32 accumulation, on the trainer's token-major rows (no head-major copies): query head h
// (of `heads`) of sequence b (of `batch`), position i, is at q + (b n + i) q_stride + h D, and
// its key and value at k / v + (b n + i) kv_stride + (h / (heads / kv_heads)) D; o and dout as q
// with o_stride, dq as q with dq_stride, dk and dv as k with dkv_stride (each kv head's gradient
// summed over its query heads, in a fixed order: no atomics, the same bits every step). window as
// causal_softmax_cuda's, scores scaled by `scale`. The forward writes o and lse [batch heads, n]
// (each row's log2-sum-exp of its scaled scores, log2 units); the backward recomputes the
// probabilities from lse and uses delta [batch heads, n] as scratch (each row's sum of dout o).
// Rows are read four floats at a time: q, k, v, o and dout must be 16-byte aligned and every
// stride a multiple of 4. Shapes flash_attention_takes() refuses, and strides that are not
// multiples of 4, are cudaErrorInvalidValue. Stream-ordered; no host synchronisation.
// flash_attention_takes(head_dim): the head dims the kernels have (16, 32, 64); with a shape, also
// heads a multiple of kv_heads, batch heads at most 65535 (a grid's y) and window >= 0.
struct FlashAttentionShape {
  int32_t batch = 0, n = 0, heads = 0, kv_heads = 0, head_dim = 0, window = 0;
  float scale = 1.0f;
};
bool flash_attention_takes(int32_t head_dim);
bool flash_attention_takes(const FlashAttentionShape& shape);
int flash_attention_forward_cuda(const FlashAttentionShape& shape, const float* q, int64_t q_stride, const float* k,
                                 const float* v, int64_t kv_stride, float* o, int64_t o_stride, float* lse, void* stream);
int flash_attention_backward_cuda(const FlashAttentionShape& shape, const float* q, int64_t q_stride, const float* k,
                                  const float* v, int64_t kv_stride, const float* o, const float* dout, int64_t o_stride,
                                  const float* lse, float* delta, float* dq, int64_t dq_stride, float* dk, float* dv,
                                  int64_t dkv_stride, void* stream);

// m = silu(g) * u (written); the backward writes dg = dm u silu'(g) and du = dm silu(g).
int swiglu_forward_cuda(const float* g, const float* u, int64_t n, float* m, void* stream);
int swiglu_backward_cuda(const float* dm, const float* g, const float* u, int64_t n, float* dg, float* du,
                         void* stream);

// GPT-2's GELU (tanh approximation) of g [rows, C]: with a bias b[C] (may be null), g += b on
// every row first (kept, for the backward; one pass with the GELU), then m = gelu(g) (written);
// the backward writes dg = dm gelu'(g).
int gelu_forward_cuda(float* g, const float* b, int64_t rows, int32_t C, float* m, void* stream);
int gelu_backward_cuda(const float* dm, const float* g, int64_t n, float* dg, void* stream);

// y[rows, C] += b[C] on every row.
int bias_add_cuda(float* y, const float* b, int64_t rows, int32_t C, void* stream);
// y[rows, C] = x + b[C] on every row (a residual copied with the bias of the product added to it next).
int bias_copy_cuda(const float* x, const float* b, int64_t rows, int32_t C, float* y, void* stream);

// y[n] += x[n].
int accumulate_cuda(float* y, const float* x, int64_t n, void* stream);

// Embedding backward without atomics: for u < n_unique, dtable[unique[u]] += the sum of
// dx[order[k]] over k in [starts[u], starts[u + 1]), in k order. dx: [T, H].
int embedding_backward_cuda(const float* dx, const int32_t* order, const int32_t* starts, const int32_t* unique,
                            int32_t n_unique, int32_t H, float* dtable, void* stream);

// Cross-entropy per row of logits[rows, V] against targets[rows] (< 0: not scored). Writes
// loss[rows] (lse - logit[target], 0 unscored) and, in place of the logits when `grad` is
// true, weight * (softmax - onehot) (0 on unscored rows).
int cross_entropy_cuda(float* logits, const int32_t* targets, int32_t rows, int32_t V, float weight, bool grad,
                       float* loss, void* stream);

// One AdamW step of n parameters as torch.optim.AdamW (decoupled decay), in double arithmetic:
// p = p (1 - lr decay) - lr (m / c1) / (sqrt(v / c2) + eps) after m, v are updated from g, with
// decay applied to the first `decayed` parameters only (a whole model in one launch: its
// matrices first, its norms and biases after).
int adamw_cuda(float* p, const float* g, float* m, float* v, int64_t n, int64_t decayed, double lr, double beta1,
               double beta2, double eps, double decay, double c1, double c2, void* stream);

// The number of doubles of scratch that sum_squares_cuda needs.
constexpr int32_t kSumSquaresScratch = 256;
// out[0] (written, double) = the sum of x[n]^2 in a fixed order (blocks' partial sums in
// scratch[kSumSquaresScratch], then one block adds them).
int sum_squares_cuda(const float* x, int64_t n, double* scratch, double* out, void* stream);
// (Clipping scales the gradients with rows.hpp's scale_cuda.)

}  // namespace loom::kernels
