/* Host extension "loom.host.kernels/1": Loom's own compute kernels, offered to plugins.
 *
 * Obtained with host->get_extension(ctx, LOOM_HOST_KERNELS_EXTENSION); NULL when the host does
 * not offer it. Each call dispatches on the tensor's device (CPU, or CUDA on the current stream)
 * and accepts contiguous row-major float32 tensors only (LOOM_ERR_UNSUPPORTED otherwise).
 * Thread-safety: any thread, concurrently on different tensors.
 */
#ifndef LOOM_HOST_KERNELS_H
#define LOOM_HOST_KERNELS_H

#include "loom/host.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LOOM_HOST_KERNELS_EXTENSION "loom.host.kernels/1"

typedef struct loom_host_kernels {
  uint32_t struct_size;
  /* x: [rows, cols] float32, rewritten in place as softmax over each row. Entries of -INFINITY
   * become 0; a row of only -INFINITY is an error (LOOM_ERR_INVALID_ARGUMENT). */
  loom_status (*softmax_rows)(loom_host_ctx *ctx, DLTensor *x);
  /* x: [rows, cols] float32. out: [rows] host memory, the first index of each row's maximum.
   * Synchronises with the device before returning. */
  loom_status (*argmax_rows)(loom_host_ctx *ctx, const DLTensor *x, int32_t *out);
  /* ABI 1.2 (check LOOM_HAS_FIELD). x: [rows, cols] float32. out: [rows] int32 on x's device:
   * the first index of each row's maximum (0 for a row of only -INFINITY or NaN, as in
   * argmax_rows). On a GPU the kernel is ordered on the host's current stream and the
   * call returns without waiting for it, so that the host can queue the next step behind it. */
  loom_status (*argmax_rows_to)(loom_host_ctx *ctx, const DLTensor *x, DLTensor *out);
} loom_host_kernels;

#ifdef __cplusplus
}
#endif
#endif /* LOOM_HOST_KERNELS_H */
