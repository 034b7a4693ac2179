// `loom quantize` checkpoints: a model written with its linears as the quantizer stores them
// loads without re-quantizing and computes exactly what the quantizer made at load time; a
// corrupt or mismatched quantized checkpoint gets an error naming the module and what is wrong.
#include <catch2/catch.hpp>

#include <cstring>
#include <unistd.h>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../../core/calibration.hpp"
#include "quant_test_support.hpp"
#include "../../core/cpu_backend.hpp"
#include "loom/core/error.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/core/safetensors_writer.hpp"
#include "loom/core/tokenizer.hpp"

namespace fs = std::filesystem;

namespace {

using quant_test::kCalibration;
using quant_test::kKjv;

std::string manifest(const fs::path &model, const std::string &quantizer, const std::string &model_extra = "") {
  std::string m = "[loom]\ndevice = \"cpu\"\n[model]\npath = \"" + model.string() + "\"\n" + model_extra +
                  "[run]\nprompt = \"And God said\"\nsteps = 8\n[attention]\nuse = \"sdpa\"\nblock_size = 16\n"
                  "[[sampler]]\nuse = \"greedy\"\n";
  if (!quantizer.empty()) m += "[quantizer]\n" + quantizer;
  return m;
}

std::string calibration_keys() { return "calibration = \"" + kCalibration.string() + "\"\ncalibration_tokens = 300\n"; }

fs::path fresh_dir(const std::string &name) {
  const fs::path d = fs::temp_directory_path() / ("loom_qckpt_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  return d;
}

// Logits after each prefix of `ids` (one ragged batch, prefix s in slot s) from a CPU backend of
// its own over `model`, quantized by the runtime's quantizer (calibrated as `calibrated` says).
std::vector<float> logits(const fs::path &model, const std::string &quantizer, bool calibrated) {
  auto rt = loom::Runtime::from_string(manifest(model, quantizer), "q.toml");
  const loom::ModelConfig config = loom::load_model_config(model);
  const auto options = quant_test::options("q.toml", calibrated ? 300 : 0, 256, config.max_positions);
  loom::CpuBackend backend(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(model)),
                           rt->pipeline(), options);
  const std::vector<int32_t> ids = {1, 37, 12, 99, 410, 7, 250};
  backend.reserve(static_cast<int32_t>(ids.size()), 16);
  loom::StepBatch b;
  b.seq_offsets = {0};
  for (size_t s = 0; s < ids.size(); ++s) {
    b.tokens.insert(b.tokens.end(), ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(s) + 1);
    b.seq_offsets.push_back(static_cast<int32_t>(b.tokens.size()));
    b.seq_positions.push_back(0);
    b.seq_slots.push_back(static_cast<int32_t>(s));
  }
  const DLTensor *t = backend.forward(b);
  const float *p = static_cast<const float *>(t->data);
  return std::vector<float>(p, p + ids.size() * static_cast<size_t>(config.vocab_size));
}

std::string load_error(const fs::path &model, const std::string &quantizer) {
  try {
    loom::Runtime::from_string(manifest(model, quantizer), "q.toml")->run();
  } catch (const loom::Error &e) {
    return e.what();
  }
  return "";
}

// Rewrites dir's checkpoint into a new directory after `edit` changes its tensors and metadata.
struct Rewritten {
  std::string name;
  std::vector<int64_t> shape;
  loom::SafetensorsDtype dtype;
  std::vector<std::byte> bytes;
};
fs::path rewrite(const fs::path &dir, const std::string &name,
                 const std::function<void(std::vector<Rewritten> &, nlohmann::json &)> &edit) {
  const auto file = loom::SafetensorsFile::open(dir / "model.safetensors");
  std::vector<Rewritten> tensors;
  for (const auto &t : file.tensors())
    tensors.push_back({t.name, t.shape, t.dtype, std::vector<std::byte>(t.data, t.data + t.nbytes)});
  auto meta = nlohmann::json::parse(file.metadata().at("loom.quantization"));
  edit(tensors, meta);
  const fs::path out = fresh_dir(name);
  fs::create_directories(out);
  for (const char *f : {"config.json", "tokenizer.model"}) fs::copy_file(dir / f, out / f);
  std::vector<loom::TensorToWrite> w;
  for (const auto &t : tensors) w.push_back({t.name, t.dtype, t.shape, t.bytes});
  loom::write_safetensors(out / "model.safetensors", w, {{"loom.quantization", meta.dump()}});
  return out;
}

} // namespace

