#include "loom/core/request_queue.hpp"

#include <chrono>

#include "loom/core/error.hpp"

namespace loom {

int64_t RequestQueue::submit(ServeRequest request) {
  std::lock_guard lock(mutex_);
  if (closed_) throw runtime_error("request queue: submit after close()");
  const int64_t id = next_id_++;
  pending_.emplace_back(id, std::move(request));
  ready_.notify_one();
  return id;
}

void RequestQueue::close() {
  std::lock_guard lock(mutex_);
  closed_ = true;
  ready_.notify_all();
}

bool RequestQueue::take(std::vector<std::pair<int64_t, ServeRequest>> &out, bool wait) {
  std::unique_lock lock(mutex_);
  // A bounded wait: the server looks at its cancel flag between waits.
  if (wait) ready_.wait_for(lock, std::chrono::milliseconds(100), [&] { return !pending_.empty() || closed_; });
  if (pending_.empty()) return !closed_;
  while (!pending_.empty()) {
    out.push_back(std::move(pending_.front()));
    pending_.pop_front();
  }
  return true;
}

} // namespace loom
