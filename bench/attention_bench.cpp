// Times the `flash` attention component through the runtime (a pipeline with [attention] use =
// "flash", as `loom run` loads it) on the shapes of the [Batching] attention target, and prints
// one JSON line per case. bench/attention_vs_torch.py runs it beside PyTorch's
// scaled_dot_product_attention (flash backend) on the same shapes and prints the table.
//
// Cases, for each head_dim (64, 128), batch (sequences) and length L:
//   prefill: each of `batch` sequences prefills its whole L-token prompt from position 0 in one
//            forward() call (causal). The call writes the new k/v into the paged cache and then
//            attends over the cache, so the cache write is inside the timed region: that is what
//            the runtime pays per layer, and what torch's sdpa (k/v already in place) does not.
//   decode:  each sequence adds one token at position L-1, so it attends over L keys of a
//            cache that the prefill filled (the one new k/v row is appended by the same call).
// Timing: forward() calls are captured in a CUDA graph (`calls` of them back to back, so that
// short decode calls are not timed behind the host's launch), one replay per rep between CUDA
// events after warm-up replays; median of reps, divided by `calls`. Decode rotates over
// `copies` caches (separate pool regions) so that back-to-back calls read their keys from
// memory, not from the L2 cache the previous call filled; prefill reuses one cache.
//
// KV-cache storage: --kv-dtype takes a list of flash's kv_dtype values (bf16, int8, fp8; default
// bf16, the bf16 compute dtype's own cache) and runs every case once per value, so that the cache
// formats are compared in one run on one machine. kv_gbps counts the bytes the format stores
// (1-byte codes plus a float32 scale per row for int8/fp8).
//
// usage: loom_attention_bench [--lengths 2048,4096,8192] [--dims 64,128] [--batches 1,4]
//          [--heads 32] [--kv-heads 8] [--block 16] [--reps 30] [--warmup 5]
//          [--prefill-calls 10] [--decode-calls 20] [--decode-bytes 200000000] [--no-decode]
//          [--no-prefill]   (--no-prefill: decode cases alone; their caches are still filled)
//          [--kv-dtype bf16,int8,fp8]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench_args.hpp"
#include "cuda_check.hpp"
#include "graph_timing.hpp"
#include "loom/core/error.hpp"
#include "loom/core/runtime.hpp"
#include "loom/loom_plugin_api.h"

namespace {

struct Options {
  std::vector<int> lengths{2048, 4096, 8192}, dims{64, 128}, batches{1, 4};
  int heads = 32, kv_heads = 8, block = 16, reps = 30, warmup = 5;
  int prefill_calls = 10, decode_calls = 20;
  double decode_bytes = 2e8; // KV bytes the rotated decode caches span at least (4x the H100's L2)
  bool decode = true;
  bool prefill = true; // time the prefill cases (their forward still fills the decode caches)
  std::vector<std::string> kv_dtypes{"bf16"};
};

Options parse(int argc, char **argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char *next = i + 1 < argc ? argv[i + 1] : nullptr;
    auto need = [&] {
      if (next == nullptr) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      ++i;
      return next;
    };
    if (a == "--lengths") o.lengths = loom_bench::parse_int_list(need());
    else if (a == "--dims") o.dims = loom_bench::parse_int_list(need());
    else if (a == "--batches") o.batches = loom_bench::parse_int_list(need());
    else if (a == "--heads") o.heads = std::atoi(need());
    else if (a == "--kv-heads") o.kv_heads = std::atoi(need());
    else if (a == "--block") o.block = std::atoi(need());
    else if (a == "--reps") o.reps = std::atoi(need());
    else if (a == "--warmup") o.warmup = std::atoi(need());
    else if (a == "--prefill-calls") o.prefill_calls = std::atoi(need());
    else if (a == "--decode-calls") o.decode_calls = std::atoi(need());
    else if (a == "--decode-bytes") o.decode_bytes = std::atof(need());
    else if (a == "--no-decode") o.decode = false;
    else if (a == "--no-prefill") o.prefill = false;
    else if (a == "--kv-dtype") o.kv_dtypes = loom_bench::parse_word_list(need());
    else {
      std::fprintf(stderr, "unknown argument %s (see the comment at the top of bench/attention_bench.cpp)\n",
                   a.c_str());
      std::exit(2);
    }
  }
  return o;
}

