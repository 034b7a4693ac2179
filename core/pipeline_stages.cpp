#include "pipeline_stages.hpp"

#include "host_tensor.hpp"
#include "loom/core/error.hpp"

namespace loom {

namespace {

int64_t layer_of(const std::string &name) {
  for (const std::string prefix : {"model.layers.", "h."}) {
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    const size_t dot = name.find('.', prefix.size());
    if (dot == std::string::npos) return -1;
    return std::stoll(name.substr(prefix.size(), dot - prefix.size()));
  }
  return -1;
}

}  // namespace

PipelineStages::PipelineStages(Instance &parallel, const ModelConfig &config)
    : parallel_(parallel), vt_(parallel.vtable<loom_parallel_vtable>()), n_layers_(config.n_layers) {
  topo_.struct_size = sizeof(topo_);
  parallel_.check(vt_->topology(parallel_.handle(), &topo_), "topology");
  stage_ = topo_.pipeline_rank;
  stages_ = topo_.pipeline_size;
  if (stages_ > 1 && topo_.tensor_size > 1)
    throw runtime_error("pipeline parallel with tensor parallel stages is not supported yet");
  int64_t first = -1, end = -1;
  std::vector<int32_t> layers_per_stage(static_cast<size_t>(stages_), 0);
  int32_t previous = 0;
  for (int64_t l = 0; l < config.n_layers; ++l) {
    const int32_t s = vt_->stage_of_layer(parallel_.handle(), static_cast<int32_t>(l), static_cast<int32_t>(config.n_layers));
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
  const int64_t layer = layer_of(name);
  if (layer >= 0 && layer < n_layers_) return stage_of_layer_[static_cast<size_t>(layer)];
  if (name == "model.embed_tokens.weight" || name == "wte.weight" || name == "wpe.weight") return 0;
  return stages_ - 1;  // the final norm and the head
}

int32_t PipelineStages::world_rank_of(int32_t stage) const {
  if (stage < 0 || stage >= stages_) throw runtime_error("pipeline: stage " + std::to_string(stage) + " does not exist");
  return topo_.world_rank + (stage - stage_) * topo_.tensor_size;
}

void PipelineStages::send(const std::vector<float> &values, int32_t to_stage) const {
  int64_t count = static_cast<int64_t>(values.size());
  DLTensor t = detail::flat_view(const_cast<float *>(values.data()), count);
  parallel_.check(vt_->send(parallel_.handle(), &t, world_rank_of(to_stage)), "send");
}

std::vector<float> PipelineStages::receive(size_t count, int32_t from_stage) const {
  std::vector<float> values(count);
  int64_t n = static_cast<int64_t>(count);
  DLTensor t = detail::flat_view(values.data(), n);
  parallel_.check(vt_->recv(parallel_.handle(), &t, world_rank_of(from_stage)), "recv");
  return values;
}

double PipelineStages::sum(double value) const {
  if (stages_ == 1) return value;
  int64_t n = 1;
  DLTensor t = detail::flat_view(&value, n);
  parallel_.check(vt_->all_reduce(parallel_.handle(), LOOM_GROUP_PIPELINE, &t, LOOM_REDUCE_SUM), "all_reduce");
  return value;
}

void PipelineStages::broadcast(std::vector<float> &values, int32_t from_stage) const {
  if (stages_ == 1) return;
  int64_t n = static_cast<int64_t>(values.size());
  DLTensor t = detail::flat_view(values.data(), n);
  parallel_.check(vt_->broadcast(parallel_.handle(), LOOM_GROUP_PIPELINE, &t, world_rank_of(from_stage)), "broadcast");
}

double PipelineStages::broadcast(double value, int32_t from_stage) const {
  if (stages_ == 1) return value;
  int64_t n = 1;
  DLTensor t = detail::flat_view(&value, n);
  parallel_.check(vt_->broadcast(parallel_.handle(), LOOM_GROUP_PIPELINE, &t, world_rank_of(from_stage)), "broadcast");
  return value;
}

}  // namespace loom
