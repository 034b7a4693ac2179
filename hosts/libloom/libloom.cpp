// The C embedding API over loom::Runtime. No exception crosses this boundary.
#include "loom/loom.h"

#include <new>
#include <string>
#include <vector>

#include "loom/core/error.hpp"
#include "loom/core/runtime.hpp"

struct loom_runtime {
  std::unique_ptr<loom::Runtime> runtime;
};

namespace {

thread_local std::string last_error;

loom_status fail(loom_status status, std::string message) {
  last_error = std::move(message);
  return status;
}

loom_status from_exception() {
  try {
    throw;
  } catch (const loom::Error &e) {
    loom_status s = e.status() != 0                                  ? e.status()
                    : e.category() == loom::ErrorCategory::runtime ? LOOM_ERR_INTERNAL
                    : e.category() == loom::ErrorCategory::plugin  ? LOOM_ERR_NOT_FOUND
                                                                   : LOOM_ERR_INVALID_ARGUMENT;
    return fail(s, e.what());
  } catch (const std::bad_alloc &) {
    return fail(LOOM_ERR_OUT_OF_MEMORY, "out of memory");
  } catch (const std::exception &e) {
    return fail(LOOM_ERR_INTERNAL, e.what());
  } catch (...) {
    return fail(LOOM_ERR_INTERNAL, "unknown error");
  }
}

std::vector<std::string> to_vector(const char *const *overrides, size_t count) {
  std::vector<std::string> out;
  for (size_t i = 0; i < count; ++i) {
    if (overrides[i] == nullptr) throw loom::manifest_error("override #" + std::to_string(i) + " is NULL");
    out.emplace_back(overrides[i]);
  }
  return out;
}

} // namespace

extern "C" {

const char *loom_last_error(void) { return last_error.c_str(); }

loom_status loom_runtime_create_from_file(const char *path, const char *const *overrides, size_t count,
                                          loom_runtime **out) {
  last_error.clear();
  if (path == nullptr || out == nullptr || (overrides == nullptr && count > 0))
    return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_create_from_file: NULL argument");
  try {
    auto rt = std::make_unique<loom_runtime>();
    rt->runtime = loom::Runtime::from_file(path, to_vector(overrides, count));
    *out = rt.release();
    return LOOM_OK;
  } catch (...) {
    return from_exception();
  }
}

loom_status loom_runtime_create_from_string(const char *toml_text, const char *source_name,
                                            const char *const *overrides, size_t count, loom_runtime **out) {
  last_error.clear();
  if (toml_text == nullptr || out == nullptr || (overrides == nullptr && count > 0))
    return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_create_from_string: NULL argument");
  try {
    auto rt = std::make_unique<loom_runtime>();
    rt->runtime = loom::Runtime::from_string(toml_text, source_name ? source_name : "<string>", to_vector(overrides, count));
    *out = rt.release();
    return LOOM_OK;
  } catch (...) {
    return from_exception();
  }
}

loom_status loom_runtime_run(loom_runtime *runtime, int64_t steps, loom_token_fn on_token, void *user,
                             int32_t *tokens_out, size_t tokens_capacity, size_t *tokens_written) {
  last_error.clear();
  if (runtime == nullptr) return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_run: NULL runtime");
  try {
    loom::TokenCallback callback;
    if (on_token) callback = [&](int32_t step, int32_t token) { return on_token(user, step, token) == 0; };
    loom::RunResult result = runtime->runtime->run(steps, callback);
    size_t n = 0;
    if (tokens_out != nullptr)
      for (; n < result.tokens.size() && n < tokens_capacity; ++n) tokens_out[n] = result.tokens[n];
    if (tokens_written) *tokens_written = n;
    return result.cancelled ? fail(LOOM_ERR_CANCELLED, "the run was cancelled") : LOOM_OK;
  } catch (...) {
    return from_exception();
  }
}

loom_status loom_runtime_swap(loom_runtime *runtime, const char *slot, const char *component_toml) {
  last_error.clear();
  if (runtime == nullptr || slot == nullptr || component_toml == nullptr)
    return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_swap: NULL argument");
  try {
    runtime->runtime->swap(slot, component_toml);
    return LOOM_OK;
  } catch (...) {
    return from_exception();
  }
}

loom_status loom_runtime_cancel(loom_runtime *runtime) {
  if (runtime == nullptr) return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_cancel: NULL runtime");
  runtime->runtime->cancel();
  return LOOM_OK;
}

void loom_runtime_destroy(loom_runtime *runtime) { delete runtime; }

} // extern "C"