// Device memory that frees itself.
struct DeviceBuffer {
  void *ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { CHECK_CUDA(cudaMalloc(&ptr, bytes == 0 ? 1 : bytes)); }
  DeviceBuffer(const DeviceBuffer &) = delete;
  DeviceBuffer &operator=(const DeviceBuffer &) = delete;
  ~DeviceBuffer() { cudaFree(ptr); }
};

template <class T> void upload(const DeviceBuffer &dst, const std::vector<T> &src) {
  CHECK_CUDA(cudaMemcpy(dst.ptr, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice));
}

// `n` bfloat16 values uniform in [-1, 1) (the high half of a float; truncation is as random).
std::vector<uint16_t> random_bf16(size_t n, uint64_t seed) {
  std::vector<uint16_t> out(n);
  uint64_t s = seed;
  for (auto &x : out) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const float f = static_cast<float>(s >> 40) * (2.0f / 16777216.0f) - 1.0f;
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    x = static_cast<uint16_t>(bits >> 16);
  }
  return out;
}

// A DLTensor over device memory that the caller keeps alive.
struct View {
  std::vector<int64_t> shape;
  DLTensor t{};
  View(void *data, DLDataType dtype, std::vector<int64_t> s) : shape(std::move(s)) {
    t.data = data;
    t.device = DLDevice{kDLCUDA, 0};
    t.ndim = static_cast<int32_t>(shape.size());
    t.dtype = dtype;
    t.shape = shape.data();
  }
  View(const View &) = delete;
  View &operator=(const View &) = delete;
};

// One causal forward over these views (which must outlive the batch): S sequences, T tokens.
loom_attention_batch causal_batch(int S, int64_t T, View &q, View &k, View &v, View &out, View &off, View &pos,
                                  View &table, View &pool) {
  loom_attention_batch b{};
  b.struct_size = sizeof(b);
  b.n_seqs = S;
  b.n_tokens = static_cast<int32_t>(T);
  b.q = &q.t;
  b.k = &k.t;
  b.v = &v.t;
  b.out = &out.t;
  b.seq_offsets = &off.t;
  b.seq_positions = &pos.t;
  b.block_table = &table.t;
  b.kv_pool = &pool.t;
  b.causal = 1;
  return b;
}

// The flash instance of a one-slot pipeline, prepared for one head_dim.
class Flash {
 public:
  Flash(const Options &o, int head_dim, int max_positions, const std::string &kv_dtype) : kv_dtype_(kv_dtype) {
    const std::string manifest = "[loom]\ndevice = \"cuda\"\n\n[attention]\nuse = \"flash\"\nblock_size = " +
                                 std::to_string(o.block) + "\nkv_dtype = \"" + kv_dtype + "\"\n";
    rt_ = loom::Runtime::from_string(manifest, "<loom_attention_bench>");
    inst_ = &rt_->pipeline().at("attention");
    vt_ = inst_->vtable<loom_attention_vtable>();
    loom_attention_config c{};
    c.struct_size = sizeof(c);
    c.n_layers = 1;
    c.n_heads = o.heads;
    c.n_kv_heads = o.kv_heads;
    c.head_dim = head_dim;
    c.max_positions = max_positions;
    c.softmax_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    c.dtype = DLDataType{kDLBfloat, 16, 1};
    c.device = DLDevice{kDLCUDA, 0};
    layout_.struct_size = sizeof(layout_);
    inst_->check(vt_->prepare(inst_->handle(), &c, &layout_), "prepare");
    stream_ = static_cast<cudaStream_t>(inst_->host()->current_stream(inst_->ctx(), c.device));
  }
  void forward(const loom_attention_batch &b) const { inst_->check(vt_->forward(inst_->handle(), &b), "forward"); }
  uint64_t bytes_per_block() const { return layout_.bytes_per_block; }
  const std::string &kv_dtype() const { return kv_dtype_; }
  // Bytes the cache stores per (token, kv head) row of D values.
  double row_bytes(int head_dim) const {
    return kv_dtype_ == "int8" || kv_dtype_ == "fp8" ? head_dim + 4.0 : 2.0 * head_dim;
  }
  cudaStream_t stream() const { return stream_; }

