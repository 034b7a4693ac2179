// Device memory, copies and row kernels for CPU and (when built with it) CUDA.
#include <cstdlib>
#include <map>
#include <mutex>
#include <cstring>
#include <vector>

#include "loom/core/error.hpp"
#include "loom/core/host_context.hpp"
#include "loom/kernels/rows.hpp"

#if LOOM_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace loom {

namespace {
#if LOOM_HAVE_CUDA
bool cuda_ok(cudaError_t e, const char *what, std::string &error) {
  if (e == cudaSuccess) return true;
  error = std::string(what) + ": " + cudaGetErrorString(e);
  return false;
}

// Device scratch for the row kernels' small outputs (argmax ids, the masked-row count), kept
// per device and grown on demand instead of a cudaMalloc/cudaFree pair per sampling step, with
// a page-locked host mirror of the same size: a copy back into pageable memory goes through a
// staging buffer and costs several microseconds more, on every decode step. The lock is held
// from the kernel to the copy back; the memory lives as long as the process.
struct Scratch {
  std::mutex mutex;
  void *ptr = nullptr;
  void *host = nullptr;
  size_t bytes = 0;
};

// Locks the current device's scratch and makes it at least `bytes` long; *host (when asked
// for) is its pinned host mirror.
std::unique_lock<std::mutex> scratch(size_t bytes, void **out, std::string &error, void **host = nullptr) {
  static std::mutex table_mutex;
  static std::map<int, Scratch> table;
  int device = 0;
  if (!cuda_ok(cudaGetDevice(&device), "cudaGetDevice", error)) return {};
  Scratch *s;
  {
    std::lock_guard lock(table_mutex);
    s = &table[device]; // std::map nodes do not move
  }
  std::unique_lock lock(s->mutex);
  if (s->bytes < bytes) {
    if (s->ptr) cudaFree(s->ptr);
    if (s->host) cudaFreeHost(s->host);
    s->ptr = s->host = nullptr;
    s->bytes = 0;
    if (!cuda_ok(cudaMalloc(&s->ptr, bytes), "cudaMalloc", error)) return {};
    if (!cuda_ok(cudaMallocHost(&s->host, bytes), "cudaMallocHost", error)) {
      cudaFree(s->ptr);
      s->ptr = nullptr;
      return {};
    }
    s->bytes = bytes;
  }
  *out = s->ptr;
  if (host) *host = s->host;
  return lock;
}
#endif
} // namespace

void *cuda_compute_stream(int device) {
#if LOOM_HAVE_CUDA
  // A blocking stream (it waits for, and is waited on by, the legacy default stream), so code
  // that still uses the legacy stream, tests included, stays ordered with it; work on it can be
  // captured into CUDA graphs, which the legacy stream cannot.
  static std::mutex mutex;
  static std::map<int, cudaStream_t> streams;
  std::lock_guard lock(mutex);
  auto it = streams.find(device);
  if (it != streams.end()) return it->second;
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) return nullptr;
  cudaStream_t stream = nullptr;
  if (cudaStreamCreate(&stream) != cudaSuccess) stream = nullptr;
  cudaSetDevice(previous);
  if (stream) streams.emplace(device, stream);
  return stream;
#else
  (void)device;
  return nullptr;
#endif
}

bool cuda_device_present() {
#if LOOM_HAVE_CUDA
  return kernels::cuda_available();
#else
  return false;
#endif
}

int cuda_device_count() {
#if LOOM_HAVE_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) return 0;
  return count;
#else
  return 0;
#endif
}

