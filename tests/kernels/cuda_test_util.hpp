// Helpers shared by the CUDA kernel tests: bfloat16 rounding on the host, device copies of host
// vectors, normal random vectors. Test code only; not thread-safe (a test's own objects).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace loom_kernel_test {

#define CUDA_REQUIRE(expr) REQUIRE(static_cast<int>(expr) == static_cast<int>(cudaSuccess))

// float32 -> bfloat16 bits, round to nearest even (finite inputs).
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float round_bf16(float f) { return from_bf16(bf16_bits(f)); }

// Device memory holding a copy of a host vector; owns it.
template <class T>
struct Device {
  void* ptr = nullptr;
  size_t n = 0;
  explicit Device(const std::vector<T>& host) : n(host.size()) {
    if (cudaMalloc(&ptr, std::max<size_t>(1, n) * sizeof(T)) == cudaSuccess && n > 0)
      cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice);
  }
  ~Device() { cudaFree(ptr); }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  std::vector<T> read() const {
    std::vector<T> host(n);
    if (n > 0) cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost);
    return host;
  }
  T* get() const { return static_cast<T*>(ptr); }
};

inline std::vector<float> normal(size_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

}  // namespace loom_kernel_test
