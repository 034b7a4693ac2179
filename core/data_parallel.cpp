#include "data_parallel.hpp"

#include <algorithm>
#include <string_view>

#include "loom/core/error.hpp"
#include "decoder_layout.hpp"
#include "loom/core/host_context.hpp"

namespace loom {

DataParallel::DataParallel(Instance &parallel, TrainingEngine &engine)
    : parallel_(parallel), calls_(parallel), engine_(engine), topo_(calls_.topology()) {
  training_ = {sizeof(loom_parallel_training), 0, 25 << 20, 1};
  if (const auto *ext = parallel_.extension<loom_parallel_training_ext>(LOOM_PARALLEL_TRAINING_EXTENSION);
      ext != nullptr && ext->training != nullptr)
    parallel_.check(ext->training(parallel_.handle(), &training_), "training");
  device_ = engine_.device();
  grads_ = engine_.grad_views();
  const bool cuda = device_.device_type == kDLCUDA;

  // Every rank must hold the same parameters: their count and total size agree.
  int64_t total = 0;
  for (const auto &g : grads_) total += static_cast<int64_t>(g.size());
  for (loom_reduce_op op : {LOOM_REDUCE_MAX, LOOM_REDUCE_MIN}) {
    int64_t check[2] = {static_cast<int64_t>(grads_.size()), total};
    calls_.all_reduce(LOOM_GROUP_DATA, check, 2, op);
    if (check[0] != static_cast<int64_t>(grads_.size()) || check[1] != total)
      throw runtime_error("loom train: the data parallel ranks hold different models (parameter counts or sizes differ)");
  }

  if (training_.zero_stage == 1) {
    // Contiguous shares of about total / size elements: a parameter goes to the rank whose share
    // holds its middle.
    owner_.resize(grads_.size());
    std::vector<bool> mine(grads_.size());
    int64_t before = 0;
    for (size_t i = 0; i < grads_.size(); ++i) {
      const int64_t mid = before + static_cast<int64_t>(grads_[i].size()) / 2;
      owner_[i] = static_cast<int32_t>(std::min<int64_t>(topo_.data_size - 1, mid * topo_.data_size / std::max<int64_t>(total, 1)));
      mine[i] = owner_[i] == topo_.data_rank;
      before += static_cast<int64_t>(grads_[i].size());
    }
    engine_.set_optimizer_shard(std::move(mine));
  }
  if (topo_.data_size == 1 || cuda) return;  // CUDA: one flat all-reduce in finish_gradients

  // Buckets in the order the backward pass finishes the parameters: the last layer first, the
  // parameters outside the layers at the end.
  const auto &params = engine_.host_params();
  std::vector<size_t> order(grads_.size());
  layer_of_.resize(grads_.size());
  for (size_t i = 0; i < order.size(); ++i) {
    order[i] = i;
    layer_of_[i] = decoder_layer_of(params[i].name);
  }
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const int64_t la = layer_of_[a] < 0 ? -1 : layer_of_[a], lb = layer_of_[b] < 0 ? -1 : layer_of_[b];
    if ((la < 0) != (lb < 0)) return lb < 0;  // layers before the rest
    return la > lb;
  });
  const size_t bucket_elems = std::max<size_t>(1, static_cast<size_t>(training_.bucket_bytes) / sizeof(float));
  size_t filled = 0;
  for (size_t i : order) {
    if (buckets_.empty() || filled >= bucket_elems) {
      buckets_.emplace_back();
      filled = 0;
    }
    buckets_.back().push_back(i);
    filled += grads_[i].size();
  }
  ready_.assign(grads_.size(), false);
  // Not with pipeline stages: their exchanges run on this thread while buckets would be reduced
  // on the communication thread, and one instance takes one call at a time.
  overlap_ = training_.overlap_backward != 0 && topo_.pipeline_size == 1 &&
             engine_.set_layer_hook([this](int64_t layer) { layer_done(layer); });
  thread_ = std::thread([this] { communicate(); });
}

DataParallel::~DataParallel() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
  engine_.set_layer_hook({});
}

std::string DataParallel::describe() const {
  return "data parallel x" + std::to_string(topo_.data_size) + (training_.zero_stage == 1 ? " (ZeRO-1)" : "") +
         (overlap_ ? ", all-reduce overlapped with backward" : "");
}

std::vector<std::vector<int32_t>> DataParallel::share(const std::vector<std::vector<int32_t>> &batch) const {
  std::vector<std::vector<int32_t>> mine;
  for (size_t i = static_cast<size_t>(topo_.data_rank); i < batch.size(); i += static_cast<size_t>(topo_.data_size))
    mine.push_back(batch[i]);
  return mine;
}

double DataParallel::run(std::span<const std::vector<int32_t>> mine, double grad_scale, bool last) {
  if (!last || !overlap_ || mine.empty()) return engine_.run(mine, true, grad_scale);
  // The last sequence's backward pass finishes the gradients: buckets leave as its layers end.
  double loss = mine.size() > 1 ? engine_.run(mine.first(mine.size() - 1), true, grad_scale) : 0.0;
  armed_ = true;
  try {
    loss += engine_.run(mine.last(1), true, grad_scale);
  } catch (...) {
    armed_ = false;
    throw;
  }
  armed_ = false;
  return loss;
}

