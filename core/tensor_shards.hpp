// Private to core: tensor parallelism's weights ([Parallel], Megatron-style). The parallel
// component decides how each parameter is cut (loom_parallel_vtable::shard); this file applies
// its decisions: the rank's model config (its heads, its share of the MLP's intermediate width
// and of the vocabulary), its slices of the weights, and the way back (the full tensors gathered
// from the tensor group, for checkpoints and exports).
//
// Column-parallel linears (q, k, v, gate, up) are split along their outputs, row-parallel ones
// (o, down) along their inputs, the embedding and the head along the vocabulary; norms are
// replicated; GPT-2's fused c_attn is cut per block (q, k and v alike), its row-parallel c_proj
// biases are added once (by the engines' tensor rank 0). The heads, key/value heads,
// intermediate width and vocabulary must divide by the tensor group's size.
//
// Ownership: plain values. Thread-safety: none needed (immutable after planning); gather() runs
// collectives, one caller.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "loom/core/instance.hpp"
#include "parallel_calls.hpp"
#include "loom/loom_plugin_api.h"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"

namespace loom {

struct TensorSlice {
  int32_t dim = -1;          // the split dimension; -1: replicated
  int64_t begin = 0, end = 0;  // this rank's range along it (within each fused block)
  std::vector<int64_t> full;   // the whole tensor's shape
  int64_t parts = 1;           // fused blocks along dim (GPT-2's c_attn: q, k, v), each cut alike
};

class TensorShards {
 public:
  // Asks `parallel` for every parameter of `config`'s model; throws loom::Error when the model
  // cannot be split that way (architecture, sizes that do not divide, row-parallel biases).
  // keep_vocabulary: the engine keeps the embedding and head whole on every rank (the CUDA
  // backend: its lookups and head read the whole table) and splits the layers only.
  TensorShards(Instance &parallel, const ModelConfig &config, bool keep_vocabulary = false);

  int32_t rank() const { return rank_; }
  int32_t size() const { return size_; }
  const ModelConfig &local_config() const { return local_; }
  int64_t vocab_begin() const { return vocab_begin_; }
  // This rank's slices of the full weights (as float32).
  ModelWeights local_weights(const ModelWeights &full) const;
  // This rank's slice of a whole tensor's values (a checkpoint's moments), and the whole
  // tensor's size for a slice of `local` values.
  std::vector<float> slice(const std::string &name, const std::vector<float> &whole) const;
  size_t whole_size(const std::string &name, size_t local) const { return split(name) ? local * static_cast<size_t>(size_) : local; }
  // Whether the parameter is split (its gradient's squares sum over the tensor group).
  bool split(const std::string &name) const;
  // The full tensor from every tensor rank's slice (a collective over LOOM_GROUP_TENSOR).
  std::vector<float> gather(const std::string &name, const std::vector<float> &local) const;
  // Rows of `cols` values split by columns over the group (this rank's at column rank * cols):
  // out receives the whole rows, rows x (cols x size) (a collective over LOOM_GROUP_TENSOR).
  void gather_columns(const float *local, int64_t rows, int64_t cols, float *out) const;
  // Sums float32 values in device memory over the tensor group (queued on the host's current
  // stream for the device, as the CUDA backend's work is).
  void all_reduce_device(float *data, size_t count, DLDevice device) const;
  // Sums host values over the tensor group; the maximum with `max`.
  void all_reduce(float *data, size_t count, bool max = false) const;
  void all_reduce(double *data, size_t count) const;

 private:
  // Every rank's `outer` blocks of `part` values (rank-major after an all-gather) put back side
  // by side: out holds outer blocks of size x part.
  void gather_blocks(const float *local, int64_t outer, int64_t part, float *out) const;

  ParallelCalls calls_;
  int32_t rank_ = 0, size_ = 1;
  ModelConfig local_;
  int64_t vocab_begin_ = 0;
  std::map<std::string, TensorSlice> slices_;
};

}  // namespace loom
