// Private to core: data parallel training ([Parallel]) over a parallel component's collectives.
// loom::train (training_run.cpp) gives each data rank its share of every micro-batch (sequence
// i goes to rank i mod size), and this class makes the replicas' gradients the whole batch's:
//
// - Gradients are all-reduced (summed: each rank's are already scaled by 1 / the global batch)
//   in buckets of the strategy's bucket_bytes, in the order the backward pass finishes them
//   (the last layer first). On the CPU engine, with overlap on, a bucket goes to a
//   communication thread as soon as the step's last backward pass has finished its layers,
//   while the pass goes on with earlier layers; otherwise (and on CUDA, where the gradients are
//   one flat device array reduced in one call) after the backward pass.
// - ZeRO stage 1 (zero_stage = 1): the parameters are split into contiguous shares
//   of about equal size, one per data rank; a rank keeps AdamW moments for its share only,
//   updates only it, and broadcasts the updated values to the other ranks.
//
// Ownership: holds references to the parallel instance and the engine, which must outlive it.
// Thread-safety: one caller; the communication thread it starts is the only other user of the
// parallel instance while gradients are in flight, and finish_gradients() waits for it.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "loom/core/instance.hpp"
#include "parallel_calls.hpp"
#include "training_engine.hpp"

namespace loom {

class DataParallel {
 public:
  DataParallel(Instance &parallel, TrainingEngine &engine);
  ~DataParallel();
  DataParallel(const DataParallel &) = delete;
  DataParallel &operator=(const DataParallel &) = delete;

  int32_t rank() const { return topo_.data_rank; }
  int32_t size() const { return topo_.data_size; }
  bool writes() const { return topo_.world_rank == 0; }  // the rank that writes logs and checkpoints
  int32_t zero_stage() const { return training_.zero_stage; }
  std::string describe() const;

  // This rank's sequences of a micro-batch.
  std::vector<std::vector<int32_t>> share(const std::vector<std::vector<int32_t>> &batch) const;
  // Forward and backward of this rank's share; `last`: the step's last micro-batch (its backward
  // finishes the gradients). Returns the engine's sum of mean losses times grad_scale.
  double run(std::span<const std::vector<int32_t>> mine, double grad_scale, bool last);
  // The gradients summed over the data ranks, on every rank (waits for the buckets in flight).
  void finish_gradients();
  // A value summed over the data ranks.
  double sum(double local);
  // AdamW on this rank's share (every parameter without ZeRO), then the updated values shared.
  void optimizer_step(double lr);
  // The whole optimizer state on every rank (ZeRO shards gathered), for a checkpoint.
  void gather_moments(std::vector<std::vector<float>> &m, std::vector<std::vector<float>> &v);

 private:
  void all_reduce(std::span<float> values, DLDevice device);
  void broadcast(std::span<float> values, DLDevice device, int32_t owner);
  void layer_done(int64_t layer);
  void launch_ready_buckets();
  void reduce_bucket(size_t b);
  void communicate();  // the communication thread's loop

  Instance &parallel_;
  ParallelCalls calls_;
  TrainingEngine &engine_;
  loom_parallel_topology topo_{};
  loom_parallel_training training_{};
  DLDevice device_{};
  std::vector<std::span<float>> grads_;
  std::vector<int64_t> layer_of_;          // per parameter: its decoder layer, -1 for the others
  std::vector<std::vector<size_t>> buckets_;  // parameter indices, in the order they are finished
  std::vector<int32_t> owner_;             // per parameter: the data rank holding its moments (ZeRO-1)
  std::vector<float> flat_;                // one bucket's gradients, host side (communication thread)
  bool overlap_ = false;
  // Within the step's last backward pass (main thread): layers finished so far, buckets handed on.
  std::vector<bool> ready_;
  size_t next_bucket_ = 0;
  bool armed_ = false;
  // The communication thread's queue of bucket indices.
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable wake_, idle_;
  std::deque<size_t> queue_;
  size_t in_flight_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace loom
