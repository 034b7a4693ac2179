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

  void send_next(const std::vector<float> &values) const { send(values, stage_ + 1); }
  void send_previous(const std::vector<float> &values) const { send(values, stage_ - 1); }
  std::vector<float> receive_next(size_t count) const { return receive(count, stage_ + 1); }
  std::vector<float> receive_previous(size_t count) const { return receive(count, stage_ - 1); }
  void send(const std::vector<float> &values, int32_t to_stage) const;
  std::vector<float> receive(size_t count, int32_t from_stage) const;
  // Into `values` as sized (a buffer the caller reuses step after step).
  void receive_into(std::vector<float> &values, int32_t from_stage) const;
  // Sums over the pipeline's stages.
  double sum(double value) const;
  // `values` as the stage `from_stage` holds them, on every stage.
  void broadcast(std::vector<float> &values, int32_t from_stage) const;
  double broadcast(double value, int32_t from_stage) const;

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