 private:
  std::unique_ptr<loom::Runtime> rt_;
  loom::Instance *inst_ = nullptr;
  const loom_attention_vtable *vt_ = nullptr;
  loom_kv_layout layout_{};
  cudaStream_t stream_ = nullptr;
  std::string kv_dtype_;
};

// Median microseconds of one call: `calls` forward() calls captured in one graph, `reps` timed
// replays after `warmup` untimed ones. `batch_of(i)` is the i-th call's batch.
template <class BatchOf>
double median_us(const Flash &f, const Options &o, int calls, BatchOf &&batch_of) {
  const double ms = loom_bench::graph_median_ms(f.stream(), o.warmup, o.reps, [&](cudaStream_t) {
    for (int i = 0; i < calls; ++i) f.forward(batch_of(i));
  });
  return 1000.0 * ms / calls;
}

// Largest |x| of bf16 `out` (NaN if any is NaN): a check that the timed calls computed numbers.
double max_abs_bf16(const void *dev, size_t n) {
  std::vector<uint16_t> host(n);
  CHECK_CUDA(cudaMemcpy(host.data(), dev, n * 2, cudaMemcpyDeviceToHost));
  double m = 0;
  for (uint16_t h : host) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    if (std::isnan(f)) return std::nan("");
    m = std::max(m, static_cast<double>(std::fabs(f)));
  }
  return m;
}

void print_case(const char *phase, const Options &o, const Flash &f, int D, int S, int L, int calls, int copies,
                double us, double flops, double kv_bytes, double out_max) {
  std::printf("{\"phase\": \"%s\", \"kv_dtype\": \"%s\", \"batch\": %d, \"length\": %d, \"head_dim\": %d, "
              "\"heads\": %d, \"kv_heads\": %d, "
              "\"block_size\": %d, \"calls\": %d, \"copies\": %d, \"reps\": %d, \"warmup\": %d, \"median_us\": %.2f, "
              "\"tflops\": %.1f, \"kv_gbps\": %.0f, \"out_max_abs\": %.4f}\n",
              phase, f.kv_dtype().c_str(), S, L, D, o.heads, o.kv_heads, o.block, calls, copies, o.reps, o.warmup, us,
              flops / us * 1e-6, kv_bytes / us * 1e-3, out_max);
  std::fflush(stdout);
}

