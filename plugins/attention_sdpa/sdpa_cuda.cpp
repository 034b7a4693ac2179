// sdpa's CUDA path, host side: checks of the batch, then the launch (see sdpa_cuda.hpp).
#include "sdpa_cuda.hpp"

#include <cuda_runtime_api.h>

#include <limits>
#include <string>

#include "loom_device_tensor.hpp"
#include "loom_cuda_guard.hpp"
#include "loom_plugin_util.hpp"
#include "sdpa_cuda_kernels.hpp"

namespace loomp::sdpa {
namespace {

void check_cuda(cudaError_t e, const std::string& what) { loomp::check_cuda(e, "sdpa", what); }

struct DeviceGuard : loomp::DeviceGuard {
  explicit DeviceGuard(int device) : loomp::DeviceGuard(device, "sdpa") {}
};

}  // namespace

void forward_cuda(const loom_host_api* host, loom_host_ctx* ctx, const loom_attention_config& cfg,
                  const KvGeometry& kv, const loom_attention_batch& b) {
  const int64_t H = cfg.n_heads, Hkv = cfg.n_kv_heads, D = cfg.head_dim, B = kv.block_size;
  const int64_t T = b.n_tokens, S = b.n_seqs;
  const bool bf16 = is_bf16(cfg.dtype);
  const int64_t elem = bf16 ? 2 : 4;
  const DLDevice dev = cfg.device;
  check_device_tensor(b.q, "q", dev, cfg.dtype, {T, H, D}, elem);
  check_device_tensor(b.k, "k", dev, cfg.dtype, {T, Hkv, D}, elem);
  check_device_tensor(b.v, "v", dev, cfg.dtype, {T, Hkv, D}, elem);
  check_device_tensor(b.out, "out", dev, cfg.dtype, {T, H, D}, elem);
  check_device_tensor(b.seq_offsets, "seq_offsets", dev, kI32, {S + 1}, 4);
  check_device_tensor(b.seq_positions, "seq_positions", dev, kI32, {S}, 4);
  check_device_tensor(b.block_table, "block_table", dev, kI32, {S, -1}, 4);
  const int64_t bytes_per_block = kv.bytes_per_block();
  // Rows and scales are loaded as their element type (float scales: bytes_per_block and the
  // scales' offset are multiples of 16, so a 4-aligned pool keeps every block's scales aligned).
  check_device_tensor(b.kv_pool, "kv_pool", dev, kU8, {-1, bytes_per_block},
                      static_cast<std::uintptr_t>(kv_quantized(kv.format) ? 4 : kv_elem_bytes(kv.format)));
  if (T == 0) return;
  if (S == 0) invalid("sdpa: n_tokens is " + std::to_string(T) + " but n_seqs is 0");
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  if (T > kIntMax || S >= kIntMax) invalid("sdpa: n_tokens or n_seqs too large");
  if (b.block_table->shape[1] * B > kIntMax) invalid("block_table: more positions than 2^31 - 1");

  CudaProblem p;
  p.bf16 = bf16;
  p.n_heads = cfg.n_heads;
  p.n_kv_heads = cfg.n_kv_heads;
  p.head_dim = cfg.head_dim;
  p.block_size = static_cast<int>(B);
  p.window = cfg.sliding_window;
  p.scale = cfg.softmax_scale;
  p.bytes_per_block = bytes_per_block;
  p.kv = kv;
  bind_attention_batch(p, b);

  DeviceGuard device(dev.device_id);
  auto* stream = static_cast<cudaStream_t>(host->current_stream(ctx, dev));
  check_cuda(launch_cuda(p, stream), "kernel launch");
}

}  // namespace loomp::sdpa
