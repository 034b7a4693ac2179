// Shared by the adapter tests of core_train_test (bottleneck_test.cpp, prefix_test.cpp): the
// default model, a pipeline built from manifest text, an adapter's parameters as the plugin
// lists them, a short loom train of an adapter, and the trainer against the CPU engine.
#pragma once

#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <utility>
#include <string>
#include <vector>

#include "../../core/cpu_backend.hpp"
#include "../../core/decoder_trainer.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/core/training.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/core/registry.hpp"
#include "loom/loom_plugin_api.h"

#include <nlohmann/json.hpp>

namespace loom_test {

inline const std::filesystem::path kSource = LOOM_SOURCE_DIR;
inline const std::filesystem::path kKjv = kSource / "models/tiny-kjv";
// The head of the adapter tests' manifests: the default model on the CPU.
inline const std::string kKjvHead = "[loom]\ndevice = \"cpu\"\nseed = 5\n[model]\npath = \"" + kKjv.string() + "\"\n";

// loom train of the [[adapter]] `table` over the frozen default model on this repository's
// DESIGN.md (a text it has never seen): 12 steps of 4 x 32 tokens at `lr`, quiet, into `out`.
inline loom::TrainResult train_on_design(const std::string &table, const std::filesystem::path &out, double lr) {
  const std::string train = "[train]\ndata = \"" + (kSource / "DESIGN.md").string() +
                            "\"\nvalidation_fraction = 0.1\nseq_len = 32\nbatch_size = 4\nsteps = 12\nlr = " +
                            std::to_string(lr) + "\nwarmup = 2\neval_every = 0\nout = \"" + out.string() + "\"\n";
  loom::TrainOptions quiet;
  quiet.progress = false;
  return loom::train(loom::parse_manifest_string(kKjvHead + table + train, "adapter_train.toml"), quiet);
}

inline nlohmann::json read_json(const std::filesystem::path &path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

struct Built {
  loom::Manifest manifest;
  std::unique_ptr<loom::Registry> registry;
  std::unique_ptr<loom::Pipeline> pipeline;
};
inline Built build(const std::string &text) {
  Built b{loom::parse_manifest_string(text, "adapter.toml"), nullptr, nullptr};
  b.registry = std::make_unique<loom::Registry>(loom::Registry::default_search_paths(b.manifest.plugin_paths));
  b.registry->scan();
  b.pipeline = std::make_unique<loom::Pipeline>(*b.registry, loom::InstanceEnvironment{});
  b.pipeline->build(b.manifest);
  return b;
}

struct Param {
  std::string name;
  float *value, *grad;
  size_t n;
};
inline std::vector<Param> params_of(loom::Instance &adapter) {
  std::vector<Param> out;
  loom_tensor_sink sink{sizeof(loom_tensor_sink), &out, [](void *user, const char *name, DLTensor *t, DLTensor *g) -> loom_status {
                          size_t n = 1;
                          for (int i = 0; i < t->ndim; ++i) n *= static_cast<size_t>(t->shape[i]);
                          static_cast<std::vector<Param> *>(user)->push_back(
                              {name, static_cast<float *>(t->data), static_cast<float *>(g->data), n});
                          return LOOM_OK;
                        }};
  adapter.check(adapter.vtable<loom_adapter_vtable>()->parameters(adapter.handle(), &sink), "parameters");
  return out;
}

// Central differences (step 2e-2, in float) of the trainer's loss at each tensor's largest
// gradient entry against that gradient; returns how many tensors were checked (those whose
// largest gradient exceeds 1e-4). `loss` recomputes the loss without backward.
template <class Loss>
int check_largest_gradients(std::vector<Param> &params, Loss &&loss) {
  int checked = 0;
  for (auto &p : params) {
    size_t i = 0;
    for (size_t j = 1; j < p.n; ++j)
      if (std::fabs(p.grad[j]) > std::fabs(p.grad[i])) i = j;
    const float g = p.grad[i], keep = p.value[i], h = 2e-2f;
    if (std::fabs(g) < 1e-4f) continue;
    p.value[i] = keep + h;
    const double up = loss();
    p.value[i] = keep - h;
    const double down = loss();
    p.value[i] = keep;
    const double fd = (up - down) / (2.0 * h);
    INFO(p.name << "[" << i << "]: analytic " << g << ", finite differences " << fd);
    CHECK(std::fabs(fd - g) <= 0.03 * std::fabs(g) + 1e-4);
    ++checked;
  }
  return checked;
}

// The default-model-shaped check that an adapter loaded by the trainer and by the CPU engine
// computes the same: the trainer's logits over `tokens` (with `trainer_text`'s adapters), and the
// engine's (with `engine_text`'s) over `virtual_n` placeholders, then all but the last token as
// one prefill and the last as a decode step. Returns the two steps' max |engine - trainer| /
// max |trainer| at their positions.
inline std::pair<double, double> engine_vs_trainer(const std::filesystem::path &model, const std::string &trainer_text,
                                                   const std::string &engine_text, const std::vector<int32_t> &tokens,
                                                   int32_t virtual_n) {
  const loom::ModelConfig config = loom::load_model_config(model);
  auto weights = [&] { return loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(model)); };
  Built for_trainer = build(trainer_text), for_engine = build(engine_text);
  loom::DecoderTrainer<float> trainer(config, weights());
  trainer.attach_adapters(for_trainer.pipeline->list(LOOM_KIND_ADAPTER));
  const std::vector<float> expected = trainer.logits(tokens);
  loom::CpuBackendOptions options;
  options.dtype = loom::ComputeDtype::float32;
  options.threads = 2;
  options.source_name = "engine";
  loom::CpuBackend backend(config, weights(), *for_engine.pipeline, options);
  backend.reserve(1, static_cast<int64_t>(tokens.size()) + virtual_n);
  auto worst = [&](const DLTensor *got, size_t position) {
    const auto *row = static_cast<const float *>(got->data);
    double w = 0, largest = 0;
    for (int64_t v = 0; v < config.vocab_size; ++v) {
      const double e = expected[position * static_cast<size_t>(config.vocab_size) + static_cast<size_t>(v)];
      w = std::max(w, std::fabs(row[v] - e));
      largest = std::max(largest, std::fabs(e));
    }
    return w / largest;
  };
  loom::StepBatch prefill;
  prefill.tokens.assign(static_cast<size_t>(virtual_n), 0);
  prefill.tokens.insert(prefill.tokens.end(), tokens.begin(), tokens.end() - 1);
  prefill.seq_offsets = {0, static_cast<int32_t>(prefill.tokens.size())};
  prefill.seq_positions = {0};
  prefill.seq_slots = {0};
  const double first = worst(backend.forward(prefill), tokens.size() - 2);
  loom::StepBatch decode;
  decode.tokens = {tokens.back()};
  decode.seq_offsets = {0, 1};
  decode.seq_positions = {static_cast<int32_t>(virtual_n + static_cast<int32_t>(tokens.size()) - 1)};
  decode.seq_slots = {0};
  return {first, worst(backend.forward(decode), tokens.size() - 1)};
}

}  // namespace loom_test
