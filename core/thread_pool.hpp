// Private to core: a small fork-join thread pool for the CPU backend's row and matrix loops.
//
// run(n, fn) calls fn(i) once for every i in [0, n), on the calling thread and the pool's
// workers, and returns when all calls have returned. Which thread runs which index is not fixed;
// callers that need results independent of the thread count make each index write its own
// outputs with a fixed order of operations (the CPU backend's linears do).
// Idle workers sleep on an atomic wait (a futex on Linux) after a short bounded spin, so an idle
// pool costs no CPU time; the spin only bridges the gap between two consecutive jobs of a step.
// Tasks must not throw (a throwing task terminates the process): they are plain arithmetic.
// Ownership: the pool owns its workers (std::jthread), stopped and joined by the destructor.
// Thread-safety: one thread at a time calls run(); it is not reentrant (a task must not call run).
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <vector>

namespace loom::detail {

class ThreadPool {
 public:
  // `threads` counts the calling thread: 1 = no workers (run() is a plain loop); 0 = one per
  // hardware thread (std::thread::hardware_concurrency(), at least 1).
  explicit ThreadPool(int32_t threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool &) = delete;
  ThreadPool &operator=(const ThreadPool &) = delete;

  int32_t size() const { return static_cast<int32_t>(workers_.size()) + 1; }

  template <class F> void run(int64_t n, F &&fn) {
    if (n <= 0) return;
    if (workers_.empty() || n == 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    using Fn = std::remove_reference_t<F>;
    dispatch(n, [](void *ctx, int64_t i) { (*static_cast<Fn *>(ctx))(i); }, const_cast<void *>(static_cast<const void *>(&fn)));
  }

  // 0 -> hardware threads (at least 1); other values unchanged.
  static int32_t resolve(int32_t threads);

 private:
  using TaskFn = void (*)(void *, int64_t);
  void dispatch(int64_t n, TaskFn fn, void *ctx);
  void work(); // claims and runs tasks of the current job until none is left
  void worker_main(std::stop_token stop);

  // The current job; written by run() while no job is open, read by workers that joined it.
  TaskFn fn_ = nullptr;
  void *ctx_ = nullptr;
  int64_t n_ = 0;
  // job_ is odd while a job is open. A worker joins by counting itself in active_ and seeing the
  // same open job; run() returns once every task is done and every worker that joined has left,
  // so a worker that was asleep or descheduled never holds the caller up unless it runs a task.
  alignas(64) std::atomic<uint64_t> job_{0};
  alignas(64) std::atomic<int64_t> next_{0}; // the next unclaimed index
  alignas(64) std::atomic<int64_t> done_{0}; // tasks finished
  alignas(64) std::atomic<int32_t> active_{0};
  std::vector<std::jthread> workers_;
};

} // namespace loom::detail
