// [PEFT] item 1: the `bottleneck` adapter (Houlsby) on the block sites of adapter ABI 1.6, after
// each layer's attention and MLP. Its gradients through the trainer against finite differences;
// loom train trains one over the frozen default model and saves it (Loom's adapter_config.json);
// the CPU engine, loading it, gives the trainer's logits; a table that disagrees is refused.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../../core/cpu_backend.hpp"
#include "../../core/decoder_trainer.hpp"
#include "loom/core/error.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/core/registry.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/core/training.hpp"

namespace fs = std::filesystem;

namespace {

const fs::path kSource = LOOM_SOURCE_DIR;
const fs::path kKjv = kSource / "models/tiny-kjv";

struct Built {
  loom::Manifest manifest;
  std::unique_ptr<loom::Registry> registry;
  std::unique_ptr<loom::Pipeline> pipeline;
};
Built build(const std::string &text) {
  Built b{loom::parse_manifest_string(text, "bottleneck.toml"), nullptr, nullptr};
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
std::vector<Param> params_of(loom::Instance &adapter) {
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

const std::string kTable = "[[adapter]]\nuse = \"bottleneck\"\nsize = 16\nactivation = \"gelu\"\nseed = 2\n";

}  // namespace

TEST_CASE("a bottleneck adapter's gradients through the trainer match finite differences", "[train][peft]") {
  const fs::path dir = kSource / "tests/fixtures/models/tiny-llama";
  const loom::ModelConfig config = loom::load_model_config(dir);
  Built b = build("[model]\npath = \"" + dir.string() + "\"\n" +
                  "[[adapter]]\nuse = \"bottleneck\"\nsize = 3\nactivation = \"gelu\"\nscale = 0.5\nseed = 1\n");
  loom::DecoderTrainer<float> t(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)));
  t.attach_adapters(b.pipeline->list(LOOM_KIND_ADAPTER));
  t.set_frozen_base(true);
  auto params = params_of(*b.pipeline->list(LOOM_KIND_ADAPTER).front());
  REQUIRE(params.size() == static_cast<size_t>(config.n_layers) * 2 * 4);  // down, b_down, up, b_up per block
  CHECK(params[0].name == "base_model.model.model.layers.0.self_attn.adapter_down.weight");
  CHECK(params[7].name == "base_model.model.model.layers.0.mlp.adapter_up.bias");
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(-0.5f, 0.5f);
  for (auto &p : params)  // up starts at 0 (down's gradient would be 0): random values throughout
    for (size_t i = 0; i < p.n; ++i) p.value[i] = dist(rng);
  const std::vector<int32_t> tokens = {1, 17, 4, 33, 8, 21, 5, 99, 3, 42, 7};
  t.loss(tokens, true, 1.0);
  // Central differences in float with a wide step: each tensor's largest gradient entry.
  int checked = 0;
  for (auto &p : params) {
    const size_t i = static_cast<size_t>(std::max_element(p.grad, p.grad + p.n, [](float a, float c) {
                                           return std::fabs(a) < std::fabs(c);
                                         }) - p.grad);
    const float g = p.grad[i], keep = p.value[i], h = 2e-2f;
    if (std::fabs(g) < 1e-4f) continue;
    p.value[i] = keep + h;
    const double up = t.loss(tokens, false);
    p.value[i] = keep - h;
    const double down = t.loss(tokens, false);
    p.value[i] = keep;
    const double fd = (up - down) / (2.0 * h);
    INFO(p.name << "[" << i << "]: analytic " << g << ", finite differences " << fd);
    CHECK(std::fabs(fd - g) <= 0.03 * std::fabs(g) + 1e-4);
    ++checked;
  }
  CHECK(checked == static_cast<int>(params.size()));  // every tensor has a gradient worth checking
}

