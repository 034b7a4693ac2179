// Flash host side: config checks, the decode scratch, per-batch checks and launch planning
// (see flash_attention.hpp for ownership, threading and graph-capture rules).
#include "flash_attention.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

#include "loom_attention_glue.hpp"
#include "loom_cuda_guard.hpp"
#include "loom_device_tensor.hpp"
#include "loom_plugin_util.hpp"

namespace loomp::flash {
namespace {

void check_cuda(cudaError_t e, const std::string& what) { loomp::check_cuda(e, "flash", what); }

struct DeviceGuard : loomp::DeviceGuard {
  explicit DeviceGuard(int device) : loomp::DeviceGuard(device, "flash") {}
};

int log2_exact(int64_t n) {
  int s = 0;
  while ((int64_t{1} << s) < n) ++s;
  return s;
}

// The tensor-core decode kernel, unless LOOM_FLASH_DECODE_MMA is 0, false, off or no (to measure
// the CUDA-core one in the same process; read at each prepare()).
bool decode_mma_allowed() {
  const char* v = std::getenv("LOOM_FLASH_DECODE_MMA");
  if (v == nullptr) return true;
  const std::string s(v);
  return s != "0" && s != "false" && s != "off" && s != "no";
}

}  // namespace

FlashAttention::FlashAttention(const loom_host_api* host, loom_host_ctx* ctx) : host_(host), ctx_(ctx) {
  const int64_t b = cfg_int(host, ctx, "block_size");
  if (b < 1 || b > 1024 || (b & (b - 1)) != 0)
    invalid_param("block_size", "flash: block_size must be a power of two in [1, 1024], got " + std::to_string(b));
  block_size_ = static_cast<int>(b);
  window_ = parse_sliding_window("flash", cfg_int(host, ctx, "sliding_window"));
  // "auto" and "bf16" keep the cache in the compute dtype; "int8" and "fp8" in sdpa's quantized
  // block format (loom_kv_format.hpp), with either compute dtype.
  const KvDtype kv = parse_kv_dtype("flash", cfg_string(host, ctx, "kv_dtype"));
  kv_bf16_ = kv == KvDtype::kBf16;
  kv_format_ = kv_format_of(kv, KvFormat::bf16);
}

FlashAttention::~FlashAttention() {
  release_scratch();
  release_prefill_scratch();
}

void FlashAttention::check_config(const loom_attention_config& c) const {
  if (c.n_heads <= 0 || c.n_kv_heads <= 0 || c.head_dim <= 0)
    invalid("flash: n_heads, n_kv_heads and head_dim must be positive");
  if (c.n_heads % c.n_kv_heads != 0)
    invalid("flash: n_heads (" + std::to_string(c.n_heads) + ") must be a multiple of n_kv_heads (" +
            std::to_string(c.n_kv_heads) + ")");
  if (c.n_heads > 65535) unsupported("flash: n_heads above 65535 is not supported");
  if (c.sliding_window < 0) invalid("flash: sliding_window must be >= 0");
  if (c.max_positions < 0) invalid("flash: max_positions must be >= 0");
  if (!std::isfinite(c.softmax_scale)) invalid("flash: softmax_scale is not finite");
  if (c.head_dim != 64 && c.head_dim != 128)
    unsupported("flash: head_dim " + std::to_string(c.head_dim) +
                " is not supported: flash has kernels for head_dim 64 and 128 (sdpa takes any)");
  if (!is_bf16(c.dtype) && !is_f16(c.dtype))
    unsupported("flash: config.dtype " + dtype_name(c.dtype) + " is not supported: use bfloat16 or float16");
  if (kv_bf16_ && !is_bf16(c.dtype))
    unsupported("flash: kv_dtype \"bf16\" needs bfloat16 compute (config.dtype is " + dtype_name(c.dtype) +
                "): flash stores its KV cache in the compute dtype");
  if (c.device.device_type != kDLCUDA)
    unsupported("flash: runs on CUDA only, but config.device is " + device_name(c.device) + " (sdpa runs there)");
}

void FlashAttention::prepare(const loom_attention_config& c, loom_kv_layout& layout) {
  prepared_ = false;
  check_config(c);
  const bool quantized = kvcache::kv_quantized(kv_format_);
  // Quantized: exactly sdpa's block (codes, then the row scales), so that the pools interchange.
  const uint64_t bytes_per_block =
      quantized ? static_cast<uint64_t>(
                      kvcache::KvGeometry{block_size_, c.n_kv_heads, c.head_dim, kv_format_}.bytes_per_block())
                : 2ull * static_cast<uint64_t>(block_size_) * static_cast<uint64_t>(c.n_kv_heads) *
                      static_cast<uint64_t>(c.head_dim) * 2ull;
  if (bytes_per_block > static_cast<uint64_t>(std::numeric_limits<int32_t>::max()))
    unsupported("flash: a KV block of " + std::to_string(bytes_per_block) + " bytes is too large");

  DeviceGuard device(c.device.device_id);
  int major = 0, minor = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c.device.device_id),
             "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, c.device.device_id),
             "cudaDeviceGetAttribute");
  if (major < 8)
    unsupported("flash: needs a GPU of compute capability 8.0 or newer (bf16 tensor cores); " +
                device_name(c.device) + " is " + std::to_string(major) + "." + std::to_string(minor));
  check_cuda(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, c.device.device_id),
             "cudaDeviceGetAttribute");
  const Dtype dtype = is_bf16(c.dtype) ? Dtype::bf16 : Dtype::f16;
  const bool wgmma = major == 9 && minor == 0;
  check_cuda(configure_kernels(dtype, c.head_dim, wgmma), "cudaFuncSetAttribute (prefill shared memory)");
  check_cuda(configure_decode(dtype, c.head_dim, c.n_heads / c.n_kv_heads, kv_format_, decode_mma_allowed(),
                              decode_narrow_, decode_wide_),
             "configure_decode (decode shared memory)");
  release_prefill_scratch();  // sized by the batches of this geometry, at their first prefill
  allocate_scratch(c);

  cfg_ = c;
  bytes_per_block_ = bytes_per_block;
  prepared_problem_ = Problem{};
  prepared_problem_.dtype = dtype;
  prepared_problem_.n_heads = c.n_heads;
  prepared_problem_.n_kv_heads = c.n_kv_heads;
  prepared_problem_.head_dim = c.head_dim;
  prepared_problem_.window = window_ > 0 ? window_ : c.sliding_window;  // its own window over the model's
  prepared_problem_.block_shift = log2_exact(block_size_);
  prepared_problem_.scale_log2 = static_cast<float>(static_cast<double>(c.softmax_scale) * 1.4426950408889634);
  prepared_problem_.programmatic = major >= 9;
  prepared_problem_.wgmma = wgmma;
  prepared_problem_.kv_format = kv_format_;
  prepared_problem_.kv_block_bytes = static_cast<int64_t>(bytes_per_block);
  prepared_ = true;
  layout.block_size = block_size_;
  // As sdpa reports its caches; the unquantized cache is in the compute dtype (f16 included).
  layout.cache_dtype = quantized ? kv_cache_dtype(kv_format_) : c.dtype;
  layout.bytes_per_block = bytes_per_block;
  layout.window = prepared_problem_.window;  // a host before ABI 1.4 does not get it back (the glue)
}