loom_status device_alloc(DLDevice device, size_t bytes, size_t alignment, void **out, std::string &error) {
  if (out == nullptr) {
    error = "device_alloc: out is NULL";
    return LOOM_ERR_INVALID_ARGUMENT;
  }
  if (alignment == 0) alignment = 256;
  if ((alignment & (alignment - 1)) != 0) {
    error = "device_alloc: alignment " + std::to_string(alignment) + " is not a power of two";
    return LOOM_ERR_INVALID_ARGUMENT;
  }
  if (device.device_type == kDLCPU) {
    size_t rounded = (bytes + alignment - 1) / alignment * alignment;
    if (rounded < bytes) {
      error = "device_alloc: size overflows";
      return LOOM_ERR_OUT_OF_MEMORY;
    }
    void *p = std::aligned_alloc(alignment, rounded == 0 ? alignment : rounded);
    if (p == nullptr) {
      error = "device_alloc: out of host memory for " + std::to_string(bytes) + " bytes";
      return LOOM_ERR_OUT_OF_MEMORY;
    }
    *out = p;
    return LOOM_OK;
  }
#if LOOM_HAVE_CUDA
  if (device.device_type == kDLCUDA) {
    // cudaMalloc aligns to at least 256 bytes.
    if (alignment > 256) {
      error = "device_alloc: CUDA allocations align to 256 bytes at most";
      return LOOM_ERR_UNSUPPORTED;
    }
    if (!cuda_ok(cudaSetDevice(device.device_id), "cudaSetDevice", error)) return LOOM_ERR_DEVICE;
    if (!cuda_ok(cudaMalloc(out, bytes == 0 ? 1 : bytes), "cudaMalloc", error)) return LOOM_ERR_OUT_OF_MEMORY;
    return LOOM_OK;
  }
#endif
  error = "device_alloc: device type " + std::to_string(device.device_type) + " is not available in this build";
  return LOOM_ERR_UNSUPPORTED;
}

void device_free(DLDevice device, void *ptr) {
  if (ptr == nullptr) return;
  if (device.device_type == kDLCPU) {
    std::free(ptr);
    return;
  }
#if LOOM_HAVE_CUDA
  if (device.device_type == kDLCUDA) cudaFree(ptr);
#endif
}

loom_status device_memcpy(void *dst, DLDevice dst_device, const void *src, DLDevice src_device, size_t bytes,
                          std::string &error) {
  if (bytes == 0) return LOOM_OK;
  if (dst == nullptr || src == nullptr) {
    error = "memcpy: NULL pointer";
    return LOOM_ERR_INVALID_ARGUMENT;
  }
  if (dst_device.device_type == kDLCPU && src_device.device_type == kDLCPU) {
    std::memmove(dst, src, bytes);
    return LOOM_OK;
  }
#if LOOM_HAVE_CUDA
  auto stream = static_cast<cudaStream_t>(
      cuda_compute_stream(dst_device.device_type == kDLCUDA ? dst_device.device_id : src_device.device_id));
  if (!cuda_ok(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream), "cudaMemcpyAsync", error))
    return LOOM_ERR_DEVICE;
  // A copy into host memory must be complete when the call returns: the caller reads it next.
  if (dst_device.device_type == kDLCPU && !cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize", error))
    return LOOM_ERR_DEVICE;
  return LOOM_OK;
#else
  error = "memcpy: CUDA is not available in this build";
  return LOOM_ERR_UNSUPPORTED;
#endif
}

bool device_synchronize(DLDevice device, std::string &error) {
  if (device.device_type == kDLCPU) return true;
#if LOOM_HAVE_CUDA
  return cuda_ok(cudaStreamSynchronize(static_cast<cudaStream_t>(cuda_compute_stream(device.device_id))),
                 "cudaStreamSynchronize", error);
#else
  error = "CUDA is not available in this build";
  return false;
#endif
}

