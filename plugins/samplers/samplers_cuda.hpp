// The samplers' CUDA paths (samplers_cuda.cu), called from the components' apply() when the
// logits are on kDLCUDA. Plain C++ declarations: no CUDA header, streams as void*. Every call
// queues its kernels on `stream` and returns without waiting for the device; each returns a
// cudaError_t value (0 = success) for the launches.
//
// Rows: x is [rows, vocab] float32, row-major, on the device. Scratch is per instance, grown on
// demand through the host (DeviceScratch below), so the hot path never calls cudaMalloc.
#ifndef LOOM_PLUGINS_SAMPLERS_CUDA_HPP
#define LOOM_PLUGINS_SAMPLERS_CUDA_HPP

#include <cstddef>
#include <cstdint>
#include <string>

#include "loom/loom_plugin_api.h"
#include "loom_plugin_util.hpp"
#ifndef __CUDACC__
#include <cmath>
#include <optional>
#include <unordered_map>
#include <vector>

#include "sampler_common.hpp"
#endif

#ifndef LOOM_SAMPLERS_CUDA
#define LOOM_SAMPLERS_CUDA 0
#endif

namespace loomp::samplers {

// LOOM_SAMPLER_RUNS_ON_CUDA where this build has the CUDA paths, else nothing.
inline constexpr uint32_t kRunsOnCuda = LOOM_SAMPLERS_CUDA ? static_cast<uint32_t>(LOOM_SAMPLER_RUNS_ON_CUDA) : 0u;
// LOOM_SAMPLER_CANDIDATES where this build has the candidate kernels (candidates_cuda.cu).
inline constexpr uint32_t kReadsCandidates =
    LOOM_SAMPLERS_CUDA ? static_cast<uint32_t>(LOOM_SAMPLER_CANDIDATES) : 0u;
// LOOM_SAMPLER_DENSE_SCALE (with LOOM_SAMPLER_CANDIDATES) where this build has those kernels.
inline constexpr uint32_t kDenseScale =
    LOOM_SAMPLERS_CUDA ? static_cast<uint32_t>(LOOM_SAMPLER_CANDIDATES | LOOM_SAMPLER_DENSE_SCALE) : 0u;

namespace cuda {
// Pinned host memory for uploads (penalty pairs, dist's uniforms): an asynchronous copy from
// pageable memory would wait for the stream. Created on first use; reused once the previous
// upload through it is done (an event; long done by the next call).
struct Staging;
void staging_delete(Staging* s);
}  // namespace cuda

// Device memory of one instance, from host->device_alloc, kept between calls and grown when a
// call needs more, plus its pinned staging. `fresh` is true after a (re)allocation.
// Freed (and re-allocated) only between calls; device_free waits for the device.
struct DeviceScratch {
  const loom_host_api* host = nullptr;
  loom_host_ctx* ctx = nullptr;
  DLDevice device{kDLCPU, 0};
  void* ptr = nullptr;
  size_t bytes = 0;
  bool fresh = false;
  cuda::Staging* staging = nullptr;
  int64_t layout_rows = -1, layout_vocab = -1;