TEST_CASE("a quantized checkpoint loads without re-quantizing and computes the same logits", "[quant][checkpoint]") {
  struct Case {
    std::string quantizer;
    bool calibrated;
  };
  for (const Case &c : {Case{"use = \"int8\"\n", false}, Case{"use = \"int4\"\ngroup_size = 64\n", false},
                        Case{"use = \"int4\"\ngroup_size = 32\nmethod = \"awq\"\n", true}}) {
    INFO(c.quantizer);
    const fs::path dir = fresh_dir("roundtrip");
    // float32 compute, as logits() below: AWQ's choices follow the calibration activations.
    loom::Runtime::from_string(
        manifest(kKjv, c.quantizer, "dtype = \"float32\"\n" + (c.calibrated ? calibration_keys() : std::string())),
        "q.toml")
        ->export_quantized(dir);
    REQUIRE(fs::exists(dir / "model.safetensors"));
    CHECK(fs::exists(dir / "config.json"));
    CHECK(fs::exists(dir / "tokenizer.model"));
    const auto file = loom::SafetensorsFile::open(dir / "model.safetensors");
    CHECK(file.find("model.layers.0.self_attn.q_proj.weight") == nullptr);
    CHECK(file.find("model.layers.0.self_attn.q_proj.qweight") != nullptr);
    CHECK(file.find("model.embed_tokens.weight") != nullptr); // the tied head's lookups
    CHECK(file.find("lm_head.qweight") != nullptr);
    const auto meta = nlohmann::json::parse(file.metadata().at("loom.quantization"));
    CHECK(meta["modules"].size() == 29);
    CHECK(meta["modules"]["lm_head"]["shape"] == nlohmann::json{2000, 192});
    // The same numbers as quantizing at load; the stored file is smaller than the bf16 one.
    CHECK(logits(dir, c.quantizer, false) == logits(kKjv, c.quantizer, c.calibrated));
    CHECK(fs::file_size(dir / "model.safetensors") < fs::file_size(kKjv / "model.safetensors"));
    // Loading and exporting again writes the same tensors.
    const fs::path again = fresh_dir("again");
    loom::Runtime::from_string(manifest(dir, c.quantizer), "q.toml")->export_quantized(again);
    const auto second = loom::SafetensorsFile::open(again / "model.safetensors");
    REQUIRE(second.tensors().size() == file.tensors().size());
    for (const auto &t : file.tensors()) {
      const auto *u = second.find(t.name);
      REQUIRE(u != nullptr);
      CHECK(u->nbytes == t.nbytes);
      CHECK(std::memcmp(u->data, t.data, static_cast<size_t>(t.nbytes)) == 0);
    }
    fs::remove_all(again);
    fs::remove_all(dir);
  }
}

TEST_CASE("a corrupt or mismatched quantized checkpoint gets an error naming what is wrong", "[quant][checkpoint]") {
  const std::string int4 = "use = \"int4\"\ngroup_size = 64\n";
  const fs::path dir = fresh_dir("corrupt");
  loom::Runtime::from_string(manifest(kKjv, int4), "q.toml")->export_quantized(dir);

  CHECK_THAT(load_error(dir, ""), Catch::Contains("quantized by 'int4'") && Catch::Contains("[quantizer]"));
  CHECK_THAT(load_error(dir, "use = \"int8\"\n"),
             Catch::Contains("model.layers.0.self_attn.q_proj") && Catch::Contains("unknown format 'loom-int4'"));

  const std::string module = "model.layers.1.mlp.down_proj";
  auto expect = [&](const fs::path &bad, const std::vector<std::string> &words) {
    const std::string e = load_error(bad, int4);
    INFO(e);
    for (const auto &w : words) CHECK_THAT(e, Catch::Contains(w));
    fs::remove_all(bad);
  };
  expect(rewrite(dir, "scales", [&](auto &ts, auto &) {
           for (auto &t : ts)
             if (t.name == module + ".scales") {
               t.shape = {t.shape[0] * t.shape[1]};
             }
         }),
         {module, "'scales'", "shape"});
  expect(rewrite(dir, "group", [&](auto &, auto &m) { m["modules"][module]["metadata"]["group_size"] = 48; }),
         {module, "group_size 48 does not divide in_features 448"});
  expect(rewrite(dir, "zeros", [&](auto &ts, auto &) {
           std::erase_if(ts, [&](const auto &t) { return t.name == module + ".zeros"; });
         }),
         {module, "missing tensor 'zeros'"});
  expect(rewrite(dir, "none", [&](auto &ts, auto &) {
           std::erase_if(ts, [&](const auto &t) { return t.name.rfind(module + ".", 0) == 0; });
         }),
         {module, "holds none of its tensors"});
  expect(rewrite(dir, "shape", [&](auto &, auto &m) { m["modules"][module]["shape"] = {192, 192}; }),
         {module, "does not match the config's [192, 448]"});
  expect(rewrite(dir, "stranger", [&](auto &, auto &m) {
           m["modules"]["model.layers.9.mlp.up_proj"] = m["modules"][module];
         }),
         {"model.layers.9.mlp.up_proj", "not a linear layer"});
  expect(rewrite(dir, "kept", [&](auto &ts, auto &) {
           // The float weight of a quantized module: not a weight this checkpoint may hold.
           ts.push_back({"model.layers.1.mlp.down_proj.bias", {192}, loom::SafetensorsDtype::F32,
                         std::vector<std::byte>(192 * 4)});
         }),
         {"model.layers.1.mlp.down_proj.bias", "not a weight"});
  expect(rewrite(dir, "json", [&](auto &, auto &m) { m = "not an object"; }), {"loom.quantization", "expected"});
  fs::remove_all(dir);
}