void DataParallel::layer_done(int64_t layer) {
  if (!armed_) return;
  for (size_t i = 0; i < ready_.size(); ++i)
    if (layer < 0 || layer_of_[i] == layer) ready_[i] = true;
  launch_ready_buckets();
}

void DataParallel::launch_ready_buckets() {
  while (next_bucket_ < buckets_.size()) {
    const auto &b = buckets_[next_bucket_];
    if (!std::all_of(b.begin(), b.end(), [&](size_t i) { return ready_[i]; })) return;
    {
      std::lock_guard lock(mutex_);
      queue_.push_back(next_bucket_);
      ++in_flight_;
    }
    wake_.notify_one();
    ++next_bucket_;
  }
}

void DataParallel::communicate() {
  for (;;) {
    size_t b = 0;
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping
      b = queue_.front();
      queue_.pop_front();
    }
    std::exception_ptr failure;
    if (!error_) {  // after a failure the peers are gone: do not wait on them again
      try {
        reduce_bucket(b);
      } catch (...) {
        failure = std::current_exception();
      }
    }
    {
      std::lock_guard lock(mutex_);
      if (failure) error_ = failure;
      --in_flight_;
    }
    idle_.notify_all();
  }
}

void DataParallel::reduce_bucket(size_t b) {
  size_t n = 0;
  for (size_t i : buckets_[b]) n += grads_[i].size();
  flat_.resize(n);
  size_t at = 0;
  for (size_t i : buckets_[b]) at = static_cast<size_t>(std::copy(grads_[i].begin(), grads_[i].end(), flat_.begin() + static_cast<std::ptrdiff_t>(at)) - flat_.begin());
  all_reduce(flat_, {kDLCPU, 0});
  at = 0;
  for (size_t i : buckets_[b]) {
    std::copy_n(flat_.begin() + static_cast<std::ptrdiff_t>(at), grads_[i].size(), grads_[i].begin());
    at += grads_[i].size();
  }
}

void DataParallel::finish_gradients() {
  if (device_.device_type == kDLCUDA) {  // also for a world of one: an NCCL communicator of one
    engine_.synchronize();  // the backward pass is on the engine's stream, the collective on the host's
    all_reduce(engine_.flat_grads(), device_);
    std::string error;
    if (!device_synchronize(device_, error)) throw runtime_error("data parallel all-reduce: " + error);
    return;
  }
  if (topo_.data_size == 1) return;
  std::fill(ready_.begin(), ready_.end(), true);
  launch_ready_buckets();
  std::exception_ptr failure;
  {
    std::unique_lock lock(mutex_);
    idle_.wait(lock, [&] { return in_flight_ == 0; });
    failure = error_;
  }
  std::fill(ready_.begin(), ready_.end(), false);
  next_bucket_ = 0;
  if (failure) std::rethrow_exception(failure);
}

void DataParallel::all_reduce(std::span<float> values, DLDevice device) {
  calls_.all_reduce(LOOM_GROUP_DATA, values.data(), values.size(), LOOM_REDUCE_SUM, device);
}

void DataParallel::broadcast(std::span<float> values, DLDevice device, int32_t owner) {
  // The owner's world rank: data ranks are strided by the ranks of one replica.
  const int32_t root = topo_.world_rank + (owner - topo_.data_rank) * (topo_.world_size / topo_.data_size);
  calls_.broadcast(LOOM_GROUP_DATA, values.data(), values.size(), root, device);
}

double DataParallel::sum(double local) {
  if (topo_.data_size == 1) return local;
  calls_.all_reduce(LOOM_GROUP_DATA, &local, 1);
  return local;
}

void DataParallel::optimizer_step(double lr) {
  engine_.optimizer_step(lr);
  if (owner_.empty() || topo_.data_size == 1) return;
  const bool cuda = device_.device_type == kDLCUDA;
  if (cuda) engine_.synchronize();  // the update is on the engine's stream, the broadcasts on the host's
  auto values = engine_.value_views();
  for (size_t i = 0; i < values.size(); ++i) broadcast(values[i], device_, owner_[i]);
  std::string error;
  if (cuda && !device_synchronize(device_, error)) throw runtime_error("ZeRO-1 broadcast: " + error);
}

void DataParallel::gather_moments(std::vector<std::vector<float>> &m, std::vector<std::vector<float>> &v) {
  engine_.host_moments(m, v);
  if (owner_.empty() || topo_.data_size == 1 || m.empty()) return;  // empty: no step yet, on every rank
  for (size_t i = 0; i < m.size(); ++i) {
    m[i].resize(grads_[i].size());
    v[i].resize(grads_[i].size());
    broadcast(m[i], {kDLCPU, 0}, owner_[i]);
    broadcast(v[i], {kDLCPU, 0}, owner_[i]);
  }
}

}  // namespace loom
