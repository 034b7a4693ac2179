// The int8 and int4 quantizers' CUDA products (loom_quant_gemv.cuh) against their CPU products on
// the same codes: plain `linear` (bf16/f32 in and out, bias, more tokens than one launch takes)
// and every fusion of loom.quantizer.fused/1 (RMSNorm prologue, residual add, SwiGLU), on shapes
// that take the kernel's row-pair and split-K paths and a row that ends inside a 32-piece block;
// and the fp8 quantizer's cuBLASLt products against its CPU product.
// Exits 77 (CTest: skipped) without a CUDA device.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>

#include "builtin_test_util.hpp"
#include "loom/core/host_context.hpp"

namespace {

constexpr DLDevice kGpu{kDLCUDA, 0};
constexpr DLDataType kF32{kDLFloat, 32, 1};
constexpr DLDataType kBF16{kDLBfloat, 16, 1};
constexpr DLDataType kDLInt32() { return DLDataType{kDLInt, 32, 1}; }

float bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// Device memory with a DLTensor view.
struct DeviceTensor {
  std::vector<int64_t> shape;
  DLDataType dtype;
  void *data = nullptr;
  DLTensor t{};
  DeviceTensor(std::vector<int64_t> s, DLDataType d) : shape(std::move(s)), dtype(d) {
    REQUIRE(cudaMalloc(&data, bytes()) == cudaSuccess);
  }
  ~DeviceTensor() { cudaFree(data); }
  DeviceTensor(const DeviceTensor &) = delete;
  DeviceTensor &operator=(const DeviceTensor &) = delete;
  size_t count() const {
    size_t n = 1;
    for (int64_t e : shape) n *= static_cast<size_t>(e);
    return n;
  }
  size_t bytes() const { return count() * dtype.bits / 8; }
  DLTensor *dl() {
    t = DLTensor{};
    t.data = data;
    t.device = kGpu;
    t.ndim = static_cast<int32_t>(shape.size());
    t.dtype = dtype;
    t.shape = shape.data();
    return &t;
  }
  void upload(const std::vector<float> &v) {
    REQUIRE(v.size() == count());
    if (dtype.bits == 32) {
      REQUIRE(cudaMemcpy(data, v.data(), bytes(), cudaMemcpyHostToDevice) == cudaSuccess);
      return;
    }
    std::vector<__nv_bfloat16> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = __float2bfloat16_rn(v[i]);
    REQUIRE(cudaMemcpy(data, h.data(), bytes(), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  std::vector<float> download() const {
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    std::vector<float> v(count());
    if (dtype.bits == 32) {
      REQUIRE(cudaMemcpy(v.data(), data, bytes(), cudaMemcpyDeviceToHost) == cudaSuccess);
      return v;
    }
    std::vector<__nv_bfloat16> h(v.size());
    REQUIRE(cudaMemcpy(h.data(), data, bytes(), cudaMemcpyDeviceToHost) == cudaSuccess);
    for (size_t i = 0; i < v.size(); ++i) v[i] = __bfloat162float(h[i]);
    return v;
  }
};

// One quantizer, one weight quantized for the CPU and for the GPU (the same codes: quantize is
// deterministic), and the CPU's product as the reference.
struct Quantized {
  std::unique_ptr<loom::Runtime> rt;
  loom::Instance &q;
  const loom_quantizer_vtable *vt;
  const loom_quantizer_fused *fused;
  int64_t out, in;
  loom_qweight *cpu = nullptr, *gpu = nullptr;

  Quantized(const std::string &toml, int64_t out_features, int64_t in_features)
      : rt(bt::runtime(toml)), q(rt->pipeline().at("quantizer")), vt(q.vtable<loom_quantizer_vtable>()),
        fused(static_cast<const loom_quantizer_fused *>(vt->life.get_extension(q.handle(), LOOM_QUANTIZER_FUSED_EXTENSION))),
        out(out_features), in(in_features) {
    bt::Tensor<float> w({out, in}, bt::random_floats(static_cast<size_t>(out * in), 11, -1.0f, 1.0f));
    // Calibration rows with a few loud inputs, for AWQ (int8 and RTN ignore them).
    bt::Tensor<float> calib({32, in}, bt::random_floats(static_cast<size_t>(32 * in), 12, -1.0f, 1.0f));
    for (int64_t r = 0; r < 32; ++r)
      for (int64_t i = 0; i < in; i += 97) calib.v[static_cast<size_t>(r * in + i)] *= 20.0f;
    REQUIRE(bt::quantize(q, w.dl(), "test.linear", DLDevice{kDLCPU, 0}, &cpu, calib.dl()) == LOOM_OK);
    const loom_status s = bt::quantize(q, w.dl(), "test.linear", kGpu, &gpu, calib.dl());
    INFO(q.last_error());
    REQUIRE(s == LOOM_OK);
  }
  ~Quantized() {
    vt->free_weight(q.handle(), cpu);
    vt->free_weight(q.handle(), gpu);
  }

  // The CPU product of x [n, in] (float32, already in the form the GPU multiplies).
  std::vector<float> reference(const std::vector<float> &x, int64_t n) {
    bt::Tensor<float> xt({n, in}, x), yt({n, out});
    REQUIRE(vt->linear(q.handle(), cpu, xt.dl(), nullptr, yt.dl()) == LOOM_OK);
    return yt.v;
  }
};

void check_close(const std::vector<float> &ours, const std::vector<float> &ref, double tolerance) {
  REQUIRE(ours.size() == ref.size());
  double worst = 0, largest = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    worst = std::max(worst, std::abs(static_cast<double>(ours[i]) - ref[i]));
    largest = std::max(largest, std::abs(static_cast<double>(ref[i])));
  }
  INFO("worst " << worst << " of largest " << largest);
  CHECK(worst <= tolerance * largest);
}

struct RopeShape {
  int32_t heads = 0, kv_heads = 0, head_dim = 0;  // heads == 0: out is no q/k/v layout
};

// Every product of one quantizer at one shape.
void check_products(const std::string &toml, int64_t out, int64_t in, RopeShape rope = {}) {
  INFO(toml << "out " << out << ", in " << in);
  Quantized qz(toml, out, in);
  REQUIRE(qz.fused != nullptr);
  loom_linear_fusion f{};
  f.struct_size = sizeof(f);
  f.act_dtype = kBF16;
  const int32_t max_rows = qz.fused->max_rows(qz.q.handle(), qz.gpu, &f);
  CHECK(max_rows >= 1);
  CHECK(max_rows <= 4);
  CHECK(qz.fused->max_rows(qz.q.handle(), qz.cpu, &f) == 0);  // fused products are for GPU weights

  // 70 rows: bfloat16 products take the prefill path (dequantized rows through cuBLAS).
  for (int64_t n : {int64_t{1}, int64_t{3}, int64_t{max_rows}, int64_t{9}, int64_t{70}}) {
    INFO("rows " << n);
    const auto x = bt::random_floats(static_cast<size_t>(n * in), 5 + static_cast<uint32_t>(n), -2.0f, 2.0f);
    std::vector<float> xb(x.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = bf16(x[i]);

    // Plain linear: float32 and bfloat16 activations, any number of rows, with a bias.
    {
      DeviceTensor xd({n, in}, kF32), yd({n, out}, kF32), bd({out}, kF32);
      xd.upload(x);
      const auto bias = bt::random_floats(static_cast<size_t>(out), 9);
      bd.upload(bias);
      REQUIRE(qz.vt->linear(qz.q.handle(), qz.gpu, xd.dl(), bd.dl(), yd.dl()) == LOOM_OK);
      auto ref = qz.reference(x, n);  // float32 activations are staged as float32
      for (int64_t r = 0; r < n; ++r)
        for (int64_t o = 0; o < out; ++o) ref[static_cast<size_t>(r * out + o)] += bias[static_cast<size_t>(o)];
      check_close(yd.download(), ref, 2e-5);
      DeviceTensor xh({n, in}, kBF16), yh({n, out}, kBF16);
      xh.upload(x);
      REQUIRE(qz.vt->linear(qz.q.handle(), qz.gpu, xh.dl(), bd.dl(), yh.dl()) == LOOM_OK);
      auto ref_b = qz.reference(xb, n);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t o = 0; o < out; ++o) ref_b[static_cast<size_t>(r * out + o)] += bias[static_cast<size_t>(o)];
      check_close(yh.download(), ref_b, 8e-3);
    }
    if (n > max_rows) {  // a fused product refuses more rows than max_rows
      DeviceTensor xd({n, in}, kBF16), yd({n, out}, kF32);
      f.input = LOOM_LINEAR_INPUT_ACT;
      f.output = LOOM_LINEAR_OUTPUT_ADD;
      CHECK(qz.fused->linear_fused(qz.q.handle(), qz.gpu, xd.dl(), &f, yd.dl()) == LOOM_ERR_UNSUPPORTED);
      continue;
    }
    // RMSNorm prologue (x is the float32 residual), stored as bfloat16.
    {
      const auto norm_w = bt::random_floats(static_cast<size_t>(in), 13, 0.5f, 1.5f);
      std::vector<float> normed(x.size());
      for (int64_t r = 0; r < n; ++r) {
        double sq = 0;
        for (int64_t i = 0; i < in; ++i) sq += static_cast<double>(x[static_cast<size_t>(r * in + i)]) * x[static_cast<size_t>(r * in + i)];
        const float inv = 1.0f / std::sqrt(static_cast<float>(sq / static_cast<double>(in)) + 1e-5f);
        for (int64_t i = 0; i < in; ++i) {
          const size_t at = static_cast<size_t>(r * in + i);
          normed[at] = bf16(norm_w[static_cast<size_t>(i)] * (x[at] * inv));
        }
      }
      DeviceTensor xd({n, in}, kF32), nd({in}, kF32), yd({n, out}, kBF16);
      xd.upload(x);
      nd.upload(norm_w);
      f.input = LOOM_LINEAR_INPUT_RMS_NORM;
      f.output = LOOM_LINEAR_OUTPUT_STORE;
      f.norm_weight = nd.dl();
      f.norm_eps = 1e-5f;
      REQUIRE(qz.fused->linear_fused(qz.q.handle(), qz.gpu, xd.dl(), &f, yd.dl()) == LOOM_OK);
      check_close(yd.download(), qz.reference(normed, n), 1e-2);
      f.norm_weight = nullptr;
    }
    // Residual add into float32 y.
    {
      const auto resid = bt::random_floats(static_cast<size_t>(n * out), 17, -3.0f, 3.0f);
      DeviceTensor xd({n, in}, kBF16), yd({n, out}, kF32);
      xd.upload(x);
      yd.upload(resid);
      f.input = LOOM_LINEAR_INPUT_ACT;
      f.output = LOOM_LINEAR_OUTPUT_ADD;
      REQUIRE(qz.fused->linear_fused(qz.q.handle(), qz.gpu, xd.dl(), &f, yd.dl()) == LOOM_OK);
      auto ref = qz.reference(xb, n);
      for (size_t i = 0; i < ref.size(); ++i) ref[i] += resid[i];
      check_close(yd.download(), ref, 4e-3);  // bfloat16 inputs: products in half2
    }
    // RoPE and the q/k/v split of a fused q/k/v product.
    if (rope.heads > 0) {
      const int64_t D = rope.head_dim, half = D / 2, P = 16;
      std::vector<float> cos_sin(static_cast<size_t>(P * half * 2));
      const auto angles = bt::random_floats(static_cast<size_t>(P * half), 19, 0.0f, 6.2831853f);
      for (size_t i = 0; i < angles.size(); ++i) {
        cos_sin[2 * i] = std::cos(angles[i]);
        cos_sin[2 * i + 1] = std::sin(angles[i]);
      }
      std::vector<int32_t> positions(static_cast<size_t>(n));
      for (int64_t r = 0; r < n; ++r) positions[static_cast<size_t>(r)] = static_cast<int32_t>((r * 7 + 3) % P);
      DeviceTensor xd({n, in}, kBF16), cs({P, half, 2}, kF32), pos({n}, kDLInt32()), qd({n, rope.heads, D}, kBF16),
          kd({n, rope.kv_heads, D}, kBF16), vd({n, rope.kv_heads, D}, kBF16);
      xd.upload(x);
      cs.upload(cos_sin);
      REQUIRE(cudaMemcpy(pos.data, positions.data(), positions.size() * 4, cudaMemcpyHostToDevice) == cudaSuccess);
      f.input = LOOM_LINEAR_INPUT_ACT;
      f.output = LOOM_LINEAR_OUTPUT_ROPE_QKV;
      f.rope_cos_sin = cs.dl();
      f.rope_positions = pos.dl();
      f.rope_heads = rope.heads;
      f.rope_kv_heads = rope.kv_heads;
      f.rope_head_dim = rope.head_dim;
      f.rope_q = qd.dl();
      f.rope_k = kd.dl();
      f.rope_v = vd.dl();
      REQUIRE(qz.fused->max_rows(qz.q.handle(), qz.gpu, &f) >= n);
      REQUIRE(qz.fused->linear_fused(qz.q.handle(), qz.gpu, xd.dl(), &f, nullptr) == LOOM_OK);
      const auto p = qz.reference(xb, n);
      std::vector<float> q_ref(qd.count()), k_ref(kd.count()), v_ref(vd.count());
      for (int64_t r = 0; r < n; ++r)
        for (int64_t h = 0; h < rope.heads + 2 * rope.kv_heads; ++h)
          for (int64_t i = 0; i < half; ++i) {
            float a = bf16(p[static_cast<size_t>(r * out + h * D + i)]), b = bf16(p[static_cast<size_t>(r * out + h * D + i + half)]);
            std::vector<float> *dst;
            int64_t at;
            if (h < rope.heads) {
              dst = &q_ref;
              at = (r * rope.heads + h) * D;
            } else if (h < rope.heads + rope.kv_heads) {
              dst = &k_ref;
              at = (r * rope.kv_heads + h - rope.heads) * D;
            } else {
              dst = &v_ref;
              at = (r * rope.kv_heads + h - rope.heads - rope.kv_heads) * D;
            }
            if (dst != &v_ref) {
              const size_t c = static_cast<size_t>((positions[static_cast<size_t>(r)] * half + i) * 2);
              const float ra = a * cos_sin[c] - b * cos_sin[c + 1], rb = b * cos_sin[c] + a * cos_sin[c + 1];
              a = ra;
              b = rb;
            }
            (*dst)[static_cast<size_t>(at + i)] = a;
            (*dst)[static_cast<size_t>(at + i + half)] = b;
          }
      check_close(qd.download(), q_ref, 8e-3);
      check_close(kd.download(), k_ref, 8e-3);
      check_close(vd.download(), v_ref, 8e-3);
      f = loom_linear_fusion{};
      f.struct_size = sizeof(f);
      f.act_dtype = kBF16;
      // A q/k/v layout that does not make up the output is refused by max_rows.
      f.output = LOOM_LINEAR_OUTPUT_ROPE_QKV;
      f.rope_heads = rope.heads + 1;
      f.rope_kv_heads = rope.kv_heads;
      f.rope_head_dim = rope.head_dim;
      CHECK(qz.fused->max_rows(qz.q.handle(), qz.gpu, &f) == 0);
      f = loom_linear_fusion{};
      f.struct_size = sizeof(f);
      f.act_dtype = kBF16;
    }
    // SwiGLU of the two halves of the product.
    if (out % 2 == 0) {
      DeviceTensor xd({n, in}, kBF16), yd({n, out / 2}, kBF16);
      xd.upload(x);
      f.input = LOOM_LINEAR_INPUT_ACT;
      f.output = LOOM_LINEAR_OUTPUT_SWIGLU;
      REQUIRE(qz.fused->linear_fused(qz.q.handle(), qz.gpu, xd.dl(), &f, yd.dl()) == LOOM_OK);
      const auto p = qz.reference(xb, n);
      std::vector<float> ref(static_cast<size_t>(n * out / 2));
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < out / 2; ++j) {
          const float g = bf16(p[static_cast<size_t>(r * out + j)]), u = bf16(p[static_cast<size_t>(r * out + out / 2 + j)]);
          ref[static_cast<size_t>(r * out / 2 + j)] = g / (1.0f + std::exp(-g)) * u;
        }
      check_close(yd.download(), ref, 8e-3);
    }
  }
}

// The fp8 quantizer's products (cuBLASLt E4M3, no fusions) against its CPU product on the same
// codes: float32 and bfloat16 activations and outputs, a bias, and, for 8192 inputs, more rows
// than one chunk of the activation scratch holds (2,047).
void check_fp8_products(const std::string &toml, int64_t out, int64_t in, const std::vector<int64_t> &row_counts) {
  INFO(toml << "out " << out << ", in " << in);
  Quantized qz(toml, out, in);
  CHECK(qz.fused == nullptr);
  for (const int64_t n : row_counts) {
    INFO("rows " << n);
    const auto x = bt::random_floats(static_cast<size_t>(n * in), 5 + static_cast<uint32_t>(n), -2.0f, 2.0f);
    std::vector<float> xb(x.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = bf16(x[i]);
    const auto bias = bt::random_floats(static_cast<size_t>(out), 9);
    DeviceTensor bd({out}, kF32);
    bd.upload(bias);
    auto with_bias = [&](std::vector<float> ref) {
      for (int64_t r = 0; r < n; ++r)
        for (int64_t o = 0; o < out; ++o) ref[static_cast<size_t>(r * out + o)] += bias[static_cast<size_t>(o)];
      return ref;
    };
    const auto ref = with_bias(qz.reference(x, n));
    {
      DeviceTensor xd({n, in}, kF32), yd({n, out}, kF32);
      xd.upload(x);
      REQUIRE(qz.vt->linear(qz.q.handle(), qz.gpu, xd.dl(), bd.dl(), yd.dl()) == LOOM_OK);
      // The same codes on both sides (the identity test below checks them bit for bit): only the
      // accumulation differs, and Hopper's E4M3 tensor cores accumulate with fewer bits than
      // float32 between cuBLASLt's promotions (1.1e-4 to 1.8e-4 of the largest output measured).
      check_close(yd.download(), ref, 5e-4);
    }
    {
      DeviceTensor xh({n, in}, kBF16), yh({n, out}, kBF16), yf({n, out}, kF32);
      xh.upload(x);
      const auto ref_b = with_bias(qz.reference(xb, n));
      REQUIRE(qz.vt->linear(qz.q.handle(), qz.gpu, xh.dl(), bd.dl(), yh.dl()) == LOOM_OK);
      check_close(yh.download(), ref_b, 8e-3);
      REQUIRE(qz.vt->linear(qz.q.handle(), qz.gpu, xh.dl(), nullptr, yf.dl()) == LOOM_OK);
      check_close(yf.download(), qz.reference(xb, n), 5e-4);
    }
  }
}

}  // namespace

TEST_CASE("fp8 on CUDA: cuBLASLt's E4M3 products match the CPU's", "[cuda][quant]") {
  for (const char *scales : {"", "weight_scale = \"per-tensor\"\n", "activation_scale = \"per-tensor\"\n",
                             "weight_scale = \"per-tensor\"\nactivation_scale = \"per-tensor\"\n"}) {
    const std::string toml = std::string("[quantizer]\nuse = \"fp8\"\n") + scales;
    check_fp8_products(toml, 64, 2048, {1, 3, 70});
    check_fp8_products(toml, 4112, 1040, {1, 17});
  }
  check_fp8_products("[quantizer]\nuse = \"fp8\"\n", 48, 8192, {2100});
  check_fp8_products("[quantizer]\nuse = \"fp8\"\nactivation_scale = \"per-tensor\"\n", 48, 8192, {2100});
}

TEST_CASE("fp8 on CUDA quantizes activations exactly as the CPU does", "[cuda][quant]") {
  // An identity weight (every row's scale 1/448, its one code 448) passes the quantized
  // activations through: y = decode(code(x / s)) * s for each row's scale s. Magnitudes spread
  // over 24 binades reach E4M3's subnormals, and exact midpoints between two codes test the ties.
  const int64_t in = 256, n = 5;
  std::vector<float> eye(static_cast<size_t>(in * in), 0.0f);
  for (int64_t i = 0; i < in; ++i) eye[static_cast<size_t>(i * in + i)] = 1.0f;
  for (const char *act : {"per-token", "per-tensor"}) {
    INFO(act);
    auto rt = bt::runtime(std::string("[quantizer]\nuse = \"fp8\"\nactivation_scale = \"") + act + "\"\n");
    loom::Instance &q = rt->pipeline().at("quantizer");
    const auto *vt = q.vtable<loom_quantizer_vtable>();
    bt::Tensor<float> w({in, in}, eye);
    loom_qweight *cpu = nullptr, *gpu = nullptr;
    REQUIRE(bt::quantize(q, w.dl(), "identity", DLDevice{kDLCPU, 0}, &cpu) == LOOM_OK);
    REQUIRE(bt::quantize(q, w.dl(), "identity", kGpu, &gpu) == LOOM_OK);
    const auto u = bt::random_floats(static_cast<size_t>(n * in), 21, 0.0f, 1.0f);
    const auto e = bt::random_floats(static_cast<size_t>(n * in), 22, -24.0f, 0.0f);
    std::vector<float> x(u.size());
    for (size_t i = 0; i < x.size(); ++i) x[i] = (u[i] < 0.5f ? -1.0f : 1.0f) * std::ldexp(1.0f + u[i], static_cast<int>(e[i]));
    x[3] = 1.0f;                 // row 0's amax 1: the scale is 1/448, so x / s = 448 x
    x[4] = 1.0625f / 448.0f;     // midway between codes 1 and 1.125 (x / s = 1.0625): ties to even, 1
    x[5] = 1.1875f / 448.0f;     // midway between 1.125 and 1.25: ties to 1.25 (even mantissa)
    x[6] = std::ldexp(1.5f, -9) / 448.0f;  // midway between the subnormals 2^-9 and 2^-8
    bt::Tensor<float> xt({n, in}, x), yt({n, in});
    REQUIRE(vt->linear(q.handle(), cpu, xt.dl(), nullptr, yt.dl()) == LOOM_OK);
    DeviceTensor xd({n, in}, kF32), yd({n, in}, kF32);
    xd.upload(x);
    REQUIRE(vt->linear(q.handle(), gpu, xd.dl(), nullptr, yd.dl()) == LOOM_OK);
    const auto got = yd.download();
    int differ = 0;
    for (size_t i = 0; i < got.size(); ++i)
      // A code apart is at least 2^-4 relative; the scales' product may round differently.
      if (std::fabs(got[i] - yt.v[i]) > 1e-6f * std::fabs(yt.v[i]) && ++differ <= 5) UNSCOPED_INFO("at " << i << ": x " << x[i] << " cpu " << yt.v[i] << " gpu " << got[i]);
    CHECK(differ == 0);
    vt->free_weight(q.handle(), cpu);
    vt->free_weight(q.handle(), gpu);
  }
}

TEST_CASE("fp8 on CUDA refuses shapes cuBLASLt cannot take, by name", "[cuda][quant]") {
  auto rt = bt::runtime("[quantizer]\nuse = \"fp8\"\n");
  loom::Instance &q = rt->pipeline().at("quantizer");
  bt::Tensor<float> w({8, 40}, bt::random_floats(8 * 40, 3));
  loom_qweight *out = nullptr;
  CHECK(bt::quantize(q, w.dl(), "test.linear", kGpu, &out) == LOOM_ERR_UNSUPPORTED);
  CHECK(out == nullptr);
  CHECK_THAT(q.last_error(), Catch::Contains("fp8: on CUDA, in_features and out_features must be multiples of 16"));
}

TEST_CASE("int8 on CUDA: linear and fused products match the CPU's", "[cuda][quant]") {
  // 2048 inputs: 128 pieces, so few rows split K in two; 1040: 65 pieces, a row ends inside a
  // 32-piece block; 8192: max_rows is 3 (the staged rows fill 48 KB).
  check_products("[quantizer]\nuse = \"int8\"\n", 64, 2048, {2, 1, 16});
  check_products("[quantizer]\nuse = \"int8\"\n", 4099, 1040);
  check_products("[quantizer]\nuse = \"int8\"\n", 300, 8192, {9, 3, 20});
}

TEST_CASE("quantized one-token products on CUDA: odd row counts and many units a warp", "[cuda][quant]") {
  // int8's one token takes the streamed kernel (loom_quant_gemv_stream.cuh) where rows are whole
  // 64-piece slots (where its setup fails, or with LOOM_QUANT_STREAM=0, the common kernel answers
  // the same): an odd number of rows leaves the last unit one row. int4 has no streamed kernel:
  // its cases are the common kernel's at the same shapes.
  check_products("[quantizer]\nuse = \"int8\"\n", 4099, 1024);
  check_products("[quantizer]\nuse = \"int4\"\n", 4099, 2048);
  // 70,000 rows: on a GPU of up to 136 SMs (the H200's 132: about 33 units a warp), more units a
  // warp than its lanes hold epilogue values for (32).
  for (const char *toml : {"[quantizer]\nuse = \"int8\"\n", "[quantizer]\nuse = \"int4\"\n"}) {
    INFO(toml);
    const int64_t out = 70000, in = 2048;
    Quantized qz(toml, out, in);
    const auto x = bt::random_floats(static_cast<size_t>(in), 23, -2.0f, 2.0f);
    std::vector<float> xb(x.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = bf16(x[i]);
    DeviceTensor xh({1, in}, kBF16), yd({1, out}, kF32);
    xh.upload(x);
    REQUIRE(qz.vt->linear(qz.q.handle(), qz.gpu, xh.dl(), nullptr, yd.dl()) == LOOM_OK);
    check_close(yd.download(), qz.reference(xb, 1), 8e-3);
  }
}

TEST_CASE("int4 on CUDA: linear and fused products match the CPU's", "[cuda][quant]") {
  check_products("[quantizer]\nuse = \"int4\"\n", 64, 2048, {2, 1, 16});
  check_products("[quantizer]\nuse = \"int4\"\ngroup_size = 32\nzero_point = false\n", 4099, 1056);
  check_products("[quantizer]\nuse = \"int4\"\ngroup_size = 64\n", 300, 8192, {9, 3, 20});
  // AWQ: the input scales divide the staged inputs, and fold into the prefill path's rows.
  check_products("[quantizer]\nuse = \"int4\"\nmethod = \"awq\"\nawq_rows = 16\n", 4099, 1024);
}

TEST_CASE("int4 on CUDA refuses shapes its kernel cannot take, by name", "[cuda][quant]") {
  auto rt = bt::runtime("[quantizer]\nuse = \"int4\"\ngroup_size = 16\n");
  loom::Instance &q = rt->pipeline().at("quantizer");
  bt::Tensor<float> w({8, 64}, bt::random_floats(8 * 64, 3));
  loom_qweight *out = nullptr;
  CHECK(bt::quantize(q, w.dl(), "test.linear", kGpu, &out) == LOOM_ERR_UNSUPPORTED);
  CHECK(out == nullptr);
  CHECK_THAT(q.last_error(), Catch::Contains("int4: on CUDA, in_features and group_size must be multiples of 32"));
}

int main(int argc, char **argv) {
  if (!loom::cuda_device_present()) {
    std::cout << "quant_cuda_test: skipped: no CUDA device\n";
    return 77;
  }
  return Catch::Session().run(argc, argv);
}

// Not a test (hidden tag): the fused decode products of the 1B shape, one token, timed over 200
// back-to-back launches each; prints microseconds per product and the weight bytes per second.
// Run: quant_cuda_test "[.bench]"
TEST_CASE("quantized GEMV timings on the 1B shape", "[.bench]") {
  struct Shape {
    const char *name;
    int64_t out, in;
    loom_linear_input input;
    loom_linear_output output;
  };
  const Shape shapes[] = {{"qkv", 3072, 2048, LOOM_LINEAR_INPUT_RMS_NORM, LOOM_LINEAR_OUTPUT_STORE},
                          {"o", 2048, 2048, LOOM_LINEAR_INPUT_ACT, LOOM_LINEAR_OUTPUT_ADD},
                          {"gate_up", 16384, 2048, LOOM_LINEAR_INPUT_RMS_NORM, LOOM_LINEAR_OUTPUT_SWIGLU},
                          {"down", 2048, 8192, LOOM_LINEAR_INPUT_ACT, LOOM_LINEAR_OUTPUT_ADD},
                          {"lm_head", 32000, 2048, LOOM_LINEAR_INPUT_RMS_NORM, LOOM_LINEAR_OUTPUT_STORE}};
  for (const char *toml : {"[quantizer]\nuse = \"int8\"\n", "[quantizer]\nuse = \"int4\"\n"})
    for (const auto act : {kBF16, kF32})
      for (const Shape &s : shapes) {
        Quantized qz(toml, s.out, s.in);
        const bool norm = s.input == LOOM_LINEAR_INPUT_RMS_NORM;
        DeviceTensor xd({1, s.in}, norm ? kF32 : act), nd({s.in}, kF32),
            yd({1, s.output == LOOM_LINEAR_OUTPUT_SWIGLU ? s.out / 2 : s.out},
               s.output == LOOM_LINEAR_OUTPUT_ADD ? kF32 : (s.output == LOOM_LINEAR_OUTPUT_SWIGLU ? act : kF32));
        xd.upload(bt::random_floats(static_cast<size_t>(s.in), 1));
        nd.upload(std::vector<float>(static_cast<size_t>(s.in), 1.0f));
        yd.upload(std::vector<float>(yd.count(), 0.0f));
        loom_linear_fusion f{};
        f.struct_size = sizeof(f);
        f.input = s.input;
        f.output = s.output;
        f.norm_weight = norm ? nd.dl() : nullptr;
        f.norm_eps = 1e-5f;
        f.act_dtype = act;
        auto once = [&] { REQUIRE(qz.fused->linear_fused(qz.q.handle(), qz.gpu, xd.dl(), &f, yd.dl()) == LOOM_OK); };
        for (int i = 0; i < 20; ++i) once();
        cudaEvent_t a, b;
        cudaEventCreate(&a);
        cudaEventCreate(&b);
        cudaStream_t stream = static_cast<cudaStream_t>(loom::cuda_compute_stream(0));
        cudaEventRecord(a, stream);
        for (int i = 0; i < 200; ++i) once();
        cudaEventRecord(b, stream);
        cudaEventSynchronize(b);
        float ms = 0;
        cudaEventElapsedTime(&ms, a, b);
        const double us = ms * 1000.0 / 200;
        const double bytes = static_cast<double>(s.out * s.in) * (std::strstr(toml, "int8") ? 1.0 : 0.5);
        std::printf("%-5s %-4s %-8s %8.2f us  %7.0f GB/s\n", std::strstr(toml, "int8") ? "int8" : "int4",
                    act.bits == 16 ? "bf16" : "f32", s.name, us, bytes / us / 1e3);
        cudaEventDestroy(a);
        cudaEventDestroy(b);
      }
}