TEST_CASE("loom train trains a bottleneck adapter that the engine then runs with the trainer's logits", "[train][peft]") {
  const fs::path out = fs::temp_directory_path() / ("loom_bottleneck_" + std::to_string(::getpid()));
  fs::remove_all(out);
  const std::string head = "[loom]\ndevice = \"cpu\"\nseed = 5\n[model]\npath = \"" + kKjv.string() + "\"\n";
  const std::string train = "[train]\ndata = \"" + (kSource / "DESIGN.md").string() +
                            "\"\nvalidation_fraction = 0.1\nseq_len = 32\nbatch_size = 4\nsteps = 12\nlr = 3e-3\nwarmup = 2\n"
                            "eval_every = 0\nout = \"" + out.string() + "\"\n";
  loom::TrainOptions quiet;
  quiet.progress = false;
  const loom::TrainResult r = loom::train(loom::parse_manifest_string(head + kTable + train, "bottleneck.toml"), quiet);
  CHECK_THAT(r.device, Catch::Contains("adapters only (base frozen)"));
  REQUIRE(r.val_loss.size() == 2);
  CHECK(r.val_loss.back().second < r.val_loss.front().second - 0.25);  // it learns the new text
  std::ifstream config_in(r.adapter_dir / "adapter_config.json");
  const auto config_json = nlohmann::json::parse(config_in);
  CHECK(config_json["peft_type"] == "LOOM");
  CHECK(config_json["loom_component"] == "bottleneck");
  CHECK(config_json["loom_config"]["size"] == 16);
  CHECK(config_json["loom_config"]["activation"] == "gelu");

  // The trained adapter loaded twice: into the trainer and into the CPU engine.
  const std::string loaded = kTable + "weights = \"" + r.adapter_dir.string() + "\"\n";
  const loom::ModelConfig config = loom::load_model_config(kKjv);
  auto weights = [&] { return loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(kKjv)); };
  Built for_trainer = build(head + loaded), for_engine = build(head + loaded + "[attention]\nuse = \"sdpa\"\n");
  loom::DecoderTrainer<float> trainer(config, weights());
  trainer.attach_adapters(for_trainer.pipeline->list(LOOM_KIND_ADAPTER));
  const std::vector<int32_t> tokens = {1, 140, 7, 33, 512, 48, 9, 1200, 77, 5, 301};
  const std::vector<float> expected = trainer.logits(tokens);
  loom::CpuBackendOptions options;
  options.dtype = loom::ComputeDtype::float32;
  options.threads = 2;
  options.source_name = "bottleneck";
  loom::CpuBackend backend(config, weights(), *for_engine.pipeline, options);
  backend.reserve(1, 32);
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
  loom::StepBatch prefill;  // all but the last token, then the last as a decode step
  prefill.tokens.assign(tokens.begin(), tokens.end() - 1);
  prefill.seq_offsets = {0, static_cast<int32_t>(tokens.size() - 1)};
  prefill.seq_positions = {0};
  prefill.seq_slots = {0};
  CHECK(worst(backend.forward(prefill), tokens.size() - 2) < 1e-4);
  loom::StepBatch decode;
  decode.tokens = {tokens.back()};
  decode.seq_offsets = {0, 1};
  decode.seq_positions = {static_cast<int32_t>(tokens.size() - 1)};
  decode.seq_slots = {0};
  CHECK(worst(backend.forward(decode), tokens.size() - 1) < 1e-4);
  // Without the adapter the logits are elsewhere (so the comparison above means something).
  loom::DecoderTrainer<float> base(config, weights());
  const std::vector<float> plain = base.logits(tokens);
  double diff = 0;
  for (size_t i = 0; i < plain.size(); ++i) diff = std::max(diff, static_cast<double>(std::fabs(plain[i] - expected[i])));
  CHECK(diff > 1e-2);
  // A table that disagrees with the saved config is refused, naming the key; so is a LoRA
  // aimed at a block and a bottleneck that cannot merge.
  auto run = [&](const std::string &adapter) {
    return loom::Runtime::from_string(head + adapter + "[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n"
                                             "[run]\nprompt = [1, 140]\nsteps = 4\n",
                                      "run.toml");
  };
  CHECK_THROWS_WITH(run("[[adapter]]\nuse = \"bottleneck\"\nsize = 8\nactivation = \"gelu\"\nweights = \"" +
                        r.adapter_dir.string() + "\"\n")->run(),
                    Catch::Contains("\"loom_config\".size is 16, but adapter[0] (bottleneck) has size = 8"));
  CHECK_THROWS_WITH(run("[[adapter]]\nuse = \"lora\"\ntarget_modules = [\"mlp\"]\n")->run(),
                    Catch::Contains("'model.layers.0.mlp' is a block's output, not a linear module"));
  auto served = run(loaded);
  CHECK(served->run().tokens.size() == 4);
  CHECK_THROWS_WITH(served->merge_adapter("adapter[0]"), Catch::Contains("cannot merge into base weights"));
  fs::remove_all(out);
}
