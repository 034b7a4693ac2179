// The skinny decode GEMM (loom/kernels/skinny_gemm.hpp) against a float64 host product of the
// same bfloat16 inputs: every epilogue, 1 to 64 tokens (full and partial tiles of 8), shapes
// that split K across a cluster of blocks and shapes that do not, K of one stage and of many,
// the same bits on a second run, and the shapes it must refuse. Part of
// kernels_cuda_test (its main skips without a CUDA device).
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda_test_util.hpp"
#include "loom/kernels/skinny_gemm.hpp"

namespace lk = loom::kernels;

namespace {

using namespace loom_kernel_test;

struct Shape {
  int tokens, in, out;
};

double silu(double x) { return x / (1.0 + std::exp(-x)); }

// Runs one launch of `e` and checks it against the host product; returns the raw output.
std::vector<float> check_case(const Shape& s, lk::SkinnyEpilogue e, std::mt19937& rng, int splits = 0) {
  INFO("T " << s.tokens << " in " << s.in << " out " << s.out << " epilogue " << static_cast<int>(e) << " splits " << splits);
  std::vector<float> w = normal(static_cast<size_t>(s.out) * s.in, 0.05f, rng);
  std::vector<float> x = normal(static_cast<size_t>(s.tokens) * s.in, 1.0f, rng);
  std::vector<uint16_t> wb(w.size()), xb(x.size());
  for (size_t i = 0; i < w.size(); ++i) wb[i] = bf16_bits(w[i]), w[i] = from_bf16(wb[i]);
  for (size_t i = 0; i < x.size(); ++i) xb[i] = bf16_bits(x[i]), x[i] = from_bf16(xb[i]);
  // y and the scale of each dot product (sum of |x w|) for the tolerance.
  std::vector<double> y(static_cast<size_t>(s.tokens) * s.out), scale(y.size());
  for (int t = 0; t < s.tokens; ++t)
    for (int r = 0; r < s.out; ++r) {
      double acc = 0, mag = 0;
      for (int k = 0; k < s.in; ++k) {
        const double p = static_cast<double>(x[static_cast<size_t>(t) * s.in + k]) * w[static_cast<size_t>(r) * s.in + k];
        acc += p;
        mag += std::fabs(p);
      }
      y[static_cast<size_t>(t) * s.out + r] = acc;
      scale[static_cast<size_t>(t) * s.out + r] = mag;
    }

  const bool swiglu = e == lk::SkinnyEpilogue::swiglu;
  const int cols = swiglu ? s.out / 2 : s.out;
  const size_t n_out = static_cast<size_t>(s.tokens) * cols;
  const bool f32 = e == lk::SkinnyEpilogue::store_f32 || e == lk::SkinnyEpilogue::add_f32;
  std::vector<float> before = normal(n_out, 1.0f, rng); // add_f32 adds into these
  Device<uint16_t> dw(wb), dx(xb);
  Device<float> out_f32(before);
  Device<uint16_t> out_bf16(std::vector<uint16_t>(n_out, 0));
  lk::SkinnyGemmArgs a;
  a.tokens = s.tokens;
  a.in = s.in;
  a.out = s.out;
  a.weight = dw.get();
  a.act = dx.get();
  a.out_ptr = f32 ? static_cast<void*>(out_f32.get()) : static_cast<void*>(out_bf16.get());
  a.splits = splits;
  CUDA_REQUIRE(lk::skinny_gemm_bf16_cuda(a, e, false, nullptr));
  CUDA_REQUIRE(cudaDeviceSynchronize());
  std::vector<float> got(n_out);
  if (f32) {
    got = out_f32.read();
  } else {
    const std::vector<uint16_t> bits = out_bf16.read();
    for (size_t i = 0; i < n_out; ++i) got[i] = from_bf16(bits[i]);
  }

  int bad = 0;
  for (int t = 0; t < s.tokens; ++t)
    for (int j = 0; j < cols; ++j) {
      const size_t o = static_cast<size_t>(t) * cols + j, i = static_cast<size_t>(t) * s.out + j;
      double want, tol;
      if (swiglu) {
        const size_t iu = i + static_cast<size_t>(s.out / 2);
        const double g = round_bf16(static_cast<float>(y[i])), u = round_bf16(static_cast<float>(y[iu]));
        want = silu(g) * u;
        // g and u may round the other way (float32 sums): a bfloat16 step of each.
        tol = (std::fabs(silu(g)) + 1.0) * (std::fabs(u) + 1e-3) * 1.6e-2 + 1e-4 * (scale[i] + scale[iu]);
      } else {
        want = y[i] + (e == lk::SkinnyEpilogue::add_f32 ? before[o] : 0.0);
        tol = 1e-5 * scale[i] + 1e-6 + (f32 ? 0.0 : std::fabs(want) * 8e-3);
      }
      if (std::fabs(got[o] - want) > tol && ++bad <= 5)
        UNSCOPED_INFO("t " << t << " col " << j << ": got " << got[o] << ", want " << want << " (tolerance " << tol << ")");
    }
  CHECK(bad == 0);

  // The same launch again gives the same bits (add_f32: from the same starting values).
  if (e == lk::SkinnyEpilogue::add_f32)
    CUDA_REQUIRE(cudaMemcpy(out_f32.get(), before.data(), n_out * 4, cudaMemcpyHostToDevice));
  CUDA_REQUIRE(lk::skinny_gemm_bf16_cuda(a, e, true, nullptr));
  CUDA_REQUIRE(cudaDeviceSynchronize());
  if (f32) {
    CHECK(out_f32.read() == got);
  } else {
    const std::vector<uint16_t> bits = out_bf16.read();
    std::vector<float> again(n_out);
    for (size_t i = 0; i < n_out; ++i) again[i] = from_bf16(bits[i]);
    CHECK(again == got);
  }
  return got;
}

}  // namespace

