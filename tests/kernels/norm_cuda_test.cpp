// add_bias_norm_cuda (loom/kernels/model.hpp) against a float64 host computation: RMSNorm and
// LayerNorm, rows held in registers (hidden a multiple of 256 up to 4096) and rows of any other
// size, with and without a pending bias and split-K parts (both added into x, which the kernel
// writes back) and a row index, float32 and bfloat16 outputs, launched plainly and as a
// programmatic dependent launch after a kernel that writes the rows it reads. Part of kernels_cuda_test (its main skips without a CUDA
// device).
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda_test_util.hpp"
#include "loom/kernels/model.hpp"

namespace lk = loom::kernels;

namespace {

using namespace loom_kernel_test;

void check_norm(int hidden, bool layer_norm, bool bias, bool indexed, int n_parts, lk::Dtype dtype, bool programmatic,
                std::mt19937& rng) {
  INFO("hidden " << hidden << (layer_norm ? " layer_norm" : " rms_norm") << (bias ? " bias" : "")
                 << (indexed ? " indexed" : "") << ", " << n_parts << " parts" << (dtype == lk::Dtype::bf16 ? " bf16" : " f32")
                 << (programmatic ? ", programmatic launch" : ""));
  const int stored = 7, rows = indexed ? 3 : stored; // indexed: rows 5, 0, 3 of the 7
  const std::vector<int32_t> index = {5, 0, 3};
  std::vector<float> x = normal(static_cast<size_t>(stored) * hidden, 2.0f, rng);
  for (size_t i = 0; i < x.size(); ++i) x[i] += 0.5f; // a mean for LayerNorm to remove
  const std::vector<float> w = normal(static_cast<size_t>(hidden), 1.0f, rng), b = normal(static_cast<size_t>(hidden), 1.0f, rng),
                           pending = normal(static_cast<size_t>(hidden), 1.0f, rng);
  // Parts 32 floats further apart than a part's rows, so a kernel that ignores the stride fails.
  const int64_t part_stride = int64_t{stored} * hidden + 32;
  const std::vector<float> parts = normal(static_cast<size_t>(n_parts) * static_cast<size_t>(part_stride), 1.0f, rng);
  const float eps = 1e-5f;
  Device<float> dx(x), dw(w), db(b), dp(pending), dparts(n_parts > 0 ? parts : std::vector<float>(1, 0.0f));
  Device<int32_t> di(index);
  Device<float> out_f32(std::vector<float>(static_cast<size_t>(rows) * hidden, 0.0f));
  Device<uint16_t> out_bf16(std::vector<uint16_t>(static_cast<size_t>(rows) * hidden, 0));
  void* out = dtype == lk::Dtype::bf16 ? static_cast<void*>(out_bf16.get()) : static_cast<void*>(out_f32.get());
  cudaStream_t stream = nullptr;  // (a stream of its own for the programmatic launch)
  if (programmatic) CUDA_REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA_REQUIRE(lk::add_bias_norm_cuda(dx.get(), indexed ? di.get() : nullptr, rows, hidden, bias ? dp.get() : nullptr,
                                      dw.get(), layer_norm ? db.get() : nullptr, eps, out, dtype, stream, false,
                                      lk::SplitParts{dparts.get(), n_parts, part_stride}));
  // Programmatic: the same norm again, launched while that one may still run (it lets the next
  // kernel start at once), over the x it writes back: it must wait for those writes.
  if (programmatic)
    CUDA_REQUIRE(lk::add_bias_norm_cuda(dx.get(), indexed ? di.get() : nullptr, rows, hidden, nullptr, dw.get(),
                                        layer_norm ? db.get() : nullptr, eps, out, dtype, stream, true));
  CUDA_REQUIRE(cudaDeviceSynchronize());
  if (stream) CUDA_REQUIRE(cudaStreamDestroy(stream));
  std::vector<float> got(static_cast<size_t>(rows) * hidden);
  if (dtype == lk::Dtype::bf16) {
    const std::vector<uint16_t> bits = out_bf16.read();
    for (size_t i = 0; i < got.size(); ++i) got[i] = from_bf16(bits[i]);
  } else {
    got = out_f32.read();
  }
  const std::vector<float> x_after = dx.read();
  int bad = 0;
  for (int r = 0; r < rows; ++r) {
    const int src = indexed ? index[static_cast<size_t>(r)] : r;
    std::vector<double> v(static_cast<size_t>(hidden));
    double mean = 0, sq = 0;
    for (int i = 0; i < hidden; ++i) {
      const size_t at = static_cast<size_t>(src) * hidden + i;
      double e = x[at];
      for (int p = 0; p < n_parts; ++p) e += parts[static_cast<size_t>(p * part_stride) + at];
      v[static_cast<size_t>(i)] = e + (bias ? pending[static_cast<size_t>(i)] : 0.0f);
      mean += v[static_cast<size_t>(i)];
      sq += v[static_cast<size_t>(i)] * v[static_cast<size_t>(i)];
    }
    mean /= hidden;
    double var = 0;
    for (double e : v) var += (e - mean) * (e - mean);
    for (int i = 0; i < hidden; ++i) {
      const double e = v[static_cast<size_t>(i)];
      // The parts and the pending bias land in x.
      if (std::fabs(x_after[static_cast<size_t>(src) * hidden + i] - e) > 1e-6 * (1.0 + std::fabs(e)) && ++bad <= 5)
        UNSCOPED_INFO("x row " << src << " [" << i << "]: " << x_after[static_cast<size_t>(src) * hidden + i] << " != " << e);
      const double want = layer_norm ? (e - mean) / std::sqrt(var / hidden + eps) * w[static_cast<size_t>(i)] + b[static_cast<size_t>(i)]
                                     : w[static_cast<size_t>(i)] * (e / std::sqrt(sq / hidden + eps));
      const double tol = 1e-4 * (1.0 + std::fabs(want)) + (dtype == lk::Dtype::bf16 ? std::fabs(want) * 4e-3 : 0.0);
      const float g = got[static_cast<size_t>(r) * hidden + i];
      if (!(std::fabs(g - want) <= tol) && ++bad <= 5) UNSCOPED_INFO("row " << r << " [" << i << "]: " << g << ", want " << want);
    }
  }
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE("add_bias_norm matches a float64 norm for rows in registers and rows of any size", "[kernels][cuda][norm]") {
  std::mt19937 rng(11);
  for (int hidden : {256, 2048, 4096, 64, 3000, 4352})
    for (bool layer_norm : {false, true})
      for (bool bias : {false, true})
        for (bool indexed : {false, true})
          for (int n_parts : {0, 3})
            for (lk::Dtype dtype : {lk::Dtype::f32, lk::Dtype::bf16})
              check_norm(hidden, layer_norm, bias, indexed, n_parts, dtype, false, rng);
  // As the backend launches it on sm_90: a programmatic dependent launch after the kernel that
  // writes its rows (here the same norm adding a bias and parts into x).
  for (int hidden : {2048, 3000})
    for (int n_parts : {0, 3}) check_norm(hidden, false, true, false, n_parts, lk::Dtype::bf16, true, rng);
}
