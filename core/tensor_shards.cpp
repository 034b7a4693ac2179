#include "tensor_shards.hpp"

#include <algorithm>

#include "loom/core/error.hpp"

namespace loom {

namespace {

bool ends_with(const std::string &s, const char *suffix) {
  const std::string x(suffix);
  return s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0;
}

}  // namespace

TensorShards::TensorShards(Instance &parallel, const ModelConfig &config, bool keep_vocabulary)
    : calls_(parallel), local_(config) {
  const loom_parallel_topology topo = calls_.topology();
  rank_ = topo.tensor_rank;
  size_ = topo.tensor_size;
  const std::string who = "tensor parallel over " + std::to_string(size_) + " ranks";
  if (size_ > 1 && keep_vocabulary && config.architecture == Architecture::gpt2)
    throw runtime_error(who + ": tensor parallel GPT-2 runs on the CPU backend so far (the Llama family also on CUDA)");
  for (const auto &[what, value] : {std::pair{"num_attention_heads", config.n_heads}, std::pair{"num_key_value_heads", config.n_kv_heads},
                                    std::pair{"intermediate_size", config.intermediate_size},
                                    std::pair{"vocab_size", keep_vocabulary ? int64_t{0} : config.vocab_size}})
    if (value % size_ != 0)
      throw runtime_error(who + ": the model's " + what + " (" + std::to_string(value) + ") does not divide by " +
                          std::to_string(size_));
  local_.n_heads /= size_;
  local_.n_kv_heads /= size_;
  local_.intermediate_size /= size_;
  if (!keep_vocabulary) local_.vocab_size /= size_;
  vocab_begin_ = keep_vocabulary ? 0 : rank_ * local_.vocab_size;
  const auto vocabulary = [](const std::string &name) {
    return ends_with(name, "embed_tokens.weight") || ends_with(name, "lm_head.weight") || name == "wte.weight";
  };

  const auto local_shapes = expected_weights(local_);
  for (const auto &[name, shape] : expected_weights(config)) {
    if (size_ > 1 && (ends_with(name, "o_proj.bias") || ends_with(name, "down_proj.bias")))
      throw runtime_error(who + ": " + name + " (a row-parallel linear's bias) is not split yet");
    const loom_shard s = calls_.shard(name, shape);
    const int64_t parts = LOOM_HAS_FIELD(&s, loom_shard, parts) && s.parts > 1 ? s.parts : 1;
    TensorSlice slice{s.split_dim, s.begin, s.end, shape, parts};
    if (keep_vocabulary && vocabulary(name)) slice = {-1, 0, shape.empty() ? 1 : shape[0], shape};
    std::vector<int64_t> mine = shape;
    if (slice.dim >= 0) {
      if (slice.dim >= static_cast<int32_t>(shape.size()) || shape[static_cast<size_t>(slice.dim)] % parts != 0 ||
          slice.begin < 0 || slice.end > shape[static_cast<size_t>(slice.dim)] / parts || slice.begin >= slice.end)
        throw runtime_error(who + ": the parallel component cut " + name + " outside its shape");
      mine[static_cast<size_t>(slice.dim)] = (slice.end - slice.begin) * parts;
    }
    // The trainer computes with the local config's shapes: the component must cut exactly those.
    const auto want = local_shapes.find(name);
    if (want == local_shapes.end() || want->second != mine)
      throw runtime_error(who + ": the parallel component's cut of " + name +
                          " is not the Megatron split this engine computes with (column-parallel q/k/v/gate/up and c_attn/c_fc, "
                          "row-parallel o/down and c_proj, vocabulary-parallel embedding and head, replicated norms)");
    if (slice.dim >= 0 && slice.begin != rank_ * (slice.end - slice.begin))
      throw runtime_error(who + ": " + name + " is not cut in rank order");
    slices_.emplace(name, std::move(slice));
  }
}

bool TensorShards::split(const std::string &name) const {
  const auto it = slices_.find(name);
  return it != slices_.end() && it->second.dim >= 0;
}

ModelWeights TensorShards::local_weights(const ModelWeights &full) const {
  std::map<std::string, HostWeight, std::less<>> local;
  for (const auto &[name, slice] : slices_) {
    const HostWeight &w = full.at(name);
    HostWeight &out = local[name];
    out.shape = w.shape;
    if (slice.dim >= 0) out.shape[static_cast<size_t>(slice.dim)] = (slice.end - slice.begin) * slice.parts;
    out.values = this->slice(name, w.values);
  }
  return ModelWeights::from_map(std::move(local));
}

std::vector<float> TensorShards::slice(const std::string &name, const std::vector<float> &whole) const {
  const auto it = slices_.find(name);
  if (it == slices_.end() || it->second.dim < 0) return whole;
  const TensorSlice &s = it->second;
  // Rows [begin, end) of dimension `dim` of a row-major tensor: `outer` blocks of
  // `shape[dim] * inner` values, each contributing (end - begin) * inner.
  int64_t outer = 1, inner = 1;
  for (int32_t d = 0; d < s.dim; ++d) outer *= s.full[static_cast<size_t>(d)];
  for (size_t d = static_cast<size_t>(s.dim) + 1; d < s.full.size(); ++d) inner *= s.full[d];
  // A fused dimension: `parts` blocks of extent / parts, each cut alike (as `outer` x parts
  // blocks of the block's extent).
  const int64_t extent = s.full[static_cast<size_t>(s.dim)] / s.parts, keep = (s.end - s.begin) * inner;
  if (static_cast<int64_t>(whole.size()) != outer * s.parts * extent * inner)
    throw runtime_error(name + ": not the whole tensor's size");
  outer *= s.parts;
  std::vector<float> out(static_cast<size_t>(outer * keep));
  for (int64_t o = 0; o < outer; ++o)
    std::copy_n(whole.begin() + (o * extent + s.begin) * inner, keep, out.begin() + o * keep);
  return out;
}

std::vector<float> TensorShards::gather(const std::string &name, const std::vector<float> &local) const {
  const auto it = slices_.find(name);
  if (size_ == 1 || it == slices_.end() || it->second.dim < 0) return local;
  // Along `dim`: `outer` blocks, each rank's `part` values of a block side by side.
  const TensorSlice &slice = it->second;
  int64_t outer = 1, inner = 1;
  for (int32_t d = 0; d < slice.dim; ++d) outer *= slice.full[static_cast<size_t>(d)];
  for (size_t d = static_cast<size_t>(slice.dim) + 1; d < slice.full.size(); ++d) inner *= slice.full[d];
  std::vector<float> full(local.size() * static_cast<size_t>(size_));
  gather_blocks(local.data(), outer * slice.parts, (slice.end - slice.begin) * inner, full.data());
  return full;
}

void TensorShards::gather_columns(const float *local, int64_t rows, int64_t cols, float *out) const {
  gather_blocks(local, rows, cols, out);
}

void TensorShards::gather_blocks(const float *local, int64_t outer, int64_t part, float *out) const {
  // The ranks' values arrive one after another (rank-major); each block gets every rank's part.
  std::vector<float> all(static_cast<size_t>(outer * part * size_));
  calls_.all_gather(LOOM_GROUP_TENSOR, local, static_cast<size_t>(outer * part), all.data(), all.size());
  for (int64_t r = 0; r < size_; ++r)
    for (int64_t o = 0; o < outer; ++o)
      std::copy_n(all.begin() + (r * outer + o) * part, part, out + (o * size_ + r) * part);
}

void TensorShards::all_reduce_device(float *data, size_t count, DLDevice device) const {
  if (size_ > 1) calls_.all_reduce(LOOM_GROUP_TENSOR, data, count, LOOM_REDUCE_SUM, device);
}

void TensorShards::all_reduce(float *data, size_t count, bool max) const {
  if (size_ > 1) calls_.all_reduce(LOOM_GROUP_TENSOR, data, count, max ? LOOM_REDUCE_MAX : LOOM_REDUCE_SUM);
}

void TensorShards::all_reduce(double *data, size_t count) const {
  if (size_ > 1) calls_.all_reduce(LOOM_GROUP_TENSOR, data, count);
}

}  // namespace loom
