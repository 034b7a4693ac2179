// [PEFT] item 1: the `prefix` adapter (prefix tuning) on the attention-prefix sites of adapter ABI
// 1.6. Its gradients through the trainer (with the reparameterisation MLP) against finite
// differences; loom train trains one over the frozen default model; the CPU engine, given the
// virtual tokens' placeholders, gives the trainer's logits.
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

}  // namespace

TEST_CASE("a prefix adapter's gradients through the trainer match finite differences", "[train][peft]") {
  const fs::path dir = kSource / "tests/fixtures/models/tiny-llama";
  const loom::ModelConfig config = loom::load_model_config(dir);
  for (const bool projection : {false, true}) {
    INFO("projection " << projection);
    Built b = build("[model]\npath = \"" + dir.string() + "\"\n[[adapter]]\nuse = \"prefix\"\nnum_virtual_tokens = 3\n"
                    "encoder_hidden_size = 5\nseed = 4\nprojection = " + (projection ? "true" : "false") + "\n");
    loom::DecoderTrainer<float> t(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)));
    t.attach_adapters(b.pipeline->list(LOOM_KIND_ADAPTER));
    t.set_frozen_base(true);
    auto params = params_of(*b.pipeline->list(LOOM_KIND_ADAPTER).front());
    // direct: one [3, 2 x kv] per layer; projection: the shared embedding and first layer, then
    // each layer's output weight and bias.
    REQUIRE(params.size() == (projection ? 3 + 2 * static_cast<size_t>(config.n_layers) : static_cast<size_t>(config.n_layers)));
    CHECK(params.back().name == (projection ? "base_model.model.model.layers.1.self_attn.prefix_encoder.out.bias"
                                            : "base_model.model.model.layers.1.self_attn.prefix_kv.weight"));
    const std::vector<int32_t> tokens = {1, 17, 4, 33, 8, 21, 5, 99, 3, 42, 7};
    t.loss(tokens, true, 1.0);
    // The virtual tokens matter: without them the loss differs.
    loom::DecoderTrainer<float> plain(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)));
    CHECK(std::fabs(plain.loss(tokens, false) - t.loss(tokens, false)) > 1e-4);
    const int checked = loom_test::check_largest_gradients(params, [&] { return t.loss(tokens, false); });
    CHECK(checked == static_cast<int>(params.size()));
  }
}

TEST_CASE("loom train trains a prefix adapter that the engine then runs with the trainer's logits", "[train][peft]") {
  const fs::path out = fs::temp_directory_path() / ("loom_prefix_" + std::to_string(::getpid()));
  fs::remove_all(out);
  const std::string &head = kKjvHead;
  const std::string table = "[[adapter]]\nuse = \"prefix\"\nnum_virtual_tokens = 6\nprojection = true\nencoder_hidden_size = 32\n";
  const loom::TrainResult r = loom_test::train_on_design(table, out, 1e-2);
  REQUIRE(r.val_loss.size() == 2);
  CHECK(r.val_loss.back().second < r.val_loss.front().second - 0.25);  // it learns the new text
  const auto config_json = loom_test::read_json(r.adapter_dir / "adapter_config.json");
  CHECK(config_json["loom_component"] == "prefix");
  CHECK(config_json["loom_config"]["num_virtual_tokens"] == 6);

  // The trained adapter in the trainer and in the CPU engine: the engine's step batch starts
  // with the 6 placeholders (their ids do not matter), then the tokens at positions 6, 7, ...
  const std::string loaded = table + "weights = \"" + r.adapter_dir.string() + "\"\n";
  const std::vector<int32_t> tokens = {1, 140, 7, 33, 512, 48, 9, 1200, 77, 5, 301};
  const auto [prefill_error, decode_error] =
      loom_test::engine_vs_trainer(kKjv, head + loaded, head + loaded + "[attention]\nuse = \"sdpa\"\n", tokens, 6);
  CHECK(prefill_error < 1e-4);
  CHECK(decode_error < 1e-4);
  // loom run with the adapter: generates (placeholders and all) without error, and a sequence
  // that does not fit the positions with its virtual tokens is refused by name.
  auto rt = loom::Runtime::from_string(head + loaded + "[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n"
                                                     "[run]\nprompt = [1, 140]\nsteps = 8\nstop_tokens = []\n",
                                       "run.toml");
  const loom::RunResult run = rt->run();
  CHECK(run.tokens.size() == 8);
  CHECK(run.sequences[0].prompt == std::vector<int32_t>{1, 140});
  CHECK_THROWS_WITH(rt->run(loom::load_model_config(kKjv).max_positions - 3), Catch::Contains("positions"));
  fs::remove_all(out);
}
