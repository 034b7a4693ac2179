// loom::RequestQueue: requests that arrive while a runtime serves (Runtime::serve). Producers on
// any thread submit requests; the serving thread takes them between steps, so a request joins
// the running batch at the next step, and each one leaves the batch when it ends.
//
// Ownership: the queue owns requests until the server takes them; a request's callbacks are
// called on the serving thread, never concurrently with each other. Thread-safety: submit() and
// close() from any thread; take() from the serving thread only.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "loom/core/runtime.hpp"

namespace loom {

struct ServeRequest {
  std::vector<int32_t> prompt; // token ids, at least one
  int64_t max_new_tokens = 16; // it ends after this many (or at a stop token or string)
  // [PEFT] which adapter it runs with: unset, every adapter of the pipeline (as a manifest's run
  // applies them); "" the base model alone; else one adapter by its slot ("adapter[1]", or its
  // `name`, also one loaded by Runtime::load_adapter). Rows with different adapters run in the
  // same batch. A name that is not loaded (or is being unloaded) refuses the request.
  std::optional<std::string> adapter;
  // After each generated token: its index in the request's output and the token. Returning false
  // cancels the request (it ends at once). Optional.
  std::function<bool(int64_t index, int32_t token)> on_token;
  // Once, when the request ends (stopped, at max_new_tokens, cancelled, or refused: then
  // `error` says why and the result is empty). Optional.
  std::function<void(const SequenceResult &result, const std::string &error)> on_done;
};

class RequestQueue {
 public:
  // Queues a request and returns its id (0, 1, 2, ... in submission order). Throws loom::Error
  // after close().
  int64_t submit(ServeRequest request);
  // No more requests: serve() returns once every submitted request has ended.
  void close();
  // Serving side: moves the pending requests into `out`. With `wait`, blocks until there is one,
  // the queue is closed, or 100 ms passed. Returns false when the queue is closed and nothing was
  // pending.
  bool take(std::vector<std::pair<int64_t, ServeRequest>> &out, bool wait);

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::pair<int64_t, ServeRequest>> pending_;
  int64_t next_id_ = 0;
  bool closed_ = false;
};

} // namespace loom
