// libloom-quant-fp8 on the CPU: the E4M3 weight error bound per scale scheme, the product
// against one computed here from the definition (activations quantized per token or per tensor,
// both operands decoded), export/import round trip and the errors of corrupt imports and bad
// parameters.
#include <catch2/catch.hpp>

#include <cmath>

#include <nlohmann/json.hpp>

#include "builtin_test_util.hpp"
#include "loom_e4m3.hpp"

namespace e4m3 = loomp::e4m3;

namespace {

constexpr int64_t OUT = 6, IN = 40;

struct Fixture {
  std::unique_ptr<loom::Runtime> rt;
  loom::Instance &q;
  const loom_quantizer_vtable *vt;
  bt::Tensor<float> w{{OUT, IN}, bt::random_floats(OUT * IN, 3, -2.0f, 2.0f)};
  loom_qweight *qw = nullptr;

  explicit Fixture(const std::string &params = "")
      : rt(bt::runtime("[quantizer]\nuse = \"fp8\"\n" + params)), q(rt->pipeline().at("quantizer")),
        vt(q.vtable<loom_quantizer_vtable>()) {
    for (int64_t i = 0; i < IN; ++i) w.v[static_cast<size_t>(2 * IN + i)] = 0.0f;       // an all-zero row
    for (int64_t i = 0; i < IN; ++i) w.v[static_cast<size_t>(4 * IN + i)] *= 1e-3f;     // a quiet row
    w.v[static_cast<size_t>(5 * IN + 7)] = 300.0f;                                      // an outlier
    INFO(q.last_error());
    REQUIRE(bt::quantize(q, w.dl(), "model.layers.0.mlp.down_proj", DLDevice{kDLCPU, 0}, &qw) == LOOM_OK);
  }
  ~Fixture() { vt->free_weight(q.handle(), qw); }

  std::vector<float> dequant(const loom_qweight *x) {
    bt::Tensor<float> out({OUT, IN});
    REQUIRE(vt->dequantize(q.handle(), x, out.dl()) == LOOM_OK);
    return out.v;
  }
};

float amax_of(const float *v, int64_t n) {
  float m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(v[i]));
  return m;
}

// E4M3 rounds to 3 mantissa bits: at most 2^-4 relative for normals, and half the subnormal
// spacing (2^-10 of the scale) below 2^-6.
void check_error_bound(const Fixture &f, const std::vector<float> &dq, bool per_tensor) {
  const float tensor_amax = amax_of(f.w.v.data(), OUT * IN);
  for (int64_t o = 0; o < OUT; ++o) {
    const float amax = per_tensor ? tensor_amax : amax_of(f.w.v.data() + o * IN, IN);
    const float scale = amax > 0 ? amax / 448.0f : 1.0f;
    for (int64_t i = 0; i < IN; ++i) {
      const float v = f.w.v[static_cast<size_t>(o * IN + i)];
      INFO("row " << o << " col " << i << " value " << v);
      REQUIRE(std::fabs(dq[static_cast<size_t>(o * IN + i)] - v) <=
              std::max(std::fabs(v) * 0.0625f, scale * 0.0009765625f) * 1.0001f);
    }
  }
}

// The product by the definition: x rows quantized with amax / 448 scales, both operands decoded.
std::vector<double> expected_product(const std::vector<float> &x, int64_t n, const std::vector<float> &dq,
                                     bool act_per_tensor) {
  std::vector<double> y(static_cast<size_t>(n * OUT));
  const float tensor_amax = amax_of(x.data(), n * IN);
  for (int64_t r = 0; r < n; ++r) {
    const float amax = act_per_tensor ? tensor_amax : amax_of(x.data() + r * IN, IN);
    const float s = amax > 0 ? amax / 448.0f : 1.0f;
    for (int64_t o = 0; o < OUT; ++o) {
      double acc = 0;
      for (int64_t i = 0; i < IN; ++i)
        acc += static_cast<double>(e4m3::decode(e4m3::encode(x[static_cast<size_t>(r * IN + i)] / s))) * s *
               dq[static_cast<size_t>(o * IN + i)];
      y[static_cast<size_t>(r * OUT + o)] = acc;
    }
  }
  return y;
}

}  // namespace

