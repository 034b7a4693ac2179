// CUDA row kernels against the CPU ones on random data, including vocabulary-sized rows
// (128256 columns) and -inf masks. Exits 77 (CTest: skipped) when there is no CUDA device.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "cuda_test_util.hpp"
#include "loom/kernels/rows.hpp"

namespace lk = loom::kernels;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// A device buffer of T that frees itself.
template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  explicit DeviceBuffer(size_t n) {
    if (cudaMalloc(reinterpret_cast<void**>(&ptr), n * sizeof(T)) != cudaSuccess) ptr = nullptr;
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// [rows, cols] normal(0, scale) logits; mask_fraction of the entries set to -inf; the rows listed
// in all_masked entirely -inf.
std::vector<float> random_logits(int64_t rows, int64_t cols, float scale, double mask_fraction,
                                 const std::vector<int64_t>& all_masked, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::bernoulli_distribution masked(mask_fraction);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (float& v : x) v = masked(rng) ? -kInf : normal(rng);
  for (int64_t r : all_masked)
    for (int64_t c = 0; c < cols; ++c) x[static_cast<size_t>(r * cols + c)] = -kInf;
  return x;
}

struct Case {
  int64_t rows;
  int64_t cols;
  float scale;
  double mask_fraction;
  std::vector<int64_t> all_masked;
};

void compare(const Case& k, uint32_t seed, cudaStream_t stream) {
  INFO("rows=" << k.rows << " cols=" << k.cols << " scale=" << k.scale << " mask=" << k.mask_fraction);
  const std::vector<float> x = random_logits(k.rows, k.cols, k.scale, k.mask_fraction, k.all_masked, seed);
  const size_t n = x.size();

  // argmax first: it reads x unchanged.
  std::vector<int32_t> want_idx(static_cast<size_t>(k.rows));
  lk::argmax_rows_cpu(x.data(), k.rows, k.cols, want_idx.data());
  DeviceBuffer<float> dx(n);
  DeviceBuffer<int32_t> didx(static_cast<size_t>(k.rows));
  DeviceBuffer<int32_t> dmasked(1);
  REQUIRE(dx.ptr != nullptr);
  REQUIRE(didx.ptr != nullptr);
  REQUIRE(dmasked.ptr != nullptr);
  CUDA_REQUIRE(cudaMemcpyAsync(dx.ptr, x.data(), n * sizeof(float), cudaMemcpyHostToDevice, stream));
  CUDA_REQUIRE(lk::argmax_rows_cuda(dx.ptr, k.rows, k.cols, didx.ptr, stream));
  std::vector<int32_t> got_idx(static_cast<size_t>(k.rows), -7);
  CUDA_REQUIRE(cudaMemcpyAsync(got_idx.data(), didx.ptr, got_idx.size() * sizeof(int32_t),
                               cudaMemcpyDeviceToHost, stream));
  CUDA_REQUIRE(cudaStreamSynchronize(stream));
  CHECK(got_idx == want_idx);

  // softmax.
  std::vector<float> want = x;
  const bool cpu_ok = lk::softmax_rows_cpu(want.data(), k.rows, k.cols);
  CHECK(cpu_ok == k.all_masked.empty());
  CUDA_REQUIRE(cudaMemsetAsync(dmasked.ptr, 0, sizeof(int32_t), stream));
  CUDA_REQUIRE(lk::softmax_rows_cuda(dx.ptr, k.rows, k.cols, stream, dmasked.ptr));
  std::vector<float> got(n, -1.0f);
  int32_t masked_rows = -1;
  CUDA_REQUIRE(cudaMemcpyAsync(got.data(), dx.ptr, n * sizeof(float), cudaMemcpyDeviceToHost, stream));
  CUDA_REQUIRE(cudaMemcpyAsync(&masked_rows, dmasked.ptr, sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  CUDA_REQUIRE(cudaStreamSynchronize(stream));
  CHECK(masked_rows == static_cast<int32_t>(k.all_masked.size()));

  size_t mismatches = 0;
  double worst = 0.0;
  for (size_t i = 0; i < n; ++i) {
    if (x[i] == -kInf && got[i] != 0.0f) ++mismatches;  // masked entries are exactly 0
    const double diff = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    const double tol = 1e-6 + 1e-4 * std::fabs(static_cast<double>(want[i]));
    if (!(diff <= tol)) ++mismatches;  // also catches NaN
    if (diff > worst) worst = diff;
  }
  INFO("worst abs diff " << worst);
  CHECK(mismatches == 0);
  for (int64_t r = 0; r < k.rows; ++r) {
    double sum = 0.0;
    for (int64_t c = 0; c < k.cols; ++c) sum += got[static_cast<size_t>(r * k.cols + c)];
    const bool row_masked = std::find(k.all_masked.begin(), k.all_masked.end(), r) != k.all_masked.end();
    CHECK(sum == Approx(row_masked ? 0.0 : 1.0).margin(1e-4));
  }
}

}  // namespace

TEST_CASE("CUDA row kernels match the CPU on random data", "[kernels][cuda]") {
  cudaStream_t stream = nullptr;
  CUDA_REQUIRE(cudaStreamCreate(&stream));
  const std::vector<Case> cases = {
      {1, 1, 1.0f, 0.0, {}},
      {3, 31, 1.0f, 0.0, {}},          // fewer columns than a warp
      {5, 513, 3.0f, 0.1, {}},         // just over one block's stride
      {7, 1000, 10.0f, 0.5, {2, 6}},   // heavy masks and whole masked rows
      {4, 128256, 5.0f, 0.0, {}},      // Llama 3 vocabulary
      {6, 128256, 8.0f, 0.3, {1}},     // vocabulary with masks and a masked row
      {2, 262144, 2.0f, 0.9, {}},      // 256k columns, mostly masked
      {300, 4096, 30.0f, 0.05, {0, 299}},  // many rows, large logits
      {1, 32003, 4.0f, 0.2, {}},       // rows split across blocks, a column count not a multiple of 4
      {16, 50001, 3.0f, 0.0, {3}},     // the most rows that are split, one of them masked
      {17, 16384, 3.0f, 0.0, {}},      // one row too many for the split
  };
  uint32_t seed = 1234;
  for (const Case& k : cases) compare(k, seed++, stream);
  CUDA_REQUIRE(cudaStreamDestroy(stream));
}

TEST_CASE("CUDA argmax takes the first index of a tie and ignores -inf", "[kernels][cuda]") {
  // The tie sits at indices strided by the block size so that different threads hold them.
  const int64_t cols = 128256;
  std::vector<float> x(static_cast<size_t>(2 * cols), -kInf);
  x[777] = 4.0f;
  x[777 + 512] = 4.0f;
  x[100000] = 4.0f;
  x[static_cast<size_t>(cols) + 5] = -1e30f;  // row 1: one finite entry among -inf
  DeviceBuffer<float> dx(x.size());
  DeviceBuffer<int32_t> didx(2);
  REQUIRE(dx.ptr != nullptr);
  REQUIRE(didx.ptr != nullptr);
  CUDA_REQUIRE(cudaMemcpy(dx.ptr, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_REQUIRE(lk::argmax_rows_cuda(dx.ptr, 2, cols, didx.ptr, nullptr));
  int32_t got[2] = {-7, -7};
  CUDA_REQUIRE(cudaMemcpy(got, didx.ptr, sizeof(got), cudaMemcpyDeviceToHost));
  CHECK(got[0] == 777);
  CHECK(got[1] == 5);
  // A tie across two blocks of a split row: the lower index wins whichever block ends last.
  std::vector<float> y(static_cast<size_t>(cols), 0.0f);
  y[static_cast<size_t>(cols) - 3] = 9.0f;
  y[40000] = 9.0f;
  y[4004] = 9.0f;
  CUDA_REQUIRE(cudaMemcpy(dx.ptr, y.data(), y.size() * sizeof(float), cudaMemcpyHostToDevice));
  for (int rep = 0; rep < 20; ++rep) {
    CUDA_REQUIRE(lk::argmax_rows_cuda(dx.ptr, 1, cols, didx.ptr, nullptr));
    CUDA_REQUIRE(cudaMemcpy(got, didx.ptr, sizeof(int32_t), cudaMemcpyDeviceToHost));
    CHECK(got[0] == 4004);
  }
}

TEST_CASE("CUDA kernels reject invalid shapes", "[kernels][cuda]") {
  float* dummy = reinterpret_cast<float*>(uintptr_t{256});
  int32_t* out = reinterpret_cast<int32_t*>(uintptr_t{256});
  CHECK(lk::softmax_rows_cuda(dummy, 1, 0, nullptr) == static_cast<int>(cudaErrorInvalidValue));
  CHECK(lk::softmax_rows_cuda(nullptr, 1, 4, nullptr) == static_cast<int>(cudaErrorInvalidValue));
  CHECK(lk::argmax_rows_cuda(dummy, -1, 4, out, nullptr) == static_cast<int>(cudaErrorInvalidValue));
  CHECK(lk::softmax_rows_cuda(dummy, 0, 4, nullptr) == static_cast<int>(cudaSuccess));
  CHECK(lk::cuda_available());
}

int main(int argc, char** argv) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
