// sdpa's CUDA path, called by sdpa.cpp when the instance was prepared for a CUDA device. Only
// built when LOOM_HAVE_CUDA (sdpa.cpp sees LOOM_SDPA_CUDA then).
//
// Thread-safety: as the component (LOOM_THREADING_SERIAL). Ownership: borrows everything.
#ifndef LOOM_PLUGINS_ATTENTION_SDPA_CUDA_HPP
#define LOOM_PLUGINS_ATTENTION_SDPA_CUDA_HPP

#include <cstdint>

#include "loom/loom_plugin_api.h"
#include "loom_kv_format.hpp"

namespace loomp::sdpa {
using namespace loomp::kvcache;  // the block format flash shares (loom_kv_format.hpp)

// Checks a batch whose tensors all live on config.device (kDLCUDA) in config.dtype (float32 or
// bfloat16) and whose pool has kv's block format, then enqueues the cache append (quantizing for
// int8/fp8) and the attention on the host's current stream.
// Reads no device memory on the host and does not wait for the kernels. Throws Fail.
void forward_cuda(const loom_host_api* host, loom_host_ctx* ctx, const loom_attention_config& config,
                  const KvGeometry& kv, const loom_attention_batch& batch);

}  // namespace loomp::sdpa

#endif
