// Private to core: pipeline parallelism's place of this rank ([Parallel]). The parallel
// component says which stage runs each decoder layer (loom_parallel_vtable::stage_of_layer);
// this class turns that into this rank's DecoderTrainer::Stage, names the world ranks of the
// neighbouring stages, and moves activations, gradients and parameters between the stages of
// this rank's pipeline (LOOM_GROUP_PIPELINE) through the component's collectives.
//
// Ownership: refers to the parallel instance, which must outlive it. Thread-safety: one caller
// (every call is a collective or a point-to-point exchange the peer stage makes too).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "decoder_trainer.hpp"
#include "loom/core/instance.hpp"
#include "parallel_calls.hpp"
#include "loom/core/model_config.hpp"
#include "loom/loom_plugin_api.h"

namespace loom {

class PipelineStages {
 public:
  // Throws loom::Error when a stage would get no layer or the strategy also splits tensors.
  PipelineStages(Instance &parallel, const ModelConfig &config);

  int32_t stage() const { return stage_; }
  int32_t stages() const { return stages_; }
  bool first() const { return stage_ == 0; }
  bool last() const { return stage_ == stages_ - 1; }
  DecoderTrainer<float>::Stage trainer_stage() const { return range_; }
  // The stage holding a parameter (a tied embedding: the first).
  int32_t owner(const std::string &name) const;

  // Host vectors (the CPU engine) or, with `device`, device memory (the CUDA engine: transfers
  // ordered on the device's compute stream, returning before they complete).
  void send(const std::vector<float> &values, int32_t to_stage) const { send(values.data(), values.size(), to_stage); }
  void send(const float *values, size_t count, int32_t to_stage, DLDevice device = {kDLCPU, 0}) const;
  void receive_into(float *values, size_t count, int32_t from_stage, DLDevice device = {kDLCPU, 0}) const;
  // Sends to one stage while receiving from another (or the same): both in flight at once.
  void exchange(const float *out, size_t out_count, int32_t to_stage, float *in, size_t in_count, int32_t from_stage,
                DLDevice device = {kDLCPU, 0}) const;
  // Sums over the pipeline's stages.
  double sum(double value) const;
  // `values` as the stage `from_stage` holds them, on every stage.
  void broadcast(std::vector<float> &values, int32_t from_stage) const;
  double broadcast(double value, int32_t from_stage) const;

  // What an engine gives the 1F1B schedule for micro-batch i: where its stage input arrives and
  // its output leaves, where the output's gradient arrives and the input's leaves (each count(i)
  // floats, on `device`; a pointer stays valid until the micro-batch's backward pass), and the
  // passes themselves.
  struct MicroBatches {
    virtual ~MicroBatches() = default;
    virtual DLDevice device() const = 0;
    virtual size_t count(int64_t i) = 0;
    virtual float *input(int64_t i) = 0;              // not called on the first stage
    virtual const float *output(int64_t i) = 0;       // after forward(i); not on the last stage
    virtual float *output_grad(int64_t i) = 0;        // not on the last stage
    virtual const float *input_grad(int64_t i) = 0;   // after backward(i); not on the first stage
    virtual void forward(int64_t i) = 0;
    virtual void backward(int64_t i) = 0;
  };
  // Runs `m` micro-batches through this stage: 1F1B (a stage first runs the forward passes the
  // later stages need to fill the pipeline, then alternates one forward and one backward pass,
  // then drains the backward passes), each step's send to one neighbour paired with the receive
  // from the other so that no two stages wait on each other. Forward passes only without
  // `backward`.
  void run_1f1b(int64_t m, bool backward, MicroBatches &mb) const;
  // The sequences per micro-batch for a batch of `batch`: `wanted`
  // (train.pipeline_micro_batch), which must divide a batch that trains; a forward-only batch
  // it does not divide (the last validation chunk) runs one sequence a micro-batch.
  static int64_t micro_batch_size(int64_t batch, int64_t wanted, bool backward);

 private:
  int32_t world_rank_of(int32_t stage) const;

  ParallelCalls calls_;
  loom_parallel_topology topo_{};
  int32_t stage_ = 0, stages_ = 1;
  int64_t n_layers_ = 0;
  std::vector<int32_t> stage_of_layer_;
  DecoderTrainer<float>::Stage range_;
};

}  // namespace loom