TEST_CASE("the skinny GEMM matches a float64 product for every epilogue", "[kernels][cuda][skinny]") {
  if (!lk::skinny_gemm_supported()) { // too little shared memory a block: refused, checked below
    WARN("the skinny GEMM is not supported on this GPU; its products are not checked");
    return;
  }
  std::mt19937 rng(7);
  // (in, out): one K step and one tile; K split over a cluster (few tiles, sm_90+); a long K
  // split; enough tiles to fill an H100's 132 SMs without a split.
  const Shape shapes[] = {{0, 64, 256}, {0, 2048, 512}, {0, 8192, 256}, {0, 256, 17152}};
  for (const Shape& base : shapes)
    for (int tokens : {1, 5, 8, 17, 40, 64}) {
      const Shape s{tokens, base.in, base.out};
      for (lk::SkinnyEpilogue e : {lk::SkinnyEpilogue::store_bf16, lk::SkinnyEpilogue::store_f32,
                                   lk::SkinnyEpilogue::add_f32, lk::SkinnyEpilogue::swiglu})
        check_case(s, e, rng);
    }
}

TEST_CASE("the skinny GEMM matches at every K split a benchmark may ask for", "[kernels][cuda][skinny]") {
  if (!lk::skinny_gemm_supported()) {
    WARN("the skinny GEMM is not supported on this GPU; its products are not checked");
    return;
  }
  std::mt19937 rng(11);
  // Splits that do not divide the K steps (3, 5, 6, 7) or the tile's outputs among the blocks,
  // and more than the portable cluster (capped); token counts that leave rows of a tile unused.
  for (int splits = 1; splits <= 9; ++splits)
    for (int tokens : {7, 64}) {
      const Shape s{tokens, 1536, 512};
      check_case(s, lk::SkinnyEpilogue::add_f32, rng, splits);
      check_case(s, lk::SkinnyEpilogue::swiglu, rng, splits);
    }
  lk::SkinnyGemmArgs negative;
  negative.tokens = 1;
  negative.in = 64;
  negative.out = 128;
  negative.weight = negative.act = negative.out_ptr = reinterpret_cast<void*>(uintptr_t{256});
  negative.splits = -1;
  CHECK(lk::skinny_gemm_bf16_cuda(negative, lk::SkinnyEpilogue::store_f32, false, nullptr) ==
        static_cast<int>(cudaErrorInvalidValue));
}

TEST_CASE("the skinny GEMM refuses shapes outside its contract", "[kernels][cuda][skinny]") {
  CHECK(lk::skinny_gemm_takes(64, 128, lk::SkinnyEpilogue::store_bf16));
  CHECK_FALSE(lk::skinny_gemm_takes(96, 128, lk::SkinnyEpilogue::store_bf16));
  CHECK_FALSE(lk::skinny_gemm_takes(64, 192, lk::SkinnyEpilogue::add_f32));
  CHECK_FALSE(lk::skinny_gemm_takes(64, 128, lk::SkinnyEpilogue::swiglu));
  CHECK(lk::skinny_gemm_takes(2048, 16384, lk::SkinnyEpilogue::swiglu));
  std::vector<uint16_t> host(4096 * 2 + 8, 0);
  Device<uint16_t> buf(host);
  lk::SkinnyGemmArgs a;
  a.tokens = 4;
  a.in = 64;
  a.out = 128;
  a.weight = buf.get();
  a.act = buf.get();
  a.out_ptr = buf.get();
  const int invalid = static_cast<int>(cudaErrorInvalidValue);
  if (!lk::skinny_gemm_supported()) { // every call refused, no error left behind
    CHECK(lk::skinny_gemm_bf16_cuda(a, lk::SkinnyEpilogue::store_bf16, false, nullptr) == invalid);
    CHECK(cudaGetLastError() == cudaSuccess);
    return;
  }
  CHECK(lk::skinny_gemm_bf16_cuda(a, lk::SkinnyEpilogue::store_bf16, false, nullptr) == 0);
  CUDA_REQUIRE(cudaDeviceSynchronize());
  auto with = [&](auto change, lk::SkinnyEpilogue e = lk::SkinnyEpilogue::store_bf16) {
    lk::SkinnyGemmArgs b = a;
    change(b);
    return lk::skinny_gemm_bf16_cuda(b, e, false, nullptr);
  };
  CHECK(with([](lk::SkinnyGemmArgs& b) { b.tokens = 0; }) == invalid);
  CHECK(with([](lk::SkinnyGemmArgs& b) { b.tokens = lk::skinny_gemm_max_tokens() + 1; }) == invalid);
  CHECK(with([](lk::SkinnyGemmArgs& b) { b.in = 96; }) == invalid);
  CHECK(with([](lk::SkinnyGemmArgs& b) { b.out = 192; }) == invalid);
  CHECK(with([](lk::SkinnyGemmArgs& b) { b.out = 128; }, lk::SkinnyEpilogue::swiglu) == invalid); // 256 needed
  CHECK(with([&](lk::SkinnyGemmArgs& b) { b.weight = buf.get() + 1; }) == invalid);              // 2-byte aligned
  CHECK(with([](lk::SkinnyGemmArgs& b) { b.act = nullptr; }) == invalid);
  CHECK(with([](lk::SkinnyGemmArgs& b) { b.out_ptr = nullptr; }) == invalid);
  CHECK(with([&](lk::SkinnyGemmArgs& b) { b.out_ptr = buf.get() + 1; }) == invalid); // 2-byte aligned
  CHECK(cudaGetLastError() == cudaSuccess); // refusals leave no CUDA error behind
}
