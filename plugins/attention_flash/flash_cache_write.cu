// Flash: appends the batch's new keys and values to the paged KV cache (layout in
// flash_launch.hpp). Unquantized caches: one thread per 16-byte piece of a k/v row, so that
// loads and stores are 16 bytes wide and a warp covers whole rows. int8/fp8 caches: one warp per
// row, quantized exactly as sdpa's cache write does it (the row's absmax over the lanes, the
// scale and each code from loom_kv_format.hpp's kv_scale and kv_store, IEEE division and all),
// so that the two plugins store identical bytes. Runs before the attention kernels on the same
// stream, which then read every key, new or old, from the cache alone (and, for int8/fp8, the
// dequantize kernel below before prefill).
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

// One warp per new row (token, kv head, which = 0 for the key, 1 for the value). A warp's lanes
// share one row, so the early exits are warp-uniform and the full-mask shuffles are safe.
template <class T, int D>
__global__ void quantize_kernel(dev::Pool pool, kvcache::KvGeometry kv, const T* k, const T* v,
                                const int32_t* off, const int32_t* pos, int n_tokens, int n_seqs) {
  dev::allow_next_kernel();
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (row >= static_cast<int64_t>(n_tokens) * pool.kv_heads * 2) return;
  const int which = static_cast<int>(row % 2);
  const int64_t token_head = row / 2;
  const int h = static_cast<int>(token_head % pool.kv_heads);
  const int t = static_cast<int>(token_head / pool.kv_heads);
  const int s = dev::seq_of_token(off, n_seqs, t);
  const int64_t p = dev::token_position(pos, off, s, t);
  const int64_t at = pool.block_offset(s, p);
  if (at < 0) return;
  uint8_t* const block = pool.base + at;
  const T* src = (which == 0 ? k : v) + token_head * D;
  dev::store_quantized_row<T, D>(src, block, kv.row(which, p & ((1 << pool.block_shift) - 1), h), kv, lane);
}

// One CTA per (sequence s, table column j): block j of s, dequantized into scratch block
// s * M + j. Rows at positions past the sequence's length after this call are never read by
// prefill, so they are skipped (the cost follows the context, not the table width).
template <class T>
__global__ void dequantize_kernel(dev::Pool pool, kvcache::KvGeometry kv, const int32_t* off, const int32_t* pos,
                                  int n_tokens, int32_t* table, uint8_t* blocks) {
  dev::allow_next_kernel();
  const int cols = pool.cols;
  const int s = static_cast<int>(blockIdx.x / cols);
  const int j = static_cast<int>(blockIdx.x % cols);
  const int64_t block = pool.block_offset(s, static_cast<int64_t>(j) << pool.block_shift);
  if (threadIdx.x == 0) table[blockIdx.x] = block < 0 ? -1 : static_cast<int32_t>(blockIdx.x);
  if (block < 0) return;
  const dev::SeqSpan span = dev::seq_span(off, n_tokens, s);
  const int64_t total = static_cast<int64_t>(__ldg(pos + s)) + span.count;
  const int64_t first = static_cast<int64_t>(j) << pool.block_shift;  // position of slot 0
  if (first >= total) return;
  const uint8_t* const src = pool.base + block;
  uint8_t* const dst = blocks + static_cast<int64_t>(blockIdx.x) * (kv.rows() * kv.head_dim * 2);
  const int pieces = kv.head_dim / 8;  // 8 values: 8 code bytes in, 16 bytes out
  const int64_t n = kv.rows() * pieces;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t r = i / pieces;
    const int piece = static_cast<int>(i % pieces);
    const int64_t slot = (r / kv.n_kv_heads) % kv.block_size;
    if (first + slot >= total) continue;
    const uint8_t* codes = src + r * kv.head_dim + piece * 8;
    const float scale = __ldg(reinterpret_cast<const float*>(src + kv.scales_offset()) + r);
    uint32_t out[4];
#pragma unroll
    for (int e = 0; e < 4; ++e)
      out[e] = dev::Elem<T>::pack(kvcache::kv_load(codes, 2 * e, scale, kv.format),
                                  kvcache::kv_load(codes, 2 * e + 1, scale, kv.format));
    *reinterpret_cast<uint4*>(dst + r * kv.head_dim * 2 + piece * 16) = make_uint4(out[0], out[1], out[2], out[3]);
  }
}

kvcache::KvGeometry geometry(const Problem& p) {
  return kvcache::KvGeometry{int64_t{1} << p.block_shift, p.n_kv_heads, p.head_dim, p.kv_format};
}

template <class T, int D>
cudaError_t launch_quantize(const Problem& p, cudaStream_t stream) {
  constexpr int kBlock = 256;
  const int64_t rows = static_cast<int64_t>(p.n_tokens) * p.n_kv_heads * 2;  // a warp each
  quantize_kernel<T, D><<<static_cast<unsigned>((rows * 32 + kBlock - 1) / kBlock), kBlock, 0, stream>>>(
      dev::make_pool(p), geometry(p), static_cast<const T*>(p.k), static_cast<const T*>(p.v), p.seq_offsets,
      p.seq_positions, p.n_tokens, p.n_seqs);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dequantize(const Problem& p, int32_t* table, uint8_t* blocks, cudaStream_t stream) {
  const int64_t ctas = static_cast<int64_t>(p.n_seqs) * p.table_cols;
  if (p.n_tokens == 0 || ctas == 0) return cudaSuccess;
  constexpr int kBlock = 256;
  const auto grid = static_cast<unsigned>(ctas);
  if (p.dtype == Dtype::bf16)
    dequantize_kernel<__nv_bfloat16><<<grid, kBlock, 0, stream>>>(dev::make_pool(p), geometry(p), p.seq_offsets,
                                                                   p.seq_positions, p.n_tokens, table, blocks);
  else
    dequantize_kernel<__half><<<grid, kBlock, 0, stream>>>(dev::make_pool(p), geometry(p), p.seq_offsets,
                                                           p.seq_positions, p.n_tokens, table, blocks);
  return cudaGetLastError();
}

cudaError_t launch_cache_write(const Problem& p, cudaStream_t stream) {
  const int64_t threads = static_cast<int64_t>(p.n_tokens) * p.n_kv_heads * (p.head_dim / 8);
  if (threads == 0) return cudaSuccess;
  if (kvcache::kv_quantized(p.kv_format))
    return p.dtype == Dtype::bf16
               ? (p.head_dim == 64 ? launch_quantize<__nv_bfloat16, 64>(p, stream)
                                   : launch_quantize<__nv_bfloat16, 128>(p, stream))
               : (p.head_dim == 64 ? launch_quantize<__half, 64>(p, stream) : launch_quantize<__half, 128>(p, stream));
  constexpr int kBlock = 256;
  const auto blocks = static_cast<unsigned>((threads + kBlock - 1) / kBlock);
  cache_write_kernel<<<blocks, kBlock, 0, stream>>>(dev::make_pool(p), static_cast<const uint4*>(p.k),
                                                    static_cast<const uint4*>(p.v), p.seq_offsets,
                                                    p.seq_positions, p.n_tokens, p.n_seqs);
  return cudaGetLastError();
}

}  // namespace loomp::flash
