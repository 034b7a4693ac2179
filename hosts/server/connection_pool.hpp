// The HTTP server's connection threads: cpp-httplib serves each connection on one thread for as
// long as it stays open (keep-alive included), so a fixed pool of N threads is starved by N idle
// sockets. This pool starts a thread whenever a connection arrives and none is idle, up to
// `max_threads`; a thread idle for `idle_exit` seconds ends. Connections beyond max_threads wait
// for a thread (the server's read timeout bounds how long an idle one holds it).
// Thread-safety: enqueue() from httplib's accept thread; shutdown() once, from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <list>
#include <mutex>
#include <thread>
#include <vector>

#include <httplib.h>

namespace loom::server {

class ConnectionPool final : public httplib::TaskQueue {
 public:
  explicit ConnectionPool(size_t max_threads, std::chrono::seconds idle_exit = std::chrono::seconds(30))
      : max_threads_(max_threads), idle_exit_(idle_exit) {}
  ~ConnectionPool() override { shutdown(); }

  void enqueue(std::function<void()> fn) override {
    std::lock_guard lock(mutex_);
    if (stopping_) return;
    jobs_.push_back(std::move(fn));
    reap();
    if (idle_ == 0 && threads_ < max_threads_) {
      ++threads_;
      workers_.emplace_back();
      const auto it = std::prev(workers_.end());
      *it = std::thread([this, it] { work(it); });
    }
    ready_.notify_one();
  }

  void shutdown() override {
    std::list<std::thread> workers;
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      workers.swap(workers_);
      finished_.clear();
    }
    ready_.notify_all();
    for (auto &t : workers)
      if (t.joinable()) t.join();
  }

  size_t threads() const {
    std::lock_guard lock(mutex_);
    return threads_;
  }

 private:
  // Joins the threads that ended (each returns right after it listed itself, under the lock).
  void reap() {
    for (auto it : finished_) {
      it->join();
      workers_.erase(it);
    }
    finished_.clear();
  }

  void work(std::list<std::thread>::iterator self) {
    std::unique_lock lock(mutex_);
    while (true) {
      ++idle_;
      const bool woke = ready_.wait_for(lock, idle_exit_, [&] { return stopping_ || !jobs_.empty(); });
      --idle_;
      if (jobs_.empty() && (stopping_ || !woke)) break; // idle too long, or shutting down
      std::function<void()> job = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      job();
      lock.lock();
    }
    --threads_;
    if (!stopping_) finished_.push_back(self); // joined by the next enqueue (at shutdown: by shutdown)
  }

  const size_t max_threads_;
  const std::chrono::seconds idle_exit_;
  mutable std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> jobs_;
  std::list<std::thread> workers_;
  std::vector<std::list<std::thread>::iterator> finished_;
  size_t threads_ = 0, idle_ = 0;
  bool stopping_ = false;
};

} // namespace loom::server
