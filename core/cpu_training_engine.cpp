// The CPU's TrainingEngine: DecoderTrainer<float> and AdamW<float> (decoder_trainer.hpp), and,
// in builds without CUDA, the refusal of the CUDA engine.
#include <chrono>
#include <cmath>
#include <thread>

#include "loom/core/error.hpp"
#include "loom/loom_plugin_api.h"
#include "pipeline_stages.hpp"
#include "tensor_shards.hpp"
#include "thread_pool.hpp"
#include "training_engine.hpp"

namespace loom {

namespace {

class CpuTrainingEngine final : public TrainingEngine {
 public:
  CpuTrainingEngine(const ModelConfig &config, const ModelWeights &weights, const TrainEngineOptions &options)
      : trainer_(config, weights, options.pipeline ? options.pipeline->trainer_stage() : DecoderTrainer<float>::Stage{}),
        opt_(options.adamw), threads_(detail::ThreadPool::resolve(options.threads)), quantized_(options.quantizer != nullptr),
        pipeline_(options.pipeline != nullptr && options.pipeline->stages() > 1 ? options.pipeline : nullptr),
        micro_(std::max<int64_t>(1, options.pipeline_micro_batch)) {
    if (pipeline_ && (!options.adapters.empty() || options.tensor))
      throw runtime_error("training: pipeline stages with adapters or tensor parallelism are not supported yet");
    hidden_ = config.hidden_size;
    tied_ = config.architecture == Architecture::gpt2 || config.tie_word_embeddings;
    trainer_.set_recompute(options.recompute);
    trainer_.set_threads(options.threads);
    if (options.tensor != nullptr && options.tensor->size() > 1) {
      if (!options.adapters.empty()) throw runtime_error("training: tensor parallel training of adapters is not supported yet");
      tensor_ = options.tensor;
      const TensorShards *shards = tensor_;
      trainer_.set_tensor_group({shards->vocab_begin(), config.vocab_size * shards->size(),
                                 [shards](float *data, size_t count, bool max) { shards->all_reduce(data, count, max); },
                                 shards->rank() == 0});
    }
    if (options.attention) {
      if (!options.adapters.empty()) throw runtime_error("training: train.attention = \"plugin\" with an adapter is not supported yet");
      trainer_.attach_attention(options.attention);
      attention_ = ", attention by " + options.attention->slot() + " (" + options.attention->desc().name + ")";
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
           (views_.empty() ? "" : quantized_ ? ", adapters only (base frozen, quantized)" : ", adapters only (base frozen)") +
           attention_;
  }
  void zero_grad() override {
    trainer_.zero_grad();
    for (const auto &v : views_) std::fill(v.grad, v.grad + v.size, 0.0f);
  }
  double run(std::span<const std::vector<int32_t>> batch, bool backward, double grad_scale) override {
    if (pipeline_) return run_stages(batch, backward, grad_scale);
    double sum = 0;
    for (const auto &seq : batch) sum += trainer_.loss(seq, backward, grad_scale);
    return sum;
  }
  void reduce_stage_gradients() override {
    // A tied embedding: the first stage's (input) and the last stage's (head) gradients
    // exchanged and added on both, as the CUDA engine does (IEEE addition commutes: both copies
    // stay bit-identical). In place: grad_views() point into it.
    const size_t tied = tied_copy();
    if (tied == SIZE_MAX) return;
    auto &grad = trainer_.params()[tied].grad;
    std::vector<float> other(grad.size());
    const int32_t peer = pipeline_->first() ? pipeline_->stages() - 1 : 0;
    pipeline_->exchange(grad.data(), grad.size(), peer, other.data(), other.size(), peer);
    for (size_t i = 0; i < grad.size(); ++i) grad[i] += other[i];
  }
  double clip_grad_norm(double max_norm) override {
    if (tensor_ == nullptr && pipeline_ == nullptr)
      return views_.empty() ? loom::clip_grad_norm(trainer_.params(), max_norm) : loom::clip_grad_norm(views_, max_norm);
    // The group's parameters are spread over its ranks: the squares of what this rank alone holds
    // are summed over the group (a tensor slice; a pipeline stage's parameters, a tied
    // embedding's once: not the last stage's copy); a replicated tensor-parallel parameter, the
    // same on every rank, counts once.
    double mine = 0, replicated = 0;
    const size_t tied = pipeline_ && pipeline_->last() ? tied_copy() : SIZE_MAX;
    auto &params = trainer_.params();
    for (size_t i = 0; i < params.size(); ++i) {
      if (i == tied) continue;
      double sq = 0;
      for (const float g : params[i].grad) sq += static_cast<double>(g) * static_cast<double>(g);
      (tensor_ && !tensor_->split(params[i].name) ? replicated : mine) += sq;
    }
    if (pipeline_) mine = pipeline_->sum(mine);
    else tensor_->all_reduce(&mine, 1);
    const double norm = std::sqrt(mine + replicated);
    loom::clip_to_norm(params, norm, max_norm);
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
  std::string attention_;  // describe(): the attention component training runs through, if any
  const TensorShards *tensor_ = nullptr;  // tensor parallel: this rank's group
  const PipelineStages *pipeline_ = nullptr;  // pipeline parallel: this rank's stage (of several)
  int64_t micro_ = 1;                         // sequences per pipeline micro-batch

  // The index of the embedding's copy that the first and last stages both hold, SIZE_MAX when
  // there is none (untied, one stage, or a middle stage).
  size_t tied_copy() {
    if (!pipeline_ || !tied_ || !(pipeline_->first() || pipeline_->last())) return SIZE_MAX;
    auto &params = trainer_.params();
    for (size_t i = 0; i < params.size(); ++i)
      if (is_token_embedding(params[i].name)) return i;
    return SIZE_MAX;
  }
  bool tied_ = false;  // the head is the embedding (GPT-2, tie_word_embeddings)

  // 1F1B (PipelineStages::run_1f1b) over micro-batches of k consecutive sequences: host vectors
  // in and out of DecoderTrainer's stage passes, one sequence after another (a micro-batch's
  // activations are its sequences' rows, end to end). The loss (the last stage's) is broadcast
  // so every stage returns it.
  struct StagePasses final : PipelineStages::MicroBatches {
    CpuTrainingEngine &e;
    std::span<const std::vector<int32_t>> batch;
    int64_t k;
    bool training;  // backward passes follow
    double grad_scale, loss_sum = 0;
    std::vector<std::vector<float>> in, out, d_out, d_in;  // by micro-batch, released after use
    StagePasses(CpuTrainingEngine &engine, std::span<const std::vector<int32_t>> b, int64_t per, bool bw, double scale)
        : e(engine), batch(b), k(per), training(bw), grad_scale(scale) {
      const size_t m = b.size() / static_cast<size_t>(per);
      in.resize(m), out.resize(m), d_out.resize(m), d_in.resize(m);
    }
    DLDevice device() const override { return {kDLCPU, 0}; }
    size_t count(int64_t i) override {
      size_t rows = 0;
      for (int64_t s = i * k; s < (i + 1) * k; ++s) rows += batch[static_cast<size_t>(s)].size();
      return rows * static_cast<size_t>(e.hidden_);
    }
    float *input(int64_t i) override { return sized(in, i); }
    const float *output(int64_t i) override { return out[static_cast<size_t>(i)].data(); }
    float *output_grad(int64_t i) override { return sized(d_out, i); }
    const float *input_grad(int64_t i) override { return d_in[static_cast<size_t>(i)].data(); }
    double busy_s = 0;  // in the passes themselves
    void forward(int64_t i) override {
      const Timer timer(busy_s);
      const auto m = static_cast<size_t>(i);
      size_t at = 0;
      out[m].clear();
      for (int64_t s = i * k; s < (i + 1) * k; ++s) {
        const auto &tokens = batch[static_cast<size_t>(s)];
        std::vector<float> x;
        if (!e.pipeline_->first()) x = next_rows(in[m], at, tokens.size());
        double loss = 0;
        const auto y = e.trainer_.stage_forward(s, tokens, e.pipeline_->first() ? nullptr : &x, training, grad_scale, &loss);
        out[m].insert(out[m].end(), y.begin(), y.end());
        if (e.pipeline_->last()) loss_sum += loss;
      }
      in[m] = {};
    }
    void backward(int64_t i) override {
      const Timer timer(busy_s);
      const auto m = static_cast<size_t>(i);
      size_t at = 0;
      d_in[m].clear();
      for (int64_t s = i * k; s < (i + 1) * k; ++s) {
        std::vector<float> d;
        if (!e.pipeline_->last()) d = next_rows(d_out[m], at, batch[static_cast<size_t>(s)].size());
        const auto g = e.trainer_.stage_backward(s, e.pipeline_->last() ? nullptr : &d);
        d_in[m].insert(d_in[m].end(), g.begin(), g.end());
      }
      out[m] = {};
      d_out[m] = {};
    }
    // The next `tokens` rows of a micro-batch's values, from float `at` on (advanced past them).
    std::vector<float> next_rows(const std::vector<float> &values, size_t &at, size_t tokens) const {
      const size_t count = tokens * static_cast<size_t>(e.hidden_);
      std::vector<float> rows(values.begin() + static_cast<std::ptrdiff_t>(at),
                              values.begin() + static_cast<std::ptrdiff_t>(at + count));
      at += count;
      return rows;
    }
    float *sized(std::vector<std::vector<float>> &v, int64_t i) {
      auto &x = v[static_cast<size_t>(i)];
      x.resize(count(i));
      return x.data();
    }
  };
  // Adds the seconds from its construction to its destruction to a total.
  struct Timer {
    double &total;
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
    explicit Timer(double &t) : total(t) {}
    ~Timer() { total += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); }
  };
  double run_stages(std::span<const std::vector<int32_t>> batch, bool backward, double grad_scale) {
    const auto B = static_cast<int64_t>(batch.size());
    const int64_t k = PipelineStages::micro_batch_size(B, micro_, backward);
    StagePasses passes(*this, batch, k, backward, grad_scale);
    double wall_s = 0;
    {
      const Timer timer(wall_s);
      pipeline_->run_1f1b(B / k, backward, passes);
    }
    stage_time_ = {passes.busy_s, wall_s};
    return pipeline_->broadcast(passes.loss_sum, pipeline_->stages() - 1);
  }
  StageTime stage_time_;
  StageTime last_stage_time() const override { return stage_time_; }
  int64_t hidden_ = 0;
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
