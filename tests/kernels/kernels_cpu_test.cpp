// CPU row kernels against hand-computed values and edge cases.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "loom/kernels/rows.hpp"

using loom::kernels::argmax_rows_cpu;
using loom::kernels::softmax_rows_cpu;

namespace {
constexpr float kInf = std::numeric_limits<float>::infinity();
}

TEST_CASE("softmax of hand-computed rows", "[kernels][cpu]") {
  // Row 0: [0, ln 2, ln 3, 0] -> exp = [1, 2, 3, 1] / 7.
  // Row 1: equal logits -> uniform.
  std::vector<float> x = {0.0f, std::log(2.0f), std::log(3.0f), 0.0f,  //
                          5.0f, 5.0f, 5.0f, 5.0f};
  REQUIRE(softmax_rows_cpu(x.data(), 2, 4));
  CHECK(x[0] == Approx(1.0 / 7).epsilon(1e-6));
  CHECK(x[1] == Approx(2.0 / 7).epsilon(1e-6));
  CHECK(x[2] == Approx(3.0 / 7).epsilon(1e-6));
  CHECK(x[3] == Approx(1.0 / 7).epsilon(1e-6));
  for (int c = 4; c < 8; ++c) CHECK(x[c] == Approx(0.25).epsilon(1e-6));
}

TEST_CASE("softmax is stable for large logits", "[kernels][cpu]") {
  // Without max subtraction exp(1000) overflows to inf and the row becomes NaN.
  // Expected: [1, e, 0] / (1 + e).
  std::vector<float> x = {1000.0f, 1001.0f, -1000.0f};
  REQUIRE(softmax_rows_cpu(x.data(), 1, 3));
  const double e = std::exp(1.0);
  CHECK(x[0] == Approx(1.0 / (1.0 + e)).epsilon(1e-6));
  CHECK(x[1] == Approx(e / (1.0 + e)).epsilon(1e-6));
  CHECK(x[2] == 0.0f);  // exp(-2000) underflows to exactly 0
  for (float v : x) CHECK(std::isfinite(v));
}

TEST_CASE("softmax maps -inf to exactly 0 and renormalises the rest", "[kernels][cpu]") {
  std::vector<float> x = {-kInf, 1.0f, -kInf, 1.0f};
  REQUIRE(softmax_rows_cpu(x.data(), 1, 4));
  CHECK(x[0] == 0.0f);
  CHECK(x[2] == 0.0f);
  CHECK(x[1] == Approx(0.5).epsilon(1e-6));
  CHECK(x[3] == Approx(0.5).epsilon(1e-6));
}

TEST_CASE("softmax reports an all -inf row and still normalises the others", "[kernels][cpu]") {
  std::vector<float> x = {0.0f, 0.0f, -kInf, -kInf, 2.0f, -kInf};
  CHECK_FALSE(softmax_rows_cpu(x.data(), 3, 2));
  CHECK(x[0] == Approx(0.5));
  CHECK(x[1] == Approx(0.5));
  CHECK(x[2] == 0.0f);  // the masked row is zeros, not NaN
  CHECK(x[3] == 0.0f);
  CHECK(x[4] == 1.0f);
  CHECK(x[5] == 0.0f);
}

TEST_CASE("softmax of a single column and of no rows", "[kernels][cpu]") {
  float one = -3.5f;
  REQUIRE(softmax_rows_cpu(&one, 1, 1));
  CHECK(one == 1.0f);
  CHECK(softmax_rows_cpu(nullptr, 0, 10));
  float unused = 1.0f;
  CHECK_FALSE(softmax_rows_cpu(&unused, 1, 0));  // a row with no entries has no distribution
}

TEST_CASE("softmax rows sum to one over a vocabulary-sized row", "[kernels][cpu]") {
  const int64_t cols = 128256;
  std::vector<float> x(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) x[static_cast<size_t>(c)] = static_cast<float>((c * 7919) % 1000) / 50.0f;
  x[5] = -kInf;
  REQUIRE(softmax_rows_cpu(x.data(), 1, cols));
  double sum = 0.0;
  for (float v : x) sum += v;
  CHECK(sum == Approx(1.0).epsilon(1e-5));
  CHECK(x[5] == 0.0f);
}

TEST_CASE("argmax picks the first index of the maximum", "[kernels][cpu]") {
  std::vector<float> x = {1.0f, 3.0f, 3.0f, 2.0f,     // tie: first wins -> 1
                          -kInf, -kInf, -kInf, -kInf,  // all masked -> 0
                          -5.0f, -kInf, -1.0f, -2.0f,  // negatives -> 2
                          0.0f, 0.0f, 0.0f, 7.0f};     // last -> 3
  std::vector<int32_t> out(4, 99);
  argmax_rows_cpu(x.data(), 4, 4, out.data());
  CHECK(out == std::vector<int32_t>{1, 0, 2, 3});
}

TEST_CASE("argmax skips NaN and handles +inf", "[kernels][cpu]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> x = {nan, 1.0f, 2.0f, nan, kInf, 1.0f, kInf};
  std::vector<int32_t> out(1, 99);
  argmax_rows_cpu(x.data(), 1, 4, out.data());
  CHECK(out[0] == 2);
  argmax_rows_cpu(x.data() + 4, 1, 3, out.data());
  CHECK(out[0] == 0);
}

TEST_CASE("argmax of empty rows is -1", "[kernels][cpu]") {
  std::vector<int32_t> out(2, 99);
  argmax_rows_cpu(nullptr, 2, 0, out.data());
  CHECK(out == std::vector<int32_t>{-1, -1});
}

#if !(defined(LOOM_HAVE_CUDA) && LOOM_HAVE_CUDA)
TEST_CASE("cuda_available is false without CUDA", "[kernels][cpu]") {
  CHECK_FALSE(loom::kernels::cuda_available());
}
#endif
