// The CUDA attention paths against the CPU reference: `sdpa` on CUDA (float32 and bfloat16) and
// `flash` (bfloat16, float16) against `sdpa` on the CPU, over ragged batches of several
// sequences (prefill, decode steps, chunked and uneven steps), GQA ratios 1 to 24, head dims 64
// and 128, block sizes 1 to 64 and sliding windows; flash's decode captured in a CUDA graph and
// replayed with new positions in device memory; clear refusals of bad batches; sdpa's bf16,
// int8 and fp8 KV caches (kv_dtype) on CUDA against the same caches on the CPU, stored bytes
// included; flash's int8 and fp8 caches against CUDA sdpa's (pools byte for byte, outputs within
// a tolerance), its decode captured in a CUDA graph with an int8 cache. A hidden
// micro-benchmark ("[bench]") times flash against sdpa on CUDA.
//
// Inputs are rounded to bfloat16 once, so every dtype sees the same values and the CPU
// reference (float32) computes on exactly what the GPU kernels read. Errors are normwise:
// max |got - want| / max |want| over a step's output.
// Exits 77 (CTest: skipped) when there is no CUDA device.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "builtin_test_util.hpp"
#include "loom/core/host_context.hpp"

namespace {

#define CUDA_REQUIRE(expr) REQUIRE(static_cast<int>(expr) == static_cast<int>(cudaSuccess))

enum class Dt { f32, bf16, f16 };

DLDataType dl_dtype(Dt d) {
  switch (d) {
    case Dt::f32: return {kDLFloat, 32, 1};
    case Dt::bf16: return {kDLBfloat, 16, 1};
    default: return {kDLFloat, 16, 1};
  }
}
size_t elem_size(Dt d) { return d == Dt::f32 ? 4 : 2; }
const char *dt_name(Dt d) { return d == Dt::f32 ? "float32" : d == Dt::bf16 ? "bfloat16" : "float16"; }

float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

std::vector<uint8_t> encode(const std::vector<float> &x, Dt d) {
  std::vector<uint8_t> out(x.size() * elem_size(d));
  for (size_t i = 0; i < x.size(); ++i) {
    if (d == Dt::f32) {
      std::memcpy(out.data() + 4 * i, &x[i], 4);
    } else if (d == Dt::bf16) {
      const __nv_bfloat16 h = __float2bfloat16_rn(x[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    } else {
      const __half h = __float2half_rn(x[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

std::vector<float> decode(const std::vector<uint8_t> &bytes, Dt d) {
  std::vector<float> out(bytes.size() / elem_size(d));
  for (size_t i = 0; i < out.size(); ++i) {
    if (d == Dt::f32) {
      std::memcpy(&out[i], bytes.data() + 4 * i, 4);
    } else if (d == Dt::bf16) {
      __nv_bfloat16 h;
      std::memcpy(&h, bytes.data() + 2 * i, 2);
      out[i] = __bfloat162float(h);
    } else {
      __half h;
      std::memcpy(&h, bytes.data() + 2 * i, 2);
      out[i] = __half2float(h);
    }
  }
  return out;
}

// max |got - want| / max |want|; NaN anywhere makes it NaN, which fails every <= check.
double relative_error(const std::vector<float> &got, const std::vector<float> &want) {
  REQUIRE(got.size() == want.size());
  double worst = 0, largest = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double diff = std::abs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (std::isnan(diff)) return std::nan("");
    worst = std::max(worst, diff);
    largest = std::max(largest, std::abs(static_cast<double>(want[i])));
  }
  return largest > 0 ? worst / largest : worst;
}

// Device memory that frees itself.
struct DeviceBuffer {
  void *ptr = nullptr;
  size_t bytes = 0;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : bytes(n) { CUDA_REQUIRE(cudaMalloc(&ptr, n == 0 ? 1 : n)); }
  DeviceBuffer(const DeviceBuffer &) = delete;
  DeviceBuffer &operator=(const DeviceBuffer &) = delete;
  DeviceBuffer(DeviceBuffer &&o) noexcept : ptr(o.ptr), bytes(o.bytes) { o.ptr = nullptr; }
  DeviceBuffer &operator=(DeviceBuffer &&o) noexcept {
    std::swap(ptr, o.ptr);
    std::swap(bytes, o.bytes);
    return *this;
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  template <class T> static DeviceBuffer of(const std::vector<T> &host) {
    DeviceBuffer b(host.size() * sizeof(T));
    CUDA_REQUIRE(cudaMemcpy(b.ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    return b;
  }
};

// A DLTensor over memory the caller keeps alive, with its own shape storage.
struct View {
  std::vector<int64_t> shape;
  DLTensor t{};

  View(void *data, DLDevice dev, DLDataType dtype, std::vector<int64_t> s) : shape(std::move(s)) {
    t.data = data;
    t.device = dev;
    t.ndim = static_cast<int32_t>(shape.size());
    t.dtype = dtype;
    t.shape = shape.data();
  }
  View(const View &) = delete;
  View &operator=(const View &) = delete;
};

// One causal forward of layer 0 over these views: S sequences, T tokens. The views must outlive
// the batch.
loom_attention_batch causal_batch(View &q, View &k, View &v, View &out, View &off, View &pos, View &table, View &pool,
                                  int64_t S, int64_t T) {
  return bt::causal_batch(&q.t, &k.t, &v.t, &out.t, &off.t, &pos.t, &table.t, &pool.t, S, T);
}

struct Geometry {
  int H, Hkv, D, B, window;
  int max_positions = 4096;
};

// One forward call's host data: the new tokens of each sequence and their q/k/v (bf16 values).
struct Step {
  int T = 0;
  std::vector<int32_t> offsets, positions;
  std::vector<float> q, k, v;
};

// Sequences, the block table shared by every backend, and the steps.
struct Scenario {
  Geometry g;
  int S = 0, M = 0, N = 0;
  std::vector<int32_t> table; // [S, M], pool blocks shuffled so that neighbours are far apart
  std::vector<Step> steps;
};

Scenario make_scenario(const Geometry &g, const std::vector<std::vector<int>> &lens, uint32_t seed) {
  Scenario sc;
  sc.g = g;
  sc.S = static_cast<int>(lens.front().size());
  std::vector<int> total(static_cast<size_t>(sc.S), 0);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  for (const auto &step_lens : lens) {
    REQUIRE(static_cast<int>(step_lens.size()) == sc.S);
    Step st;
    st.offsets.push_back(0);
    for (int s = 0; s < sc.S; ++s) {
      st.positions.push_back(total[static_cast<size_t>(s)]);
      total[static_cast<size_t>(s)] += step_lens[static_cast<size_t>(s)];
      st.T += step_lens[static_cast<size_t>(s)];
      st.offsets.push_back(st.T);
    }
    const auto T = static_cast<size_t>(st.T);
    // q spans [-2, 2] so that some softmaxes are peaked, not all flat.
    for (size_t i = 0; i < T * static_cast<size_t>(g.H * g.D); ++i) st.q.push_back(round_bf16(2.0f * uni(rng)));
    for (size_t i = 0; i < T * static_cast<size_t>(g.Hkv * g.D); ++i) st.k.push_back(round_bf16(uni(rng)));
    for (size_t i = 0; i < T * static_cast<size_t>(g.Hkv * g.D); ++i) st.v.push_back(round_bf16(uni(rng)));
    sc.steps.push_back(std::move(st));
  }
  const int longest = *std::max_element(total.begin(), total.end());
  REQUIRE(longest <= g.max_positions);
  sc.M = (longest + g.B - 1) / g.B;
  sc.N = sc.S * sc.M + 5; // a few blocks nobody uses
  std::vector<int32_t> blocks(static_cast<size_t>(sc.N));
  std::iota(blocks.begin(), blocks.end(), 0);
  std::shuffle(blocks.begin(), blocks.end(), rng);
  sc.table.assign(blocks.begin(), blocks.begin() + sc.S * sc.M);
  return sc;
}

loom_attention_config make_config(const Geometry &g, Dt dt, DLDevice dev) {
  loom_attention_config c{};
  c.struct_size = sizeof(c);
  c.n_layers = 1;
  c.n_heads = g.H;
  c.n_kv_heads = g.Hkv;
  c.head_dim = g.D;
  c.max_positions = g.max_positions;
  c.sliding_window = g.window;
  c.softmax_scale = 1.0f / std::sqrt(static_cast<float>(g.D));
  c.dtype = dl_dtype(dt);
  c.device = dev;
  return c;
}

constexpr DLDevice kCpu{kDLCPU, 0};
constexpr DLDevice kGpu{kDLCUDA, 0};

// A non-blocking stream (made by main) and a host table whose current_stream() hands it to the
// plugin: graph capture needs a stream other than the legacy default one.
cudaStream_t g_stream = nullptr;
void *test_stream(loom_host_ctx *, DLDevice) { return g_stream; }
const loom_host_api *stream_host() {
  static const loom_host_api table = [] {
    loom_host_api t = *loom::host_api();
    t.current_stream = &test_stream;
    return t;
  }();
  return &table;
}

// One attention instance with its own KV pool, on the CPU or CUDA. With `host` set, the
// instance is created through that host table (over the runtime's context) instead of the
// runtime's own: how the graph test hands the plugin a stream of its choosing.
class Backend {
 public:
  Backend(const std::string &component, DLDevice dev, Dt dt, const Geometry &g, int n_blocks,
          const loom_host_api *host = nullptr, const std::string &kv_dtype = "auto")
      : dev_(dev), dt_(dt), g_(g) {
    const std::string manifest = std::string("[loom]\ndevice = \"") + (dev.device_type == kDLCPU ? "cpu" : "cuda") +
                                 "\"\n\n[attention]\nuse = \"" + component + "\"\nblock_size = " + std::to_string(g.B) +
                                 "\nkv_dtype = \"" + kv_dtype + "\"\n";
    rt_ = loom::Runtime::from_string(manifest, "<attention_cuda_test>");
    inst_ = &rt_->pipeline().at("attention");
    vt_ = inst_->vtable<loom_attention_vtable>();
    handle_ = inst_->handle();
    if (host != nullptr) {
      REQUIRE(vt_->life.create(host, inst_->ctx(), &own_handle_) == LOOM_OK);
      handle_ = own_handle_;
    }
    const loom_attention_config c = make_config(g, dt, dev);
    layout_.struct_size = sizeof(layout_);
    const loom_status st = vt_->prepare(handle_, &c, &layout_);
    INFO(component << " prepare: " << inst_->last_error());
    REQUIRE(st == LOOM_OK);
    REQUIRE(layout_.block_size == g.B);
    // Scaled caches (int8, fp8) are sized in builtin_sdpa_kv_dtype_test; here the CPU and CUDA
    // instances must agree, which compare_kv checks.
    if (kv_dtype == "auto")
      REQUIRE(layout_.bytes_per_block == 2ull * static_cast<uint64_t>(g.B * g.Hkv * g.D) * elem_size(dt));
    n_blocks_ = n_blocks;
    const size_t pool_bytes = static_cast<size_t>(n_blocks) * layout_.bytes_per_block;
    if (dev.device_type == kDLCPU) {
      host_pool_.assign(pool_bytes, 0);
    } else {
      pool_ = DeviceBuffer(pool_bytes);
      CUDA_REQUIRE(cudaMemset(pool_.ptr, 0, pool_bytes));
    }
  }
  ~Backend() {
    if (own_handle_ != nullptr) vt_->life.destroy(own_handle_);
  }
  Backend(const Backend &) = delete;
  Backend &operator=(const Backend &) = delete;

  // Runs one step and returns `out` as float.
  std::vector<float> forward(const Scenario &sc, const Step &st) {
    const auto T = static_cast<int64_t>(st.T), S = static_cast<int64_t>(sc.S);
    const int64_t H = g_.H, Hkv = g_.Hkv, D = g_.D;
    const DLDataType dtype = dl_dtype(dt_);
    const DLDataType i32{kDLInt, 32, 1}, u8{kDLUInt, 8, 1};
    const auto q = encode(st.q, dt_), k = encode(st.k, dt_), v = encode(st.v, dt_);
    std::vector<uint8_t> out(static_cast<size_t>(T * H * D) * elem_size(dt_));
    std::vector<int32_t> offsets = st.offsets, positions = st.positions, table = sc.table;
    if (dev_.device_type == kDLCPU) {
      View vq(const_cast<uint8_t *>(q.data()), kCpu, dtype, {T, H, D}),
          vk(const_cast<uint8_t *>(k.data()), kCpu, dtype, {T, Hkv, D}),
          vv(const_cast<uint8_t *>(v.data()), kCpu, dtype, {T, Hkv, D}), vo(out.data(), kCpu, dtype, {T, H, D}),
          voff(offsets.data(), kCpu, i32, {S + 1}), vpos(positions.data(), kCpu, i32, {S}),
          vtab(table.data(), kCpu, i32, {S, sc.M}),
          vpool(host_pool_.data(), kCpu, u8, {n_blocks_, static_cast<int64_t>(layout_.bytes_per_block)});
      call(vq, vk, vv, vo, voff, vpos, vtab, vpool, S, T);
      return decode(out, dt_);
    }
    auto dq = DeviceBuffer::of(q), dk = DeviceBuffer::of(k), dv = DeviceBuffer::of(v);
    DeviceBuffer dout(out.size());
    auto doff = DeviceBuffer::of(offsets), dpos = DeviceBuffer::of(positions), dtab = DeviceBuffer::of(table);
    View vq(dq.ptr, kGpu, dtype, {T, H, D}), vk(dk.ptr, kGpu, dtype, {T, Hkv, D}), vv(dv.ptr, kGpu, dtype, {T, Hkv, D}),
        vo(dout.ptr, kGpu, dtype, {T, H, D}), voff(doff.ptr, kGpu, i32, {S + 1}), vpos(dpos.ptr, kGpu, i32, {S}),
        vtab(dtab.ptr, kGpu, i32, {S, sc.M}),
        vpool(pool_.ptr, kGpu, u8, {n_blocks_, static_cast<int64_t>(layout_.bytes_per_block)});
    // The plugin may order its work on a stream of the host's that does not wait for the legacy
    // default stream: settle the uploads first and the kernels before reading back.
    CUDA_REQUIRE(cudaDeviceSynchronize());
    call(vq, vk, vv, vo, voff, vpos, vtab, vpool, S, T);
    CUDA_REQUIRE(cudaDeviceSynchronize());
    CUDA_REQUIRE(cudaGetLastError());
    CUDA_REQUIRE(cudaMemcpy(out.data(), dout.ptr, out.size(), cudaMemcpyDeviceToHost));
    return decode(out, dt_);
  }

  const loom_attention_vtable *vt() const { return vt_; }
  void *handle() const { return handle_; }
  loom::Instance &instance() const { return *inst_; }
  void *device_pool() const { return pool_.ptr; }
  int n_blocks() const { return n_blocks_; }
  const loom_kv_layout &layout() const { return layout_; }
  // The whole KV pool as bytes, copied from the device where it lives there.
  std::vector<uint8_t> pool_bytes() const {
    if (dev_.device_type == kDLCPU) return host_pool_;
    std::vector<uint8_t> out(pool_.bytes);
    CUDA_REQUIRE(cudaMemcpy(out.data(), pool_.ptr, out.size(), cudaMemcpyDeviceToHost));
    return out;
  }

 private:
  void call(View &q, View &k, View &v, View &out, View &off, View &pos, View &table, View &pool, int64_t S, int64_t T) {
    loom_attention_batch b = causal_batch(q, k, v, out, off, pos, table, pool, S, T);
    const loom_status st = vt_->forward(handle_, &b);
    INFO("forward: " << inst_->last_error());
    REQUIRE(st == LOOM_OK);
  }

  DLDevice dev_;
  Dt dt_;
  Geometry g_;
  std::unique_ptr<loom::Runtime> rt_;
  loom::Instance *inst_ = nullptr;
  const loom_attention_vtable *vt_ = nullptr;
  void *handle_ = nullptr;
  void *own_handle_ = nullptr;
  loom_kv_layout layout_{};
  int n_blocks_ = 0;
  std::vector<uint8_t> host_pool_;
  DeviceBuffer pool_;
};

struct Candidate {
  const char *component;
  Dt dt;
  double tolerance;
};

// Every candidate against CPU sdpa, step by step (each keeps its own cache across steps).
void compare(const Geometry &g, const std::vector<std::vector<int>> &lens, uint32_t seed,
             const std::vector<Candidate> &candidates) {
  const Scenario sc = make_scenario(g, lens, seed);
  INFO("H=" << g.H << " Hkv=" << g.Hkv << " D=" << g.D << " B=" << g.B << " window=" << g.window << " S=" << sc.S);
  Backend reference("sdpa", kCpu, Dt::f32, g, sc.N);
  std::vector<std::unique_ptr<Backend>> backends;
  for (const auto &c : candidates) backends.push_back(std::make_unique<Backend>(c.component, kGpu, c.dt, g, sc.N));
  std::vector<double> worst(candidates.size(), 0.0);
  for (size_t i = 0; i < sc.steps.size(); ++i) {
    const auto want = reference.forward(sc, sc.steps[i]);
    for (size_t c = 0; c < candidates.size(); ++c) {
      const double err = relative_error(backends[c]->forward(sc, sc.steps[i]), want);
      INFO("step " << i << " (T=" << sc.steps[i].T << "): " << candidates[c].component << " "
                   << dt_name(candidates[c].dt) << " relative error " << err);
      CHECK(err <= candidates[c].tolerance);
      worst[c] = std::isnan(err) ? err : std::max(worst[c], err);
    }
  }
  // One line per geometry, so that a passing run still shows how close each path came.
  std::printf("H=%-2d Hkv=%-2d D=%-3d B=%-2d window=%-3d S=%d steps=%zu:", g.H, g.Hkv, g.D, g.B, g.window, sc.S,
              sc.steps.size());
  for (size_t c = 0; c < candidates.size(); ++c)
    std::printf("  %s/%s %.2e", candidates[c].component, dt_name(candidates[c].dt), worst[c]);
  std::printf("\n");
}

const std::vector<Candidate> kAll = {
    {"sdpa", Dt::f32, 1e-4}, {"sdpa", Dt::bf16, 2e-2}, {"flash", Dt::bf16, 2e-2}};

// Prefill of different lengths, decode steps, a chunked step with an empty sequence (prefill
// kernel) and an uneven step with T == S (decode kernel, one sequence with two tokens).
std::vector<std::vector<int>> standard_steps(std::mt19937 &rng, int S, int max_prefill) {
  std::uniform_int_distribution<int> len(1, max_prefill);
  std::vector<int> prefill;
  for (int s = 0; s < S; ++s) prefill.push_back(s == 1 ? 1 : len(rng));
  std::vector<std::vector<int>> steps{prefill};
  for (int i = 0; i < 3; ++i) steps.emplace_back(static_cast<size_t>(S), 1);
  std::vector<int> chunk(static_cast<size_t>(S), 1), uneven(static_cast<size_t>(S), 1);
  chunk[0] = 37;
  chunk[static_cast<size_t>(S - 1)] = 0;
  uneven[0] = 2;
  uneven[static_cast<size_t>(S - 1)] = 0;
  steps.push_back(chunk);
  steps.push_back(uneven);
  steps.emplace_back(static_cast<size_t>(S), 1);
  return steps;
}

// A geometry run over S sequences of standard_steps() with prefills up to max_prefill tokens.
struct Case {
  Geometry g;
  int S, max_prefill;
};

// sdpa with a KV cache of `kv_dtype` on CUDA (float32 and bfloat16 compute) against sdpa with the
// same cache on the CPU, step by step. Both quantize the same (bf16-valued) k/v with the same
// functions (sdpa_kv_format.hpp), so the pools must hold identical bytes after every step; the
// outputs differ only by float summation order (float32) or bf16 rounding of the output.
void compare_kv(const Geometry &g, const std::vector<std::vector<int>> &lens, uint32_t seed, const std::string &kv_dtype) {
  const Scenario sc = make_scenario(g, lens, seed);
  INFO("kv_dtype=" << kv_dtype << " H=" << g.H << " Hkv=" << g.Hkv << " D=" << g.D << " B=" << g.B
                   << " window=" << g.window << " S=" << sc.S);
  Backend reference("sdpa", kCpu, Dt::f32, g, sc.N, nullptr, kv_dtype);
  Backend f32("sdpa", kGpu, Dt::f32, g, sc.N, nullptr, kv_dtype), bf16("sdpa", kGpu, Dt::bf16, g, sc.N, nullptr, kv_dtype);
  REQUIRE(f32.layout().bytes_per_block == reference.layout().bytes_per_block);
  REQUIRE(bf16.layout().bytes_per_block == reference.layout().bytes_per_block);
  CHECK(f32.layout().cache_dtype.code == reference.layout().cache_dtype.code);
  double worst_f32 = 0, worst_bf16 = 0;
  for (size_t i = 0; i < sc.steps.size(); ++i) {
    INFO("step " << i << " (T=" << sc.steps[i].T << ")");
    const auto want = reference.forward(sc, sc.steps[i]);
    const double e32 = relative_error(f32.forward(sc, sc.steps[i]), want);
    const double e16 = relative_error(bf16.forward(sc, sc.steps[i]), want);
    CHECK(e32 <= 1e-4);
    CHECK(e16 <= 2e-2);
    worst_f32 = std::max(worst_f32, e32);
    worst_bf16 = std::max(worst_bf16, e16);
    const auto cpu_pool = reference.pool_bytes();
    CHECK(f32.pool_bytes() == cpu_pool);
    CHECK(bf16.pool_bytes() == cpu_pool);
  }
  std::printf("kv_dtype=%-4s H=%-2d Hkv=%-2d D=%-3d B=%-2d window=%-3d S=%d: sdpa/float32 %.2e  sdpa/bfloat16 %.2e\n",
              kv_dtype.c_str(), g.H, g.Hkv, g.D, g.B, g.window, sc.S, worst_f32, worst_bf16);
}

// The scenario's inputs rounded to `dt` (values already bf16 stay bf16 for bf16; float16 may
// round tiny ones), so that a float32 reference reads exactly what a `dt` kernel reads.
Scenario rounded_to(Scenario sc, Dt dt) {
  for (Step &st : sc.steps)
    for (std::vector<float> *x : {&st.q, &st.k, &st.v}) *x = decode(encode(*x, dt), dt);
  return sc;
}

// flash with an int8 or fp8 cache (compute dtype `dt`: bfloat16 or float16) against CUDA sdpa
// with the same cache (bfloat16 compute for bfloat16, float32 for float16, which sdpa lacks on
// CUDA: inputs rounded to float16 first, so both quantize the same float values), step by step.
// The two quantize with the same functions, so their pools must hold identical bytes after every
// step (flash's decode reads what sdpa's cache write stored); the outputs differ by flash's
// summation order, its prefill reading the context dequantized to `dt` (one more rounding of
// each key and value) and the output's rounding. Returns the worst relative error.
double compare_flash_kv(const Geometry &g, const std::vector<std::vector<int>> &lens, uint32_t seed,
                        const std::string &kv_dtype, Dt dt, double tolerance) {
  const Scenario sc = rounded_to(make_scenario(g, lens, seed), dt);
  INFO("kv_dtype=" << kv_dtype << " " << dt_name(dt) << " H=" << g.H << " Hkv=" << g.Hkv << " D=" << g.D
                   << " B=" << g.B << " window=" << g.window << " S=" << sc.S);
  Backend reference("sdpa", kGpu, dt == Dt::bf16 ? Dt::bf16 : Dt::f32, g, sc.N, nullptr, kv_dtype);
  Backend flash("flash", kGpu, dt, g, sc.N, nullptr, kv_dtype);
  // The same block format: either plugin's pool is valid for the other.
  REQUIRE(flash.layout().bytes_per_block == reference.layout().bytes_per_block);
  CHECK(flash.layout().cache_dtype.code == reference.layout().cache_dtype.code);
  CHECK(flash.layout().cache_dtype.bits == reference.layout().cache_dtype.bits);
  double worst = 0;
  for (size_t i = 0; i < sc.steps.size(); ++i) {
    INFO("step " << i << " (T=" << sc.steps[i].T << ")");
    const auto want = reference.forward(sc, sc.steps[i]);
    const double err = relative_error(flash.forward(sc, sc.steps[i]), want);
    CHECK(err <= tolerance);
    worst = std::isnan(err) ? err : std::max(worst, err);
    CHECK(flash.pool_bytes() == reference.pool_bytes());
  }
  std::printf("flash kv_dtype=%-4s %-8s H=%-2d Hkv=%-2d D=%-3d B=%-2d window=%-3d S=%-2d steps=%zu: vs sdpa %.2e\n",
              kv_dtype.c_str(), dt_name(dt), g.H, g.Hkv, g.D, g.B, g.window, sc.S, sc.steps.size(), worst);
  return worst;
}

} // namespace

TEST_CASE("CUDA sdpa with bf16, int8 and fp8 KV caches matches CPU sdpa with the same cache", "[cuda][attention][kv]") {
  std::mt19937 rng(4242);
  const std::vector<Case> cases = {
      {{8, 2, 64, 16, 0}, 3, 120},   // GQA 4
      {{12, 4, 48, 4, 0}, 2, 90},    // GQA 3, head dim 48 (the default model's), small blocks
      {{8, 8, 20, 1, 17}, 2, 60},    // odd row bytes (20): scales after padding, window
      {{16, 1, 128, 32, 0}, 2, 150}, // MQA, head dim 128 (4 elements a lane)
  };
  for (const char *kv : {"int8", "fp8", "bf16"})
    for (size_t i = 0; i < cases.size(); ++i)
      compare_kv(cases[i].g, standard_steps(rng, cases[i].S, cases[i].max_prefill), static_cast<uint32_t>(300 + i), kv);
}

TEST_CASE("CUDA sdpa and flash match CPU sdpa over prefill and decode", "[cuda][attention]") {
  std::mt19937 rng(2024);
  const std::vector<Case> cases = {
      {{8, 8, 64, 16, 0}, 4, 150},     // MHA
      {{16, 4, 128, 16, 0}, 3, 200},   // GQA 4
      {{32, 4, 64, 64, 0}, 4, 130},    // GQA 8, big blocks
      {{8, 2, 128, 32, 37}, 3, 180},   // GQA 4, window
      {{16, 2, 64, 8, 100}, 5, 260},   // GQA 8, window across several tiles
      {{12, 4, 64, 16, 0}, 3, 90},     // GQA 3: no head packing
      {{24, 1, 128, 4, 0}, 2, 120},    // GQA 24 (MQA), tiny blocks
      {{8, 8, 128, 1, 20}, 2, 70},     // one token per block, window
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case &c = cases[i];
    compare(c.g, standard_steps(rng, c.S, c.max_prefill), static_cast<uint32_t>(100 + i), kAll);
  }
}

TEST_CASE("flash splits long decode contexts and matches CPU sdpa", "[cuda][attention]") {
  // ~1000 cached keys: the decode steps split each token's keys across CTAs and combine them.
  const Geometry g{8, 2, 64, 16, 0, 2048};
  std::vector<std::vector<int>> steps{{1000, 700}, {1, 1}, {1, 1}, {3, 5}, {1, 1}};
  compare(g, steps, 7, {{"flash", Dt::bf16, 2e-2}, {"sdpa", Dt::bf16, 2e-2}});
  const Geometry windowed{16, 4, 128, 64, 300, 2048};
  compare(windowed, steps, 8, {{"flash", Dt::bf16, 2e-2}});
  // Forty sequences: CTAs enough for the 4-warp decode kernel, which splits ~300 keys as well
  // (few sequences take 16-warp CTAs).
  const std::vector<std::vector<int>> many{std::vector<int>(40, 300), std::vector<int>(40, 1),
                                           std::vector<int>(40, 1)};
  compare(g, many, 11, {{"flash", Dt::bf16, 2e-2}});
  compare(windowed, many, 12, {{"flash", Dt::bf16, 2e-2}});
}

TEST_CASE("flash's tensor-core and CUDA-core decode kernels both match CPU sdpa", "[cuda][attention]") {
  // Unquantized caches decode on tensor cores unless LOOM_FLASH_DECODE_MMA=0 (read at prepare);
  // the CUDA-core kernel still serves int8/fp8 caches and widths whose tensor-core ring would
  // get one stage. Served shapes (64 sequences of ~400 keys: 4-warp CTAs, one split), few
  // sequences (16-warp CTAs, splits), GQA 1 to 8 (1, 2 and 4 heads a CTA), both head dims, a
  // window, float16.
  const Geometry gqa4{32, 8, 64, 16, 0, 2048}, mha{8, 8, 128, 16, 0, 2048}, gqa8{16, 2, 64, 32, 90, 2048},
      gqa2{16, 8, 128, 16, 0, 2048};
  const std::vector<std::vector<int>> served{std::vector<int>(64, 400), std::vector<int>(64, 1),
                                             std::vector<int>(64, 1)};
  const std::vector<std::vector<int>> few{{700, 33, 1}, {1, 1, 1}, {1, 1, 1}};
  for (const char *mma : {"0", "1"}) {
    INFO("LOOM_FLASH_DECODE_MMA=" << mma);
    REQUIRE(setenv("LOOM_FLASH_DECODE_MMA", mma, 1) == 0);
    compare(gqa4, served, 41, {{"flash", Dt::bf16, 2e-2}});
    compare(gqa4, few, 42, {{"flash", Dt::bf16, 2e-2}, {"flash", Dt::f16, 2e-2}});
    compare(mha, few, 43, {{"flash", Dt::bf16, 2e-2}});
    compare(gqa8, served, 44, {{"flash", Dt::f16, 2e-2}});
    compare(gqa2, few, 45, {{"flash", Dt::bf16, 2e-2}}); // two heads a CTA
  }
  REQUIRE(unsetenv("LOOM_FLASH_DECODE_MMA") == 0);
}

TEST_CASE("flash in float16 matches CPU sdpa", "[cuda][attention]") {
  std::mt19937 rng(77);
  compare({16, 4, 64, 16, 0}, standard_steps(rng, 3, 140), 9, {{"flash", Dt::f16, 2e-2}});
  compare({8, 1, 128, 32, 50}, standard_steps(rng, 2, 140), 10, {{"flash", Dt::f16, 2e-2}});
}

TEST_CASE("flash with int8 and fp8 KV caches matches CUDA sdpa with the same cache", "[cuda][attention][kv]") {
  // Prefill, decode, a chunked step (prefill kernel over cached context) and an uneven step
  // (decode kernel), over shuffled block tables; GQA 1 to 8, head dims 64 and 128, windows.
  std::mt19937 rng(5150);
  const std::vector<Case> cases = {
      {{8, 2, 64, 16, 0}, 3, 150},    // GQA 4
      {{16, 4, 128, 16, 0}, 3, 200},  // GQA 4, head dim 128
      {{32, 4, 64, 64, 0}, 4, 130},   // GQA 8, big blocks
      {{8, 2, 128, 32, 37}, 3, 180},  // window
      {{8, 8, 64, 4, 0}, 2, 90},      // MHA, small blocks
  };
  // Worst relative errors measured on the H100 (printed per line): int8 6.3e-3 and fp8 5.8e-3
  // with bfloat16 compute, 5.9e-4 with float16 (bf16 output rounding dominates). The tolerance is
  // the unquantized flash-vs-reference one.
  constexpr double kTolerance = 2e-2;
  for (const char *kv : {"int8", "fp8"}) {
    for (size_t i = 0; i < cases.size(); ++i)
      compare_flash_kv(cases[i].g, standard_steps(rng, cases[i].S, cases[i].max_prefill),
                       static_cast<uint32_t>(500 + i), kv, Dt::bf16, kTolerance);
    // float16 compute, both head dims.
    compare_flash_kv({16, 4, 64, 16, 0}, standard_steps(rng, 3, 140), 520, kv, Dt::f16, kTolerance);
    compare_flash_kv({8, 1, 128, 32, 50}, standard_steps(rng, 2, 140), 521, kv, Dt::f16, kTolerance);
    // Long contexts: decode splits each token's keys across CTAs (16-warp CTAs for 2 sequences,
    // 4-warp ones for 40), and a chunked prefill reads ~1000 cached keys.
    const Geometry g{8, 2, 64, 16, 0, 2048}, g128{16, 4, 128, 64, 0, 2048};
    const std::vector<std::vector<int>> steps{{1000, 700}, {1, 1}, {1, 1}, {3, 5}, {1, 1}};
    const std::vector<std::vector<int>> many{std::vector<int>(40, 300), std::vector<int>(40, 1),
                                             std::vector<int>(40, 1)};
    compare_flash_kv(g, steps, 530, kv, Dt::bf16, kTolerance);
    compare_flash_kv(g128, steps, 531, kv, Dt::bf16, kTolerance);
    compare_flash_kv(g, many, 532, kv, Dt::bf16, kTolerance);
    compare_flash_kv(g128, many, 533, kv, Dt::f16, kTolerance);
  }
}

TEST_CASE("flash decode captured in a CUDA graph replays like direct calls", "[cuda][attention][graph]") {
  struct GraphCase {
    Geometry g;
    const char *kv_dtype;
  };
  const GraphCase graph_cases[] = {{{32, 8, 64, 16, 0, 2048}, "auto"},
                                   {{16, 2, 128, 32, 200, 2048}, "auto"},
                                   {{32, 8, 64, 16, 0, 2048}, "int8"},
                                   {{16, 2, 128, 32, 0, 2048}, "fp8"}};
  for (const GraphCase &gc : graph_cases) {
    const Geometry &g = gc.g;
    INFO("H=" << g.H << " Hkv=" << g.Hkv << " D=" << g.D << " window=" << g.window << " kv_dtype=" << gc.kv_dtype);
    // Three sequences: prefill, then five decode steps.
    const Scenario sc = make_scenario(g, {{50, 400, 7}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1}}, 31);
    {
      // The reference keeps the same cache (CPU sdpa quantizes as flash does).
      Backend reference("sdpa", kCpu, Dt::f32, g, sc.N, nullptr, gc.kv_dtype);
      Backend direct("flash", kGpu, Dt::bf16, g, sc.N, nullptr, gc.kv_dtype);
      Backend graphed("flash", kGpu, Dt::bf16, g, sc.N, stream_host(), gc.kv_dtype);
      direct.forward(sc, sc.steps[0]);
      graphed.forward(sc, sc.steps[0]);
      reference.forward(sc, sc.steps[0]);

      // Fixed device buffers for a decode batch of S tokens; the graph bakes in their addresses.
      const int64_t S = sc.S, H = g.H, Hkv = g.Hkv, D = g.D;
      const DLDataType bf16{kDLBfloat, 16, 1}, i32{kDLInt, 32, 1}, u8{kDLUInt, 8, 1};
      DeviceBuffer q(static_cast<size_t>(S * H * D * 2)), k(static_cast<size_t>(S * Hkv * D * 2)),
          v(static_cast<size_t>(S * Hkv * D * 2)), out(static_cast<size_t>(S * H * D * 2));
      auto off = DeviceBuffer::of(sc.steps[1].offsets), pos = DeviceBuffer::of(sc.steps[1].positions),
           table = DeviceBuffer::of(sc.table);
      View vq(q.ptr, kGpu, bf16, {S, H, D}), vk(k.ptr, kGpu, bf16, {S, Hkv, D}), vv(v.ptr, kGpu, bf16, {S, Hkv, D}),
          vo(out.ptr, kGpu, bf16, {S, H, D}), voff(off.ptr, kGpu, i32, {S + 1}), vpos(pos.ptr, kGpu, i32, {S}),
          vtab(table.ptr, kGpu, i32, {S, sc.M}),
          vpool(graphed.device_pool(), kGpu, u8, {graphed.n_blocks(), static_cast<int64_t>(graphed.layout().bytes_per_block)});
      loom_attention_batch b = causal_batch(vq, vk, vv, vo, voff, vpos, vtab, vpool, S, S);

      CUDA_REQUIRE(cudaDeviceSynchronize());
      cudaGraph_t graph = nullptr;
      CUDA_REQUIRE(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeGlobal));
      const loom_status st = graphed.vt()->forward(graphed.handle(), &b);
      CUDA_REQUIRE(cudaStreamEndCapture(g_stream, &graph));
      INFO("captured forward: " << graphed.instance().last_error());
      REQUIRE(st == LOOM_OK);
      cudaGraphExec_t exec = nullptr;
      CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));

      for (size_t i = 1; i < sc.steps.size(); ++i) {
        const Step &step = sc.steps[i];
        const auto hq = encode(step.q, Dt::bf16), hk = encode(step.k, Dt::bf16), hv = encode(step.v, Dt::bf16);
        // New inputs and positions in the same device memory, then a replay.
        CUDA_REQUIRE(cudaMemcpyAsync(q.ptr, hq.data(), hq.size(), cudaMemcpyHostToDevice, g_stream));
        CUDA_REQUIRE(cudaMemcpyAsync(k.ptr, hk.data(), hk.size(), cudaMemcpyHostToDevice, g_stream));
        CUDA_REQUIRE(cudaMemcpyAsync(v.ptr, hv.data(), hv.size(), cudaMemcpyHostToDevice, g_stream));
        CUDA_REQUIRE(cudaMemcpyAsync(pos.ptr, step.positions.data(), step.positions.size() * sizeof(int32_t),
                                     cudaMemcpyHostToDevice, g_stream));
        CUDA_REQUIRE(cudaGraphLaunch(exec, g_stream));
        std::vector<uint8_t> got_bytes(static_cast<size_t>(S * H * D * 2));
        CUDA_REQUIRE(cudaMemcpyAsync(got_bytes.data(), out.ptr, got_bytes.size(), cudaMemcpyDeviceToHost, g_stream));
        CUDA_REQUIRE(cudaStreamSynchronize(g_stream));
        const auto got = decode(got_bytes, Dt::bf16);
        const auto want = direct.forward(sc, step);
        const auto ref = reference.forward(sc, step);
        INFO("decode step " << i);
        CHECK(got == want); // same kernels, same inputs: bit for bit
        CHECK(relative_error(got, ref) <= 2e-2);
        CHECK(graphed.pool_bytes() == direct.pool_bytes()); // the replayed cache write too
      }
      CUDA_REQUIRE(cudaGraphExecDestroy(exec));
      CUDA_REQUIRE(cudaGraphDestroy(graph));
    }
  }
}

TEST_CASE("CUDA attention refuses bad batches with the field named", "[cuda][attention]") {
  const Geometry g{8, 2, 64, 16, 0};
  const Scenario sc = make_scenario(g, {{5, 3}}, 3);
  for (const char *component : {"flash", "sdpa"}) {
    INFO(component);
    Backend be(component, kGpu, Dt::bf16, g, sc.N);
    const int64_t T = 8, S = 2, H = g.H, Hkv = g.Hkv, D = g.D;
    const DLDataType bf16{kDLBfloat, 16, 1}, f32{kDLFloat, 32, 1}, i32{kDLInt, 32, 1}, u8{kDLUInt, 8, 1};
    DeviceBuffer q(static_cast<size_t>(T * H * D * 4)), k(static_cast<size_t>(T * Hkv * D * 2)),
        v(static_cast<size_t>(T * Hkv * D * 2)), out(static_cast<size_t>(T * H * D * 2));
    auto off = DeviceBuffer::of(sc.steps[0].offsets), pos = DeviceBuffer::of(sc.steps[0].positions),
         table = DeviceBuffer::of(sc.table);
    std::vector<uint8_t> host_q(static_cast<size_t>(T * H * D * 2));
    View vq(q.ptr, kGpu, bf16, {T, H, D}), vk(k.ptr, kGpu, bf16, {T, Hkv, D}), vv(v.ptr, kGpu, bf16, {T, Hkv, D}),
        vo(out.ptr, kGpu, bf16, {T, H, D}), voff(off.ptr, kGpu, i32, {S + 1}), vpos(pos.ptr, kGpu, i32, {S}),
        vtab(table.ptr, kGpu, i32, {S, sc.M}),
        vpool(be.device_pool(), kGpu, u8, {be.n_blocks(), static_cast<int64_t>(be.layout().bytes_per_block)});
    loom_attention_batch b = causal_batch(vq, vk, vv, vo, voff, vpos, vtab, vpool, S, T);
    CHECK(be.vt()->forward(be.handle(), &b) == LOOM_OK);
    CUDA_REQUIRE(cudaDeviceSynchronize());

    vq.t.device = kCpu; // q in host memory
    vq.t.data = host_q.data();
    CHECK(be.vt()->forward(be.handle(), &b) == LOOM_ERR_UNSUPPORTED);
    CHECK_THAT(be.instance().last_error(), Catch::Contains("q: expected a tensor on cuda:0, got one on cpu"));
    vq.t.device = kGpu;
    vq.t.data = q.ptr;

    vq.t.dtype = f32;
    CHECK(be.vt()->forward(be.handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(be.instance().last_error(), Catch::Contains("q: expected dtype bfloat16, got float32"));
    vq.t.dtype = bf16;

    vk.shape[1] = Hkv + 1;
    CHECK(be.vt()->forward(be.handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(be.instance().last_error(), Catch::Contains("k: expected shape"));
    vk.shape[1] = Hkv;

    vo.t.byte_offset = 1; // misaligned
    CHECK(be.vt()->forward(be.handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(be.instance().last_error(), Catch::Contains("out: data must be aligned"));
    vo.t.byte_offset = 0;

    vpool.shape[1] += 1;
    CHECK(be.vt()->forward(be.handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(be.instance().last_error(), Catch::Contains("kv_pool"));
    vpool.shape[1] -= 1;

    voff.t.dtype = u8;
    CHECK(be.vt()->forward(be.handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(be.instance().last_error(), Catch::Contains("seq_offsets: expected dtype int32, got uint8"));
    voff.t.dtype = i32;

    CHECK(be.vt()->forward(be.handle(), &b) == LOOM_OK);
    CUDA_REQUIRE(cudaDeviceSynchronize());
  }
}

namespace {

// Mean time in microseconds of `reps` runs of `work` after two warm-ups, timed on `stream`.
template <class F> double time_on(cudaStream_t stream, int reps, F &&work) {
  for (int i = 0; i < 2; ++i) work();
  cudaEvent_t start, stop;
  CUDA_REQUIRE(cudaEventCreate(&start));
  CUDA_REQUIRE(cudaEventCreate(&stop));
  CUDA_REQUIRE(cudaEventRecord(start, stream));
  for (int i = 0; i < reps; ++i) work();
  CUDA_REQUIRE(cudaEventRecord(stop, stream));
  CUDA_REQUIRE(cudaEventSynchronize(stop));
  float ms = 0;
  CUDA_REQUIRE(cudaEventElapsedTime(&ms, start, stop));
  CUDA_REQUIRE(cudaEventDestroy(start));
  CUDA_REQUIRE(cudaEventDestroy(stop));
  return 1000.0 * static_cast<double>(ms) / reps;
}

// Times flash (direct calls, and one call captured in a CUDA graph and replayed: the GPU time
// without the host's launch cost) and sdpa (bf16, direct) on one batch: S sequences, `n_new` new
// tokens each at `position`, in a block table of `table_positions` positions (at least the
// context; a runtime's table reserves its longest context).
void bench(const char *label, const Geometry &g, int S, int n_new, int position, int table_positions = 0) {
  const int64_t T = static_cast<int64_t>(S) * n_new, H = g.H, Hkv = g.Hkv, D = g.D;
  const int M = (std::max(position + n_new, table_positions) + g.B - 1) / g.B;
  const int N = S * M;
  std::vector<int32_t> offsets, positions(static_cast<size_t>(S), position), table(static_cast<size_t>(N));
  for (int s = 0; s <= S; ++s) offsets.push_back(s * n_new);
  std::iota(table.begin(), table.end(), 0);
  const DLDataType bf16{kDLBfloat, 16, 1}, i32{kDLInt, 32, 1}, u8{kDLUInt, 8, 1};
  std::vector<uint8_t> qkv_host(static_cast<size_t>(T * H * D * 2));
  for (size_t i = 0; i < qkv_host.size(); i += 2) { // bf16 of small values: high byte 0x3c..0x3f
    qkv_host[i] = static_cast<uint8_t>(i * 37);
    qkv_host[i + 1] = static_cast<uint8_t>(0x3c + (i / 2) % 4);
  }
  auto q = DeviceBuffer::of(qkv_host);
  DeviceBuffer k(static_cast<size_t>(T * Hkv * D * 2)), v(static_cast<size_t>(T * Hkv * D * 2)),
      out(static_cast<size_t>(T * H * D * 2));
  CUDA_REQUIRE(cudaMemcpy(k.ptr, qkv_host.data(), k.bytes, cudaMemcpyHostToDevice));
  CUDA_REQUIRE(cudaMemcpy(v.ptr, qkv_host.data(), v.bytes, cudaMemcpyHostToDevice));
  auto off = DeviceBuffer::of(offsets), pos = DeviceBuffer::of(positions), tab = DeviceBuffer::of(table);
  double flash_us = 0, graph_us = 0, sdpa_us = 0;
  for (const bool is_flash : {true, false}) {
    Backend be(is_flash ? "flash" : "sdpa", kGpu, Dt::bf16, g, N, is_flash ? stream_host() : nullptr);
    View vq(q.ptr, kGpu, bf16, {T, H, D}), vk(k.ptr, kGpu, bf16, {T, Hkv, D}), vv(v.ptr, kGpu, bf16, {T, Hkv, D}),
        vo(out.ptr, kGpu, bf16, {T, H, D}), voff(off.ptr, kGpu, i32, {S + 1}), vpos(pos.ptr, kGpu, i32, {S}),
        vtab(tab.ptr, kGpu, i32, {S, M}),
        vpool(be.device_pool(), kGpu, u8, {N, static_cast<int64_t>(be.layout().bytes_per_block)});
    loom_attention_batch b = causal_batch(vq, vk, vv, vo, voff, vpos, vtab, vpool, S, T);
    CUDA_REQUIRE(cudaDeviceSynchronize());
    auto call = [&] { REQUIRE(be.vt()->forward(be.handle(), &b) == LOOM_OK); };
    if (!is_flash) {
      loom::Instance &inst = be.instance();
      sdpa_us = time_on(static_cast<cudaStream_t>(inst.host()->current_stream(inst.ctx(), kGpu)), 5, call);
      continue;
    }
    flash_us = time_on(g_stream, 50, call);
    cudaGraph_t graph = nullptr;
    CUDA_REQUIRE(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeGlobal));
    const loom_status st = be.vt()->forward(be.handle(), &b);
    CUDA_REQUIRE(cudaStreamEndCapture(g_stream, &graph));
    REQUIRE(st == LOOM_OK);
    cudaGraphExec_t exec = nullptr;
    CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
    graph_us = time_on(g_stream, 50, [&] { CUDA_REQUIRE(cudaGraphLaunch(exec, g_stream)); });
    CUDA_REQUIRE(cudaGraphExecDestroy(exec));
    CUDA_REQUIRE(cudaGraphDestroy(graph));
  }
  // Bytes of K and V read once; causal FLOPs (QK^T and PV) of the new tokens.
  const double kv_bytes = 2.0 * S * (position + n_new) * static_cast<double>(Hkv * D * 2);
  const double flops = 4.0 * S * static_cast<double>(H * D) * n_new * (position + (n_new + 1) / 2.0);
  std::printf("bench %-31s flash %8.1f us, in a graph %8.1f us (%5.1f TFLOP/s, %5.0f GB/s of KV)   sdpa-cuda %9.1f us\n",
              label, flash_us, graph_us, flops / graph_us * 1e-6, kv_bytes / graph_us * 1e-3, sdpa_us);
}

} // namespace

TEST_CASE("flash vs sdpa on CUDA: micro-benchmark", "[.bench]") {
  const Geometry g{32, 8, 64, 16, 0, 8192}; // hidden 2048
  bench("prefill T=2048 (1 sequence)", g, 1, 2048, 0);
  bench("prefill 4 x 512", g, 4, 512, 0);
  const Geometry g128{32, 8, 128, 16, 0, 8192}; // hidden 4096 (Llama 3 8B)
  bench("prefill T=2048, head_dim 128", g128, 1, 2048, 0);
  bench("decode batch 1, context 128", g, 1, 1, 127);
  bench("decode batch 1, context 256", g, 1, 1, 255);
  bench("decode batch 1, context 512", g, 1, 1, 511);
  bench("decode b1, context 200, table 8192", g, 1, 1, 199, 8192);
  bench("decode b1, context 260, table 8192", g, 1, 1, 259, 8192);
  bench("decode batch 4, context 256", g, 4, 1, 255);
  bench("decode batch 1, context 1024", g, 1, 1, 1023);
  bench("decode batch 1, context 4096", g, 1, 1, 4095);
  bench("decode batch 32, context 1024", g, 32, 1, 1023);
  bench("decode batch 32, context 4096", g, 32, 1, 4095);
}

int main(int argc, char **argv) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  if (cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking) != cudaSuccess) {
    std::printf("cannot create a CUDA stream\n");
    return 1;
  }
  const int status = Catch::Session().run(argc, argv);
  cudaStreamDestroy(g_stream);
  return status;
}
