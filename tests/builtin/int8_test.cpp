// libloom-quant-int8: quantization error bound, linear vs dense, export/import round trip and
// the errors of a corrupt import.
#include <catch2/catch.hpp>

#include <cmath>

#include <nlohmann/json.hpp>

#include "builtin_test_util.hpp"

namespace {

constexpr int64_t OUT = 6, IN = 10;

struct Fixture {
  std::unique_ptr<loom::Runtime> rt = bt::runtime("[quantizer]\nuse = \"int8\"\n");
  loom::Instance &q = rt->pipeline().at("quantizer");
  const loom_quantizer_vtable *vt = q.vtable<loom_quantizer_vtable>();
  bt::Tensor<float> w{{OUT, IN}, bt::random_floats(OUT * IN, 3, -2.0f, 2.0f)};
  loom_qweight *qw = nullptr;

  Fixture() {
    for (int64_t i = 0; i < IN; ++i) w.v[2 * IN + i] = 0.0f; // an all-zero row
    REQUIRE(bt::quantize(q, w.dl(), "model.layers.0.mlp.down_proj", DLDevice{kDLCPU, 0}, &qw) == LOOM_OK);
  }
  ~Fixture() { vt->free_weight(q.handle(), qw); }

  std::vector<float> dequant(const loom_qweight *x) {
    bt::Tensor<float> out({OUT, IN});
    REQUIRE(vt->dequantize(q.handle(), x, out.dl()) == LOOM_OK);
    return out.v;
  }
  std::vector<float> row_scales() {
    std::vector<float> s(OUT);
    for (int64_t o = 0; o < OUT; ++o) {
      float amax = 0;
      for (int64_t i = 0; i < IN; ++i) amax = std::max(amax, std::fabs(w.v[o * IN + i]));
      s[o] = amax > 0 ? amax / 127.0f : 1.0f;
    }
    return s;
  }
};

} // namespace

TEST_CASE("int8 dequantize error is at most half a step per channel", "[int8]") {
  Fixture f;
  const auto dq = f.dequant(f.qw);
  const auto scales = f.row_scales();
  for (int64_t o = 0; o < OUT; ++o)
    for (int64_t i = 0; i < IN; ++i)
      REQUIRE(std::fabs(dq[o * IN + i] - f.w.v[o * IN + i]) <= scales[o] * 0.5f + 1e-6f);
  for (int64_t i = 0; i < IN; ++i) CHECK(dq[2 * IN + i] == 0.0f);
}

