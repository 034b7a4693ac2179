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
#include "adapter_test_support.hpp"
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

using loom_test::kKjv;
using loom_test::kKjvHead;
using loom_test::kSource;
using loom_test::Built;
using loom_test::build;
using loom_test::Param;
using loom_test::params_of;

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
  const int checked = loom_test::check_largest_gradients(params, [&] { return t.loss(tokens, false); });
  CHECK(checked == static_cast<int>(params.size()));  // every tensor has a gradient worth checking
}

TEST_CASE("loom train trains a bottleneck adapter that the engine then runs with the trainer's logits", "[train][peft]") {
  const fs::path out = fs::temp_directory_path() / ("loom_bottleneck_" + std::to_string(::getpid()));
  fs::remove_all(out);
  const std::string &head = kKjvHead;
  const loom::TrainResult r = loom_test::train_on_design(kTable, out, 3e-3);
  CHECK_THAT(r.device, Catch::Contains("adapters only (base frozen)"));
  REQUIRE(r.val_loss.size() == 2);
  CHECK(r.val_loss.back().second < r.val_loss.front().second - 0.25);  // it learns the new text
  const auto config_json = loom_test::read_json(r.adapter_dir / "adapter_config.json");
  CHECK(config_json["peft_type"] == "LOOM");
  CHECK(config_json["loom_component"] == "bottleneck");
  CHECK(config_json["loom_config"]["size"] == 16);
  CHECK(config_json["loom_config"]["activation"] == "gelu");

  // The trained adapter loaded twice: into the trainer and into the CPU engine.
  const std::string loaded = kTable + "weights = \"" + r.adapter_dir.string() + "\"\n";
  const std::vector<int32_t> tokens = {1, 140, 7, 33, 512, 48, 9, 1200, 77, 5, 301};
  const auto [prefill_error, decode_error] =
      loom_test::engine_vs_trainer(kKjv, head + loaded, head + loaded + "[attention]\nuse = \"sdpa\"\n", tokens, 0);
  CHECK(prefill_error < 1e-4);
  CHECK(decode_error < 1e-4);
  // Without the adapter the logits are elsewhere (so the comparison above means something).
  CHECK(loom_test::engine_vs_trainer(kKjv, head + loaded, head + "[attention]\nuse = \"sdpa\"\n", tokens, 0).second > 1e-2);
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