TEST_CASE("fp8 weights are within E4M3's rounding of the originals", "[fp8]") {
  for (const bool per_tensor : {false, true}) {
    INFO("per_tensor " << per_tensor);
    Fixture f(per_tensor ? "weight_scale = \"per-tensor\"\n" : "");
    const auto dq = f.dequant(f.qw);
    check_error_bound(f, dq, per_tensor);
    for (int64_t i = 0; i < IN; ++i) CHECK(dq[static_cast<size_t>(2 * IN + i)] == 0.0f);
    // Per channel, each row's largest magnitude is exactly representable (it maps to 448).
    if (!per_tensor) CHECK(dq[static_cast<size_t>(5 * IN + 7)] == 300.0f);
  }
}

TEST_CASE("fp8 linear is the product of the quantized activations and weights", "[fp8]") {
  for (const char *act : {"per-token", "per-tensor"})
    for (const char *wscale : {"per-channel", "per-tensor"}) {
      INFO(act << " activations, " << wscale << " weights");
      Fixture f(std::string("activation_scale = \"") + act + "\"\nweight_scale = \"" + wscale + "\"\n");
      const int64_t n = 4;
      auto xv = bt::random_floats(n * IN, 5, -3.0f, 3.0f);
      for (int64_t i = 0; i < IN; ++i) xv[static_cast<size_t>(1 * IN + i)] = 0.0f;    // an all-zero row
      for (int64_t i = 0; i < IN; ++i) xv[static_cast<size_t>(2 * IN + i)] *= 0.01f;  // a quiet row
      bt::Tensor<float> x({n, IN}, xv), bias({OUT}, bt::random_floats(OUT, 6)), y({n, OUT});
      REQUIRE(f.vt->linear(f.q.handle(), f.qw, x.dl(), bias.dl(), y.dl()) == LOOM_OK);
      const auto dq = f.dequant(f.qw);
      const auto want = expected_product(xv, n, dq, std::string(act) == "per-tensor");
      for (int64_t r = 0; r < n; ++r)
        for (int64_t o = 0; o < OUT; ++o) {
          double magnitude = 0, exact = bias.v[static_cast<size_t>(o)];
          for (int64_t i = 0; i < IN; ++i) {
            magnitude += std::fabs(xv[static_cast<size_t>(r * IN + i)] * dq[static_cast<size_t>(o * IN + i)]);
            exact += static_cast<double>(xv[static_cast<size_t>(r * IN + i)]) * f.w.v[static_cast<size_t>(o * IN + i)];
          }
          const double got = y.v[static_cast<size_t>(r * OUT + o)];
          CHECK(got == Approx(want[static_cast<size_t>(r * OUT + o)] + bias.v[static_cast<size_t>(o)]).margin(1e-5 * magnitude + 1e-6));
          // And the quantized product stays near the float one: each operand within 2^-4
          // relative (plus the subnormal floor of the quiet rows).
          CHECK(std::fabs(got - exact) <= 0.13 * magnitude + 1e-4);
        }
      // Per token, the quiet row keeps its own precision; per tensor it loses it to the loud rows.
      if (std::string(act) == "per-token") {
        for (int64_t o = 0; o < OUT; ++o) CHECK(y.v[static_cast<size_t>(1 * OUT + o)] == Approx(bias.v[static_cast<size_t>(o)]));
      }
      bt::Tensor<float> bad_x({n, IN + 1});
      CHECK(f.vt->linear(f.q.handle(), f.qw, bad_x.dl(), nullptr, y.dl()) == LOOM_ERR_INVALID_ARGUMENT);
      CHECK_THAT(f.q.last_error(), Catch::Contains("x"));
    }
}

