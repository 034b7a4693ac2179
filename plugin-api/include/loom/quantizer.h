/* Quantizer kind: how a linear layer's weights are stored and multiplied.
 *
 * The host hands the plugin each linear weight once (at load) and gets back an opaque handle;
 * every later matmul goes through the handle. Storage is the plugin's, allocated through the
 * host's device memory. A quantized checkpoint round-trips through export_weight /
 * import_weight, so a model quantized ahead of time loads without re-quantizing.
 */
#ifndef LOOM_QUANTIZER_H
#define LOOM_QUANTIZER_H

#include "loom/plugin.h"
#include "loom/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct loom_qweight loom_qweight; /* plugin-owned quantized weight */

typedef struct loom_quantize_request {
  uint32_t struct_size;
  const char *module_name;  /* "model.layers.3.mlp.down_proj": for logs and per-module rules */
  const DLTensor *weight;   /* [out_features, in_features], bf16/fp16/fp32, host or device */
  /* Optional calibration activations [n, in_features] (activation-aware methods); NULL if none */
  const DLTensor *calibration;
  DLDevice target_device;   /* where the quantized weight must live */
} loom_quantize_request;

typedef struct loom_quantizer_vtable {
  uint32_t struct_size;
  loom_lifecycle life;
  /* Quantizes one weight. *out is owned by the instance until free_weight. The request is the
   * host's. [concurrent calls allowed only for CONCURRENT components] */
  loom_status (*quantize)(void *instance, const loom_quantize_request *request, loom_qweight **out);
  /* y[n, out] = x[n, in] @ W^T (+ bias[out] when bias is not NULL); y is overwritten. x, y and
   * bias are the caller's, on the weight's device. Ordered on the current stream. */
  loom_status (*linear)(void *instance, const loom_qweight *weight, const DLTensor *x,
                        const DLTensor *bias, DLTensor *y);
  /* Writes the dequantized weight [out, in] into `out` (caller-owned, any float dtype). */
  loom_status (*dequantize)(void *instance, const loom_qweight *weight, DLTensor *out);
  /* Lists the stored tensors (suffixes such as "qweight", "scales") to `sink` and writes the
   * quantization metadata as JSON into `metadata` (format, bits, group size). */
  loom_status (*export_weight)(void *instance, const loom_qweight *weight,
                               const loom_tensor_sink *sink, loom_buffer *metadata);
  /* Rebuilds a weight from exported tensors and metadata; LOOM_ERR_INVALID_ARGUMENT with a
   * message naming the tensor when shapes, dtypes or group sizes do not fit. */
  loom_status (*import_weight)(void *instance, const loom_named_tensor *tensors, uint32_t count,
                               const char *metadata_json, DLDevice target_device,
                               loom_qweight **out);
  /* Frees a weight made by quantize or import_weight. */
  void (*free_weight)(void *instance, loom_qweight *weight);
} loom_quantizer_vtable;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_QUANTIZER_H */
