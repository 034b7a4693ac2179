// The boundary between flash's host code (C++20, flash_attention.cpp) and its CUDA kernels
// (C++17, *.cu): one description of a prepared problem and one launcher per kernel family.
//
// Ownership: a Problem only borrows pointers; every one of them is device memory owned by the
// caller of forward() (tensors, the KV pool) or by the plugin instance (decode scratch).
// Thread-safety: the launchers keep no state; they enqueue work on `stream` and return the
// launch status (cudaGetLastError after the launch) without waiting for the work.
//
// KV cache layout (one layer, B = block_size):
//   kv_dtype auto/bf16 (cache dtype = the q/k/v dtype): block = keys [B, Hkv, D] followed by
//     values [B, Hkv, D]; bytes_per_block = 2 * B * Hkv * D * 2
//   kv_dtype int8/fp8: sdpa's quantized block (loom_kv_format.hpp): one-byte codes, keys then
//     values, then a float32 scale per (token, kv head) row, so the pools of the two plugins
//     hold identical bytes.
// A sequence's token at position p lives in pool block block_table[s, p / B], slot p % B.
#ifndef LOOM_PLUGINS_ATTENTION_FLASH_LAUNCH_HPP
#define LOOM_PLUGINS_ATTENTION_FLASH_LAUNCH_HPP

#include <cuda_runtime_api.h>

#include <cstdint>

#include "loom_kv_format.hpp"

