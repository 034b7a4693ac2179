// The fused decode GEMVs (loom/kernels/gemv.hpp) against a float64 host computation of the same
// contract: every prologue/epilogue pair, 1 to the largest number of tokens, odd output sizes,
// inputs shorter than a warp's stride and as long as an MLP's, biases present and absent,
// with and without programmatic dependent launch. Part of kernels_cuda_test (its main skips
// without a CUDA device).
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda_test_util.hpp"
#include "loom/kernels/gemv.hpp"

namespace lk = loom::kernels;

namespace {

using namespace loom_kernel_test;

struct Problem {
  int tokens, in, out;
  lk::GemvPrologue prologue;
  lk::GemvEpilogue epilogue;
  bool bias;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;  // rope_split
  bool rope = false;
  bool embed = false;  // input rows from an embedding table (and, for layer_norm, a position table)
};

// The input rows as the kernel must see them (bfloat16 values), in float64 arithmetic.
std::vector<float> reference_input(const Problem& p, const std::vector<float>& act, const std::vector<float>& resid,
                                   const std::vector<float>& w, const std::vector<float>& b, float eps) {
  if (p.prologue == lk::GemvPrologue::act) return act;
  std::vector<float> x(resid.size());
  for (int t = 0; t < p.tokens; ++t) {
    const float* row = resid.data() + static_cast<size_t>(t) * p.in;
    double mean = 0, sq = 0;
    for (int i = 0; i < p.in; ++i) {
      mean += row[i];
      sq += static_cast<double>(row[i]) * row[i];
    }
    mean /= p.in;
    double var = 0;
    for (int i = 0; i < p.in; ++i) var += (row[i] - mean) * (row[i] - mean);
    for (int i = 0; i < p.in; ++i) {
      const double v = p.prologue == lk::GemvPrologue::rms_norm ? w[i] * (row[i] / std::sqrt(sq / p.in + eps))
                                                                  : (row[i] - mean) / std::sqrt(var / p.in + eps) * w[i] + b[i];
      x[static_cast<size_t>(t) * p.in + i] = round_bf16(static_cast<float>(v));
    }
  }
  return x;
}

double silu(double x) { return x / (1.0 + std::exp(-x)); }
double gelu(double v) { return 0.5 * v * (1.0 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))); }

