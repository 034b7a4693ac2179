// The loom_host_api table handed to every plugin instance.
#include <cstdio>
#include <type_traits>
#include <cstring>
#include <iostream>

#include "loom/core/host_buffer.hpp"
#include "loom/core/host_context.hpp"
#include "loom/host_kernels.h"
#include "loom/host_vocab.h"
#include "hosted_model.hpp"

const char *loom_host_ctx::keep(const std::string &lookup, std::string value) noexcept {
  try {
    std::lock_guard lock(mutex);
    auto [it, inserted] = strings.try_emplace(lookup, std::move(value));
    return it->second.c_str();
  } catch (...) {
    return nullptr;
  }
}

std::string loom_host_ctx::take_error(std::string *key) {
  std::lock_guard lock(mutex);
  std::string e = std::move(last_error);
  last_error.clear();
  if (key != nullptr) *key = std::move(last_error_key);
  last_error_key.clear();
  return e;
}

namespace loom {
namespace {

std::mutex log_mutex;

void host_log(loom_host_ctx *ctx, loom_log_level level, const char *message) {
  if (ctx == nullptr || message == nullptr) return;
  static const char *names[] = {"debug", "info", "warn", "error"};
  if (level < LOOM_LOG_DEBUG || level > LOOM_LOG_ERROR) level = LOOM_LOG_INFO;
  const char *name = names[level];
  if (level < LOOM_LOG_INFO && std::getenv("LOOM_DEBUG") == nullptr) return;
  std::lock_guard lock(log_mutex);
  std::cerr << "[" << name << "] " << ctx->slot << " (" << ctx->component << "): " << message << "\n";
}

// A copy of a plugin's string, bounded so that a missing NUL cannot run away.
std::string bounded(const char *s) { return std::string(s, strnlen(s, 4096)); }

void host_set_config_error(loom_host_ctx *ctx, const char *key, const char *message) {
  if (ctx == nullptr) return;
  // Copies made before the lock: an allocation failure leaves the previous error whole.
  std::string m = message ? bounded(message) : "(no message)";
  std::string k = key ? bounded(key) : std::string();
  std::lock_guard lock(ctx->mutex);
  ctx->last_error = std::move(m);
  ctx->last_error_key = std::move(k);
}

// A message about no key: it also drops the key of an earlier set_config_error (the last wins).
void host_set_error(loom_host_ctx *ctx, const char *message) { host_set_config_error(ctx, nullptr, message); }

loom_value_type config_type(loom_host_ctx *ctx, const char *key) {
  if (ctx == nullptr || key == nullptr) return LOOM_VALUE_NONE;
  return ctx->config->type(key);
}

template <class T>
loom_status config_result(loom_host_ctx *ctx, const char *key, const std::optional<T> &value, T *out) {
  if (value) {
    *out = *value;
    return LOOM_OK;
  }
  return ctx->config->type(key) == LOOM_VALUE_NONE ? LOOM_ERR_NOT_FOUND : LOOM_ERR_INVALID_ARGUMENT;
}

loom_status config_get_bool(loom_host_ctx *ctx, const char *key, int32_t *out) {
  if (!ctx || !key || !out) return LOOM_ERR_INVALID_ARGUMENT;
  auto v = ctx->config->get_bool(key);
  std::optional<int32_t> i = v ? std::optional<int32_t>(*v ? 1 : 0) : std::nullopt;
  return config_result(ctx, key, i, out);
}

loom_status config_get_int(loom_host_ctx *ctx, const char *key, int64_t *out) {
  if (!ctx || !key || !out) return LOOM_ERR_INVALID_ARGUMENT;
  return config_result(ctx, key, ctx->config->get_int(key), out);
}

loom_status config_get_float(loom_host_ctx *ctx, const char *key, double *out) {
  if (!ctx || !key || !out) return LOOM_ERR_INVALID_ARGUMENT;
  return config_result(ctx, key, ctx->config->get_float(key), out);
}

loom_status config_get_string(loom_host_ctx *ctx, const char *key, const char **out) {
  if (!ctx || !key || !out) return LOOM_ERR_INVALID_ARGUMENT;
  auto v = ctx->config->get_string(key);
  if (!v) return ctx->config->type(key) == LOOM_VALUE_NONE ? LOOM_ERR_NOT_FOUND : LOOM_ERR_INVALID_ARGUMENT;
  const char *kept = ctx->keep(std::string("s:") + key, std::move(*v));
  if (kept == nullptr) return LOOM_ERR_OUT_OF_MEMORY;
  *out = kept;
  return LOOM_OK;
}

loom_status config_get_array_size(loom_host_ctx *ctx, const char *key, uint32_t *out) {
  if (!ctx || !key || !out) return LOOM_ERR_INVALID_ARGUMENT;
  return config_result(ctx, key, ctx->config->array_size(key), out);
}

loom_status config_get_json(loom_host_ctx *ctx, const char *key, const char **out) {
  if (!ctx || !key || !out) return LOOM_ERR_INVALID_ARGUMENT;
  auto v = ctx->config->json(key);
  if (!v) return LOOM_ERR_NOT_FOUND;
  const char *kept = ctx->keep(std::string("j:") + key, std::move(*v));
  if (kept == nullptr) return LOOM_ERR_OUT_OF_MEMORY;
  *out = kept;
  return LOOM_OK;
}

DLDevice host_device(loom_host_ctx *ctx) { return ctx ? ctx->device : DLDevice{kDLCPU, 0}; }

loom_status host_device_alloc(loom_host_ctx *ctx, DLDevice device, size_t bytes, size_t alignment, void **out) {
  std::string error;
  loom_status s = device_alloc(device, bytes, alignment, out, error);
  if (s != LOOM_OK && ctx) host_set_error(ctx, error.c_str());
  return s;
}

void host_device_free(loom_host_ctx *, DLDevice device, void *ptr) { device_free(device, ptr); }

loom_status host_memcpy(loom_host_ctx *ctx, void *dst, DLDevice dst_device, const void *src, DLDevice src_device,
                        size_t bytes) {
  std::string error;
  loom_status s = device_memcpy(dst, dst_device, src, src_device, bytes, error);
  if (s != LOOM_OK && ctx) host_set_error(ctx, error.c_str());
  return s;
}

// Core orders all of its work on one stream per device; per-request streams arrive with the
// scheduler.
void *host_current_stream(loom_host_ctx *, DLDevice device) {
  return device.device_type == kDLCUDA ? cuda_compute_stream(device.device_id) : nullptr;
}

loom_status host_stream_synchronize(loom_host_ctx *ctx, DLDevice device) {
  if (device.device_type == kDLCPU) return LOOM_OK;
  std::string error;
  if (!device_synchronize(device, error)) {
    if (ctx) host_set_error(ctx, error.c_str());
    return LOOM_ERR_DEVICE;
  }
  return LOOM_OK;
}

int32_t host_is_cancelled(loom_host_ctx *ctx) {
  return ctx && ctx->cancelled && ctx->cancelled->load(std::memory_order_relaxed) ? 1 : 0;
}

std::string metric_name(loom_host_ctx *ctx, const char *name) {
  return ctx->kind + "." + ctx->slot + "." + (name ? name : "unnamed");
}

void host_metric_count(loom_host_ctx *ctx, const char *name, double delta) {
  if (ctx && ctx->metrics) ctx->metrics->count(metric_name(ctx, name), delta);
}
void host_metric_gauge(loom_host_ctx *ctx, const char *name, double value) {
  if (ctx && ctx->metrics) ctx->metrics->gauge(metric_name(ctx, name), value);
}
void host_metric_observe(loom_host_ctx *ctx, const char *name, double value) {
  if (ctx && ctx->metrics) ctx->metrics->observe(metric_name(ctx, name), value);
}

loom_status host_buffer_append(loom_buffer *buffer, const void *data, size_t size) {
  if (buffer == nullptr || (data == nullptr && size > 0)) return LOOM_ERR_INVALID_ARGUMENT;
  try {
    buffer->bytes.append(static_cast<const char *>(data), size);
  } catch (const std::bad_alloc &) {
    return LOOM_ERR_OUT_OF_MEMORY;
  } catch (const std::length_error &) {
    return LOOM_ERR_OUT_OF_MEMORY;
  }
  return LOOM_OK;
}

void host_buffer_clear(loom_buffer *buffer) {
  if (buffer) buffer->bytes.clear();
}

// Every host call is noexcept at the boundary: an exception (std::bad_alloc in a log line, a
// metric name, a config lookup) must not unwind through a plugin's C frames.
template <auto F> struct NoThrow;
template <class R, class... A, R (*F)(A...)> struct NoThrow<F> {
  static R call(A... args) noexcept {
    try {
      return F(args...);
    } catch (...) {
      if constexpr (std::is_same_v<R, loom_status>) return LOOM_ERR_OUT_OF_MEMORY;
      else if constexpr (!std::is_void_v<R>) return R{};
    }
  }
};

// ---- the kernels extension ----

bool row_major_f32(const DLTensor *t) {
  if (t == nullptr || t->ndim != 2 || t->dtype.code != kDLFloat || t->dtype.bits != 32 || t->dtype.lanes != 1)
    return false;
  if (t->shape[0] < 0 || t->shape[1] < 0) return false;
  return t->strides == nullptr || (t->strides[1] == 1 && t->strides[0] == t->shape[1]);
}

float *data_of(const DLTensor *t) {
  return reinterpret_cast<float *>(static_cast<char *>(t->data) + t->byte_offset);
}

loom_status kernel_softmax_rows(loom_host_ctx *ctx, DLTensor *x) {
  if (!row_major_f32(x)) {
    host_set_error(ctx, "softmax_rows: expected a contiguous [rows, cols] float32 tensor");
    return LOOM_ERR_UNSUPPORTED;
  }
  std::string error;
  loom_status status = device_softmax_rows(data_of(x), x->shape[0], x->shape[1], x->device, error);
  if (status != LOOM_OK) host_set_error(ctx, ("softmax_rows: " + error).c_str());
  return status;
}

loom_status kernel_argmax_rows(loom_host_ctx *ctx, const DLTensor *x, int32_t *out) {
  if (!row_major_f32(x) || out == nullptr) {
    host_set_error(ctx, "argmax_rows: expected a contiguous [rows, cols] float32 tensor and an output array");
    return LOOM_ERR_UNSUPPORTED;
  }
  std::string error;
  if (!device_argmax_rows(data_of(x), x->shape[0], x->shape[1], x->device, out, error)) {
    host_set_error(ctx, ("argmax_rows: " + error).c_str());
    return LOOM_ERR_DEVICE;
  }
  return LOOM_OK;
}

loom_status kernel_argmax_rows_to(loom_host_ctx *ctx, const DLTensor *x, DLTensor *out) {
  if (!row_major_f32(x) || out == nullptr || out->data == nullptr || out->ndim != 1 || out->shape[0] != x->shape[0] ||
      out->dtype.code != kDLInt || out->dtype.bits != 32 || out->dtype.lanes != 1 ||
      out->device.device_type != x->device.device_type || out->device.device_id != x->device.device_id) {
    host_set_error(ctx, "argmax_rows_to: expected a contiguous [rows, cols] float32 tensor and an int32 [rows] output "
                        "on the same device");
    return LOOM_ERR_UNSUPPORTED;
  }
  std::string error;
  auto *dst = reinterpret_cast<int32_t *>(static_cast<char *>(out->data) + out->byte_offset);
  if (!device_argmax_rows_to(data_of(x), x->shape[0], x->shape[1], x->device, dst, error)) {
    host_set_error(ctx, ("argmax_rows_to: " + error).c_str());
    return LOOM_ERR_DEVICE;
  }
  return LOOM_OK;
}

const loom_host_kernels kKernels = {sizeof(loom_host_kernels), NoThrow<kernel_softmax_rows>::call,
                                    NoThrow<kernel_argmax_rows>::call, NoThrow<kernel_argmax_rows_to>::call};

// ---- loom.host.vocab/1: the model's tokens, from the runtime's vocabulary slot ----

std::shared_ptr<const Vocabulary> vocabulary_of(loom_host_ctx *ctx) {
  return ctx && ctx->vocabulary ? ctx->vocabulary->get() : nullptr;
}

int32_t vocab_size(loom_host_ctx *ctx) {
  auto v = vocabulary_of(ctx);
  return v ? static_cast<int32_t>(v->token_bytes.size()) : 0;
}

loom_status vocab_token_bytes(loom_host_ctx *ctx, int32_t id, const char **bytes, size_t *len) {
  auto v = vocabulary_of(ctx);
  if (!v || bytes == nullptr || len == nullptr) {
    if (ctx) host_set_error(ctx, v ? "token_bytes: bytes or len is NULL" : "token_bytes: no tokenizer is loaded");
    return LOOM_ERR_INVALID_ARGUMENT;
  }
  if (id < 0 || static_cast<size_t>(id) >= v->token_bytes.size()) {
    host_set_error(ctx, ("token_bytes: id " + std::to_string(id) + " is outside the vocabulary").c_str());
    return LOOM_ERR_INVALID_ARGUMENT;
  }
  const std::string &b = v->token_bytes[static_cast<size_t>(id)];
  if (b.empty()) return LOOM_ERR_NOT_FOUND; // special and control tokens spell no text
  *bytes = b.data();                          // the slot keeps the vocabulary for the runtime's life
  *len = b.size();
  return LOOM_OK;
}

loom_status vocab_end_tokens(loom_host_ctx *ctx, const int32_t **ids, size_t *count) {
  auto v = vocabulary_of(ctx);
  if (!v || ids == nullptr || count == nullptr) return LOOM_ERR_INVALID_ARGUMENT;
  *ids = v->eos_ids.data();
  *count = v->eos_ids.size();
  return LOOM_OK;
}

const loom_host_vocab kVocab = {sizeof(loom_host_vocab), NoThrow<vocab_size>::call, NoThrow<vocab_token_bytes>::call,
                                NoThrow<vocab_end_tokens>::call};

const void *host_get_extension(loom_host_ctx *ctx, const char *id) {
  if (id != nullptr && std::strcmp(id, LOOM_HOST_KERNELS_EXTENSION) == 0) return &kKernels;
  // Offered once a model with a tokenizer is loaded (after the instances were created: ask at
  // apply time, not in create()).
  if (id != nullptr && std::strcmp(id, LOOM_HOST_VOCAB_EXTENSION) == 0) return vocabulary_of(ctx) ? &kVocab : nullptr;
  if (id != nullptr && std::strcmp(id, LOOM_HOST_MODELS_EXTENSION) == 0)
    return ctx != nullptr && ctx->models != nullptr ? host_models_table() : nullptr;
  return nullptr;
}

const loom_host_api kHostApi = {
    sizeof(loom_host_api), LOOM_ABI_MAJOR, LOOM_ABI_MINOR,
    NoThrow<host_log>::call, NoThrow<host_set_error>::call,
    NoThrow<config_type>::call, NoThrow<config_get_bool>::call, NoThrow<config_get_int>::call,
    NoThrow<config_get_float>::call, NoThrow<config_get_string>::call,
    NoThrow<config_get_array_size>::call, NoThrow<config_get_json>::call,
    NoThrow<host_device>::call, NoThrow<host_device_alloc>::call, NoThrow<host_device_free>::call,
    NoThrow<host_memcpy>::call, NoThrow<host_current_stream>::call, NoThrow<host_stream_synchronize>::call,
    NoThrow<host_is_cancelled>::call,
    NoThrow<host_metric_count>::call, NoThrow<host_metric_gauge>::call, NoThrow<host_metric_observe>::call,
    NoThrow<host_buffer_append>::call, NoThrow<host_buffer_clear>::call,
    NoThrow<host_get_extension>::call,
    NoThrow<host_set_config_error>::call,
};

} // namespace

const loom_host_api *host_api() { return &kHostApi; }

} // namespace loom