// Scratch for split decode, sized once from the geometry: a batch of one token can split its
// keys kDecodeMaxSplits ways (fewer when max_positions is short); bigger batches split less,
// as plan_decode() keeps T * H * n_splits within these rows.
void FlashAttention::allocate_scratch(const loom_attention_config& c) {
  release_scratch();
  int64_t splits = kDecodeMaxSplits;
  if (c.max_positions > 0)
    splits = std::clamp<int64_t>((c.max_positions + kDecodeMinChunk - 1) / kDecodeMinChunk, 1, kDecodeMaxSplits);
  if (splits <= 1) return;  // contexts too short to split: decode never needs scratch
  const int64_t rows = static_cast<int64_t>(c.n_heads) * splits;
  // Partial rows [rows, D], their (max, sum) [rows, 2], and one arrival counter per CTA group
  // (at most `rows` of them: a group has at least one head and two splits).
  const auto bytes = static_cast<size_t>(rows) * (static_cast<size_t>(c.head_dim) + 3) * sizeof(float);
  void* p = nullptr;
  if (host_->device_alloc(ctx_, c.device, bytes, 256, &p) != LOOM_OK || p == nullptr)
    fail(LOOM_ERR_OUT_OF_MEMORY, "flash: cannot allocate " + std::to_string(bytes) + " bytes of decode scratch on " +
                                     device_name(c.device));
  scratch_ = p;
  scratch_device_ = c.device;
  scratch_rows_ = rows;
  // The counters start at zero; each launch leaves them at zero again.
  check_cuda(cudaMemset(p, 0, bytes), "cudaMemset (decode scratch)");
}

void FlashAttention::release_scratch() {
  if (scratch_ != nullptr) host_->device_free(ctx_, scratch_device_, scratch_);
  scratch_ = nullptr;
  scratch_rows_ = 0;
}

