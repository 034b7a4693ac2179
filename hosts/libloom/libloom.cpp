// The C embedding API over loom::Runtime. No exception crosses this boundary.
#include "loom/loom.h"

#include <new>
#include <string>
#include <vector>

#include "loom/core/error.hpp"
#include "loom/core/runtime.hpp"

struct loom_runtime {
  std::unique_ptr<loom::Runtime> runtime;
  std::vector<loom::SequenceResult> last_sequences; // of the last completed run
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
    runtime->last_sequences.clear();
    loom::RunResult result = runtime->runtime->run(steps, callback);
    runtime->last_sequences = std::move(result.sequences);
    size_t n = 0;
    if (tokens_out != nullptr)
      for (; n < result.tokens.size() && n < tokens_capacity; ++n) tokens_out[n] = result.tokens[n];
    if (tokens_written) *tokens_written = n;
    return result.cancelled ? fail(LOOM_ERR_CANCELLED, "the run was cancelled") : LOOM_OK;
  } catch (...) {
    return from_exception();
  }
}

loom_status loom_runtime_sequence_count(loom_runtime *runtime, size_t *count) {
  last_error.clear();
  if (runtime == nullptr || count == nullptr) return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_sequence_count: NULL argument");
  *count = runtime->last_sequences.size();
  return LOOM_OK;
}

loom_status loom_runtime_sequence_tokens(loom_runtime *runtime, size_t index, int32_t *tokens_out, size_t capacity,
                                         size_t *written, size_t *total) {
  last_error.clear();
  if (runtime == nullptr || written == nullptr || (tokens_out == nullptr && capacity > 0))
    return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_sequence_tokens: NULL argument");
  if (index >= runtime->last_sequences.size())
    return fail(LOOM_ERR_NOT_FOUND, "loom_runtime_sequence_tokens: no sequence " + std::to_string(index) + " in the last run (" +
                                        std::to_string(runtime->last_sequences.size()) + " sequences)");
  const auto &tokens = runtime->last_sequences[index].tokens;
  size_t n = 0;
  for (; n < tokens.size() && n < capacity; ++n) tokens_out[n] = tokens[n];
  *written = n;
  if (total) *total = tokens.size();
  return LOOM_OK;
}

loom_status loom_runtime_sequence_text(loom_runtime *runtime, size_t index, const char **text_out, int32_t *stopped) {
  last_error.clear();
  if (runtime == nullptr || text_out == nullptr) return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_sequence_text: NULL argument");
  if (index >= runtime->last_sequences.size())
    return fail(LOOM_ERR_NOT_FOUND, "loom_runtime_sequence_text: no sequence " + std::to_string(index) + " in the last run (" +
                                        std::to_string(runtime->last_sequences.size()) + " sequences)");
  *text_out = runtime->last_sequences[index].text.c_str();
  if (stopped) *stopped = runtime->last_sequences[index].stopped ? 1 : 0;
  return LOOM_OK;
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
