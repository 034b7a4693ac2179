// libloom-quant-int4: group-wise error bounds (asymmetric and symmetric), linear against the
// dequantized product, AWQ's search against round-to-nearest on activations with outlier
// channels, export/import round trips and the errors of corrupt imports and bad settings.
#include <catch2/catch.hpp>

#include <cmath>
#include <random>

#include <nlohmann/json.hpp>

#include "builtin_test_util.hpp"

namespace {

constexpr int64_t OUT = 12, IN = 64, GROUP = 16;

std::string manifest(const std::string &extra) {
  return "[quantizer]\nuse = \"int4\"\ngroup_size = " + std::to_string(GROUP) + "\n" + extra;
}

struct Fixture {
  std::unique_ptr<loom::Runtime> rt;
  loom::Instance *q = nullptr;
  const loom_quantizer_vtable *vt = nullptr;
  bt::Tensor<float> w{{OUT, IN}, bt::random_floats(OUT * IN, 3, -2.0f, 2.0f)};

  explicit Fixture(const std::string &extra = "") : rt(bt::runtime(manifest(extra))) {
    q = &rt->pipeline().at("quantizer");
    vt = q->vtable<loom_quantizer_vtable>();
    for (int64_t i = 0; i < GROUP; ++i) w.v[2 * IN + i] = 0.0f;     // an all-zero group
    for (int64_t i = 0; i < GROUP; ++i) w.v[3 * IN + i] = -0.75f;   // a constant group
    for (int64_t i = 0; i < GROUP; ++i) w.v[4 * IN + i] = 10.0f + 0.25f * static_cast<float>(i); // all positive
  }
  loom_status quantize(loom_qweight **out, DLTensor *calibration = nullptr) {
    return bt::quantize(*q, w.dl(), "model.layers.0.mlp.down_proj", DLDevice{kDLCPU, 0}, out, calibration);
  }
  std::vector<float> dequant(const loom_qweight *x) {
    bt::Tensor<float> out({OUT, IN});
    REQUIRE(vt->dequantize(q->handle(), x, out.dl()) == LOOM_OK);
    return out.v;
  }
};

// Calibration rows whose inputs 5 and 37 are 30 times larger than the others (the outlier
// channels activation-aware scaling exists for).
bt::Tensor<float> outlier_activations(int64_t n) {
  bt::Tensor<float> x({n, IN}, bt::random_floats(static_cast<size_t>(n * IN), 11));
  for (int64_t r = 0; r < n; ++r) {
    x.v[r * IN + 5] *= 30.0f;
    x.v[r * IN + 37] *= 30.0f;
  }
  return x;
}

// sum over rows and outputs of (x W^T - x W~^T)^2.
double output_error(const bt::Tensor<float> &x, const std::vector<float> &w, const std::vector<float> &wq) {
  const int64_t n = x.shape[0];
  double total = 0;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t o = 0; o < OUT; ++o) {
      double d = 0;
      for (int64_t i = 0; i < IN; ++i) d += x.v[r * IN + i] * (static_cast<double>(w[o * IN + i]) - wq[o * IN + i]);
      total += d * d;
    }
  return total;
}

// The output errors on x of a's and b's weights, each quantized with its own calibration.
std::pair<double, double> output_errors(Fixture &a, DLTensor *calibration_a, Fixture &b, DLTensor *calibration_b,
                                        const bt::Tensor<float> &x) {
  loom_qweight *qa = nullptr, *qb = nullptr;
  REQUIRE(a.quantize(&qa, calibration_a) == LOOM_OK);
  REQUIRE(b.quantize(&qb, calibration_b) == LOOM_OK);
  const std::pair<double, double> errors{output_error(x, a.w.v, a.dequant(qa)), output_error(x, b.w.v, b.dequant(qb))};
  a.vt->free_weight(a.q->handle(), qa);
  b.vt->free_weight(b.q->handle(), qb);
  return errors;
}

} // namespace

