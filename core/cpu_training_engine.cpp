// The CPU's TrainingEngine: DecoderTrainer<float> and AdamW<float> (decoder_trainer.hpp), and,
// in builds without CUDA, the refusal of the CUDA engine.
#include <cmath>
#include <thread>

#include "loom/core/error.hpp"
#include "loom/loom_plugin_api.h"
#include "tensor_shards.hpp"
#include "thread_pool.hpp"
#include "training_engine.hpp"

namespace loom {

namespace {

class CpuTrainingEngine final : public TrainingEngine {
 public:
  CpuTrainingEngine(const ModelConfig &config, const ModelWeights &weights, const TrainEngineOptions &options)
      : trainer_(config, weights), opt_(options.adamw), threads_(detail::ThreadPool::resolve(options.threads)),
        quantized_(options.quantizer != nullptr) {
    trainer_.set_recompute(options.recompute);
    trainer_.set_threads(options.threads);
    if (options.tensor != nullptr && options.tensor->size() > 1) {
      if (!options.adapters.empty()) throw runtime_error("training: tensor parallel training of adapters is not supported yet");
      tensor_ = options.tensor;
      const TensorShards *shards = tensor_;
      trainer_.set_tensor_group({shards->vocab_begin(), config.vocab_size * shards->size(),
                                 [shards](float *data, size_t count, bool max) { shards->all_reduce(data, count, max); }});
    }
    if (options.adapters.empty()) return;
    trainer_.attach_adapters(options.adapters);
    trainer_.set_frozen_base(true);
    if (options.quantizer) trainer_.quantize_base(options.quantizer);
    for (const auto &adapter : options.adapters) {
      loom_tensor_sink sink{};
      sink.struct_size = sizeof(sink);
      sink.user = this;
      sink.put = [](void *user, const char *name, DLTensor *tensor, DLTensor *grad) -> loom_status {
        auto *self = static_cast<CpuTrainingEngine *>(user);
        if (tensor == nullptr || grad == nullptr || tensor->dtype.code != kDLFloat || tensor->dtype.bits != 32)
          return LOOM_ERR_INVALID_ARGUMENT;
        size_t n = 1;
        TrainParam<float> p;
        p.name = name;
        for (int i = 0; i < tensor->ndim; ++i) {
          n *= static_cast<size_t>(tensor->shape[i]);
          p.shape.push_back(tensor->shape[i]);
        }
        self->views_.push_back({static_cast<float *>(tensor->data), static_cast<float *>(grad->data), n, tensor->ndim >= 2});
        self->adapter_params_.push_back(std::move(p));
        return LOOM_OK;
      };
      adapter->check(adapter->vtable<loom_adapter_vtable>()->parameters(adapter->handle(), &sink), "parameters");
    }
  }
  std::string describe() const override {
    return "cpu float32 x" + std::to_string(threads_) + " threads" +
           (views_.empty() ? "" : quantized_ ? ", adapters only (base frozen, quantized)" : ", adapters only (base frozen)");
  }
  void zero_grad() override {
    trainer_.zero_grad();
    for (const auto &v : views_) std::fill(v.grad, v.grad + v.size, 0.0f);
  }
  double run(std::span<const std::vector<int32_t>> batch, bool backward, double grad_scale) override {
    double sum = 0;
    for (const auto &seq : batch) sum += trainer_.loss(seq, backward, grad_scale);
    return sum;
  }
  double clip_grad_norm(double max_norm) override {
    if (tensor_ == nullptr)
      return views_.empty() ? loom::clip_grad_norm(trainer_.params(), max_norm) : loom::clip_grad_norm(views_, max_norm);
    // Tensor parallel: the split parameters' squares summed over the group, the replicated ones
    // (the same on every rank) counted once.
    double split = 0, replicated = 0;
    for (const auto &p : trainer_.params()) {
      double sq = 0;
      for (const float g : p.grad) sq += static_cast<double>(g) * static_cast<double>(g);
      (tensor_->split(p.name) ? split : replicated) += sq;
    }
    tensor_->all_reduce(&split, 1);
    const double norm = std::sqrt(split + replicated);
    if (norm > max_norm && norm > 0) {
      const auto scale = static_cast<float>(max_norm / (norm + 1e-6));
      for (auto &p : trainer_.params())
        for (float &g : p.grad) g *= scale;
    }
    return norm;
  }
  void optimizer_step(double lr) override {
    if (views_.empty()) opt_.step(trainer_.params(), lr);
    else opt_.step(views_, lr);
  }
  int64_t optimizer_steps() const override { return opt_.steps(); }
  const std::vector<TrainParam<float>> &host_params() override {
    if (views_.empty()) return trainer_.params();
    for (size_t i = 0; i < views_.size(); ++i) adapter_params_[i].value.assign(views_[i].value, views_[i].value + views_[i].size);
    return adapter_params_;
  }
  std::vector<std::vector<float>> host_grads() override {
    std::vector<std::vector<float>> g;
    if (views_.empty())
      for (const auto &p : trainer_.params()) g.push_back(p.grad);
    else
      for (const auto &v : views_) g.emplace_back(v.grad, v.grad + v.size);
    return g;
  }
  void host_moments(std::vector<std::vector<float>> &m, std::vector<std::vector<float>> &v) override {
    m = opt_.first_moments();
    v = opt_.second_moments();
  }
  void restore_optimizer(int64_t steps, std::vector<std::vector<float>> m, std::vector<std::vector<float>> v) override {
    opt_.restore(steps, std::move(m), std::move(v));
  }
  void restore_params(const std::vector<TrainParam<float>> &values) override {
    if (views_.empty()) throw runtime_error("training: restore_params is for adapters");
    if (values.size() != views_.size()) throw runtime_error("training: the checkpoint's adapter has other parameters");
    for (size_t i = 0; i < views_.size(); ++i) {
      if (values[i].value.size() != views_[i].size)
        throw runtime_error("training: the checkpoint's " + values[i].name + " has the wrong size");
      std::copy(values[i].value.begin(), values[i].value.end(), views_[i].value);
    }
  }
  DLDevice device() const override { return {kDLCPU, 0}; }
  std::vector<std::span<float>> grad_views() override { return spans(&TrainParam<float>::grad, &ParamView<float>::grad); }
  std::vector<std::span<float>> value_views() override { return spans(&TrainParam<float>::value, &ParamView<float>::value); }
  bool set_layer_hook(std::function<void(int64_t)> hook) override {
    trainer_.set_layer_hook(std::move(hook));
    return true;
  }
  void set_optimizer_shard(std::vector<bool> owned) override { opt_.set_owned(std::move(owned)); }

