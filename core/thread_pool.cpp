#include "thread_pool.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace loom::detail {

namespace {

// Spins this many rounds on a value before sleeping on it: a decode step runs dozens of short
// jobs back to back, and a futex wake costs more than most of them.
constexpr int kSpinRounds = 4000;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Waits until `a` no longer holds `old`: a bounded spin, then an atomic wait.
template <class T> void wait_change(const std::atomic<T> &a, T old) {
  for (int i = 0; i < kSpinRounds; ++i) {
    if (a.load(std::memory_order_acquire) != old) return;
    cpu_relax();
  }
  while (a.load(std::memory_order_acquire) == old) a.wait(old, std::memory_order_acquire);
}

} // namespace

int32_t ThreadPool::resolve(int32_t threads) {
  if (threads > 0) return threads;
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int32_t>(hw);
}

ThreadPool::ThreadPool(int32_t threads) {
  const int32_t total = resolve(threads);
  workers_.reserve(static_cast<size_t>(total - 1));
  for (int32_t i = 1; i < total; ++i) workers_.emplace_back([this](std::stop_token stop) { worker_main(stop); });
}

ThreadPool::~ThreadPool() {
  for (auto &w : workers_) w.request_stop();
  job_.fetch_add(2, std::memory_order_seq_cst); // still even (closed): wakes the workers
  job_.notify_all();
  workers_.clear(); // joins
}

void ThreadPool::work() {
  int64_t finished = 0;
  for (int64_t i = next_.fetch_add(1, std::memory_order_relaxed); i < n_; i = next_.fetch_add(1, std::memory_order_relaxed)) {
    fn_(ctx_, i);
    ++finished;
  }
  if (finished > 0 && done_.fetch_add(finished, std::memory_order_acq_rel) + finished == n_) done_.notify_one();
}

void ThreadPool::dispatch(int64_t n, TaskFn fn, void *ctx) {
  fn_ = fn;
  ctx_ = ctx;
  n_ = n;
  next_.store(0, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  job_.fetch_add(1, std::memory_order_seq_cst); // odd: open; publishes the job's fields
  job_.notify_all();
  work();
  for (int64_t d = done_.load(std::memory_order_acquire); d != n; d = done_.load(std::memory_order_acquire))
    wait_change(done_, d);
  // Close the job, then wait for the workers that joined it: they may still be between claiming
  // an index past the end and leaving, and must not see the next job's fields half written.
  job_.fetch_add(1, std::memory_order_seq_cst); // even: closed
  for (int32_t a = active_.load(std::memory_order_seq_cst); a != 0; a = active_.load(std::memory_order_seq_cst))
    wait_change(active_, a);
}

void ThreadPool::worker_main(std::stop_token stop) {
  uint64_t seen = 0;
  for (;;) {
    wait_change(job_, seen);
    // The job first, then the stop: the destructor requests the stop and then bumps job_, so a
    // worker that reads the bumped value also sees the stop. (Checked the other way round, a
    // worker woken by the last job's close could miss a stop requested just after its check,
    // then read the destructor's bump as its new `seen` and sleep on it for good: a hung join.)
    seen = job_.load(std::memory_order_seq_cst);
    if (stop.stop_requested()) return;
    if ((seen & 1) == 0) continue; // closed before this worker woke
    // Join: counted first, then the job checked again (both sequentially consistent, against
    // dispatch's close-then-check), so that the caller either waits for this worker or this
    // worker sees the job closed and reads none of its fields.
    active_.fetch_add(1, std::memory_order_seq_cst);
    if (job_.load(std::memory_order_seq_cst) == seen) work();
    if (active_.fetch_sub(1, std::memory_order_seq_cst) == 1) active_.notify_one();
  }
}

} // namespace loom::detail
