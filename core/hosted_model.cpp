#include "hosted_model.hpp"

#include <algorithm>
#include <climits>
#include <cstring>
#include <set>

#include "loom/core/error.hpp"
#include "loom/core/host_context.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/core/safetensors.hpp"

// What a plugin holds: the model and the context its errors are reported through.
struct loom_host_model {
  loom_host_ctx *ctx = nullptr;
  std::unique_ptr<loom::HostedModel> model;
};

namespace loom {

HostedModel::HostedModel(const ModelHostOptions &options, const std::filesystem::path &dir, int32_t max_seqs,
                         int32_t max_positions)
    : name_(dir.string()), max_seqs_(max_seqs) {
  if (!options.attention)
    throw runtime_error(options.source_name + ": a hosted model (" + name_ + ") needs the manifest's [attention]");
  if (max_seqs < 1 || max_seqs > 4096) throw runtime_error("model " + name_ + ": max_seqs " + std::to_string(max_seqs) + " outside 1 to 4096");
  config_ = load_model_config(dir);
  if (max_positions == 0) max_positions = static_cast<int32_t>(std::min<int64_t>(config_.max_positions, INT32_MAX));
  if (max_positions < 1 || max_positions > config_.max_positions)
    throw runtime_error("model " + name_ + ": max_positions " + std::to_string(max_positions) + " outside 1 to the model's " +
                        std::to_string(config_.max_positions));
  max_positions_ = max_positions;
  // Its own attention instance: the runtime's is prepared for the runtime's model.
  Manifest manifest;
  manifest.source_name = options.source_name + " (model " + name_ + ")";
  manifest.base_dir = options.base_dir;
  manifest.components.push_back(*options.attention);
  pipeline_ = std::make_unique<Pipeline>(*options.registry,
                                         InstanceEnvironment{options.device, options.metrics, options.cancelled, nullptr});
  pipeline_->build(manifest);
  BackendOptions backend;
  backend.device = options.device;
  backend.dtype = options.dtype;
  backend.threads = options.threads;
  backend.source_name = manifest.source_name;
  SafetensorsIndex checkpoint = SafetensorsIndex::open_model_dir(dir);
  for (const auto &[file, shard] : checkpoint.shards())
    for (const auto &t : shard.tensors())
      if (t.dtype == SafetensorsDtype::BF16 || t.dtype == SafetensorsDtype::F16) backend.half_checkpoint = true;
  backend_ = make_backend(config_, ModelWeights::load(config_, checkpoint), *pipeline_, backend);
  auto guard = pipeline_->begin_step();
  backend_->reserve(max_seqs, max_positions);
}

HostedModel::~HostedModel() {
  backend_.reset();
  pipeline_.reset();
}

void HostedModel::forward(const loom_model_batch &b) {
  const std::string who = "model " + name_ + ": forward";
  if (b.n_seqs < 1 || b.n_seqs > max_seqs_)
    throw runtime_error(who + ": " + std::to_string(b.n_seqs) + " sequences (1 to " + std::to_string(max_seqs_) + ")");
  if (!b.slots || !b.positions || !b.offsets || !b.tokens) throw runtime_error(who + ": slots, positions, offsets and tokens are required");
  if (b.offsets[0] != 0) throw runtime_error(who + ": offsets[0] must be 0");
  step_.tokens.clear();
  step_.seq_offsets.assign(1, 0);
  step_.seq_positions.clear();
  step_.seq_slots.clear();
  step_.block_tables.clear();
  step_.table_cols = 0;
  step_.tokens_fed = false;
  step_.seq_adapters.clear();
  std::set<int32_t> slots;
  for (int32_t s = 0; s < b.n_seqs; ++s) {
    const int32_t n = b.offsets[s + 1] - b.offsets[s];
    const std::string seq = who + ": sequence " + std::to_string(s);
    if (n < 1) throw runtime_error(seq + " has no new tokens");
    if (b.slots[s] < 0 || b.slots[s] >= max_seqs_ || !slots.insert(b.slots[s]).second)
      throw runtime_error(seq + ": slot " + std::to_string(b.slots[s]) + " is outside 0 to " + std::to_string(max_seqs_ - 1) +
                          " or named twice");
    if (b.positions[s] < 0 || int64_t{b.positions[s]} + n > max_positions_)
      throw runtime_error(seq + ": positions " + std::to_string(b.positions[s]) + " + " + std::to_string(n) + " pass " +
                          std::to_string(max_positions_));
    for (int32_t i = b.offsets[s]; i < b.offsets[s + 1]; ++i) {
      if (b.tokens[i] < 0 || b.tokens[i] >= config_.vocab_size)
        throw runtime_error(seq + ": token " + std::to_string(b.tokens[i]) + " is outside the vocabulary of " +
                            std::to_string(config_.vocab_size));
      step_.tokens.push_back(b.tokens[i]);
    }
    step_.seq_offsets.push_back(static_cast<int32_t>(step_.tokens.size()));
    step_.seq_positions.push_back(b.positions[s]);
    step_.seq_slots.push_back(b.slots[s]);
  }
  auto guard = pipeline_->begin_step();
  DLTensor *logits = backend_->forward(step_);
  const auto *data = reinterpret_cast<const float *>(static_cast<const char *>(logits->data) + logits->byte_offset);
  std::string error;
  if (b.argmax_out && !device_argmax_rows(data, b.n_seqs, config_.vocab_size, logits->device, b.argmax_out, error))
    throw runtime_error(who + ": argmax: " + error);
  if (b.logits_out && device_memcpy(b.logits_out, DLDevice{kDLCPU, 0}, data, logits->device,
                                    static_cast<size_t>(b.n_seqs) * static_cast<size_t>(config_.vocab_size) * sizeof(float),
                                    error) != LOOM_OK)
    throw runtime_error(who + ": copying the logits: " + error);
}

std::unique_ptr<HostedModel> ModelHost::open(const std::string &path, int32_t max_seqs, int32_t max_positions) const {
  std::filesystem::path dir = path;
  if (dir.is_relative()) dir = (options_.base_dir / dir).lexically_normal();
  return std::make_unique<HostedModel>(options_, dir, max_seqs, max_positions);
}

namespace {

loom_status models_open(loom_host_ctx *ctx, const char *path, int32_t max_seqs, int32_t max_positions,
                        loom_host_model **out) {
  if (!ctx || !ctx->models || !path || !out) {
    if (ctx) {
      std::lock_guard lock(ctx->mutex);
      ctx->last_error = "models.open: this host runs no models here, or path/out is NULL";
    }
    return LOOM_ERR_INVALID_ARGUMENT;
  }
  const auto failed = [&](const std::string &why) {
    std::lock_guard lock(ctx->mutex);
    ctx->models_error = why;
  };
  failed("");
  try {
    auto handle = std::make_unique<loom_host_model>();
    handle->ctx = ctx;
    handle->model = ctx->models->open(path, max_seqs, max_positions);
    *out = handle.release();
    return LOOM_OK;
  } catch (const Error &e) {
    failed(e.what());
    return e.status() != 0 ? e.status() : LOOM_ERR_INVALID_ARGUMENT;
  } catch (const std::bad_alloc &) {
    failed("out of memory");
    return LOOM_ERR_OUT_OF_MEMORY;
  } catch (const std::exception &e) {
    failed(e.what());
    return LOOM_ERR_INTERNAL;
  }
}

const char *models_open_error(loom_host_ctx *ctx) {
  if (!ctx) return "";
  std::lock_guard lock(ctx->mutex);
  return ctx->models_error.c_str();
}

int32_t models_vocab_size(loom_host_model *m) { return m && m->model ? m->model->vocab_size() : 0; }
int32_t models_max_positions(loom_host_model *m) { return m && m->model ? m->model->max_positions() : 0; }

loom_status models_forward(loom_host_model *m, const loom_model_batch *b) {
  if (!m || !m->model || !b) return LOOM_ERR_INVALID_ARGUMENT;
  try {
    m->model->forward(*b);
    return LOOM_OK;
  } catch (const Error &e) {
    std::lock_guard lock(m->ctx->mutex);
    m->ctx->last_error = e.what();
    return e.status() != 0 ? e.status() : LOOM_ERR_INVALID_ARGUMENT;
  } catch (const std::bad_alloc &) {
    return LOOM_ERR_OUT_OF_MEMORY;
  } catch (const std::exception &e) {
    std::lock_guard lock(m->ctx->mutex);
    m->ctx->last_error = e.what();
    return LOOM_ERR_INTERNAL;
  }
}

void models_close(loom_host_model *m) noexcept {
  try {
    delete m;
  } catch (...) { // (a backend's teardown does not throw; nothing to report it to)
  }
}

const loom_host_models kModels = {sizeof(loom_host_models), models_open, models_vocab_size, models_max_positions, models_forward, models_close,
                                  models_open_error};

} // namespace

const loom_host_models *host_models_table() { return &kModels; }

} // namespace loom
