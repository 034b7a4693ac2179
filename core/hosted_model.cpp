#include "hosted_model.hpp"

#include <algorithm>
#include <climits>
#include <cstring>
#include <set>

#include <nlohmann/json.hpp>

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
  if (argmax_ != nullptr) device_free(backend_->device(), argmax_);
  backend_.reset();
  pipeline_.reset();
}

void HostedModel::stage(const loom_model_batch &b, int32_t extra) {
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
    if (b.positions[s] < 0 || int64_t{b.positions[s]} + n + extra > max_positions_)
      throw runtime_error(seq + ": positions " + std::to_string(b.positions[s]) + " + " + std::to_string(n + extra) + " pass " +
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
}

void HostedModel::forward(const loom_model_batch &b) {
  const std::string who = "model " + name_ + ": forward";
  stage(b, 0);
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

void HostedModel::greedy(const loom_model_batch &b, int32_t steps, int32_t *tokens_out) {
  const std::string who = "model " + name_ + ": greedy";
  if (steps < 1 || steps > 256 || tokens_out == nullptr) throw runtime_error(who + ": steps must be 1 to 256, with tokens_out");
  stage(b, steps - 1);
  const int32_t S = b.n_seqs;
  const DLDevice device = backend_->device();
  const size_t need = static_cast<size_t>(steps) * static_cast<size_t>(S) * sizeof(int32_t);
  std::string error;
  if (need > argmax_bytes_) {
    if (argmax_ != nullptr) device_free(device, argmax_);
    argmax_ = nullptr;
    argmax_bytes_ = 0;
    if (device_alloc(device, need, 256, &argmax_, error) != LOOM_OK) throw runtime_error(who + ": " + error);
    argmax_bytes_ = need;
  }
  auto *acc = static_cast<int32_t *>(argmax_);
  std::vector<int32_t> positions(step_.seq_positions.size());
  for (int32_t s = 0; s < S; ++s) positions[static_cast<size_t>(s)] = step_.seq_positions[static_cast<size_t>(s)] + (b.offsets[s + 1] - b.offsets[s]);
  auto guard = pipeline_->begin_step();
  DLTensor *logits = backend_->forward(step_);
  for (int32_t i = 0; i < steps; ++i) {
    const auto *x = reinterpret_cast<const float *>(static_cast<const char *>(logits->data) + logits->byte_offset);
    int32_t *row = acc + static_cast<size_t>(i) * static_cast<size_t>(S);
    if (!device_argmax_rows_to(x, S, config_.vocab_size, device, row, error)) throw runtime_error(who + ": argmax: " + error);
    if (i + 1 == steps) break;
    // The next pass reads this one's argmax where the backend takes fed tokens (on the device,
    // no wait for the host), else from the host (the CPU backend: `row` is host memory there).
    step_.tokens.assign(static_cast<size_t>(S), 0);
    step_.seq_offsets.resize(static_cast<size_t>(S) + 1);
    for (int32_t s = 0; s <= S; ++s) step_.seq_offsets[static_cast<size_t>(s)] = s;
    for (int32_t s = 0; s < S; ++s) step_.seq_positions[static_cast<size_t>(s)] = positions[static_cast<size_t>(s)] + i;
    if (int32_t *feed = backend_->token_feed(S)) {
      if (!device_argmax_rows_to(x, S, config_.vocab_size, device, feed, error)) throw runtime_error(who + ": argmax: " + error);
      step_.tokens_fed = true;
    } else {
      std::copy(row, row + S, step_.tokens.begin());
      step_.tokens_fed = false;
    }
    logits = backend_->forward(step_);
  }
  std::vector<int32_t> host(static_cast<size_t>(steps) * static_cast<size_t>(S));
  if (device_memcpy(host.data(), DLDevice{kDLCPU, 0}, acc, device, host.size() * sizeof(int32_t), error) != LOOM_OK)
    throw runtime_error(who + ": copying the tokens: " + error);
  for (int32_t s = 0; s < S; ++s)
    for (int32_t i = 0; i < steps; ++i)
      tokens_out[static_cast<size_t>(s) * static_cast<size_t>(steps) + static_cast<size_t>(i)] =
          host[static_cast<size_t>(i) * static_cast<size_t>(S) + static_cast<size_t>(s)];
}

std::unique_ptr<HostedModel> ModelHost::open(const std::string &path, const std::string &attention, int32_t max_seqs,
                                             int32_t max_positions) const {
  std::filesystem::path dir = path;
  if (dir.is_relative()) dir = (options_.base_dir / dir).lexically_normal();
  if (attention.empty()) return std::make_unique<HostedModel>(options_, dir, max_seqs, max_positions);
  ModelHostOptions options = options_;
  std::string table = "use = ";
  table.append(nlohmann::json(attention).dump()).append("\n");
  options.attention = parse_component_spec(LOOM_KIND_ATTENTION, "attention", table, "model " + dir.string() + " attention");
  return std::make_unique<HostedModel>(options, dir, max_seqs, max_positions);
}

namespace {

// Runs `call`; a failure goes to `report` (its message) and becomes a status.
template <class Call, class Report>
loom_status status_of(const Call &call, const Report &report) {
  try {
    call();
    return LOOM_OK;
  } catch (const Error &e) {
    report(e.what());
    return e.status() != 0 ? e.status() : LOOM_ERR_INVALID_ARGUMENT;
  } catch (const std::bad_alloc &) {
    report("out of memory");
    return LOOM_ERR_OUT_OF_MEMORY;
  } catch (const std::exception &e) {
    report(e.what());
    return LOOM_ERR_INTERNAL;
  }
}

loom_status models_open(loom_host_ctx *ctx, const char *path, const char *attention, int32_t max_seqs,
                        int32_t max_positions, loom_host_model **out) {
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
  return status_of(
      [&] {
        auto handle = std::make_unique<loom_host_model>();
        handle->ctx = ctx;
        handle->model = ctx->models->open(path, attention ? attention : "", max_seqs, max_positions);
        *out = handle.release();
      },
      failed);
}

const char *models_open_error(loom_host_ctx *ctx) {
  if (!ctx) return "";
  std::lock_guard lock(ctx->mutex);
  return ctx->models_error.c_str();
}

int32_t models_vocab_size(loom_host_model *m) { return m && m->model ? m->model->vocab_size() : 0; }
int32_t models_max_positions(loom_host_model *m) { return m && m->model ? m->model->max_positions() : 0; }

// Runs `call` on the model, turning a failure into the context's error and a status.
template <class Call>
loom_status on_model(loom_host_model *m, const Call &call) {
  if (!m || !m->model) return LOOM_ERR_INVALID_ARGUMENT;
  return status_of([&] { call(*m->model); },
                   [&](const std::string &what) {
                     std::lock_guard lock(m->ctx->mutex);
                     m->ctx->last_error = what;
                   });
}

loom_status models_forward(loom_host_model *m, const loom_model_batch *b) {
  if (!b) return LOOM_ERR_INVALID_ARGUMENT;
  return on_model(m, [&](HostedModel &model) { model.forward(*b); });
}

loom_status models_greedy(loom_host_model *m, const loom_model_batch *b, int32_t steps, int32_t *tokens_out) {
  if (!b) return LOOM_ERR_INVALID_ARGUMENT;
  return on_model(m, [&](HostedModel &model) { model.greedy(*b, steps, tokens_out); });
}

void models_close(loom_host_model *m) noexcept {
  try {
    delete m;
  } catch (...) { // (a backend's teardown does not throw; nothing to report it to)
  }
}

const loom_host_models kModels = {sizeof(loom_host_models), models_open, models_vocab_size, models_max_positions, models_forward, models_close,
                                  models_open_error, models_greedy};

} // namespace

const loom_host_models *host_models_table() { return &kModels; }

} // namespace loom