TEST_CASE("int4 round-to-nearest stays within a step of each group", "[int4]") {
  for (bool zero_point : {true, false}) {
    Fixture f(zero_point ? "" : "zero_point = false\n");
    loom_qweight *qw = nullptr;
    REQUIRE(f.quantize(&qw) == LOOM_OK);
    const auto dq = f.dequant(qw);
    for (int64_t o = 0; o < OUT; ++o)
      for (int64_t g = 0; g < IN / GROUP; ++g) {
        float lo = 0, hi = 0, amax = 0; // the range always holds 0
        for (int64_t i = g * GROUP; i < (g + 1) * GROUP; ++i) {
          const float v = f.w.v[o * IN + i];
          lo = std::min(lo, v);
          hi = std::max(hi, v);
          amax = std::max(amax, std::fabs(v));
        }
        // Asymmetric: at most one step (range / 15); symmetric: half a step (max|w| / 7).
        const float step = zero_point ? (hi - lo) / 15.0f : amax / 7.0f;
        const float bound = zero_point ? step : step * 0.5f;
        for (int64_t i = g * GROUP; i < (g + 1) * GROUP; ++i)
          REQUIRE(std::fabs(dq[o * IN + i] - f.w.v[o * IN + i]) <= bound * 1.0001f + 1e-6f);
      }
    for (int64_t i = 0; i < GROUP; ++i) {
      CHECK(dq[2 * IN + i] == 0.0f);
      CHECK(dq[3 * IN + i] == Approx(-0.75f).margin(1e-6));
    }
    f.vt->free_weight(f.q->handle(), qw);
  }
}

TEST_CASE("int4 linear equals the dequantized product, with and without AWQ scales", "[int4]") {
  for (const char *method : {"rtn", "awq"}) {
    Fixture f(std::string("method = \"") + method + "\"\n");
    auto calib = outlier_activations(32);
    loom_qweight *qw = nullptr;
    REQUIRE(f.quantize(&qw, calib.dl()) == LOOM_OK);
    const int64_t n = 3;
    bt::Tensor<float> x({n, IN}, bt::random_floats(n * IN, 5));
    bt::Tensor<float> bias({OUT}, bt::random_floats(OUT, 6));
    bt::Tensor<float> y({n, OUT});
    REQUIRE(f.vt->linear(f.q->handle(), qw, x.dl(), bias.dl(), y.dl()) == LOOM_OK);
    const auto dq = f.dequant(qw);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t o = 0; o < OUT; ++o) {
        double want = bias.v[o];
        for (int64_t i = 0; i < IN; ++i) want += static_cast<double>(x.v[r * IN + i]) * dq[o * IN + i];
        CHECK(y.v[r * OUT + o] == Approx(want).margin(1e-4));
      }
    bt::Tensor<float> bad_x({n, IN + 2});
    CHECK(f.vt->linear(f.q->handle(), qw, bad_x.dl(), nullptr, y.dl()) == LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(f.q->last_error(), Catch::Contains("x"));
    f.vt->free_weight(f.q->handle(), qw);
  }
}

