#include "pipeline_stages.hpp"

#include <algorithm>

#include "decoder_layout.hpp"
#include "loom/core/error.hpp"

namespace loom {

PipelineStages::PipelineStages(Instance &parallel, const ModelConfig &config)
    : calls_(parallel), topo_(calls_.topology()), n_layers_(config.n_layers) {
  stage_ = topo_.pipeline_rank;
  stages_ = topo_.pipeline_size;
  if (stages_ > 1 && topo_.tensor_size > 1)
    throw runtime_error("pipeline parallel with tensor parallel stages is not supported yet");
  int64_t first = -1, end = -1;
  std::vector<int32_t> layers_per_stage(static_cast<size_t>(stages_), 0);
  int32_t previous = 0;
  for (int64_t l = 0; l < config.n_layers; ++l) {
    const int32_t s = calls_.stage_of_layer(l, config.n_layers);
    if (s < 0)
      throw runtime_error("pipeline: the parallel component gives layer " + std::to_string(l) + " of the model's " +
                          std::to_string(config.n_layers) + " no stage (do its layers per stage add up to " +
                          std::to_string(config.n_layers) + "?)");
    if (s >= stages_ || s < previous)
      throw runtime_error("pipeline: the parallel component put layer " + std::to_string(l) + " on stage " + std::to_string(s) +
                          " (stages take consecutive layers, in order)");
    previous = s;
    stage_of_layer_.push_back(s);
    ++layers_per_stage[static_cast<size_t>(s)];
    if (s == stage_) {
      if (first < 0) first = l;
      end = l + 1;
    }
  }
  for (int32_t s = 0; s < stages_; ++s)
    if (layers_per_stage[static_cast<size_t>(s)] == 0)
      throw runtime_error("pipeline: stage " + std::to_string(s) + " of " + std::to_string(stages_) + " gets no layer of the model's " +
                          std::to_string(config.n_layers) + " (use fewer stages)");
  range_ = {first, end, stage_ == 0, stage_ == stages_ - 1};
}

int32_t PipelineStages::owner(const std::string &name) const {
  const int64_t layer = decoder_layer_of(name);
  if (layer >= 0 && layer < n_layers_) return stage_of_layer_[static_cast<size_t>(layer)];
  if (is_token_embedding(name) || name == "wpe.weight") return 0;
  return stages_ - 1;  // the final norm and the head
}

int32_t PipelineStages::world_rank_of(int32_t stage) const {
  if (stage < 0 || stage >= stages_) throw runtime_error("pipeline: stage " + std::to_string(stage) + " does not exist");
  return topo_.world_rank + (stage - stage_) * topo_.tensor_size;
}

void PipelineStages::send(const float *values, size_t count, int32_t to_stage, DLDevice device) const {
  calls_.send(values, count, world_rank_of(to_stage), device);
}

void PipelineStages::receive_into(float *values, size_t count, int32_t from_stage, DLDevice device) const {
  calls_.recv(values, count, world_rank_of(from_stage), device);
}

void PipelineStages::exchange(const float *out, size_t out_count, int32_t to_stage, float *in, size_t in_count,
                              int32_t from_stage, DLDevice device) const {
  calls_.send_recv(out, out_count, world_rank_of(to_stage), in, in_count, world_rank_of(from_stage), device);
}

int64_t PipelineStages::micro_batch_size(int64_t batch, int64_t wanted, bool backward) {
  if (batch % wanted == 0) return wanted;
  if (backward)
    throw runtime_error("training: train.pipeline_micro_batch = " + std::to_string(wanted) + " does not divide a batch of " +
                        std::to_string(batch) + " sequences");
  return 1;
}

void PipelineStages::run_1f1b(int64_t m, bool backward, MicroBatches &mb) const {
  const DLDevice dev = mb.device();
  const int32_t next = stage_ + 1, previous = stage_ - 1;
  const auto receive_forward = [&](int64_t i) {
    if (!first()) receive_into(mb.input(i), mb.count(i), previous, dev);
  };
  const auto send_forward = [&](int64_t i) {
    if (!last()) send(mb.output(i), mb.count(i), next, dev);
  };
  const auto receive_backward = [&](int64_t j) {
    if (!last()) receive_into(mb.output_grad(j), mb.count(j), next, dev);
  };
  const auto send_backward = [&](int64_t j) {
    if (!first()) send(mb.input_grad(j), mb.count(j), previous, dev);
  };
  if (!backward) {
    for (int64_t i = 0; i < m; ++i) {
      receive_forward(i);
      mb.forward(i);
      send_forward(i);
    }
    return;
  }
  const int64_t warmup = std::min<int64_t>(stages_ - stage_ - 1, m), steady = m - warmup;
  for (int64_t i = 0; i < warmup; ++i) {
    receive_forward(i);
    mb.forward(i);
    send_forward(i);
  }
  if (steady > 0) receive_forward(warmup);
  for (int64_t k = 0; k < steady; ++k) {
    const int64_t i = warmup + k, j = k;  // this step's forward and backward micro-batches
    mb.forward(i);
    // (The last stage's backward pass starts from its own loss; the first's forward passes from
    // the tokens.)
    if (!last()) exchange(mb.output(i), mb.count(i), next, mb.output_grad(j), mb.count(j), next, dev);
    mb.backward(j);
    if (k + 1 == steady) send_backward(j);
    else if (!first()) exchange(mb.input_grad(j), mb.count(j), previous, mb.input(i + 1), mb.count(i + 1), previous, dev);
  }
  for (int64_t j = steady; j < m; ++j) {
    receive_backward(j);
    mb.backward(j);
    send_backward(j);
  }
}

double PipelineStages::sum(double value) const {
  if (stages_ > 1) calls_.all_reduce(LOOM_GROUP_PIPELINE, &value, 1);
  return value;
}

void PipelineStages::broadcast(std::vector<float> &values, int32_t from_stage) const {
  if (stages_ > 1) calls_.broadcast(LOOM_GROUP_PIPELINE, values.data(), values.size(), world_rank_of(from_stage));
}

double PipelineStages::broadcast(double value, int32_t from_stage) const {
  if (stages_ > 1) calls_.broadcast(LOOM_GROUP_PIPELINE, &value, 1, world_rank_of(from_stage));
  return value;
}

}  // namespace loom