loom_status device_softmax_rows(float *x, int64_t rows, int64_t cols, DLDevice device, std::string &error) {
  if (device.device_type == kDLCPU) {
    if (!kernels::softmax_rows_cpu(x, rows, cols)) {
      error = "a row holds only -inf";
      return LOOM_ERR_INVALID_ARGUMENT;
    }
    return LOOM_OK;
  }
#if LOOM_HAVE_CUDA
  if (device.device_type == kDLCUDA) {
    // Count all -inf rows on the device, so CUDA reports them as the CPU version does.
    void *buffer = nullptr;
    void *pinned = nullptr;
    auto lock = scratch(sizeof(int32_t), &buffer, error, &pinned);
    if (!lock) return LOOM_ERR_DEVICE;
    auto *masked = static_cast<int32_t *>(buffer);
    void *stream = cuda_compute_stream(device.device_id);
    bool ok = cuda_ok(cudaMemsetAsync(masked, 0, sizeof(int32_t), static_cast<cudaStream_t>(stream)), "cudaMemsetAsync",
                      error) &&
              cuda_ok(static_cast<cudaError_t>(kernels::softmax_rows_cuda(x, rows, cols, stream, masked)),
                      "softmax_rows_cuda", error) &&
              cuda_ok(cudaMemcpyAsync(pinned, masked, sizeof(int32_t), cudaMemcpyDeviceToHost,
                                      static_cast<cudaStream_t>(stream)),
                      "cudaMemcpyAsync", error) &&
              cuda_ok(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize", error);
    if (!ok) return LOOM_ERR_DEVICE;
    const int32_t masked_rows = *static_cast<const int32_t *>(pinned);
    if (masked_rows > 0) {
      error = std::to_string(masked_rows) + " row(s) hold only -inf";
      return LOOM_ERR_INVALID_ARGUMENT;
    }
    return LOOM_OK;
  }
#endif
  error = "unsupported device";
  return LOOM_ERR_UNSUPPORTED;
}

bool device_argmax_rows(const float *x, int64_t rows, int64_t cols, DLDevice device, int32_t *out_host,
                        std::string &error) {
  if (device.device_type == kDLCPU) {
    kernels::argmax_rows_cpu(x, rows, cols, out_host);
    return true;
  }
#if LOOM_HAVE_CUDA
  if (device.device_type == kDLCUDA) {
    void *buffer = nullptr, *pinned = nullptr;
    const size_t bytes = static_cast<size_t>(rows) * sizeof(int32_t);
    auto lock = scratch(bytes, &buffer, error, &pinned);
    if (!lock) return false;
    auto *out_device = static_cast<int32_t *>(buffer);
    void *stream = cuda_compute_stream(device.device_id);
    int e = kernels::argmax_rows_cuda(x, rows, cols, out_device, stream);
    bool ok = cuda_ok(static_cast<cudaError_t>(e), "argmax_rows_cuda", error) &&
              cuda_ok(cudaMemcpyAsync(pinned, out_device, bytes, cudaMemcpyDeviceToHost, static_cast<cudaStream_t>(stream)),
                      "cudaMemcpyAsync", error) &&
              cuda_ok(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize", error);
    if (ok) std::memcpy(out_host, pinned, bytes);
    return ok;
  }
#endif
  error = "unsupported device";
  return false;
}

bool device_argmax_rows_to(const float *x, int64_t rows, int64_t cols, DLDevice device, int32_t *out,
                           std::string &error) {
  if (device.device_type == kDLCPU) {
    kernels::argmax_rows_cpu(x, rows, cols, out);
    return true;
  }
#if LOOM_HAVE_CUDA
  if (device.device_type == kDLCUDA)
    return cuda_ok(static_cast<cudaError_t>(
                       kernels::argmax_rows_cuda(x, rows, cols, out, cuda_compute_stream(device.device_id))),
                   "argmax_rows_cuda", error);
#endif
  error = "unsupported device";
  return false;
}

bool device_scatter_candidates(float *x, int64_t rows, int64_t cols, const int32_t *ids, const float *values,
                               const int32_t *count, int64_t capacity, DLDevice device, std::string &error) {
#if LOOM_HAVE_CUDA
  if (device.device_type == kDLCUDA)
    return cuda_ok(static_cast<cudaError_t>(kernels::scatter_candidates_cuda(x, rows, cols, ids, values, count, capacity,
                                                                              cuda_compute_stream(device.device_id))),
                   "scatter_candidates_cuda", error);
#else
  (void)x, (void)rows, (void)cols, (void)ids, (void)values, (void)count, (void)capacity;
#endif
  error = "candidate rows live only on CUDA devices (device type " + std::to_string(static_cast<int>(device.device_type)) +
          ")";
  return false;
}

bool device_scale(float *x, int64_t n, float s, DLDevice device, std::string &error) {
#if LOOM_HAVE_CUDA
  if (device.device_type == kDLCUDA)
    return cuda_ok(static_cast<cudaError_t>(kernels::scale_cuda(x, n, s, cuda_compute_stream(device.device_id))),
                   "scale_cuda", error);
#else
  (void)x, (void)n, (void)s;
#endif
  error = "a deferred dense scale lives only on CUDA devices (device type " +
          std::to_string(static_cast<int>(device.device_type)) + ")";
  return false;
}

TokenReadback::~TokenReadback() {
#if LOOM_HAVE_CUDA
  if (stream_) cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));
  if (stream_) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
  if (sampled_) cudaEventDestroy(static_cast<cudaEvent_t>(sampled_));
  if (event_) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
  if (pinned_) cudaFreeHost(pinned_);
#endif
}