TEST_CASE("int4 AWQ lowers the output error of round-to-nearest on outlier activations", "[int4]") {
  Fixture rtn, awq("method = \"awq\"\n");
  auto calib = outlier_activations(64);
  bt::Tensor<float> held_out({64, IN}); // other rows with the same outlier channels
  std::mt19937 g(99);
  std::normal_distribution<float> noise(0.0f, 1.0f);
  for (int64_t r = 0; r < 64; ++r)
    for (int64_t i = 0; i < IN; ++i) held_out.v[r * IN + i] = noise(g) * (i == 5 || i == 37 ? 30.0f : 1.0f);
  const auto [e_rtn, e_awq] = output_errors(rtn, nullptr, awq, calib.dl(), held_out);
  INFO("rtn " << e_rtn << " awq " << e_awq);
  CHECK(e_awq < 0.7 * e_rtn);

  loom_qweight *none = nullptr;
  CHECK(awq.quantize(&none) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(awq.q->last_error(), Catch::Contains("calibration") && Catch::Contains("down_proj"));
  bt::Tensor<float> narrow({4, IN / 2});
  CHECK(awq.quantize(&none, narrow.dl()) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(awq.q->last_error(), Catch::Contains("calibration"));
  CHECK(none == nullptr);
}

TEST_CASE("int4 refuses a group size that does not divide, and bad settings", "[int4]") {
  Fixture f;
  bt::Tensor<float> odd({OUT, IN + GROUP / 2}, bt::random_floats(OUT * (IN + GROUP / 2), 4));
  loom_qweight *out = nullptr;
  CHECK(bt::quantize(*f.q, odd.dl(), "model.layers.1.self_attn.q_proj", DLDevice{kDLCPU, 0}, &out) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(f.q->last_error(), Catch::Contains("q_proj") && Catch::Contains("group_size 16 does not divide") &&
                                    Catch::Contains("72"));
  CHECK(out == nullptr);
  CHECK_THAT(bt::build_error("[quantizer]\nuse = \"int4\"\ngroup_size = 7\n"), Catch::Contains("group_size"));
  CHECK_THAT(bt::build_error("[quantizer]\nuse = \"int4\"\nmethod = \"gptq\"\n"), Catch::Contains("method"));
  CHECK_THAT(bt::build_error("[quantizer]\nuse = \"int4\"\nbits = 3\n"), Catch::Contains("bits"));
}

TEST_CASE("int4 export and import round-trip; corrupt imports name what is wrong", "[int4]") {
  for (const char *method : {"rtn", "awq"}) {
    Fixture f(std::string("method = \"") + method + "\"\n");
    auto calib = outlier_activations(16);
    loom_qweight *qw = nullptr;
    REQUIRE(f.quantize(&qw, calib.dl()) == LOOM_OK);
    bt::StoredTensors stored;
    loom::HostBuffer meta;
    loom_tensor_sink sink{sizeof(loom_tensor_sink), &stored, &bt::store_tensor};
    REQUIRE(f.vt->export_weight(f.q->handle(), qw, &sink, meta.abi()) == LOOM_OK);
    const bool awq = std::string(method) == "awq";
    CHECK(stored.size() == (awq ? 4u : 3u));
    CHECK(stored["qweight"].shape == std::vector<int64_t>{OUT, IN / 2});
    CHECK(stored["scales"].shape == std::vector<int64_t>{OUT, IN / GROUP});
    CHECK(stored["zeros"].shape == std::vector<int64_t>{OUT, IN / GROUP});
    const auto m = nlohmann::json::parse(meta.view());
    CHECK(m == nlohmann::json{{"format", "loom-int4"}, {"bits", 4},         {"group_size", GROUP},
                              {"zero_point", true},  {"method", method}, {"act_scale", awq}});
    const std::string meta_text(meta.view());

    auto import = [&](bt::StoredTensors ts, const std::string &md, loom_qweight **out) {
      return bt::import_tensors(*f.q, bt::views_of(ts), md, out);
    };
    loom_qweight *back = nullptr;
    REQUIRE(import(stored, meta_text, &back) == LOOM_OK);
    CHECK(f.dequant(back) == f.dequant(qw));
    f.vt->free_weight(f.q->handle(), back);

    loom_qweight *none = nullptr;
    auto expect_error = [&](bt::StoredTensors ts, const std::string &md, const std::string &words) {
      CHECK(import(std::move(ts), md, &none) == LOOM_ERR_INVALID_ARGUMENT);
      CHECK_THAT(f.q->last_error(), Catch::Contains(words));
      CHECK(none == nullptr);
    };
    auto without = [&](const std::string &name) {
      auto c = stored;
      c.erase(name);
      return c;
    };
    expect_error(without("zeros"), meta_text, "missing tensor 'zeros'");
    auto bad_scales = stored;
    bad_scales["scales"].shape = {OUT, IN / GROUP - 1};
    expect_error(bad_scales, meta_text, "'scales' must be float32 of shape [12, 4]");
    auto bad_zero = stored;
    bad_zero["zeros"].bytes[5] = 16;
    expect_error(bad_zero, meta_text, "outside the code range");
    auto negative = stored;
    const float minus = -1.0f;
    std::memcpy(negative["scales"].bytes.data(), &minus, sizeof minus);
    expect_error(negative, meta_text, "non-positive");
    auto md = m;
    md["group_size"] = 24; // 64 inputs do not split into groups of 24
    expect_error(stored, md.dump(), "group_size 24 does not divide in_features 64");
    md["group_size"] = GROUP;
    md["bits"] = 8;
    expect_error(stored, md.dump(), "bits");
    expect_error(stored, "{not json", "not valid JSON");
    md["bits"] = 4;
    md["zero_point"] = "yes";
    expect_error(stored, md.dump(), "\"zero_point\" must be true or false");
    if (awq) {
      expect_error(without("act_scale"), meta_text, "tensor 'act_scale' is missing");
      auto rtn = m;
      rtn["method"] = "rtn";
      expect_error(stored, rtn.dump(), "\"method\" is not \"awq\"");
    } else {
      auto extra = stored;
      extra["act_scale"] = bt::StoredTensor{{IN}, DLDataType{kDLFloat, 32, 1}, std::vector<uint8_t>(IN * 4, 0)};
      expect_error(extra, meta_text, "\"act_scale\" is not true");
    }
    f.vt->free_weight(f.q->handle(), qw);
  }
}

TEST_CASE("int4 AWQ's clip search lowers the error of full-range groups", "[int4]") {
  // Gaussian rows: the extremes of a group stretch its steps for the values in between.
  Fixture clip("method = \"awq\"\nawq_grid = 1\n"), none("method = \"awq\"\nawq_grid = 1\nawq_clip = 0\n");
  std::mt19937 g(21);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto &v : clip.w.v) v = normal(g);
  none.w.v = clip.w.v;
  bt::Tensor<float> x({64, IN}, bt::random_floats(64 * IN, 8)); // no outlier channels
  const auto [with_clip, without] = output_errors(clip, x.dl(), none, x.dl(), x);
  INFO("clip " << with_clip << " none " << without);
  CHECK(with_clip < 0.97 * without);
}

TEST_CASE("int4 imports an AutoAWQ-GEMM weight as AutoAWQ packs it; bad layouts name what is wrong", "[int4]") {
  // 16 outputs x 64 inputs, groups of 16: codes (o + 3i) mod 16, zero points (o + g) mod 16,
  // scales (1 + o + g) / 64 (exact in float16). AutoAWQ packs output 8c + (0, 2, 4, 6, 1, 3, 5, 7)[n]
  // into nibble n of word (i, c), its zero points likewise, scales as float16 [groups, out].
  constexpr int64_t O = 16, I = 64, G = 16, NG = I / G;
  Fixture f;
  const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  auto code = [](int64_t o, int64_t i) { return static_cast<uint32_t>((o + 3 * i) % 16); };
  auto zero = [](int64_t o, int64_t g) { return static_cast<uint32_t>((o + g) % 16); };
  auto scale = [](int64_t o, int64_t g) { return static_cast<float>(1 + o + g) / 64.0f; };
  std::vector<uint32_t> qweight(I * O / 8, 0), qzeros(NG * O / 8, 0);
  std::vector<uint16_t> scales(NG * O);
  for (int64_t c = 0; c < O / 8; ++c)
    for (int n = 0; n < 8; ++n) {
      for (int64_t i = 0; i < I; ++i) qweight[static_cast<size_t>(i * (O / 8) + c)] |= code(8 * c + order[n], i) << (4 * n);
      for (int64_t g = 0; g < NG; ++g) qzeros[static_cast<size_t>(g * (O / 8) + c)] |= zero(8 * c + order[n], g) << (4 * n);
    }
  for (int64_t g = 0; g < NG; ++g)
    for (int64_t o = 0; o < O; ++o) {
      // (1 + o + g) / 64 as a float16: exponent and mantissa of a small integer over 2^6
      const int v = static_cast<int>(1 + o + g);
      int e = 0;
      while ((v >> (e + 1)) != 0) ++e;
      scales[static_cast<size_t>(g * O + o)] =
          static_cast<uint16_t>(((e - 6 + 15) << 10) | (((v << 10) >> e) & 1023));
    }
  auto bytes = [](const auto &v) {
    const auto *p = reinterpret_cast<const uint8_t *>(v.data());
    return std::vector<uint8_t>(p, p + v.size() * sizeof(v[0]));
  };
  bt::StoredTensors stored;
  stored["qweight"] = bt::StoredTensor{{I, O / 8}, DLDataType{kDLInt, 32, 1}, bytes(qweight)};
  stored["qzeros"] = bt::StoredTensor{{NG, O / 8}, DLDataType{kDLInt, 32, 1}, bytes(qzeros)};
  stored["scales"] = bt::StoredTensor{{NG, O}, DLDataType{kDLFloat, 16, 1}, bytes(scales)};
  const nlohmann::json meta = {{"format", "autoawq-gemm"}, {"bits", 4}, {"group_size", G}, {"out", O}, {"in", I}};
  auto import = [&](bt::StoredTensors ts, const std::string &md, loom_qweight **out) {
    return bt::import_tensors(*f.q, bt::views_of(ts), md, out);
  };
  loom_qweight *w = nullptr;
  REQUIRE(import(stored, meta.dump(), &w) == LOOM_OK);
  bt::Tensor<float> back({O, I});
  REQUIRE(f.vt->dequantize(f.q->handle(), w, back.dl()) == LOOM_OK);
  int wrong = 0;
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i) {
      const float want = (static_cast<float>(code(o, i)) - static_cast<float>(zero(o, i / G))) * scale(o, i / G);
      wrong += back.v[static_cast<size_t>(o * I + i)] != want;
    }
  CHECK(wrong == 0);
  f.vt->free_weight(f.q->handle(), w);

  loom_qweight *none = nullptr;
  auto expect_error = [&](bt::StoredTensors ts, const nlohmann::json &md, const std::string &words) {
    CHECK(import(std::move(ts), md.dump(), &none) == LOOM_ERR_INVALID_ARGUMENT);
    CHECK_THAT(f.q->last_error(), Catch::Contains(words));
    CHECK(none == nullptr);
  };
  auto md = meta;
  md["out"] = 12;
  expect_error(stored, md, "multiples of 8");
  md = meta;
  md["group_size"] = 24;
  expect_error(stored, md, "group_size 24 does not divide in_features 64");
  md = meta;
  md.erase("in");
  expect_error(stored, md, "no integer \"in\"");
  auto transposed = stored;
  std::swap(transposed["qweight"].shape[0], transposed["qweight"].shape[1]);
  expect_error(transposed, meta, "'qweight' must be int32 of shape [64, 2]");
  auto extra = stored;
  extra["g_idx"] = bt::StoredTensor{{I}, DLDataType{kDLInt, 32, 1}, std::vector<uint8_t>(I * 4, 0)};
  expect_error(extra, meta, "unexpected tensor 'g_idx'");
  auto zero_scale = stored;
  std::fill(zero_scale["scales"].bytes.begin(), zero_scale["scales"].bytes.begin() + 2, 0);
  expect_error(zero_scale, meta, "non-positive");
  md = meta;
  md["format"] = "gptq";
  expect_error(stored, md, "\"zero_offset\"");
}