  DeviceScratch(const loom_host_api* h, loom_host_ctx* c) : host(h), ctx(c) {}
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  ~DeviceScratch() {
    release();
#if LOOM_SAMPLERS_CUDA
    cuda::staging_delete(staging);
#endif
  }
  // Whether memory laid out for (rows, vocab) must be zeroed first: after a (re)allocation or
  // when the layout moved since the last call (the regions kept zero between calls shift).
  bool must_zero(int64_t rows, int64_t vocab) {
    const bool z = fresh || rows != layout_rows || vocab != layout_vocab;
    layout_rows = rows;
    layout_vocab = vocab;
    return z;
  }
  void release() {
    if (ptr != nullptr) host->device_free(ctx, device, ptr);
    ptr = nullptr;
    bytes = 0;
  }
  void* get(DLDevice dev, size_t need, const char* component) {
    fresh = false;
    if (ptr != nullptr && (dev.device_type != device.device_type || dev.device_id != device.device_id || need > bytes))
      release();
    if (ptr == nullptr) {
      const size_t grown = need + need / 4 + 4096;
      void* p = nullptr;
      const loom_status s = host->device_alloc(ctx, dev, grown, 256, &p);
      if (s != LOOM_OK) fail(s, std::string(component) + ": device scratch allocation failed");
      ptr = p;
      bytes = grown;
      device = dev;
      fresh = true;
    }
    return ptr;
  }
};

inline void check_cuda(int err, const char* component) {
  if (err != 0) fail(LOOM_ERR_DEVICE, std::string(component) + ": CUDA error " + std::to_string(err));
}

// The logits of a batch whose rows are on CUDA, and the host's current stream for them.
struct DeviceRows {
  float* data;
  void* stream;
};
inline bool on_cuda(const loom_sampling_batch& b) { return b.logits->device.device_type == kDLCUDA; }
#if LOOM_SAMPLERS_CUDA
// (Only in a CUDA build: the links' device branches are compiled there only, so that a build
// without CUDA never refers to the kernels' host functions.)
namespace cuda {
bool is_device_memory(const void* p, int device);
}
inline DeviceRows device_rows(const loom_sampling_batch& b, const loom_host_api* host, loom_host_ctx* ctx,
                              const char* component) {
  float* data = data_of<float>(*b.logits);
  // A kernel that read host memory would fault and poison the whole CUDA context: refuse first.
  if (b.n_rows > 0 && !cuda::is_device_memory(data, b.logits->device.device_id))
    unsupported(std::string(component) + ": logits are marked CUDA but are not device memory of CUDA device " +
                std::to_string(b.logits->device.device_id) + " (rows are read on the CPU or in device memory)");
  return DeviceRows{data, host->current_stream(ctx, b.logits->device)};
}
#endif

namespace cuda {

// Whether p is memory of CUDA device `device` (device or managed memory); false for host
// memory and when no device answers. (Declared above for device_rows.)

// x[i] *= inv over n floats (temperature; the same float multiply as the CPU).
int scale(float* x, int64_t n, float inv, void* stream);

// History penalties: `pairs` is host memory [3 * n_pairs] int32: rows, then tokens, then counts.
// Uploaded into scratch (3 * n_pairs int32) and applied with the CPU's float formula.
int penalties(float* x, int64_t vocab, const int32_t* pairs, int64_t n_pairs, void* scratch, Staging*& staging,
              float repetition, float frequency, float presence, void* stream);

// min-p: masks x < max(row) + log_p (in double).
size_t min_p_scratch_bytes(int64_t rows, int64_t vocab);
int min_p(float* x, int64_t rows, int64_t vocab, double log_p, void* scratch, void* stream);

// top-k (keep_count = k, no mass) and top-p (mass, target p * total, at least keep_count):
// keeps the smallest prefix, by (logit desc, id asc), that satisfies the rule; masks the rest.
// `zero` asks for the scratch's histograms to be zeroed first (a fresh allocation).
size_t select_scratch_bytes(int64_t rows, int64_t vocab, bool mass);
int top_k(float* x, int64_t rows, int64_t vocab, int64_t k, void* scratch, bool zero, void* stream);
int top_p(float* x, int64_t rows, int64_t vocab, double p, int64_t min_keep, void* scratch, bool zero, void* stream);

// dist: u[rows] (host memory, philox::uniform01 of each row) is uploaded; the chosen tokens
// (-1 for a row of only -inf) are written to tokens_device, or, when it is NULL, copied back
// into tokens_host, synchronising the stream.
size_t dist_scratch_bytes(int64_t rows, int64_t vocab);
int dist(const float* x, int64_t rows, int64_t vocab, const float* u, void* scratch, Staging*& staging,
         int32_t* tokens_device, int32_t* tokens_host, void* stream);

// ---- candidate rows (ABI 1.3; candidates_cuda.cu) ----
// The batch's candidates as plain pointers: ids/values [rows, capacity], count [rows].
struct CandidateRows {
  int32_t* ids;
  float* values;
  int32_t* count;
  int64_t capacity;
};
// The largest capacity the candidate kernels read (a row's candidates sit in shared memory).
inline constexpr int64_t kMaxCandidates = 1024;
// Whether top-k of k over `rows` rows of `vocab` can leave its result as candidates.
bool candidates_top_k_fits(int64_t rows, int64_t vocab, int64_t k, int64_t capacity);
// top-k of dense rows x, read as x * scale (the deferred scale; 1 for none), into the candidates
// (the k best, in order, scaled); scratch per the call below.
size_t candidates_top_k_scratch_bytes(int64_t rows, int64_t vocab, int64_t k);
// `zero`: the scratch is fresh (a counter in it must start at zero).
int candidates_top_k(const float* x, int64_t rows, int64_t vocab, float scale, int64_t k, const CandidateRows& c,
                     void* scratch, bool zero, void* stream);
// top-k over active candidates (already in order): count = min(count, k).
int candidates_truncate(const CandidateRows& c, int64_t rows, int64_t k, void* stream);
// temperature: values *= inv (the CPU's float multiply), order kept.
int candidates_scale(const CandidateRows& c, int64_t rows, float inv, void* stream);
// top-p and min-p: shorten each row's count to the CPU's kept prefix.
int candidates_top_p(const CandidateRows& c, int64_t rows, double p, int64_t min_keep, void* stream);
int candidates_min_p(const CandidateRows& c, int64_t rows, double log_p, void* stream);
// dist: the CPU's draw over each row's candidates (u[rows] host memory). Tokens go to
// tokens_device when it is given and no log-probabilities are asked for; otherwise tokens (and
// log-probabilities when logprobs_host is given) are copied to the host, synchronising the stream.
size_t candidates_dist_scratch_bytes(int64_t rows);
int candidates_dist(const CandidateRows& c, int64_t rows, const float* u, void* scratch, Staging*& staging,
                    int32_t* tokens_device, int32_t* tokens_host, float* logprobs_host, void* stream);

}  // namespace cuda

#if LOOM_SAMPLERS_CUDA && !defined(__CUDACC__)
// The batch's candidates (ABI 1.3) when the host offers them, checked; nullopt otherwise, or when
// their capacity exceeds what the kernels read and they are not active (the link then works on
// the dense rows). Active candidates the kernels cannot read are refused.
inline std::optional<cuda::CandidateRows> candidate_rows(const loom_sampling_batch& b, const char* component) {
  if (b.struct_size < offsetof(loom_sampling_batch, candidates) + sizeof(b.candidates) || b.candidates == nullptr)
    return std::nullopt;
  const loom_sampling_candidates& c = *b.candidates;
  if (c.struct_size < offsetof(loom_sampling_candidates, active) + sizeof(c.active)) invalid(std::string(component) + ": candidates struct_size too small");
  const auto matrix = [&](const DLTensor* t, bool is_float, const char* name) {
    if (t == nullptr || t->data == nullptr || t->ndim != 2 || t->shape[0] < b.n_rows || t->shape[1] != c.capacity ||
        !(is_float ? is_f32(t->dtype) : is_i32(t->dtype)) || t->device.device_type != b.logits->device.device_type ||
        t->device.device_id != b.logits->device.device_id || !is_contiguous(*t))
      invalid(std::string(component) + ": candidates->" + name + " must be a contiguous [n_rows, capacity] " +
              (is_float ? "float32" : "int32") + " tensor on the logits' device");
  };
  if (c.capacity < 1) invalid(std::string(component) + ": candidates->capacity must be >= 1");
  matrix(c.ids, false, "ids");
  matrix(c.logits, true, "logits");
  const DLTensor* n = c.count;
  if (n == nullptr || n->data == nullptr || n->ndim != 1 || n->shape[0] < b.n_rows || !is_i32(n->dtype) ||
      n->device.device_type != b.logits->device.device_type || n->device.device_id != b.logits->device.device_id)
    invalid(std::string(component) + ": candidates->count must be an [n_rows] int32 tensor on the logits' device");
  if (c.capacity > cuda::kMaxCandidates) {
    if (c.active != 0)
      unsupported(std::string(component) + ": candidate rows of capacity " + std::to_string(c.capacity) +
                  " (this plugin reads up to " + std::to_string(cuda::kMaxCandidates) + ")");
    return std::nullopt;
  }
  if (LOOM_HAS_FIELD(&c, loom_sampling_candidates, dense_scale) && !(c.dense_scale > 0.0f && std::isfinite(c.dense_scale)))
    invalid(std::string(component) + ": candidates->dense_scale must be a finite number > 0, got " +
            std::to_string(c.dense_scale));
  return cuda::CandidateRows{data_of<int32_t>(*c.ids), data_of<float>(*c.logits), data_of<int32_t>(*n), c.capacity};
}

// The multiply the dense rows owe (ABI 1.4 candidates->dense_scale), for a link flagged
// LOOM_SAMPLER_DENSE_SCALE that was offered candidates; NULL when the host's struct predates the
// field (nothing is ever owed then). The link may set it (from 1) or pay it and reset it to 1.
inline float* owed_scale(const loom_sampling_batch& b) {
  if (b.struct_size < offsetof(loom_sampling_batch, candidates) + sizeof(b.candidates) ||
      !LOOM_HAS_FIELD(b.candidates, loom_sampling_candidates, dense_scale))
    return nullptr;
  return &b.candidates->dense_scale;
}
// Pays an owed scale on the dense rows (a pass over them) before a path that reads them plainly.
inline void pay_owed_scale(const loom_sampling_batch& b, float* data, void* stream, const char* component) {
  float* owed = owed_scale(b);
  if (owed == nullptr || *owed == 1.0f) return;
  check_cuda(cuda::scale(data, int64_t{b.n_rows} * b.vocab_size, *owed, stream), component);
  *owed = 1.0f;
}
#endif

#if LOOM_SAMPLERS_CUDA && !defined(__CUDACC__)
// apply_history_penalties (sampler_common.hpp) on CUDA rows: the window's (token, count) pairs
// of every row are built here, uploaded (a few hundred int32 a row) and applied there with the
// same float formula.
inline void apply_history_penalties_cuda(const loom_sampling_batch& b, DeviceScratch& scratch, const char* component,
                                         float repetition, float frequency, float presence, int64_t window) {
  const DeviceRows d = device_rows(b, scratch.host, scratch.ctx, component);
  require_history(b, component);
  std::unordered_map<int32_t, int32_t> counts;
  std::vector<int32_t> rows, tokens, occurrences;
  for (int64_t r = 0; r < b.n_rows; ++r) {
    count_window(history_of(b, r, component), window, counts);
    for (const auto& [tok, c] : counts) {
      rows.push_back(static_cast<int32_t>(r));
      tokens.push_back(tok);
      occurrences.push_back(c);
    }
  }
  if (rows.empty()) return;
  std::vector<int32_t> pairs(rows);
  pairs.insert(pairs.end(), tokens.begin(), tokens.end());
  pairs.insert(pairs.end(), occurrences.begin(), occurrences.end());
  void* s = scratch.get(b.logits->device, pairs.size() * sizeof(int32_t), component);
  check_cuda(cuda::penalties(d.data, b.vocab_size, pairs.data(), static_cast<int64_t>(rows.size()), s, scratch.staging,
                             repetition, frequency, presence, d.stream),
             component);
}
#endif

}  // namespace loomp::samplers

#endif
