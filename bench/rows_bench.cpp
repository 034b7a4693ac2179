// Times Loom's CUDA row kernels (softmax, argmax) on logits-shaped inputs and prints one JSON
// line per case: {"op", "rows", "cols", "median_us"}. bench/rows_vs_torch.py runs it beside
// PyTorch on the same shapes. Median of 200 timed launches after 20 warm-up launches, each timed
// with CUDA events around the launch alone.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda_check.hpp"
#include "loom/kernels/rows.hpp"

namespace {

template <class Launch> float median_us(Launch launch) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < 20; ++i) launch();
  std::vector<float> times;
  for (int i = 0; i < 200; ++i) {
    CHECK_CUDA(cudaEventRecord(start));
    launch();
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms * 1000.0f);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  std::nth_element(times.begin(), times.begin() + 100, times.end());
  return times[100];
}

} // namespace

int main() {
  const std::pair<int64_t, int64_t> shapes[] = {{1, 128256}, {32, 128256}, {128, 128256}, {64, 32000}};
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.f, 3.f);
  for (auto [rows, cols] : shapes) {
    size_t n = static_cast<size_t>(rows * cols);
    std::vector<float> host(n);
    for (float &v : host) v = dist(rng);
    float *x = nullptr, *work = nullptr;
    int32_t *out = nullptr;
    CHECK_CUDA(cudaMalloc(&x, n * sizeof(float)));
    CHECK_CUDA(cudaMalloc(&work, n * sizeof(float)));
    CHECK_CUDA(cudaMalloc(&out, static_cast<size_t>(rows) * sizeof(int32_t)));
    CHECK_CUDA(cudaMemcpy(x, host.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    // Softmax runs in place, so each launch works on a fresh copy's worth of values: the copy
    // is outside the timed region only for argmax; for softmax, rerunning on its own output is
    // the same amount of work (values stay finite), which is what is timed.
    CHECK_CUDA(cudaMemcpy(work, x, n * sizeof(float), cudaMemcpyDeviceToDevice));
    float softmax = median_us([&] { CHECK_CUDA(static_cast<cudaError_t>(loom::kernels::softmax_rows_cuda(work, rows, cols, nullptr))); });
    float argmax = median_us([&] { CHECK_CUDA(static_cast<cudaError_t>(loom::kernels::argmax_rows_cuda(x, rows, cols, out, nullptr))); });
    std::printf("{\"op\": \"softmax\", \"rows\": %lld, \"cols\": %lld, \"median_us\": %.2f}\n",
                static_cast<long long>(rows), static_cast<long long>(cols), static_cast<double>(softmax));
    std::printf("{\"op\": \"argmax\", \"rows\": %lld, \"cols\": %lld, \"median_us\": %.2f}\n",
                static_cast<long long>(rows), static_cast<long long>(cols), static_cast<double>(argmax));
    CHECK_CUDA(cudaFree(x));
    CHECK_CUDA(cudaFree(work));
    CHECK_CUDA(cudaFree(out));
  }
  return 0;
}
