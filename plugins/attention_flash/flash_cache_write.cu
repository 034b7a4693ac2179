// Flash: appends the batch's new keys and values to the paged KV cache (layout in
// flash_launch.hpp). One thread per 16-byte piece of a k/v row, so that loads and stores are
// 16 bytes wide and a warp covers whole rows. Runs before the attention kernels on the same
// stream, which then read every key, new or old, from the cache alone.
#include "flash_device.cuh"

namespace loomp::flash {
namespace {

__global__ void cache_write_kernel(dev::Pool pool, const uint4* k, const uint4* v, const int32_t* off,
                                   const int32_t* pos, int n_tokens, int n_seqs) {
  // The prefill kernel after this one is a programmatic dependent launch: it may be placed now
  // and waits for this grid's completion before it reads anything.
  dev::allow_next_kernel();
  const int pieces = pool.head_dim / 8;  // 8 two-byte elements per 16-byte piece
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(n_tokens) * pool.kv_heads * pieces) return;
  const int piece = static_cast<int>(i % pieces);
  const int64_t row = i / pieces;  // token * Hkv + head: the row of k and v
  const int h = static_cast<int>(row % pool.kv_heads);
  const int t = static_cast<int>(row / pool.kv_heads);
  const int s = dev::seq_of_token(off, n_seqs, t);
  const int64_t p = dev::token_position(pos, off, s, t);
  const int64_t at = pool.key_offset(s, p, h);
  if (at < 0) return;  // no block for this position: nothing to write into
  uint4* key = reinterpret_cast<uint4*>(pool.base + at) + piece;
  uint4* value = reinterpret_cast<uint4*>(pool.base + at + pool.values_bytes) + piece;
  *key = k[row * pieces + piece];
  *value = v[row * pieces + piece];
}

}  // namespace

cudaError_t launch_cache_write(const Problem& p, cudaStream_t stream) {
  const int64_t threads = static_cast<int64_t>(p.n_tokens) * p.n_kv_heads * (p.head_dim / 8);
  if (threads == 0) return cudaSuccess;
  constexpr int kBlock = 256;
  const auto blocks = static_cast<unsigned>((threads + kBlock - 1) / kBlock);
  cache_write_kernel<<<blocks, kBlock, 0, stream>>>(dev::make_pool(p), static_cast<const uint4*>(p.k),
                                                    static_cast<const uint4*>(p.v), p.seq_offsets,
                                                    p.seq_positions, p.n_tokens, p.n_seqs);
  return cudaGetLastError();
}

}  // namespace loomp::flash
