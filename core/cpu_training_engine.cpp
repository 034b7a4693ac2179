// The CPU's TrainingEngine: DecoderTrainer<float> and AdamW<float> (decoder_trainer.hpp), and,
// in builds without CUDA, the refusal of the CUDA engine.
#include <cmath>
#include <thread>

#include "loom/core/error.hpp"
#include "thread_pool.hpp"
#include "training_engine.hpp"

namespace loom {

namespace {

class CpuTrainingEngine final : public TrainingEngine {
 public:
  CpuTrainingEngine(const ModelConfig &config, const ModelWeights &weights, const TrainEngineOptions &options)
      : trainer_(config, weights), opt_(options.adamw), threads_(detail::ThreadPool::resolve(options.threads)) {
    trainer_.set_recompute(options.recompute);
    trainer_.set_threads(options.threads);
  }
  std::string describe() const override { return "cpu float32 x" + std::to_string(threads_) + " threads"; }
  void zero_grad() override { trainer_.zero_grad(); }
  double run(std::span<const std::vector<int32_t>> batch, bool backward, double grad_scale) override {
    double sum = 0;
    for (const auto &seq : batch) sum += trainer_.loss(seq, backward, grad_scale);
    return sum;
  }
  double clip_grad_norm(double max_norm) override { return loom::clip_grad_norm(trainer_.params(), max_norm); }
  void optimizer_step(double lr) override { opt_.step(trainer_.params(), lr); }
  int64_t optimizer_steps() const override { return opt_.steps(); }
  const std::vector<TrainParam<float>> &host_params() override { return trainer_.params(); }
  std::vector<std::vector<float>> host_grads() override {
    std::vector<std::vector<float>> g;
    for (const auto &p : trainer_.params()) g.push_back(p.grad);
    return g;
  }
  void host_moments(std::vector<std::vector<float>> &m, std::vector<std::vector<float>> &v) override {
    m = opt_.first_moments();
    v = opt_.second_moments();
  }
  void restore_optimizer(int64_t steps, std::vector<std::vector<float>> m, std::vector<std::vector<float>> v) override {
    opt_.restore(steps, std::move(m), std::move(v));
  }

 private:
  DecoderTrainer<float> trainer_;
  AdamW<float> opt_;
  int32_t threads_;
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
bool cuda_trains(const ModelConfig &) { return false; }
#endif

}  // namespace loom
