#include "pipeline_stages.hpp"

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
    if (s < 0 || s >= stages_ || s < previous)
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

void PipelineStages::send(const std::vector<float> &values, int32_t to_stage) const {
  calls_.send(values.data(), values.size(), world_rank_of(to_stage));
}

std::vector<float> PipelineStages::receive(size_t count, int32_t from_stage) const {
  std::vector<float> values(count);
  receive_into(values, from_stage);
  return values;
}

void PipelineStages::receive_into(std::vector<float> &values, int32_t from_stage) const {
  calls_.recv(values.data(), values.size(), world_rank_of(from_stage));
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
