// Private to core: models that plugins run through the host extension loom.host.models/1
// (plugin-api/loom/host_models.h), such as the draft model of a speculative-decoding drafter.
//
// A HostedModel is a checkpoint loaded into a backend of its own (the runtime's device and
// dtype), with a pipeline of its own that holds a fresh instance of the runtime's attention
// component (an attention instance is prepared for one model's geometry), and a KV cache in slot
// mode: sequence slot s owns positions [0, max_positions) of its own.
//
// Ownership: the Runtime owns the ModelHost, which outlives every plugin instance (so every
// HostedModel, which a plugin must close before its instance is destroyed); a HostedModel
// borrows the runtime's registry. Thread-safety: ModelHost::open from any thread; one thread at
// a time per HostedModel.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "loom/core/manifest.hpp"
#include "loom/core/metrics.hpp"
#include "loom/core/model_config.hpp"
#include "loom/host_models.h"
#include "model_backend.hpp"

namespace loom {

class Registry;
class Pipeline;

struct ModelHostOptions {
  Registry *registry = nullptr;
  DLDevice device{kDLCPU, 0};
  std::optional<ComputeDtype> dtype;          // the runtime's [model] dtype (nullopt: auto)
  int32_t threads = 0;                        // [loom] threads for a CPU backend
  std::filesystem::path base_dir;             // relative model paths resolve against it
  std::string source_name;                    // the runtime's manifest, for errors
  std::optional<ComponentSpec> attention;     // the runtime's [attention]
  Metrics *metrics = nullptr;
  const std::atomic<bool> *cancelled = nullptr;
};

class HostedModel {
 public:
  // Loads the model directory `dir` for `max_seqs` sequences of up to `max_positions` positions
  // (at most the model's; 0: the model's). Throws loom::Error naming the directory.
  HostedModel(const ModelHostOptions &options, const std::filesystem::path &dir, int32_t max_seqs,
              int32_t max_positions);
  ~HostedModel();
  HostedModel(const HostedModel &) = delete;
  HostedModel &operator=(const HostedModel &) = delete;

  int32_t vocab_size() const { return static_cast<int32_t>(config_.vocab_size); }
  int32_t max_positions() const { return max_positions_; }
  // Runs `batch` (host_models.h) and fills its outputs. Throws loom::Error on a batch outside the
  // slots, positions or vocabulary, or a backend failure.
  void forward(const loom_model_batch &batch);
  // host_models.h greedy(): the batch, then steps - 1 decode passes fed with each pass's argmax on
  // the device; tokens_out [S * steps]. Throws loom::Error as forward().
  void greedy(const loom_model_batch &batch, int32_t steps, int32_t *tokens_out);

 private:
  std::string name_; // the directory, for errors
  ModelConfig config_;
  std::unique_ptr<Pipeline> pipeline_;
  std::unique_ptr<ModelBackend> backend_; // destroyed before the pipeline
  int32_t max_seqs_ = 0;
  int32_t max_positions_ = 0;
  StepBatch step_;
  // Fills step_ from `batch` (checked); `extra` more positions must fit after each sequence's.
  void stage(const loom_model_batch &batch, int32_t extra);
  // greedy()'s argmaxes, [steps * S] int32 on the device (grown as needed).
  void *argmax_ = nullptr;
  size_t argmax_bytes_ = 0;
};

class ModelHost {
 public:
  explicit ModelHost(ModelHostOptions options) : options_(std::move(options)) {}
  // A model for a plugin (host_models.h open()); the plugin frees it with close() (delete).
  // `attention`: a component name, or "" for the runtime's [attention].
  std::unique_ptr<HostedModel> open(const std::string &path, const std::string &attention, int32_t max_seqs,
                                    int32_t max_positions) const;

 private:
  ModelHostOptions options_;
};

// The extension table (host_api.cpp offers it when the instance's context has a ModelHost).
const loom_host_models *host_models_table();

} // namespace loom
