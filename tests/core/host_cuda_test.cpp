// The host API on a GPU: device memory, copies and the kernels extension on CUDA tensors, as a
// plugin uses them. Exits 77 (skipped) where there is no CUDA device.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cmath>
#include <iostream>
#include <random>

#include "loom/core/runtime.hpp"
#include "loom/core/host_context.hpp"
#include "loom/host_kernels.h"

namespace {

struct DeviceRows {
  const loom_host_api *host;
  loom_host_ctx *ctx;
  DLDevice gpu{kDLCUDA, 0};
  void *ptr = nullptr;
  int64_t shape[2];
  DLTensor t{};
  DeviceRows(loom::Instance &inst, int64_t rows, int64_t cols) : host(inst.host()), ctx(inst.ctx()), shape{rows, cols} {
    REQUIRE(host->device_alloc(ctx, gpu, static_cast<size_t>(rows * cols) * sizeof(float), 0, &ptr) == LOOM_OK);
    t.data = ptr;
    t.device = gpu;
    t.ndim = 2;
    t.dtype = {kDLFloat, 32, 1};
    t.shape = shape;
  }
  ~DeviceRows() { host->device_free(ctx, gpu, ptr); }
  void upload(const std::vector<float> &v) {
    REQUIRE(host->memcpy(ctx, ptr, gpu, v.data(), {kDLCPU, 0}, v.size() * sizeof(float)) == LOOM_OK);
  }
  std::vector<float> download() {
    std::vector<float> v(static_cast<size_t>(shape[0] * shape[1]));
    REQUIRE(host->memcpy(ctx, v.data(), {kDLCPU, 0}, ptr, gpu, v.size() * sizeof(float)) == LOOM_OK);
    return v;
  }
};

} // namespace

TEST_CASE("the kernels extension runs on CUDA tensors from host memory", "[cuda][host]") {
  auto rt = loom::Runtime::from_string("[[sampler]]\nuse = \"greedy\"\n");
  auto &inst = rt->pipeline().at("sampler[0]");
  auto kernels = static_cast<const loom_host_kernels *>(inst.host()->get_extension(inst.ctx(), LOOM_HOST_KERNELS_EXTENSION));
  REQUIRE(kernels != nullptr);
  const int64_t rows = 8, cols = 128256;
  std::mt19937 rng(5);
  std::normal_distribution<float> dist(0.f, 4.f);
  std::vector<float> host_rows(static_cast<size_t>(rows * cols));
  for (float &v : host_rows) v = dist(rng);
  for (int64_t c = 0; c < cols; c += 3) host_rows[static_cast<size_t>(cols + c)] = -INFINITY; // row 1 partly masked
  DeviceRows x(inst, rows, cols);
  x.upload(host_rows);

  int32_t arg[8];
  REQUIRE(kernels->argmax_rows(inst.ctx(), &x.t, arg) == LOOM_OK);
  for (int64_t r = 0; r < rows; ++r) {
    auto begin = host_rows.begin() + r * cols;
    CHECK(arg[r] == std::max_element(begin, begin + cols) - begin);
  }
  REQUIRE(kernels->softmax_rows(inst.ctx(), &x.t) == LOOM_OK);
  auto probs = x.download();
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (int64_t c = 0; c < cols; ++c) sum += probs[static_cast<size_t>(r * cols + c)];
    CHECK(std::abs(sum - 1.0) < 1e-4);
  }
  CHECK(probs[static_cast<size_t>(cols)] == 0.0f); // a masked entry

  std::vector<float> all_masked(static_cast<size_t>(rows * cols), -INFINITY);
  x.upload(all_masked);
  CHECK(kernels->softmax_rows(inst.ctx(), &x.t) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK(inst.last_error().find("hold only -inf") != std::string::npos);
}

int main(int argc, char **argv) {
  if (!loom::cuda_device_present()) {
    std::cout << "SKIPPED: no CUDA device\n";
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
