/* Quantizer instance extension "loom.quantizer.fused/1" (ABI 1.5): a linear with the fusions a
 * decode step needs, so that a quantized layer is as few kernels as the host's own bf16 one.
 *
 * Without fusion a quantized decode layer is norm, q/k/v, ..., o, add, norm, gate/up, SwiGLU,
 * down, add: each a kernel over a few KB, whose launch and drain cost more than the weights
 * save at batch 1. With this extension the host asks the quantizer to normalise its input
 * (RMSNorm prologue), to add its product into the float32 residual, to apply SwiGLU to a
 * fused gate/up product, or to rotate and split a fused q/k/v product, inside its own kernel.
 *
 * Obtained with life.get_extension(instance, LOOM_QUANTIZER_FUSED_EXTENSION); NULL when the
 * quantizer has none, and the host then runs `linear` and its own kernels. The table is static or
 * lives as long as the instance. Threading: as the quantizer's `linear` (the component's
 * threading flag). The host calls linear_fused only where max_rows said it may, so a quantizer
 * can offer a fusion for decode-sized inputs only.
 */
#ifndef LOOM_QUANTIZER_FUSED_H
#define LOOM_QUANTIZER_FUSED_H

#include "loom/quantizer.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LOOM_QUANTIZER_FUSED_EXTENSION "loom.quantizer.fused/1"

/* What x holds. */
typedef enum loom_linear_input {
  /* x is the activation [n, in] (bfloat16 or float32), used as it is. */
  LOOM_LINEAR_INPUT_ACT = 0,
  /* x is the float32 residual stream [n, in]; the product uses each row's RMSNorm,
   * norm_weight[i] * (x[i] * rsqrt(mean(x^2) + norm_eps)) rounded to act_dtype, as the host's
   * norm kernel writes it before an unfused linear. */
  LOOM_LINEAR_INPUT_RMS_NORM = 1
} loom_linear_input;

/* What happens to the product p[n, out] = input W^T. */
typedef enum loom_linear_output {
  /* y[n, out] = p (bfloat16 or float32 y). */
  LOOM_LINEAR_OUTPUT_STORE = 0,
  /* y[n, out] += p (float32 y): the residual add after an output projection. */
  LOOM_LINEAR_OUTPUT_ADD = 1,
  /* y[n, out / 2] = silu(g) * u with g = p[:, j] and u = p[:, j + out / 2], each rounded to
   * bfloat16 first when y is bfloat16, as the host's SwiGLU kernel reads a bf16 gate/up product. */
  LOOM_LINEAR_OUTPUT_SWIGLU = 2,
  /* The product is the q | k | v rows of rope_heads, rope_kv_heads and rope_kv_heads heads of
   * rope_head_dim values; each value is rounded to act_dtype, q and k are rotated (RoPE, the
   * rotate-half layout: values i and i + head_dim / 2 of a head are a pair) by
   * rope_cos_sin[rope_positions[row], i] (cos, sin), and the three are written to rope_q
   * [n, heads, head_dim], rope_k and rope_v [n, kv_heads, head_dim] (act_dtype); y is unused.
   * As the host's own RoPE kernel after an unfused q/k/v product. */
  LOOM_LINEAR_OUTPUT_ROPE_QKV = 3
} loom_linear_output;

typedef struct loom_linear_fusion {
  uint32_t struct_size;
  uint32_t input;              /* loom_linear_input */
  uint32_t output;             /* loom_linear_output */
  const DLTensor *norm_weight; /* RMS_NORM: float32 [in] on the weight's device; else NULL */
  float norm_eps;              /* RMS_NORM: added to the mean square */
  /* The activations' dtype (bfloat16 or float32): x's for ACT, the normalised row's for
   * RMS_NORM. A float32 caller gets float32 products (no bfloat16 rounding of its inputs). */
  DLDataType act_dtype;
  /* ROPE_QKV only (else NULL / 0): */
  const DLTensor *rope_cos_sin;   /* float32 [max_positions, head_dim / 2, 2] */
  const DLTensor *rope_positions; /* int32 [n] */
  int32_t rope_heads, rope_kv_heads, rope_head_dim; /* q heads, k and v heads, values a head */
  DLTensor *rope_q, *rope_k, *rope_v;
} loom_linear_fusion;

typedef struct loom_quantizer_fused {
  uint32_t struct_size;
  /* The most rows (tokens) linear_fused takes for `weight` with `fusion`; 0 when it does not
   * offer that fusion for that weight. A pure query: no kernel runs. */
  int32_t (*max_rows)(void *instance, const loom_qweight *weight, const loom_linear_fusion *fusion);
  /* The fused product of x [n, in] (n <= max_rows) into y, per `fusion` (no bias: the host uses
   * it for linears without one). x, y and the norm weight are the caller's, on the weight's
   * device; y must not overlap x. Ordered on the current stream. LOOM_ERR_UNSUPPORTED for a
   * fusion it lacks. */
  loom_status (*linear_fused)(void *instance, const loom_qweight *weight, const DLTensor *x,
                              const loom_linear_fusion *fusion, DLTensor *y);
} loom_quantizer_fused;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_QUANTIZER_FUSED_H */
