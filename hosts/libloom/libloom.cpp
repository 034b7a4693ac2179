// The C embedding API over loom::Runtime. No exception crosses this boundary.
#include "loom/loom.h"

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "loom/core/error.hpp"
#include "loom/core/request_queue.hpp"
#include "loom/core/runtime.hpp"
#include "stream_text.hpp"

struct loom_runtime {
  std::unique_ptr<loom::Runtime> runtime;
  std::vector<loom::SequenceResult> last_sequences; // of the last completed run
  std::mutex generating;                            // generate, chat and embed: one at a time
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

// The options a caller passed, as far as its struct_size reaches; the defaults beyond.
loom_generate_options read_options(const loom_generate_options *given) {
  loom_generate_options o{};
  o.struct_size = sizeof o;
  if (given == nullptr) return o;
  if (given->struct_size < offsetof(loom_generate_options, max_tokens) + sizeof(int64_t))
    throw loom::runtime_error("loom_generate_options.struct_size is " + std::to_string(given->struct_size) +
                              ": set it to sizeof(loom_generate_options)");
  std::memcpy(&o, given, std::min(given->struct_size, sizeof o));
  o.struct_size = sizeof o;
  return o;
}

std::string number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

// Samples per call of loom_runtime_generate_n / loom_runtime_chat_n (as run.n).
constexpr size_t kMaxSamples = 64;

// Streams sample `sample`'s new text; returns non-zero to stop that sample.
using SampleText = std::function<int32_t(size_t sample, const char *piece, size_t length)>;

// `n` samples of `prompt` through Runtime::serve on this thread, in one batch, as the options
// say: sample j draws with nth_sample_seed(seed, j) (seed: the options' or loom.seed), so sample
// 0 is the single generation's. Writes each sample's text to texts_out[j] and its stop flag to
// stopped_out[j] (each array may be NULL).
loom_status generate_samples(loom_runtime *rt, const std::vector<int32_t> &prompt, const loom_generate_options *given,
                             size_t n, const SampleText &on_text, char **texts_out, int32_t *stopped_out) {
  std::lock_guard lock(rt->generating);
  loom::Runtime &runtime = *rt->runtime;
  const loom_generate_options o = read_options(given);
  if (o.max_tokens < 0) throw loom::runtime_error("loom_generate_options.max_tokens is negative");
  if (o.stop == nullptr && o.stop_count > 0) throw loom::runtime_error("loom_generate_options.stop is NULL with stop_count > 0");
  loom::ServeRequest r;
  r.max_new_tokens = o.max_tokens == 0 ? 256 : o.max_tokens;
  r.stop = std::vector<std::string>();
  for (size_t i = 0; i < o.stop_count; ++i) {
    if (o.stop[i] == nullptr || o.stop[i][0] == '\0') throw loom::runtime_error("loom_generate_options.stop[" + std::to_string(i) + "] is empty");
    r.stop->push_back(o.stop[i]);
  }
  if (o.min_tokens < 0 || o.min_tokens > r.max_new_tokens)
    throw loom::runtime_error("loom_generate_options.min_tokens must be in [0, max_tokens]");
  r.min_tokens = o.min_tokens;
  r.ignore_stop_tokens = o.ignore_eos != 0;
  if (o.use_sampling) {
    if (!(o.temperature >= 0.0 && o.temperature <= 100.0)) throw loom::runtime_error("loom_generate_options.temperature must be in [0, 100]");
    if (!(o.top_p >= 0.0 && o.top_p <= 1.0)) throw loom::runtime_error("loom_generate_options.top_p must be in [0, 1]");
    if (o.top_k < 0) throw loom::runtime_error("loom_generate_options.top_k must be >= 0");
    if (!(o.min_p >= 0.0 && o.min_p <= 1.0)) throw loom::runtime_error("loom_generate_options.min_p must be in [0, 1]");
    if (!(o.repetition_penalty >= 0.0 && o.repetition_penalty <= 100.0))
      throw loom::runtime_error("loom_generate_options.repetition_penalty must be in [0, 100] (0 or 1: off)");
    std::vector<std::string> chain;
    if (o.repetition_penalty != 0.0 && o.repetition_penalty != 1.0)
      chain.push_back("use = \"repetition-penalty\"\npenalty = " + number(o.repetition_penalty));
    if (o.temperature == 0.0) {
      chain.push_back("use = \"greedy\"");
    } else {
      chain.push_back("use = \"temperature\"\nt = " + number(o.temperature));
      if (o.top_k > 0) chain.push_back("use = \"top-k\"\nk = " + std::to_string(o.top_k));
      if (o.top_p > 0.0 && o.top_p < 1.0) chain.push_back("use = \"top-p\"\np = " + number(o.top_p));
      if (o.min_p > 0.0) chain.push_back("use = \"min-p\"\np = " + number(o.min_p));
      chain.push_back("use = \"dist\"");
    }
    r.samplers = runtime.make_samplers(chain, "loom_generate_options"); // shared by the samples: one sampling call
  }
  const int64_t positions = static_cast<int64_t>(prompt.size()) + r.max_new_tokens;
  if (positions > runtime.max_positions())
    throw loom::runtime_error("the prompt's " + std::to_string(prompt.size()) + " tokens and max_tokens " +
                              std::to_string(r.max_new_tokens) + " exceed the model's " + std::to_string(runtime.max_positions()) +
                              " positions");
  r.prompt = prompt;
  const uint64_t seed = o.use_seed ? o.seed : runtime.manifest().seed;
  // Streamed text: what each sample adds, less a tail that could still begin a stop string or
  // finish a character cut between tokens (the rule loom serve streams by).
  struct Sample {
    std::vector<int32_t> tokens;
    loom::ContinuationCache text; // the text of `tokens` so far (on_token decodes only the last ones)
    size_t sent = 0;
    bool stop_asked = false;
    loom::SequenceResult result;
    std::string refused;
  };
  std::vector<Sample> samples(n);
  const std::vector<std::string> stops = *r.stop;
  loom::RequestQueue queue;
  for (size_t j = 0; j < n; ++j) {
    loom::ServeRequest sr = r;
    sr.seed = loom::nth_sample_seed(seed, static_cast<int64_t>(j));
    Sample &s = samples[j];
    if (on_text && runtime.has_tokenizer())
      sr.on_token = [&, j](int64_t, int32_t token) {
        s.tokens.push_back(token);
        const std::string text = runtime.continuation(prompt, s.tokens, stops, nullptr, r.min_tokens, &s.text);
        const size_t safe = loom::server::streamable_prefix(text, stops);
        if (safe > s.sent) {
          if (on_text(j, text.data() + s.sent, safe - s.sent) != 0) s.stop_asked = true;
          s.sent = safe;
        }
        return !s.stop_asked;
      };
    sr.on_done = [&s](const loom::SequenceResult &out, const std::string &error) {
      s.result = out;
      s.refused = error;
    };
    queue.submit(std::move(sr));
  }
  queue.close();
  runtime.serve(queue, positions);
  for (const Sample &s : samples)
    if (!s.refused.empty()) throw loom::runtime_error(s.refused);
  bool cancelled = false;
  for (size_t j = 0; j < n; ++j) {
    const Sample &s = samples[j];
    if (on_text && s.result.text.size() > s.sent && !s.stop_asked) on_text(j, s.result.text.data() + s.sent, s.result.text.size() - s.sent);
    if (stopped_out) stopped_out[j] = s.result.stopped ? 1 : 0;
    cancelled = cancelled || (s.result.cancelled && !s.stop_asked);
  }
  if (texts_out) {
    for (size_t j = 0; j < n; ++j) {
      const std::string &text = samples[j].result.text;
      char *copy = static_cast<char *>(std::malloc(text.size() + 1));
      if (copy == nullptr) {
        for (size_t k = 0; k < j; ++k) {
          std::free(texts_out[k]);
          texts_out[k] = nullptr;
        }
        throw std::bad_alloc();
      }
      std::memcpy(copy, text.c_str(), text.size() + 1);
      texts_out[j] = copy;
    }
  }
  return cancelled ? fail(LOOM_ERR_CANCELLED, "the generation was cancelled") : LOOM_OK;
}

// A single generation: sample 0 of generate_samples.
loom_status generate_one(loom_runtime *rt, const std::vector<int32_t> &prompt, const loom_generate_options *options,
                         loom_text_fn on_text, void *user, char **text_out, int32_t *stopped) {
  SampleText text;
  if (on_text) text = [&](size_t, const char *piece, size_t length) { return on_text(user, piece, length); };
  return generate_samples(rt, prompt, options, 1, text, text_out, stopped);
}

// Checks n and clears the outputs of the _n entry points.
void start_samples(const char *what, size_t n, char **texts_out) {
  if (n < 1 || n > kMaxSamples)
    throw loom::runtime_error(std::string(what) + ": n is " + std::to_string(n) + ", outside 1 to " + std::to_string(kMaxSamples),
                              LOOM_ERR_INVALID_ARGUMENT);
  if (texts_out)
    for (size_t j = 0; j < n; ++j) texts_out[j] = nullptr;
}

SampleText sample_text(loom_sample_text_fn on_text, void *user) {
  if (!on_text) return {};
  return [on_text, user](size_t j, const char *piece, size_t length) { return on_text(user, j, piece, length); };
}

// A conversation's token ids (loom_runtime_chat and loom_runtime_chat_n).
std::vector<int32_t> chat_ids(loom::Runtime &runtime, const loom_chat_message *messages, size_t count, const char *what) {
  std::vector<std::pair<std::string, std::string>> chat;
  for (size_t i = 0; i < count; ++i) {
    if (messages[i].role == nullptr || messages[i].content == nullptr)
      throw loom::runtime_error(std::string(what) + ": messages[" + std::to_string(i) + "] has a NULL role or content",
                                LOOM_ERR_INVALID_ARGUMENT);
    chat.emplace_back(messages[i].role, messages[i].content);
  }
  return runtime.encode_messages(chat, "messages");
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

loom_status loom_runtime_generate(loom_runtime *runtime, const char *prompt, const loom_generate_options *options,
                                  loom_text_fn on_text, void *user, char **text_out, int32_t *stopped) {
  last_error.clear();
  if (text_out) *text_out = nullptr;
  if (runtime == nullptr || prompt == nullptr) return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_generate: NULL argument");
  try {
    return generate_one(runtime, runtime->runtime->encode_text(prompt, "prompt"), options, on_text, user, text_out, stopped);
  } catch (...) {
    return from_exception();
  }
}

loom_status loom_runtime_chat(loom_runtime *runtime, const loom_chat_message *messages, size_t count,
                              const loom_generate_options *options, loom_text_fn on_text, void *user, char **text_out,
                              int32_t *stopped) {
  last_error.clear();
  if (text_out) *text_out = nullptr;
  if (runtime == nullptr || messages == nullptr || count == 0)
    return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_chat: NULL argument or no messages");
  try {
    return generate_one(runtime, chat_ids(*runtime->runtime, messages, count, "loom_runtime_chat"), options, on_text, user,
                        text_out, stopped);
  } catch (...) {
    return from_exception();
  }
}

loom_status loom_runtime_generate_n(loom_runtime *runtime, const char *prompt, const loom_generate_options *options, size_t n,
                                    loom_sample_text_fn on_text, void *user, char **texts_out, int32_t *stopped_out) {
  last_error.clear();
  if (runtime == nullptr || prompt == nullptr) return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_generate_n: NULL argument");
  try {
    start_samples("loom_runtime_generate_n", n, texts_out);
    return generate_samples(runtime, runtime->runtime->encode_text(prompt, "prompt"), options, n, sample_text(on_text, user),
                            texts_out, stopped_out);
  } catch (...) {
    return from_exception();
  }
}

loom_status loom_runtime_chat_n(loom_runtime *runtime, const loom_chat_message *messages, size_t count,
                                const loom_generate_options *options, size_t n, loom_sample_text_fn on_text, void *user,
                                char **texts_out, int32_t *stopped_out) {
  last_error.clear();
  if (runtime == nullptr || messages == nullptr || count == 0)
    return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_chat_n: NULL argument or no messages");
  try {
    start_samples("loom_runtime_chat_n", n, texts_out);
    return generate_samples(runtime, chat_ids(*runtime->runtime, messages, count, "loom_runtime_chat_n"), options, n,
                            sample_text(on_text, user), texts_out, stopped_out);
  } catch (...) {
    return from_exception();
  }
}

loom_status loom_runtime_embed(loom_runtime *runtime, const char *const *texts, size_t count, float *out, size_t capacity,
                               size_t *dim) {
  last_error.clear();
  if (runtime == nullptr || texts == nullptr || dim == nullptr || count == 0 || (out == nullptr && capacity > 0))
    return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_embed: NULL argument or no texts");
  try {
    std::vector<std::string> in;
    for (size_t i = 0; i < count; ++i) {
      if (texts[i] == nullptr) return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_embed: texts[" + std::to_string(i) + "] is NULL");
      in.emplace_back(texts[i]);
    }
    std::lock_guard lock(runtime->generating);
    const auto vectors = runtime->runtime->embed(in, false);
    *dim = vectors.empty() ? 0 : vectors[0].size();
    if (capacity < count * *dim)
      return fail(LOOM_ERR_INVALID_ARGUMENT, "loom_runtime_embed: room for " + std::to_string(capacity) + " floats, " +
                                                 std::to_string(count * *dim) + " needed (" + std::to_string(*dim) + " per text)");
    for (size_t i = 0; i < count; ++i) std::copy(vectors[i].begin(), vectors[i].end(), out + i * *dim);
    return LOOM_OK;
  } catch (...) {
    return from_exception();
  }
}

void loom_free_string(char *text) { std::free(text); }

void loom_runtime_destroy(loom_runtime *runtime) { delete runtime; }

} // extern "C"