 private:
  // The trained parameters' values or gradients: the model's, or the adapters' when training them.
  std::vector<std::span<float>> spans(std::vector<float> TrainParam<float>::*own, float *ParamView<float>::*adapter) {
    std::vector<std::span<float>> out;
    if (views_.empty())
      for (auto &p : trainer_.params()) out.emplace_back(p.*own);
    else
      for (const auto &v : views_) out.emplace_back(v.*adapter, v.size);
    return out;
  }
  DecoderTrainer<float> trainer_;
  AdamW<float> opt_;
  int32_t threads_;
  bool quantized_;
  const TensorShards *tensor_ = nullptr;  // tensor parallel: this rank's group
  std::vector<ParamView<float>> views_;          // the adapters' parameters, when training adapters
  std::vector<TrainParam<float>> adapter_params_;  // their names and shapes (values copied on request)
};

}  // namespace

std::unique_ptr<TrainingEngine> make_cpu_training_engine(const ModelConfig &config, const ModelWeights &weights,
                                                         const TrainEngineOptions &options) {
  return std::make_unique<CpuTrainingEngine>(config, weights, options);
}

#if !LOOM_HAVE_CUDA
std::unique_ptr<TrainingEngine> make_cuda_training_engine(const ModelConfig &, const ModelWeights &,
                                                          const TrainEngineOptions &) {
  throw runtime_error("training on CUDA: this build has no CUDA");
}
#endif

}  // namespace loom