TEST_CASE("fp8 export and import round-trip; corrupt imports name the tensor", "[fp8]") {
  for (const bool per_tensor : {false, true}) {
    INFO("per_tensor " << per_tensor);
    Fixture f(per_tensor ? "weight_scale = \"per-tensor\"\n" : "");
    bt::StoredTensors stored;
    loom::HostBuffer meta;
    loom_tensor_sink sink{sizeof(loom_tensor_sink), &stored, &bt::store_tensor};
    REQUIRE(f.vt->export_weight(f.q.handle(), f.qw, &sink, meta.abi()) == LOOM_OK);
    REQUIRE(stored.count("qweight") == 1);
    REQUIRE(stored.count("scales") == 1);
    CHECK(stored["qweight"].shape == std::vector<int64_t>{OUT, IN});
    CHECK(stored["qweight"].dtype.code == kDLUInt);
    CHECK(stored["qweight"].dtype.bits == 8);
    CHECK(stored["scales"].shape == std::vector<int64_t>{per_tensor ? 1 : OUT});
    const auto m = nlohmann::json::parse(meta.view());
    CHECK(m == nlohmann::json{{"format", "loom-fp8"}, {"bits", 8}, {"encoding", "e4m3fn"},
                              {"scheme", per_tensor ? "per-tensor" : "per-channel"}});
    const std::string meta_text(meta.view());

    auto import = [&](std::vector<std::pair<std::string, DLTensor>> ts, const std::string &md, loom_qweight **out) {
      return bt::import_tensors(f.q, std::move(ts), md, out);
    };
    loom_qweight *back = nullptr;
    REQUIRE(import({{"qweight", stored["qweight"].view()}, {"scales", stored["scales"].view()}}, meta_text, &back) == LOOM_OK);
    CHECK(f.dequant(back) == f.dequant(f.qw));
    f.vt->free_weight(f.q.handle(), back);

    loom_qweight *none = nullptr;
    CHECK(import({{"qweight", stored["qweight"].view()}}, meta_text, &none) == LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(f.q.last_error(), Catch::Contains("missing tensor 'scales'"));

    bt::StoredTensor wrong_dtype = stored["qweight"];
    wrong_dtype.dtype = DLDataType{kDLInt, 8, 1};
    CHECK(import({{"qweight", wrong_dtype.view()}, {"scales", stored["scales"].view()}}, meta_text, &none) ==
          LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(f.q.last_error(), Catch::Contains("'qweight'") && Catch::Contains("uint8"));

    bt::StoredTensor wrong_scales = stored["scales"];
    wrong_scales.shape = {per_tensor ? OUT : OUT - 1};
    CHECK(import({{"qweight", stored["qweight"].view()}, {"scales", wrong_scales.view()}}, meta_text, &none) ==
          LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(f.q.last_error(), Catch::Contains("'scales'") && Catch::Contains("shape"));

    bt::StoredTensor nan_code = stored["qweight"];
    nan_code.bytes[static_cast<size_t>(3 * IN + 5)] = 0xFF;
    CHECK(import({{"qweight", nan_code.view()}, {"scales", stored["scales"].view()}}, meta_text, &none) ==
          LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(f.q.last_error(), Catch::Contains("NaN code at row 3"));

    bt::StoredTensor bad_scale = stored["scales"];
    reinterpret_cast<float *>(bad_scale.bytes.data())[0] = -1.0f;
    CHECK(import({{"qweight", stored["qweight"].view()}, {"scales", bad_scale.view()}}, meta_text, &none) ==
          LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(f.q.last_error(), Catch::Contains("non-positive"));

    CHECK(import({{"qweight", stored["qweight"].view()}, {"scales", stored["scales"].view()}},
                 R"({"format":"loom-fp8","bits":8,"scheme":"per-group"})", &none) == LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(f.q.last_error(), Catch::Contains("scheme"));
    CHECK(import({{"qweight", stored["qweight"].view()}, {"scales", stored["scales"].view()}},
                 R"({"format":"loom-int8","bits":8})", &none) == LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(f.q.last_error(), Catch::Contains("unknown format 'loom-int8'"));
    CHECK(none == nullptr);
  }
}

TEST_CASE("fp8 refuses bad parameters by key and non-finite weights", "[fp8]") {
  CHECK_THAT(bt::build_error("[quantizer]\nuse = \"fp8\"\nweight_scale = \"per-group\"\n"),
             Catch::Contains("weight_scale") && Catch::Contains("per-channel"));
  CHECK_THAT(bt::build_error("[quantizer]\nuse = \"fp8\"\nactivation_scale = \"static\"\n"),
             Catch::Contains("activation_scale") && Catch::Contains("per-token"));
  auto rt = bt::runtime("[quantizer]\nuse = \"fp8\"\n");
  loom::Instance &q = rt->pipeline().at("quantizer");
  bt::Tensor<float> w({2, 16}, bt::random_floats(32, 3));
  w.v[20] = NAN;
  loom_qweight *out = nullptr;
  CHECK(bt::quantize(q, w.dl(), "m", DLDevice{kDLCPU, 0}, &out) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(q.last_error(), Catch::Contains("row 1") && Catch::Contains("non-finite"));
  CHECK(out == nullptr);
}
