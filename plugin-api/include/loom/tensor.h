/* Named tensors: how weights, adapter parameters and gradients cross the boundary by name.
 * Tensors themselves are DLPack DLTensor (dlpack/dlpack.h): device, dtype, shape, strides.
 * A DLTensor passed in a call is owned by the caller and valid for the call only. */
#ifndef LOOM_TENSOR_H
#define LOOM_TENSOR_H

#include "loom/abi.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Passed in arrays: frozen for ABI major 1. */
typedef struct loom_named_tensor {
  uint32_t struct_size;
  const char *name;   /* e.g. "q_proj.qweight", "lora_A.weight" */
  DLTensor *tensor;
} loom_named_tensor;

/* A host-provided receiver of named tensors, called once per tensor by a plugin that lists what
 * it stores (quantized weights to save, trainable parameters to optimise). The tensor and name
 * are owned by the plugin; the sink copies what it keeps. `grad` is NULL unless the tensor is
 * trainable and a gradient exists. A non-zero return asks the plugin to stop and return it. */
typedef struct loom_tensor_sink {
  uint32_t struct_size;
  void *user;
  loom_status (*put)(void *user, const char *name, DLTensor *tensor, DLTensor *grad);
} loom_tensor_sink;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_TENSOR_H */
