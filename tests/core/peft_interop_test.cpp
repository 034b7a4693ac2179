// [PEFT] item 3: LoRA adapters in the Hugging Face PEFT layout, both ways. The peft library on
// the GPU machine (tests/fixtures/make_peft_golden.py) loaded the adapter Loom trained
// (tests/fixtures/peft/loom-lora, from tests/fixtures/peft/loom_lora.toml) onto transformers' model,
// and wrote one of its own (tests/fixtures/peft/peft-lora); Loom's CPU backend with each adapter
// loaded through [[adapter]] weights must give peft's logits (float32, relative error 1e-4).
#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../../core/cpu_backend.hpp"
#include "loom/core/error.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/core/registry.hpp"
#include "loom/core/safetensors.hpp"

namespace fs = std::filesystem;

namespace {

const fs::path kSource = LOOM_SOURCE_DIR;
const fs::path kKjv = kSource / "models/tiny-kjv";

// Logits after each of `ids` (decode steps) with the adapter in `adapter_dir` (none when empty).
std::vector<std::vector<float>> logits_with(const fs::path &adapter_dir, const std::vector<int32_t> &ids) {
  std::string text = "[model]\npath = \"" + kKjv.string() + "\"\n[attention]\nuse = \"sdpa\"\n";
  if (!adapter_dir.empty())
    text += "[[adapter]]\nuse = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\n"
            "weights = \"" + adapter_dir.string() + "\"\n";
  const loom::Manifest m = loom::parse_manifest_string(text, "peft.toml");
  loom::Registry registry(loom::Registry::default_search_paths(m.plugin_paths));
  registry.scan();
  loom::Pipeline pipeline(registry, loom::InstanceEnvironment{});
  pipeline.build(m);
  const loom::ModelConfig config = loom::load_model_config(kKjv);
  loom::CpuBackendOptions options;
  options.dtype = loom::ComputeDtype::float32;
  options.threads = 2;
  options.source_name = "peft";
  loom::CpuBackend backend(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(kKjv)), pipeline,
                           options);
  backend.reserve(1, static_cast<int64_t>(ids.size()));
  std::vector<std::vector<float>> out;
  for (size_t p = 0; p < ids.size(); ++p) {
    loom::StepBatch b;
    b.tokens = {ids[p]};
    b.seq_offsets = {0, 1};
    b.seq_positions = {static_cast<int32_t>(p)};
    b.seq_slots = {0};
    const DLTensor *t = backend.forward(b);
    const auto *row = static_cast<const float *>(t->data);
    out.emplace_back(row, row + config.vocab_size);
  }
  return out;
}

// max |ours - theirs| / max |theirs| over the golden positions.
double worst_relative(const std::vector<std::vector<float>> &ours, const nlohmann::json &golden,
                      const std::vector<int> &positions) {
  double worst = 0, largest = 0;
  for (size_t k = 0; k < positions.size(); ++k)
    for (size_t v = 0; v < golden[k].size(); ++v) {
      const double theirs = golden[k][v].get<double>();
      worst = std::max(worst, std::fabs(ours[static_cast<size_t>(positions[k])][v] - theirs));
      largest = std::max(largest, std::fabs(theirs));
    }
  return worst / largest;
}

}  // namespace

TEST_CASE("LoRA adapters cross between Loom and peft with the same logits", "[peft][golden]") {
  std::ifstream in(kSource / "tests/fixtures/peft/peft_golden.json");
  REQUIRE(in.good());
  const auto golden = nlohmann::json::parse(in);
  const auto ids = golden["input_ids"].get<std::vector<int32_t>>();
  const auto positions = golden["positions"].get<std::vector<int>>();
  CHECK(worst_relative(logits_with({}, ids), golden["base"], positions) < 1e-4);
  for (const char *name : {"loom_lora", "peft_lora"}) {
    INFO(name);
    const fs::path dir = kSource / "tests/fixtures/peft" / (std::string(name) == "loom_lora" ? "loom-lora" : "peft-lora");
    const double err = worst_relative(logits_with(dir, ids), golden[name], positions);
    INFO("relative error " << err);
    CHECK(err < 1e-4);
    // The adapter matters: without it the logits are far from these.
    CHECK(worst_relative(logits_with({}, ids), golden[name], positions) > 1e-2);
  }
}

TEST_CASE("a PEFT adapter that does not fit is refused by file and key", "[peft]") {
  const fs::path dir = fs::temp_directory_path() / ("loom_peft_bad_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(kSource / "tests/fixtures/peft/peft-lora/adapter_model.safetensors", dir / "adapter_model.safetensors");
  {  // a rank the table does not have
    std::ofstream(dir / "adapter_config.json") << R"({"peft_type": "LORA", "r": 8, "lora_alpha": 8})";
    CHECK_THROWS_WITH(logits_with(dir, {1, 2}), Catch::Contains("adapter_config.json: \"r\" is 8, but adapter[0] (lora) has r = 4"));
  }
  {  // another adapter of the same modules and rank loads
    std::ofstream(dir / "adapter_config.json") << R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8})";
    fs::copy_file(kSource / "tests/fixtures/peft/loom-lora/adapter_model.safetensors", dir / "adapter_model.safetensors",
                  fs::copy_options::overwrite_existing);
    CHECK_NOTHROW(logits_with(dir, {1, 2}));
  }
  {  // not an adapter file at all
    std::ofstream(dir / "adapter_model.safetensors") << "not safetensors";
    CHECK_THROWS_WITH(logits_with(dir, {1, 2}), Catch::Contains("adapter_model.safetensors"));
  }
  fs::remove_all(dir);
}