namespace loomp::flash {

using kvcache::KvFormat;

enum class Dtype { bf16, f16 };

struct Problem {
  // Fixed by prepare().
  Dtype dtype = Dtype::bf16;
  int n_heads = 0;     // H
  int n_kv_heads = 0;  // Hkv
  int head_dim = 0;    // D: 64 or 128
  int window = 0;      // 0: full attention; else key visible iff q_pos - k_pos < window
  int block_shift = 0; // log2(B)
  float scale_log2 = 0.0f;  // softmax_scale * log2(e): scores go through exp2
  // Decode and prefill kernels are programmatic dependent launches (compute capability 9.0 and
  // newer): they may start while the kernel before them drains (decode also lets the next one do
  // the same).
  bool programmatic = false;
  // Compute capability exactly 9.0, where the sm_90a prefill kernel (wgmma) runs.
  bool wgmma = false;
  // The pool's block format: int8 or fp8 (kv_quantized) is sdpa's quantized block of
  // kv_block_bytes bytes; anything else means the compute dtype (bf16 layout, 2 bytes a value).
  KvFormat kv_format = KvFormat::bf16;
  int64_t kv_block_bytes = 0;
  // Per forward() call.
  int causal = 1;
  int n_tokens = 0;   // T
  int n_seqs = 0;     // S
  int table_cols = 0; // M: block_table is [S, M]
  int64_t pool_blocks = 0;  // N
  const void* q = nullptr;  // [T, H, D]
  const void* k = nullptr;  // [T, Hkv, D]
  const void* v = nullptr;  // [T, Hkv, D]
  void* out = nullptr;      // [T, H, D]
  const int32_t* seq_offsets = nullptr;   // [S + 1]
  const int32_t* seq_positions = nullptr; // [S]
  const int32_t* block_table = nullptr;   // [S, M]
  uint8_t* pool = nullptr;                // [N, bytes_per_block]
};

// Decode launch shape and scratch: CTAs of `warps` warps, each split at least `min_chunk` keys;
// per (token, query head, split) an unnormalised output row [D] and its running max and sum;
// when a token's keys are split across CTAs, the last CTA of a (token, head group) to finish
// combines them, counted by `arrivals` (zero between launches).
struct DecodePlan {
  int warps = 4;                 // kDecodeWarps or kDecodeWideWarps
  bool mma = false;              // the tensor-core kernel (DecodeFit::mma of the width)
  int stages = 1;                // trips of keys in the shared-memory ring (see decode_stage_bytes)
  int min_chunk = 64;            // decode_min_chunk(warps, head_dim)
  int n_splits = 1;
  float* partial_out = nullptr;  // [T, H, n_splits, D]
  float* partial_ml = nullptr;   // [T, H, n_splits, 2]: running max (log2 units) and sum
  unsigned* arrivals = nullptr;  // [T, H / heads per CTA]
};

// Warps of a decode CTA: kDecodeWarps when the batch has CTAs enough to fill the GPU, else
// kDecodeWideWarps (one CTA per SM), which reads 4x the keys per trip, so that a short context
// is one split (no merge) and one round trip to memory.
inline constexpr int kDecodeWarps = 4;
inline constexpr int kDecodeWideWarps = 16;
// Keys in flight per lane group (D/8 lanes) and trip of the decode loop: a warp's trip is
// 32 / (D/8) * 4 keys, 16 at head dim 64 and 8 at 128 (the k extent of the tensor-core kernel's
// m16n8k16 or m16n8k8 step of P V).
inline constexpr int kDecodeUnroll = 4;
// Keys a decode split covers at least, so that short contexts are not cut into slivers: one trip
// of the CTA's loop (4 keys per D/8 lanes), and never under 64.
constexpr int decode_min_chunk(int warps, int head_dim) {
  const int trip = warps * 32 / (head_dim / 8) * kDecodeUnroll;
  return trip > 64 ? trip : 64;
}
inline constexpr int kDecodeMinChunk = 64;  // the least of decode_min_chunk
// Most splits of one token's keys (bounds the scratch).
inline constexpr int kDecodeMaxSplits = 64;
// A decode CTA copies its keys and values into a ring of shared memory (cp.async), `stages`
// trips deep: the next trip's loads are in flight while one is computed. Two stages measured
// faster than three on the H100 at batch 1 to 32 (and a wide CTA's three stages would not fit
// an A100's shared memory); one is the fallback where two do not fit. One stage holds
// kDecodeUnroll K and V pieces of 16 bytes per thread.
inline constexpr int kDecodeMaxStages = 2;
inline constexpr int kMmaMaxStages = 3;  // the tensor-core kernel's (see configure_decode)
constexpr int decode_stage_bytes(int warps) { return warps * 32 * kDecodeUnroll * 2 * 16; }

// What one decode CTA width gets on the current device: the deepest ring that fits its shared
// memory (at most kDecodeMaxStages; the tensor-core kernel kMmaMaxStages where that keeps as
// many CTAs an SM), and how many such CTAs an SM holds at once.
struct DecodeFit {
  int stages = 1;
  int per_sm = 1;
  bool mma = false;  // the tensor-core kernel (unquantized pools, where its ring has two stages or more)
};

// Largest power of two dividing n, at most `cap` (a power of two).
constexpr int pow2_divisor(int n, int cap) {
  int d = 1;
  while (d < cap && n % (2 * d) == 0) d *= 2;
  return d;
}
// Query heads of one KV group that share a prefill CTA (interleaved with rows / pack tokens).
constexpr int prefill_pack(int group) { return pow2_divisor(group, 16); }
// Query heads of one KV group that share a decode CTA (each adds 16 accumulator registers per
// thread; beyond 4 the kernel runs out of registers).
constexpr int decode_heads_per_cta(int group) { return pow2_divisor(group, 4); }

// Once per prepared geometry, before any launch (and never during graph capture): raises the
// dynamic shared memory limit of the prefill kernel that launch_prefill will pick on the current
// device (`wgmma`: as Problem::wgmma).
cudaError_t configure_kernels(Dtype dtype, int head_dim, bool wgmma);

// Once per prepared geometry, like configure_kernels: raises the decode kernels' dynamic shared
// memory limit to the deepest ring that fits and reports it, with the CTAs an SM then holds
// (what plan_decode fills the GPU with), for CTAs of kDecodeWarps (`narrow`)
// and kDecodeWideWarps (`wide`) warps with decode_heads_per_cta(group) heads, reading a pool of
// `format` (as Problem::kv_format); `allow_mma` lets a width of an unquantized pool take the
// tensor-core kernel (DecodeFit::mma says whether it did).
cudaError_t configure_decode(Dtype dtype, int head_dim, int group, KvFormat format, bool allow_mma,
                             DecodeFit& narrow, DecodeFit& wide);

// Writes the batch's new k/v rows into the paged cache (before launch_prefill; launch_decode
// does it itself). For int8/fp8 it quantizes each row exactly as sdpa
// does (loom_kv_format.hpp: same scale, same rounding), so the stored bytes equal sdpa's.
cudaError_t launch_cache_write(const Problem& p, cudaStream_t stream);

// For a quantized pool (p.kv_format int8/fp8): dequantizes, into `blocks` (S * M blocks of the
// compute dtype's layout, 2 * B * Hkv * D * 2 bytes each), the cached rows below each sequence's
// length after this call (block j of sequence s goes to block s * M + j), and writes the matching
// table `table` [S, M] (s * M + j, or -1 where p.block_table has no valid block). The prefill
// kernels then run on that unquantized view. Runs after launch_cache_write.
cudaError_t launch_dequantize(const Problem& p, int32_t* table, uint8_t* blocks, cudaStream_t stream);

// Tensor-core attention over any ragged batch (prefill, chunked prefill, mixed): wgmma
// where Problem::wgmma, mma.sync otherwise. A programmatic dependent launch where
// Problem::programmatic (it waits for the kernel before it, the cache write, to complete).
cudaError_t launch_prefill(const Problem& p, cudaStream_t stream);

// One CTA per (split, query-head group, token), CUDA cores; for batches of one token per
// sequence. Appends the batch's k/v to the cache as well (int8/fp8: quantized as
// launch_cache_write does, and read back from the pool like every other key, as sdpa does).
// With plan.n_splits > 1 the CTAs write the scratch and the last one of each (token, head
// group) combines it: one launch either way.
cudaError_t launch_decode(const Problem& p, const DecodePlan& plan, cudaStream_t stream);

}  // namespace loomp::flash

#endif