// Both cases of one (head_dim, batch, length).
void run_case(const Flash &f, const Options &o, int D, int S, int L, const DeviceBuffer &q, const DeviceBuffer &k,
              const DeviceBuffer &v, const DeviceBuffer &out) {
  const int64_t H = o.heads, Hkv = o.kv_heads, M = (L + o.block - 1) / o.block, N = S * M;
  const double kv_bytes = 2.0 * S * L * static_cast<double>(Hkv) * f.row_bytes(D);
  // Decode copies: enough caches that the calls between two visits of one read >= decode_bytes.
  const int copies = o.decode ? static_cast<int>(std::clamp(std::ceil(o.decode_bytes / kv_bytes), 1.0, 64.0)) : 1;
  DeviceBuffer pool(static_cast<size_t>(copies * N) * f.bytes_per_block());
  // Block tables: each copy's blocks shuffled within its own region of the pool, as a paged
  // cache's free list hands them out after some churn.
  std::mt19937 rng(static_cast<uint32_t>(7 * D + S + L));
  std::vector<int32_t> tables;
  for (int c = 0; c < copies; ++c) {
    std::vector<int32_t> t(static_cast<size_t>(N));
    std::iota(t.begin(), t.end(), static_cast<int32_t>(c * N));
    std::shuffle(t.begin(), t.end(), rng);
    tables.insert(tables.end(), t.begin(), t.end());
  }
  DeviceBuffer table(tables.size() * 4);
  upload(table, tables);
  const DLDataType bf16{kDLBfloat, 16, 1}, i32{kDLInt, 32, 1}, u8{kDLUInt, 8, 1};
  View vpool(pool.ptr, u8, {copies * N, static_cast<int64_t>(f.bytes_per_block())});
  std::deque<View> vtab; // a deque: Views hold their own shape storage and never move
  for (int c = 0; c < copies; ++c)
    vtab.emplace_back(static_cast<int32_t *>(table.ptr) + static_cast<size_t>(c) * static_cast<size_t>(N), i32,
                      std::vector<int64_t>{S, M});

  // Prefill: S sequences of L tokens from position 0.
  {
    const int64_t T = static_cast<int64_t>(S) * L;
    std::vector<int32_t> offsets, positions(static_cast<size_t>(S), 0);
    for (int s = 0; s <= S; ++s) offsets.push_back(s * L);
    DeviceBuffer off(offsets.size() * 4), pos(positions.size() * 4);
    upload(off, offsets);
    upload(pos, positions);
    View vq(q.ptr, bf16, {T, H, D}), vk(k.ptr, bf16, {T, Hkv, D}), vv(v.ptr, bf16, {T, Hkv, D}),
        vo(out.ptr, bf16, {T, H, D}), voff(off.ptr, i32, {S + 1}), vpos(pos.ptr, i32, {S});
    auto batch_on = [&](int c) { return causal_batch(S, T, vq, vk, vv, vo, voff, vpos, vtab[static_cast<size_t>(c)], vpool); };
    if (o.prefill) {
      // One untimed call first: an int8/fp8 cache's prefill sizes its scratch at its first call
      // (an allocation, which graph capture would refuse); a bf16 one just warms up.
      f.forward(batch_on(0));
      const double us = median_us(f, o, o.prefill_calls, [&](int) { return batch_on(0); });
      const double flops = 4.0 * S * static_cast<double>(H * D) * L * (L + 1) / 2.0;
      print_case("prefill", o, f, D, S, L, o.prefill_calls, 1, us, flops, kv_bytes,
                 max_abs_bf16(out.ptr, static_cast<size_t>(T * H * D)));
    }
    // Fill the other decode copies' caches the same way (untimed; copy 0 too without the timing).
    for (int c = o.prefill ? 1 : 0; c < copies; ++c) f.forward(batch_on(c));
    CHECK_CUDA(cudaStreamSynchronize(f.stream()));
  }
  if (!o.decode) return;

  // Decode: one token per sequence at position L-1, over L keys.
  std::vector<int32_t> offsets, positions(static_cast<size_t>(S), L - 1);
  for (int s = 0; s <= S; ++s) offsets.push_back(s);
  DeviceBuffer off(offsets.size() * 4), pos(positions.size() * 4);
  upload(off, offsets);
  upload(pos, positions);
  const int64_t T = S;
  View vq(q.ptr, bf16, {T, H, D}), vk(k.ptr, bf16, {T, Hkv, D}), vv(v.ptr, bf16, {T, Hkv, D}),
      vo(out.ptr, bf16, {T, H, D}), voff(off.ptr, i32, {S + 1}), vpos(pos.ptr, i32, {S});
  const int calls = std::max(o.decode_calls, copies);
  const double us = median_us(f, o, calls, [&](int i) {
    return causal_batch(S, T, vq, vk, vv, vo, voff, vpos, vtab[static_cast<size_t>(i % copies)], vpool);
  });
  const double flops = 4.0 * S * static_cast<double>(H * D) * L;
  print_case("decode", o, f, D, S, L, calls, copies, us, flops, kv_bytes,
             max_abs_bf16(out.ptr, static_cast<size_t>(T * H * D)));
}

} // namespace

int main(int argc, char **argv) {
  const Options o = parse(argc, argv);
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "loom_attention_bench: no CUDA device\n");
    return 77;
  }
  try {
    const int longest = *std::max_element(o.lengths.begin(), o.lengths.end());
    const int most = *std::max_element(o.batches.begin(), o.batches.end());
    const size_t max_tokens = static_cast<size_t>(most) * static_cast<size_t>(longest);
    for (int D : o.dims) {
      // Inputs for the largest case; smaller cases use their prefix.
      const size_t q_elems = max_tokens * static_cast<size_t>(o.heads * D),
                   kv_elems = max_tokens * static_cast<size_t>(o.kv_heads * D);
      DeviceBuffer q(q_elems * 2), k(kv_elems * 2), v(kv_elems * 2), out(q_elems * 2);
      upload(q, random_bf16(q_elems, 1));
      upload(k, random_bf16(kv_elems, 2));
      upload(v, random_bf16(kv_elems, 3));
      for (const std::string &kv : o.kv_dtypes) {
        const Flash f(o, D, longest, kv);
        for (int S : o.batches)
          for (int L : o.lengths) run_case(f, o, D, S, L, q, k, v, out);
      }
    }
  } catch (const loom::Error &e) {
    std::fprintf(stderr, "loom_attention_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