void FlashAttention::release_prefill_scratch() {
  if (prefill_scratch_ != nullptr) host_->device_free(ctx_, prefill_device_, prefill_scratch_);
  prefill_scratch_ = nullptr;
  prefill_scratch_bytes_ = 0;
}

// Prefill over an int8/fp8 cache: quantize the new rows into the pool, dequantize every
// sequence's cached rows (up to its length) into the scratch in the compute dtype's layout, and
// run the unquantized prefill kernels on that view (the scratch table maps block j of sequence s
// to scratch block s * M + j). The simplest design that reuses the tuned kernels unchanged; it
// costs a read of the quantized context, a write and a read of it in bf16/f16, and scratch of
// S * M unquantized blocks (one layer's, reused by every layer).
void FlashAttention::run_quantized_prefill(const Problem& p, cudaStream_t stream) {
  const auto blocks = static_cast<size_t>(p.n_seqs) * static_cast<size_t>(p.table_cols);
  if (blocks > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    unsupported("flash: an int8/fp8 prefill of " + std::to_string(p.n_seqs) + " sequences x " +
                std::to_string(p.table_cols) + " table columns is too large for its scratch table");
  const size_t table_bytes = (blocks * sizeof(int32_t) + 255) / 256 * 256;
  const size_t block_bytes = 2 * (size_t{1} << p.block_shift) * static_cast<size_t>(p.n_kv_heads) *
                             static_cast<size_t>(p.head_dim) * 2;
  const size_t need = table_bytes + blocks * block_bytes;
  if (need > prefill_scratch_bytes_) {
    // Grow by half again, so that slowly growing contexts do not reallocate every call. The old
    // scratch may still be read by queued kernels: wait for them before it goes back.
    const size_t want = std::max(need, prefill_scratch_bytes_ + prefill_scratch_bytes_ / 2);
    if (prefill_scratch_ != nullptr && host_->stream_synchronize(ctx_, cfg_.device) != LOOM_OK)
      fail(LOOM_ERR_DEVICE, "flash: cannot wait for the stream before growing the prefill scratch");
    release_prefill_scratch();
    void* q = nullptr;
    if (host_->device_alloc(ctx_, cfg_.device, want, 256, &q) != LOOM_OK || q == nullptr)
      fail(LOOM_ERR_OUT_OF_MEMORY, "flash: cannot allocate " + std::to_string(want) +
                                       " bytes of prefill scratch (the dequantized int8/fp8 context) on " +
                                       device_name(cfg_.device));
    prefill_scratch_ = q;
    prefill_scratch_bytes_ = want;
    prefill_device_ = cfg_.device;
  }
  auto* table = static_cast<int32_t*>(prefill_scratch_);
  auto* data = static_cast<uint8_t*>(prefill_scratch_) + table_bytes;
  check_cuda(launch_cache_write(p, stream), "cache write kernel launch");
  check_cuda(launch_dequantize(p, table, data, stream), "dequantize kernel launch");
  Problem view = p;
  view.kv_format = KvFormat::bf16;  // the compute dtype's layout
  view.kv_block_bytes = static_cast<int64_t>(block_bytes);
  view.pool = data;
  view.pool_blocks = static_cast<int64_t>(blocks);
  view.block_table = table;
  check_cuda(launch_prefill(view, stream), "prefill kernel launch");
}

// Wide CTAs when the batch's CTAs would cover a quarter of the SMs or less (batch 1 to 4 of a
// Llama-3.2-1B shape), so that a short context is one CTA per head group. Then as many splits as
// fill one wave of resident CTAs (configure_decode's per_sm: one wide CTA per SM, a few narrow
// ones), rounded down: a split past the wave would start a second, mostly idle one, and the
// launch would take two CTA times instead of one (rounding up cost batch 4 up to 1.6x on the
// H100: 5 splits of 32 wide CTAs are 160 CTAs on 132 SMs). No more than min_chunk-key chunks of
// the longest context the table can hold, and within the scratch.
DecodePlan FlashAttention::plan_decode(int n_tokens, int table_cols) const {
  DecodePlan plan;
  const int heads_per_cta = decode_heads_per_cta(cfg_.n_heads / cfg_.n_kv_heads);
  const int64_t ctas = static_cast<int64_t>(std::max(n_tokens, 1)) * (cfg_.n_heads / heads_per_cta);
  const bool wide = 4 * ctas <= sm_count_;
  plan.warps = wide ? kDecodeWideWarps : kDecodeWarps;
  const DecodeFit& fit = wide ? decode_wide_ : decode_narrow_;
  plan.stages = fit.stages;
  plan.mma = fit.mma;
  plan.min_chunk = decode_min_chunk(plan.warps, cfg_.head_dim);
  if (scratch_ == nullptr || n_tokens <= 0) return plan;
  const int64_t want = static_cast<int64_t>(fit.per_sm) * sm_count_ / ctas;
  const int64_t by_length = (static_cast<int64_t>(table_cols) * block_size_ + plan.min_chunk - 1) / plan.min_chunk;
  const int64_t by_scratch = scratch_rows_ / (static_cast<int64_t>(n_tokens) * cfg_.n_heads);
  const int64_t n = std::min({want, by_length, by_scratch, static_cast<int64_t>(kDecodeMaxSplits)});
  if (n <= 1) return plan;
  plan.n_splits = static_cast<int>(n);
  plan.partial_out = static_cast<float*>(scratch_);
  plan.partial_ml = plan.partial_out + scratch_rows_ * cfg_.head_dim;
  plan.arrivals = reinterpret_cast<unsigned*>(plan.partial_ml + scratch_rows_ * 2);
  return plan;
}

void FlashAttention::forward(const loom_attention_batch& b) {
  if (!prepared_) invalid("flash: forward called before prepare");
  const int64_t H = cfg_.n_heads, Hkv = cfg_.n_kv_heads, D = cfg_.head_dim;
  const int64_t T = b.n_tokens, S = b.n_seqs;
  if (T < 0 || S < 0) invalid("flash: n_tokens and n_seqs must be >= 0");
  if (T > 0 && S == 0) invalid("flash: n_tokens is " + std::to_string(T) + " but n_seqs is 0");
  if (cfg_.n_layers > 0 && (b.layer < 0 || b.layer >= cfg_.n_layers))
    invalid("flash: layer " + std::to_string(b.layer) + " out of range");
  const DLDevice dev = cfg_.device;
  // 16-byte alignment: the kernels move q/k/v/out rows and cache rows in 16-byte pieces.
  check_device_tensor(b.q, "q", dev, cfg_.dtype, {T, H, D}, 16);
  check_device_tensor(b.k, "k", dev, cfg_.dtype, {T, Hkv, D}, 16);
  check_device_tensor(b.v, "v", dev, cfg_.dtype, {T, Hkv, D}, 16);
  check_device_tensor(b.out, "out", dev, cfg_.dtype, {T, H, D}, 16);
  check_device_tensor(b.seq_offsets, "seq_offsets", dev, kI32, {S + 1}, 4);
  check_device_tensor(b.seq_positions, "seq_positions", dev, kI32, {S}, 4);
  check_device_tensor(b.block_table, "block_table", dev, kI32, {S, -1}, 4);
  check_device_tensor(b.kv_pool, "kv_pool", dev, kU8, {-1, static_cast<int64_t>(bytes_per_block_)}, 16);
  if (T == 0) return;
  const int64_t M = b.block_table->shape[1], N = b.kv_pool->shape[0];
  if (M == 0) invalid("block_table: has no columns, so no position has a block");
  if (N == 0) invalid("kv_pool: has no blocks");
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  if (T > kIntMax / H || S >= kIntMax) invalid("flash: n_tokens or n_seqs too large");
  if (M * block_size_ > kIntMax) invalid("block_table: more positions than 2^31 - 1");

  Problem p = prepared_problem_;
  bind_attention_batch(p, b);

  DeviceGuard device(dev.device_id);
  auto* stream = static_cast<cudaStream_t>(host_->current_stream(ctx_, dev));
  // One token per sequence is decode (the usual case when T == S; the kernel is correct for any
  // split of T tokens). gridDim.z caps the decode grid at 65535 tokens. The decode kernel
  // appends k/v to the cache itself; prefill reads every key from the cache, so the append
  // runs first.
  if (T == S && T <= 65535) {
    // Sequences that read keys other sequences of the batch append (speculative verification)
    // need those keys in the cache first; the decode kernel's own append then rewrites the same
    // bytes.
    if (b.struct_size >= offsetof(loom_attention_batch, shared_blocks) + sizeof(b.shared_blocks) && b.shared_blocks != 0)
      check_cuda(launch_cache_write(p, stream), "cache write kernel launch");
    check_cuda(launch_decode(p, plan_decode(p.n_tokens, p.table_cols), stream), "decode kernel launch");
  } else if (kvcache::kv_quantized(p.kv_format)) {
    run_quantized_prefill(p, stream);
  } else {
    check_cuda(launch_cache_write(p, stream), "cache write kernel launch");
    check_cuda(launch_prefill(p, stream), "prefill kernel launch");
  }
}

}  // namespace loomp::flash