void run_case(const Problem& p, bool programmatic, uint32_t seed) {
  INFO("T=" << p.tokens << " in=" << p.in << " out=" << p.out << " prologue=" << static_cast<int>(p.prologue)
            << " epilogue=" << static_cast<int>(p.epilogue) << " bias=" << p.bias << " pdl=" << programmatic);
  std::mt19937 rng(seed);
  const size_t T = static_cast<size_t>(p.tokens), in = static_cast<size_t>(p.in), out = static_cast<size_t>(p.out);
  std::vector<float> weight = normal(out * in, 0.05f, rng);
  std::vector<uint16_t> weight_bits(weight.size());
  for (size_t i = 0; i < weight.size(); ++i) {
    weight_bits[i] = bf16_bits(weight[i]);
    weight[i] = from_bf16(weight_bits[i]);
  }
  std::vector<float> bias = p.bias ? normal(out, 0.5f, rng) : std::vector<float>{};
  std::vector<float> act = normal(T * in, 1.0f, rng);
  std::vector<uint16_t> act_bits(act.size());
  for (size_t i = 0; i < act.size(); ++i) {
    act_bits[i] = bf16_bits(act[i]);
    act[i] = from_bf16(act_bits[i]);
  }
  std::vector<float> resid = normal(T * in, 3.0f, rng);
  // Embedding tables: the rows the kernel must look up take the place of resid.
  const int vocab = 37, max_pos_embed = 40;
  std::vector<uint16_t> table_bits, pos_bits;
  std::vector<int32_t> token_ids(T);
  if (p.embed) {
    const bool with_pos = p.prologue == lk::GemvPrologue::layer_norm;
    for (float v : normal(static_cast<size_t>(vocab) * in, 2.0f, rng)) table_bits.push_back(bf16_bits(v));
    if (with_pos)
      for (float v : normal(static_cast<size_t>(max_pos_embed) * in, 0.5f, rng)) pos_bits.push_back(bf16_bits(v));
    for (size_t t = 0; t < T; ++t) {
      token_ids[t] = static_cast<int32_t>((11 * t + 5) % vocab);
      const int32_t pos = static_cast<int32_t>((7 * t + 3) % 40);  // = positions[t] below
      for (size_t i = 0; i < in; ++i)
        resid[t * in + i] = from_bf16(table_bits[static_cast<size_t>(token_ids[t]) * in + i]) +
                            (with_pos ? from_bf16(pos_bits[static_cast<size_t>(pos) * in + i]) : 0.0f);
    }
  }
  std::vector<float> norm_w = normal(in, 1.0f, rng), norm_b = normal(in, 0.3f, rng);
  const float eps = 1e-5f;
  std::vector<float> prior = normal(T * out, 1.0f, rng);  // add_f32 adds into this
  const int max_pos = 40;
  std::vector<float> cos_sin;
  std::vector<int32_t> positions(T);
  for (size_t t = 0; t < T; ++t) positions[t] = static_cast<int32_t>((7 * t + 3) % max_pos);
  if (p.rope) {
    const int half = p.head_dim / 2;
    for (int pos = 0; pos < max_pos; ++pos)
      for (int i = 0; i < half; ++i) {
        const double angle = pos * std::pow(10000.0, -2.0 * i / p.head_dim);
        cos_sin.push_back(static_cast<float>(std::cos(angle)));
        cos_sin.push_back(static_cast<float>(std::sin(angle)));
      }
  }

  Device<uint16_t> d_weight(weight_bits), d_act(act_bits);
  Device<float> d_bias(bias), d_resid(p.embed ? std::vector<float>(T * in, -7.0f) : resid), d_norm_w(norm_w),
      d_norm_b(norm_b), d_cos_sin(cos_sin);
  Device<uint16_t> d_table(table_bits), d_pos_table(pos_bits);
  Device<int32_t> d_token_ids(token_ids);
  Device<float> d_f32(p.epilogue == lk::GemvEpilogue::add_f32 ? prior : std::vector<float>(T * out, -9.0f));
  Device<uint16_t> d_act_out(std::vector<uint16_t>(T * out, 0));
  const size_t q_size = T * static_cast<size_t>(p.n_heads * p.head_dim),
               kv_size = T * static_cast<size_t>(p.n_kv_heads * p.head_dim);
  Device<uint16_t> d_q(std::vector<uint16_t>(q_size, 0)), d_k(std::vector<uint16_t>(kv_size, 0)),
      d_v(std::vector<uint16_t>(kv_size, 0));
  Device<int32_t> d_positions(positions);

  lk::GemvArgs a;
  a.tokens = p.tokens;
  a.in = p.in;
  a.out = p.out;
  a.weight = d_weight.get();
  a.bias = p.bias ? d_bias.get() : nullptr;
  a.act = d_act.get();
  a.resid = d_resid.get();
  if (p.embed) {
    a.embed_table = d_table.get();
    a.embed_pos_table = pos_bits.empty() ? nullptr : d_pos_table.get();
    a.tokens_ids = d_token_ids.get();
  }
  a.norm_w = d_norm_w.get();
  a.norm_b = d_norm_b.get();
  a.eps = eps;
  a.out_f32 = d_f32.get();
  a.out_act = d_act_out.get();
  a.cos_sin = p.rope ? d_cos_sin.get() : nullptr;
  a.positions = d_positions.get();
  a.n_heads = p.n_heads;
  a.n_kv_heads = p.n_kv_heads;
  a.head_dim = p.head_dim;
  a.q = d_q.get();
  a.k = d_k.get();
  a.v = d_v.get();
  cudaStream_t stream = nullptr;
  CUDA_REQUIRE(cudaStreamCreate(&stream));
  CUDA_REQUIRE(lk::gemv_bf16_cuda(a, p.prologue, p.epilogue, programmatic, stream));
  CUDA_REQUIRE(cudaStreamSynchronize(stream));
  CUDA_REQUIRE(cudaStreamDestroy(stream));
  if (p.embed) CHECK(d_resid.read() == resid);  // the looked-up rows start the residual stream

  // Reference products in float64 over the bfloat16 inputs, and the size of their terms.
  const std::vector<float> x = reference_input(p, act, resid, norm_w, norm_b, eps);
  std::vector<double> y(T * out), scale(T * out);
  for (size_t t = 0; t < T; ++t)
    for (size_t r = 0; r < out; ++r) {
      double s = 0, m = 0;
      for (size_t i = 0; i < in; ++i) {
        s += static_cast<double>(weight[r * in + i]) * x[t * in + i];
        m += std::fabs(static_cast<double>(weight[r * in + i]) * x[t * in + i]);
      }
      y[t * out + r] = s;
      scale[t * out + r] = m;
    }
  // Summation order differs from float64 only by float32 rounding (about 1e-6 of the terms'
  // sum); a bfloat16 input rounded the other way at a tie shifts a product by a bfloat16 ulp.
  auto tol = [&](size_t i) { return 1e-4 * scale[i] + 1e-6; };
  size_t bad = 0;
  double worst = 0;
  auto expect = [&](double got, double want, double tolerance) {
    const double d = std::fabs(got - want);
    worst = std::max(worst, d);
    if (!(d <= tolerance)) ++bad;
  };
  const double bf16_rel = 1.0 / 128;  // the output's own rounding
  switch (p.epilogue) {
    case lk::GemvEpilogue::add_f32:
    case lk::GemvEpilogue::store_f32: {
      const auto got = d_f32.read();
      for (size_t i = 0; i < T * out; ++i) {
        double want = y[i];
        if (p.epilogue == lk::GemvEpilogue::add_f32) want += prior[i] + (p.bias ? bias[i % out] : 0.0);
        expect(got[i], want, tol(i) + 1e-6 * std::fabs(want));
      }
      break;
    }
    case lk::GemvEpilogue::swiglu: {
      const auto got = d_act_out.read();
      const size_t inter = out / 2;
      for (size_t t = 0; t < T; ++t)
        for (size_t j = 0; j < inter; ++j) {
          const size_t g = t * out + j, u = t * out + inter + j;
          const double want = silu(y[g]) * y[u];
          const double tolerance = bf16_rel * std::fabs(want) + 2 * (tol(g) * std::fabs(y[u]) + tol(u) * std::fabs(y[g])) +
                                   bf16_rel * (std::fabs(y[g] * y[u]));
          expect(from_bf16(got[t * inter + j]), want, tolerance + 1e-6);
        }
      break;
    }
    case lk::GemvEpilogue::bias_gelu: {
      const auto got = d_act_out.read();
      for (size_t i = 0; i < T * out; ++i) {
        const double v = round_bf16(static_cast<float>(y[i])) + (p.bias ? bias[i % out] : 0.0);
        const double want = gelu(v);
        expect(from_bf16(got[i]), want, bf16_rel * (std::fabs(want) + std::fabs(y[i])) + 2 * tol(i) + 1e-6);
      }
      break;
    }
    case lk::GemvEpilogue::rope_split: {
      const auto q = d_q.read(), k = d_k.read(), v = d_v.read();
      const int D = p.head_dim, half = D / 2, heads = p.n_heads + 2 * p.n_kv_heads;
      for (size_t t = 0; t < T; ++t)
        for (int h = 0; h < heads; ++h)
          for (int i = 0; i < half; ++i) {
            const size_t r0 = static_cast<size_t>(h * D + i), r1 = r0 + static_cast<size_t>(half);
            double a0 = round_bf16(static_cast<float>(y[t * out + r0])) + (p.bias ? bias[r0] : 0.0);
            double a1 = round_bf16(static_cast<float>(y[t * out + r1])) + (p.bias ? bias[r1] : 0.0);
            if (p.rope && h < p.n_heads + p.n_kv_heads) {
              const double c = cos_sin[static_cast<size_t>((positions[t] * half + i) * 2)],
                           s = cos_sin[static_cast<size_t>((positions[t] * half + i) * 2 + 1)];
              const double b0 = a0 * c - a1 * s, b1 = a1 * c + a0 * s;
              a0 = b0;
              a1 = b1;
            }
            const std::vector<uint16_t>& dst = h < p.n_heads ? q : (h < p.n_heads + p.n_kv_heads ? k : v);
            const int local = h < p.n_heads ? h : (h < p.n_heads + p.n_kv_heads ? h - p.n_heads : h - p.n_heads - p.n_kv_heads);
            const int per_token = h < p.n_heads ? p.n_heads : p.n_kv_heads;
            const size_t at = (t * static_cast<size_t>(per_token) + static_cast<size_t>(local)) * static_cast<size_t>(D);
            const double tolerance = bf16_rel * (std::fabs(y[t * out + r0]) + std::fabs(y[t * out + r1]) + std::fabs(a0) + std::fabs(a1)) +
                                     2 * (tol(t * out + r0) + tol(t * out + r1)) + 1e-6;
            expect(from_bf16(dst[at + static_cast<size_t>(i)]), a0, tolerance);
            expect(from_bf16(dst[at + static_cast<size_t>(i + half)]), a1, tolerance);
          }
      break;
    }
  }
  INFO("worst |got - want| " << worst);
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE("fused GEMVs match a float64 reference", "[kernels][cuda][gemv]") {
  using P = lk::GemvPrologue;
  using E = lk::GemvEpilogue;
  uint32_t seed = 7;
  for (bool pdl : {false, true}) {
    for (int T = 1; T <= 4; ++T) {
      run_case({T, 2048, 1001, P::rms_norm, E::store_f32, false}, pdl, seed++);       // odd rows: a one-row unit
      run_case({T, 256, 2 * 384, P::rms_norm, E::swiglu, false}, pdl, seed++);
      run_case({T, 512, (4 + 2 * 2) * 64, P::rms_norm, E::rope_split, true, 4, 2, 64, true}, pdl, seed++);
      run_case({T, 64, (2 + 2 * 1) * 128, P::rms_norm, E::rope_split, false, 2, 1, 128, true}, pdl, seed++);
      run_case({T, 128, 96, P::layer_norm, E::bias_gelu, true}, pdl, seed++);
      run_case({T, 128, 3 * 2 * 32, P::layer_norm, E::rope_split, true, 2, 2, 32, false}, pdl, seed++);  // GPT-2: no RoPE
      run_case({T, 40, 33, P::layer_norm, E::store_f32, false}, pdl, seed++);          // in shorter than a warp's stride
      Problem embed{T, 512, (4 + 2 * 2) * 64, P::rms_norm, E::rope_split, false, 4, 2, 64, true};
      embed.embed = true;
      run_case(embed, pdl, seed++);  // the first layer: embedding lookup fused
      Problem embed_pos{T, 128, 3 * 2 * 32, P::layer_norm, E::rope_split, true, 2, 2, 32, false};
      embed_pos.embed = true;
      run_case(embed_pos, pdl, seed++);  // GPT-2: token and position tables
      Problem embed_full{T, 4096, 2 * 64, P::rms_norm, E::swiglu, false};
      embed_full.embed = true;
      run_case(embed_full, pdl, seed++);  // 48 KB of staging at T = 4, beside the norm's static bytes
      run_case({T, 2048, 64, P::act, E::add_f32, true}, pdl, seed++);     // few rows: each row's K split in two
      run_case({T, 512, 33, P::act, E::add_f32, false}, pdl, seed++);
      run_case({T, 40, 7, P::act, E::add_f32, true}, pdl, seed++);        // K not splittable (40 % 16 != 0)
      run_case({T, 256, 4501, P::act, E::add_f32, true}, pdl, seed++);    // more row pairs than an H100 has warps
    }
    for (int T = 1; T <= lk::gemv_max_tokens(8192); ++T)
      run_case({T, 8192, 130, P::act, E::add_f32, false}, pdl, seed++);               // an MLP's down projection
  }
}

TEST_CASE("fused GEMVs refuse what they cannot run", "[kernels][cuda][gemv]") {
  using P = lk::GemvPrologue;
  using E = lk::GemvEpilogue;
  CHECK(lk::gemv_max_tokens(2048) == 4);
  CHECK(lk::gemv_max_tokens(8192) == 3);
  CHECK(lk::gemv_max_tokens(12) == 0);
  CHECK(lk::gemv_max_tokens(0) == 0);
  CHECK(lk::gemv_max_embed_tokens(4096) == 4);
  CHECK(lk::gemv_max_embed_tokens(24576) == 0);  // not even one row fits beside the lookup's
  auto* fake = reinterpret_cast<void*>(uintptr_t{256});
  lk::GemvArgs a;
  a.tokens = 1;
  a.in = 64;
  a.out = 64;
  a.weight = fake;
  a.act = fake;
  a.resid = static_cast<float*>(fake);
  a.norm_w = static_cast<const float*>(fake);
  a.out_f32 = static_cast<float*>(fake);
  a.out_act = fake;
  const int invalid = static_cast<int>(cudaErrorInvalidValue);
  CHECK(lk::gemv_bf16_cuda(a, P::act, E::store_f32, false, nullptr) == invalid);   // not a valid pair
  CHECK(lk::gemv_bf16_cuda(a, P::rms_norm, E::add_f32, false, nullptr) == invalid);
  CHECK(lk::gemv_bf16_cuda(a, P::layer_norm, E::store_f32, false, nullptr) == invalid);  // no norm_b
  lk::GemvArgs e = a;
  e.embed_table = fake;
  e.tokens_ids = static_cast<const int32_t*>(fake);
  CHECK(lk::gemv_bf16_cuda(e, P::act, E::add_f32, false, nullptr) == invalid);  // a lookup needs a norm prologue
  e.tokens_ids = nullptr;
  CHECK(lk::gemv_bf16_cuda(e, P::rms_norm, E::store_f32, false, nullptr) == invalid);  // and token ids
  lk::GemvArgs b = a;
  b.tokens = 5;
  CHECK(lk::gemv_bf16_cuda(b, P::act, E::add_f32, false, nullptr) == invalid);
  b = a;
  b.tokens = 0;
  CHECK(lk::gemv_bf16_cuda(b, P::act, E::add_f32, false, nullptr) == invalid);
  b = a;
  b.in = 60;
  CHECK(lk::gemv_bf16_cuda(b, P::act, E::add_f32, false, nullptr) == invalid);
  b = a;
  b.weight = reinterpret_cast<void*>(uintptr_t{258});  // misaligned
  CHECK(lk::gemv_bf16_cuda(b, P::act, E::add_f32, false, nullptr) == invalid);
  b = a;
  b.out = 63;
  CHECK(lk::gemv_bf16_cuda(b, P::rms_norm, E::swiglu, false, nullptr) == invalid);
  b = a;
  b.n_heads = 2;
  b.n_kv_heads = 1;
  b.head_dim = 32;  // (2 + 2) * 32 = 128 rows, not 64
  b.q = b.k = b.v = fake;
  CHECK(lk::gemv_bf16_cuda(b, P::rms_norm, E::rope_split, false, nullptr) == invalid);
}

// Not a test: the 1B-shape decode GEMVs of one step (16 layers of q/k/v, o, gate/up, down, then
// the head), captured in a CUDA graph and replayed; prints the median time per step and per
// kind, against the bandwidth of a device-to-device copy. Run on the GPU machine with
// `kernels_cuda_test "[.bench]"`.
TEST_CASE("fused GEMV timings, 1B shape", "[.bench]") {
  using P = lk::GemvPrologue;
  using E = lk::GemvEpilogue;
  const int H = 2048, I = 8192, Hq = 32, Hkv = 8, D = 64, V = 128256, L = 16;
  struct Kind {
    const char* name;
    int in, out;
    P p;
    E e;
  };
  const Kind kinds[] = {{"qkv (norm, rope)", H, (Hq + 2 * Hkv) * D, P::rms_norm, E::rope_split},
                        {"o (+residual)", Hq * D, H, P::act, E::add_f32},
                        {"gate_up (norm, swiglu)", H, 2 * I, P::rms_norm, E::swiglu},
                        {"down (+residual)", I, H, P::act, E::add_f32}};
  auto alloc = [](size_t bytes) {
    void* p = nullptr;
    REQUIRE(cudaMalloc(&p, bytes) == cudaSuccess);
    REQUIRE(cudaMemset(p, 0x3c, bytes) == cudaSuccess);  // bfloat16 0.0115, float32 0.0115
    return p;
  };
  std::vector<void*> owned;
  auto make = [&](size_t bytes) {
    owned.push_back(alloc(bytes));
    return owned.back();
  };
  std::vector<std::vector<void*>> weights(4);
  for (int k = 0; k < 4; ++k)
    for (int l = 0; l < L; ++l) weights[k].push_back(make(static_cast<size_t>(kinds[k].in) * kinds[k].out * 2));
  void* head = make(static_cast<size_t>(V) * H * 2);
  lk::GemvArgs base;
  base.tokens = 1;
  base.resid = static_cast<float*>(make(H * 4));
  base.norm_w = static_cast<float*>(make(I * 4));
  base.act = make(I * 2);
  base.out_f32 = static_cast<float*>(make(static_cast<size_t>(V) * 4));
  base.out_act = make(I * 2);
  base.eps = 1e-5f;
  base.n_heads = Hq;
  base.n_kv_heads = Hkv;
  base.head_dim = D;
  base.q = make(Hq * D * 2);
  base.k = make(Hkv * D * 2);
  base.v = make(Hkv * D * 2);
  base.cos_sin = static_cast<float*>(make(4096 * D * 4));
  base.positions = static_cast<int32_t*>(make(64));
  REQUIRE(cudaMemset(const_cast<int32_t*>(base.positions), 0, 64) == cudaSuccess);
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
  cudaEvent_t start, stop;
  REQUIRE(cudaEventCreate(&start) == cudaSuccess);
  REQUIRE(cudaEventCreate(&stop) == cudaSuccess);

  // Median milliseconds of `enqueue` captured in a graph.
  auto time_graph = [&](const std::function<void()>& enqueue) {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess);
    enqueue();
    REQUIRE(cudaStreamEndCapture(stream, &graph) == cudaSuccess);
    REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
    std::vector<float> ms;
    for (int r = 0; r < 25; ++r) {
      REQUIRE(cudaEventRecord(start, stream) == cudaSuccess);
      REQUIRE(cudaGraphLaunch(exec, stream) == cudaSuccess);
      REQUIRE(cudaEventRecord(stop, stream) == cudaSuccess);
      REQUIRE(cudaEventSynchronize(stop) == cudaSuccess);
      float t = 0;
      REQUIRE(cudaEventElapsedTime(&t, start, stop) == cudaSuccess);
      if (r >= 5) ms.push_back(t);
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    std::sort(ms.begin(), ms.end());
    return static_cast<double>(ms[ms.size() / 2]);
  };
  // Copy bandwidth, bytes read + written, as the engine bench counts it.
  const size_t copy_bytes = size_t{1} << 30;
  void* src = alloc(copy_bytes);
  void* dst = alloc(copy_bytes);
  const double copy_ms = time_graph([&] { REQUIRE(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice, stream) == cudaSuccess); });
  cudaFree(src);
  cudaFree(dst);
  const double copy_gbs = 2.0 * copy_bytes / (copy_ms * 1e6);
  std::printf("copy bandwidth %.0f GB/s\n", copy_gbs);
  auto args_for = [&](int k, int l) {
    lk::GemvArgs a = base;
    a.in = kinds[k].in;
    a.out = kinds[k].out;
    a.weight = weights[k][static_cast<size_t>(l)];
    return a;
  };
  for (bool pdl : {false, true}) {
    double step_bytes = 0;
    for (int k = 0; k < 4; ++k) {
      const double bytes = static_cast<double>(kinds[k].in) * kinds[k].out * 2 * L;
      step_bytes += bytes;
      const double ms = time_graph([&] {
        for (int l = 0; l < L; ++l) REQUIRE(lk::gemv_bf16_cuda(args_for(k, l), kinds[k].p, kinds[k].e, pdl, stream) == 0);
      });
      std::printf("pdl=%d %-24s x16: %8.1f us  %6.0f GB/s  (%.2f of copy)\n", pdl, kinds[k].name, ms * 1e3,
                  bytes / (ms * 1e6), bytes / (ms * 1e6) / copy_gbs);
    }
    lk::GemvArgs h = base;
    h.in = H;
    h.out = V;
    h.weight = head;
    const double head_bytes = static_cast<double>(V) * H * 2;
    step_bytes += head_bytes;
    const double head_ms = time_graph([&] { REQUIRE(lk::gemv_bf16_cuda(h, P::rms_norm, E::store_f32, pdl, stream) == 0); });
    std::printf("pdl=%d %-24s x1:  %8.1f us  %6.0f GB/s  (%.2f of copy)\n", pdl, "lm_head (norm)", head_ms * 1e3,
                head_bytes / (head_ms * 1e6), head_bytes / (head_ms * 1e6) / copy_gbs);
    const double step_ms = time_graph([&] {
      for (int l = 0; l < L; ++l)
        for (int k = 0; k < 4; ++k) REQUIRE(lk::gemv_bf16_cuda(args_for(k, l), kinds[k].p, kinds[k].e, pdl, stream) == 0);
      REQUIRE(lk::gemv_bf16_cuda(h, P::rms_norm, E::store_f32, pdl, stream) == 0);
    });
    std::printf("pdl=%d whole step (no attention): %8.1f us  %6.0f GB/s  (%.2f of copy)\n", pdl, step_ms * 1e3,
                step_bytes / (step_ms * 1e6), step_bytes / (step_ms * 1e6) / copy_gbs);
  }
  for (void* p : owned) cudaFree(p);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
}

