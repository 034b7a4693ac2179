// The host side of an instance: what loom_host_ctx points to, and the one loom_host_api table.
//
// Ownership: an Instance owns its HostContext; the context borrows the runtime's Metrics and
// cancellation flag, which outlive every instance. Strings handed to the plugin (config strings,
// JSON) are kept in the context until it is destroyed, as the ABI promises.
// Thread-safety: the host table's calls may run concurrently (see loom/host.h); the context
// guards its mutable parts.
#pragma once

#include <atomic>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "loom/core/component_table.hpp"
#include "loom/core/metrics.hpp"
#include "loom/core/vocabulary.hpp"
#include "loom/host.h"

namespace loom {
class ModelHost;
}

struct loom_host_ctx {
  std::string kind;      // "sampler"
  std::string slot;      // "sampler[0]"
  std::string component; // "top-k"
  std::shared_ptr<const loom::ComponentTable> config;
  std::filesystem::path weights;  // an adapter's PEFT directory ([[adapter]] weights), or empty
  DLDevice device{kDLCPU, 0};
  loom::Metrics *metrics = nullptr;
  const std::atomic<bool> *cancelled = nullptr;
  const loom::VocabularySlot *vocabulary = nullptr;
  const loom::ModelHost *models = nullptr; // loom.host.models/1; null where the host runs no models

  std::mutex mutex; // guards the three members below
  std::string last_error;
  std::string models_error; // why the last loom.host.models/1 open() failed
  // The config key set_config_error() named with last_error, as the plugin gave it: not checked
  // here (the plugin may name any string); Instance::create decides whether it can point at it.
  std::string last_error_key;
  // Strings returned to the plugin, by lookup ("s:key", "j:key"): the config is immutable, so a
  // repeated lookup returns the same storage and memory stays bounded.
  std::map<std::string, std::string, std::less<>> strings;

  // Returns storage for `value` under `lookup` that lives as long as the context; nullptr when
  // memory runs out.
  const char *keep(const std::string &lookup, std::string value) noexcept;
  // The last error message, and its config key into *key when asked ("" when none); both are
  // cleared by reading.
  std::string take_error(std::string *key = nullptr);
};

namespace loom {

// The host API table (static; valid for the life of the process).
const loom_host_api *host_api();

// Device memory and copies, shared by the host table and core's own code.
loom_status device_alloc(DLDevice device, size_t bytes, size_t alignment, void **out, std::string &error);
void device_free(DLDevice device, void *ptr);
loom_status device_memcpy(void *dst, DLDevice dst_device, const void *src, DLDevice src_device, size_t bytes,
                          std::string &error);
bool device_synchronize(DLDevice device, std::string &error);
// Row kernels on CPU or CUDA memory (see loom/host_kernels.h); false with `error` on failure.
loom_status device_softmax_rows(float *x, int64_t rows, int64_t cols, DLDevice device, std::string &error);
bool device_argmax_rows(const float *x, int64_t rows, int64_t cols, DLDevice device, int32_t *out_host,
                        std::string &error);
// The argmax of each row into `out`, int32 memory on `device` (as device_argmax_rows): on CUDA queued on the compute stream, returning without waiting for it.
bool device_argmax_rows_to(const float *x, int64_t rows, int64_t cols, DLDevice device, int32_t *out,
                           std::string &error);
// Sampler candidates back into dense rows (kernels::scatter_candidates_cuda): on CUDA queued on
// the compute stream; false with `error` on another device or a launch failure.
bool device_scatter_candidates(float *x, int64_t rows, int64_t cols, const int32_t *ids, const float *values,
                               const int32_t *count, int64_t capacity, DLDevice device, std::string &error);
// x[i] *= s over n floats of CUDA memory (kernels::scale_cuda), queued on the compute stream;
// false with `error` on another device or a launch failure.
bool device_scale(float *x, int64_t n, float s, DLDevice device, std::string &error);

// Brings a few int32 values (the tokens a decode step sampled) from device memory to the host
// without blocking the compute stream's later work: start() queues the copy into page-locked
// memory, on a stream of its own, behind what the compute stream holds so far; wait() blocks
// until that copy (only) is done. The decoder queues the next forward pass between the two. One thread uses an object
// at a time; it owns its pinned buffer and event.
class TokenReadback {
 public:
  TokenReadback() = default;
  ~TokenReadback();
  TokenReadback(const TokenReadback &) = delete;
  TokenReadback &operator=(const TokenReadback &) = delete;
  // Throws loom::Error when the copy cannot be queued.
  void start(const int32_t *device_values, size_t n, DLDevice device);
  // Copies the values started last into out[0, n); throws loom::Error on a device failure.
  void wait(int32_t *out);

 private:
  // (Unused in a build without CUDA, where start() refuses.)
  [[maybe_unused]] void *pinned_ = nullptr;  // cudaMallocHost
  [[maybe_unused]] void *stream_ = nullptr;  // cudaStream_t the copy runs on
  [[maybe_unused]] void *sampled_ = nullptr; // cudaEvent_t: the values are written (compute stream)
  [[maybe_unused]] void *event_ = nullptr;   // cudaEvent_t: the copy is done
  [[maybe_unused]] size_t capacity_ = 0, pending_ = 0;
  [[maybe_unused]] int device_ = -1;
};

// The stream (a cudaStream_t) on which core, and the plugins through host->current_stream(), order
// their work on CUDA device `device`: one per device for the process, made on first use; NULL
// without CUDA. Every device_* call above uses it.
void *cuda_compute_stream(int device);
// True when this build has CUDA and a device is present.
bool cuda_device_present();
int cuda_device_count();

} // namespace loom