void TokenReadback::start(const int32_t *device_values, size_t n, DLDevice device) {
#if LOOM_HAVE_CUDA
  std::string error;
  if (device.device_type == kDLCUDA) {
    if (n > capacity_) {
      if (pinned_) cudaFreeHost(pinned_);
      pinned_ = nullptr;
      capacity_ = 0;
      if (!cuda_ok(cudaMallocHost(&pinned_, n * sizeof(int32_t)), "cudaMallocHost", error))
        throw runtime_error("token readback: " + error);
      capacity_ = n;
    }
    if (device_ != device.device_id) {
      if (stream_) cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));
      if (stream_) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
      if (sampled_) cudaEventDestroy(static_cast<cudaEvent_t>(sampled_));
      if (event_) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
      stream_ = sampled_ = event_ = nullptr;
      cudaStream_t st = nullptr;
      cudaEvent_t a = nullptr, b = nullptr;
      const bool made = cuda_ok(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreate", error) &&
                        cuda_ok(cudaEventCreateWithFlags(&a, cudaEventDisableTiming), "cudaEventCreate", error) &&
                        cuda_ok(cudaEventCreateWithFlags(&b, cudaEventDisableTiming), "cudaEventCreate", error);
      stream_ = st;
      sampled_ = a;
      event_ = b;
      if (!made) throw runtime_error("token readback: " + error);
      device_ = device.device_id;
    }
    // The copy runs on a stream of its own, after the sampler's kernel: the compute stream goes
    // straight on to the next step.
    auto compute = static_cast<cudaStream_t>(cuda_compute_stream(device.device_id));
    auto copy = static_cast<cudaStream_t>(stream_);
    if (!cuda_ok(cudaEventRecord(static_cast<cudaEvent_t>(sampled_), compute), "cudaEventRecord", error) ||
        !cuda_ok(cudaStreamWaitEvent(copy, static_cast<cudaEvent_t>(sampled_), 0), "cudaStreamWaitEvent", error) ||
        !cuda_ok(cudaMemcpyAsync(pinned_, device_values, n * sizeof(int32_t), cudaMemcpyDeviceToHost, copy),
                 "cudaMemcpyAsync", error) ||
        !cuda_ok(cudaEventRecord(static_cast<cudaEvent_t>(event_), copy), "cudaEventRecord", error))
      throw runtime_error("token readback: " + error);
    pending_ = n;
    return;
  }
#endif
  (void)device_values;
  (void)n;
  (void)device;
  throw runtime_error("token readback: tokens are not on a CUDA device");
}

void TokenReadback::wait(int32_t *out) {
#if LOOM_HAVE_CUDA
  std::string error;
  if (!event_ || !cuda_ok(cudaEventSynchronize(static_cast<cudaEvent_t>(event_)), "cudaEventSynchronize", error))
    throw runtime_error("token readback: " + (error.empty() ? std::string("nothing was started") : error));
  std::memcpy(out, pinned_, pending_ * sizeof(int32_t));
#else
  (void)out;
  throw runtime_error("token readback: CUDA is not available in this build");
#endif
}

} // namespace loom