TEST_CASE("int8 linear matches the dense product", "[int8]") {
  Fixture f;
  const int64_t n = 3;
  bt::Tensor<float> x({n, IN}, bt::random_floats(n * IN, 5));
  bt::Tensor<float> bias({OUT}, bt::random_floats(OUT, 6));
  bt::Tensor<float> y({n, OUT});
  REQUIRE(f.vt->linear(f.q.handle(), f.qw, x.dl(), bias.dl(), y.dl()) == LOOM_OK);
  const auto dq = f.dequant(f.qw);
  const auto scales = f.row_scales();
  for (int64_t r = 0; r < n; ++r)
    for (int64_t o = 0; o < OUT; ++o) {
      double exact = bias.v[o], deq = bias.v[o], bound = 1e-5;
      for (int64_t i = 0; i < IN; ++i) {
        exact += x.v[r * IN + i] * f.w.v[o * IN + i];
        deq += x.v[r * IN + i] * dq[o * IN + i];
        bound += std::fabs(x.v[r * IN + i]) * scales[o] * 0.5;
      }
      CHECK(y.v[r * OUT + o] == Approx(deq).margin(1e-5));
      CHECK(std::fabs(y.v[r * OUT + o] - exact) <= bound);
    }
  bt::Tensor<float> bad_x({n, IN + 1});
  CHECK(f.vt->linear(f.q.handle(), f.qw, bad_x.dl(), nullptr, y.dl()) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(f.q.last_error(), Catch::Contains("x"));
}

TEST_CASE("int8 export and import round-trip; corrupt imports name the tensor", "[int8]") {
  Fixture f;
  bt::StoredTensors stored;
  loom::HostBuffer meta;
  loom_tensor_sink sink{sizeof(loom_tensor_sink), &stored, &bt::store_tensor};
  REQUIRE(f.vt->export_weight(f.q.handle(), f.qw, &sink, meta.abi()) == LOOM_OK);
  REQUIRE(stored.count("qweight") == 1);
  REQUIRE(stored.count("scales") == 1);
  CHECK(stored["qweight"].shape == std::vector<int64_t>{OUT, IN});
  CHECK(stored["qweight"].dtype.code == kDLInt);
  CHECK(stored["qweight"].dtype.bits == 8);
  CHECK(stored["scales"].shape == std::vector<int64_t>{OUT});
  const auto m = nlohmann::json::parse(meta.view());
  CHECK(m == nlohmann::json{{"format", "loom-int8"}, {"bits", 8}, {"scheme", "per-channel-symmetric"}});
  const std::string meta_text(meta.view());

  auto import = [&](std::vector<std::pair<std::string, DLTensor>> ts, const std::string &md, loom_qweight **out) {
    return bt::import_tensors(f.q, std::move(ts), md, out);
  };
  loom_qweight *back = nullptr;
  REQUIRE(import({{"qweight", stored["qweight"].view()}, {"scales", stored["scales"].view()}}, meta_text, &back) ==
          LOOM_OK);
  CHECK(f.dequant(back) == f.dequant(f.qw));
  f.vt->free_weight(f.q.handle(), back);

  loom_qweight *none = nullptr;
  CHECK(import({{"qweight", stored["qweight"].view()}}, meta_text, &none) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(f.q.last_error(), Catch::Contains("missing tensor 'scales'"));

  bt::StoredTensor wrong_dtype = stored["qweight"];
  wrong_dtype.dtype = DLDataType{kDLUInt, 8, 1};
  CHECK(import({{"qweight", wrong_dtype.view()}, {"scales", stored["scales"].view()}}, meta_text, &none) ==
        LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(f.q.last_error(), Catch::Contains("'qweight'") && Catch::Contains("int8"));

  bt::StoredTensor short_scales = stored["scales"];
  short_scales.shape = {OUT - 1};
  CHECK(import({{"qweight", stored["qweight"].view()}, {"scales", short_scales.view()}}, meta_text, &none) ==
        LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(f.q.last_error(), Catch::Contains("'scales'") && Catch::Contains("shape"));

  bt::StoredTensor flat = stored["qweight"];
  flat.shape = {OUT * IN};
  CHECK(import({{"qweight", flat.view()}, {"scales", stored["scales"].view()}}, meta_text, &none) ==
        LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(f.q.last_error(), Catch::Contains("'qweight'") && Catch::Contains("2-D"));

  CHECK(import({{"qweight", stored["qweight"].view()}, {"scales", stored["scales"].view()}},
               R"({"format":"gptq","bits":4})", &none) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(f.q.last_error(), Catch::Contains("unknown format 'gptq'"));
  CHECK(none == nullptr);
}

TEST_CASE("int8 rejects half-precision weights and unknown keys", "[int8]") {
  Fixture f;
  f.w.dl()->dtype = DLDataType{kDLBfloat, 16, 1};
  loom_qweight *out = nullptr;
  CHECK(bt::quantize(f.q, &f.w.t, "m", DLDevice{kDLCPU, 0}, &out) == LOOM_ERR_UNSUPPORTED);
  CHECK_THAT(f.q.last_error(), Catch::Contains("bf16"));
  CHECK_THAT(bt::build_error("[quantizer]\nuse = \"int8\"\nbits = 4\n"), Catch::Contains("bits"));
}
