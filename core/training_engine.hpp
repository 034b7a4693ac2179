// Private to core: what loom::train (training_run.cpp) drives, whatever the device: a model's
// parameters, their gradients and AdamW. Two engines: the CPU's (DecoderTrainer + AdamW, every
// supported architecture, and adapters) and CUDA's (cuda_trainer.cpp: cuBLAS and
// kernels/cuda/train.cu; the Llama family and GPT-2, float32 or bf16 GEMM operands).
//
// Ownership: an engine owns its parameters, gradients and optimizer state (on its device).
// Thread-safety: none; one caller.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "decoder_trainer.hpp"
#include "loom/core/instance.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"

namespace loom {

class TensorShards;
class PipelineStages;

struct TrainEngineOptions {
  AdamWOptions adamw;
  bool recompute = false;      // activation recomputation
  int32_t threads = 0;         // CPU threads (0: one per hardware thread)
  int device = 0;              // CUDA device ordinal
  bool bf16 = false;           // CUDA: GEMM operands rounded to bfloat16 (fp32 master weights and accumulation)
  // Adapter instances to train ([PEFT]; CPU only): the base model is frozen and only the
  // adapters' parameters (listed by the plugin, PEFT names) are the engine's parameters.
  std::vector<std::shared_ptr<Instance>> adapters;
  // QLoRA-style ([PEFT]; CPU, with adapters): the frozen base's layer linears through this
  // quantizer (DecoderTrainer::quantize_base).
  std::shared_ptr<Instance> quantizer;
  // train.attention = "plugin" (CPU, no adapters, no tensor parallelism): this attention
  // component computes each layer's attention and its gradients (DecoderTrainer::attach_attention).
  std::shared_ptr<Instance> attention;
  // Tensor parallelism ([Parallel], CPU): the config and weights given to the engine are this
  // rank's (TensorShards::local_config / local_weights); not owned, outlives the engine.
  const TensorShards *tensor = nullptr;
  // Pipeline parallelism ([Parallel], CPU): this rank's stage; run() then drives the 1F1B
  // schedule over the batch's sequences with the neighbouring stages. Not owned.
  const PipelineStages *pipeline = nullptr;
  // Sequences per pipeline micro-batch: run() splits its batch into batch / this micro-batches
  // (it must divide a batch that trains; a forward-only batch it does not divide runs one
  // sequence a micro-batch).
  int64_t pipeline_micro_batch = 1;
};

class TrainingEngine {
 public:
  virtual ~TrainingEngine() = default;
  virtual std::string describe() const = 0;  // "cpu float32 x4 threads", "cuda:0 bf16 GEMMs"
  virtual void zero_grad() = 0;
  // The forward pass of each sequence of `batch` (equal lengths on CUDA) and, with `backward`,
  // its backward pass: adds grad_scale times the gradient of each sequence's mean next-token loss
  // into the gradients. Returns the sum over the sequences of their mean losses.
  virtual double run(std::span<const std::vector<int32_t>> batch, bool backward, double grad_scale) = 0;
  // Pipeline stages: how long the last run() took on this stage and how much of it the stage
  // spent computing (the rest: waiting for its neighbours, the pipeline's bubble). Zeros
  // without stages.
  struct StageTime {
    double busy_s = 0, wall_s = 0;
  };
  virtual StageTime last_stage_time() const { return {}; }
  // Completes the step's gradients across pipeline stages (a tied embedding's two copies
  // summed); once a step, after the last run() and before clipping. Nothing without stages.
  virtual void reduce_stage_gradients() {}
  // Clips the gradients' global L2 norm to max_norm (INFINITY: no clipping); returns the norm.
  virtual double clip_grad_norm(double max_norm) = 0;
  virtual void optimizer_step(double lr) = 0;
  virtual int64_t optimizer_steps() const = 0;
  // Names, shapes and current values of the parameters (copied to the host on CUDA).
  virtual const std::vector<TrainParam<float>> &host_params() = 0;
  // The gradients per parameter, in host_params' order (for tests).
  virtual std::vector<std::vector<float>> host_grads() = 0;
  // AdamW's moments per parameter (empty before the first step).
  virtual void host_moments(std::vector<std::vector<float>> &m, std::vector<std::vector<float>> &v) = 0;
  virtual void restore_optimizer(int64_t steps, std::vector<std::vector<float>> m, std::vector<std::vector<float>> v) = 0;
  // Sets the trained parameters' values (a resumed adapter run), in host_params' order.
  virtual void restore_params(const std::vector<TrainParam<float>> &values) = 0;

  // ---- data parallel ([Parallel], data_parallel.hpp) ----
  // Where the gradients and values live: the CPU, or the engine's CUDA device.
  virtual DLDevice device() const = 0;
  // Each parameter's gradient and value, in host_params' order, where the engine keeps them
  // (device memory on CUDA). Valid as long as the engine.
  virtual std::vector<std::span<float>> grad_views() = 0;
  virtual std::vector<std::span<float>> value_views() = 0;
  // Every gradient in one contiguous array (zero padding between parameters), or empty when the
  // engine keeps them apart.
  virtual std::span<float> flat_grads() { return {}; }
  // Waits for the work the engine has queued (CUDA); nothing on the CPU.
  virtual void synchronize() {}
  // Installs DecoderTrainer::set_layer_hook's hook (empty: removes it); false when the engine
  // cannot tell when a layer's gradients are complete.
  virtual bool set_layer_hook(std::function<void(int64_t)>) { return false; }
  // ZeRO stage 1: only the parameters marked true are updated by optimizer_step and have
  // moments (host_moments gives empty vectors for the others). Throws where unsupported.
  virtual void set_optimizer_shard(std::vector<bool> owned) = 0;
};

std::unique_ptr<TrainingEngine> make_cpu_training_engine(const ModelConfig &config, const ModelWeights &weights,
                                                         const TrainEngineOptions &options);
// Throws loom::Error when this build has no CUDA or adapters are given (they train on the CPU).
std::unique_ptr<TrainingEngine> make_cuda_training_engine(const ModelConfig &config, const ModelWeights &weights,
                                                          const TrainEngineOptions &options);

}  // namespace loom
