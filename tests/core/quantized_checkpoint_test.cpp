// `loom quantize` checkpoints: a model written with its linears as the quantizer stores them
// loads without re-quantizing and computes exactly what the quantizer made at load time; a
// corrupt or mismatched quantized checkpoint gets an error naming the module and what is wrong.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
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

// Rewrites dir's checkpoint into a new directory after `edit` changes its tensors and its
// loom.quantization metadata (null, and written back only, where the file has it).
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
  const auto stored = file.metadata().find("loom.quantization");
  nlohmann::json meta = stored == file.metadata().end() ? nlohmann::json() : nlohmann::json::parse(stored->second);
  edit(tensors, meta);
  const fs::path out = fresh_dir(name);
  fs::create_directories(out);
  for (const char *f : {"config.json", "tokenizer.model"}) fs::copy_file(dir / f, out / f);
  std::vector<loom::TensorToWrite> w;
  for (const auto &t : tensors) w.push_back({t.name, t.dtype, t.shape, t.bytes});
  std::map<std::string, std::string> file_meta;
  if (!meta.is_null()) file_meta["loom.quantization"] = meta.dump();
  loom::write_safetensors(out / "model.safetensors", w, file_meta);
  return out;
}

// The float16 nearest a positive finite float (round to nearest even), as its bits.
uint16_t half_bits(float x) {
  int e = 0;
  std::frexp(x, &e);                      // x = m 2^e, m in [0.5, 1)
  const int exp = std::max(e - 1, -14);   // the half's exponent (subnormals below 2^-14)
  const double step = std::ldexp(1.0, exp - 10);
  double m = std::nearbyint(static_cast<double>(x) / step); // mantissa with its leading 1
  int ex = exp;
  if (m >= 2048) {                        // rounded up into the next binade
    m /= 2;
    ++ex;
  }
  if (m < 1024) return static_cast<uint16_t>(m); // subnormal
  return static_cast<uint16_t>(((ex + 15) << 10) | (static_cast<int>(m) - 1024));
}
float half_value(uint16_t h) {
  const int exp = (h >> 10) & 31, mant = h & 1023;
  return exp == 0 ? std::ldexp(static_cast<float>(mant), -24) : std::ldexp(static_cast<float>(mant + 1024), exp - 25);
}

// dir's `loom quantize` int4 checkpoint (zero points) rewritten as a Hugging Face checkpoint:
// "awq" (AutoAWQ's GEMM packing: nibble n of a word holds output 8c + (0, 2, 4, 6, 1, 3, 5, 7)[n]
// of input row i), "gptq" (GPTQ v1: inputs packed down the columns, zero points stored less one,
// g_idx), each with float16 scales and config.json's quantization_config; or "loom" (the same
// layout as dir with its scales rounded to float16, the weights the other two hold). The tied
// head stays unquantized in the checkpoint (HF checkpoints leave it so).
fs::path hf_checkpoint(const fs::path &dir, const std::string &format, int64_t group, const nlohmann::json &qconfig) {
  const auto file = loom::SafetensorsFile::open(dir / "model.safetensors");
  auto meta = nlohmann::json::parse(file.metadata().at("loom.quantization"));
  meta["modules"].erase("lm_head");
  std::map<std::string, const loom::SafetensorsTensor *, std::less<>> by_name;
  for (const auto &t : file.tensors()) by_name[t.name] = &t;
  std::vector<Rewritten> out;
  for (const auto &t : file.tensors()) {
    const size_t dot = t.name.rfind('.');
    const std::string module = t.name.substr(0, dot), suffix = t.name.substr(dot + 1);
    if (module == "lm_head") continue;
    if (!meta["modules"].contains(module)) {
      out.push_back({t.name, t.shape, t.dtype, std::vector<std::byte>(t.data, t.data + t.nbytes)});
      continue;
    }
    if (suffix != "qweight") continue;  // a module's three tensors are written once, below
    const auto *qw = by_name.at(module + ".qweight"), *sc = by_name.at(module + ".scales"), *zs = by_name.at(module + ".zeros");
    const int64_t O = qw->shape[0], I = qw->shape[1] * 2, G = I / group;
    const auto *codes = reinterpret_cast<const uint8_t *>(qw->data);
    const auto *scales = reinterpret_cast<const float *>(sc->data);
    const auto *zeros = reinterpret_cast<const uint8_t *>(zs->data);
    auto code = [&](int64_t o, int64_t i) { return static_cast<uint32_t>((codes[o * (I / 2) + i / 2] >> (4 * (i & 1))) & 15); };
    std::vector<uint16_t> s16(static_cast<size_t>(G * O));  // [G, O]
    for (int64_t o = 0; o < O; ++o)
      for (int64_t g = 0; g < G; ++g) s16[static_cast<size_t>(g * O + o)] = half_bits(scales[o * G + g]);
    auto bytes_of = [](const auto &v) {
      const auto *p = reinterpret_cast<const std::byte *>(v.data());
      return std::vector<std::byte>(p, p + v.size() * sizeof(v[0]));
    };
    if (format == "loom") {
      std::vector<float> rounded(static_cast<size_t>(O * G));
      for (int64_t o = 0; o < O; ++o)
        for (int64_t g = 0; g < G; ++g) rounded[static_cast<size_t>(o * G + g)] = half_value(s16[static_cast<size_t>(g * O + o)]);
      out.push_back({module + ".qweight", qw->shape, qw->dtype, std::vector<std::byte>(qw->data, qw->data + qw->nbytes)});
      out.push_back({module + ".scales", sc->shape, sc->dtype, bytes_of(rounded)});
      out.push_back({module + ".zeros", zs->shape, zs->dtype, std::vector<std::byte>(zs->data, zs->data + zs->nbytes)});
      continue;
    }
    const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    const bool awq = format == "awq";
    std::vector<uint32_t> qweight(static_cast<size_t>(I * O / 8), 0), qzeros(static_cast<size_t>(G * O / 8), 0);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < O / 8; ++c)
        for (int n = 0; n < 8; ++n) {
          const int64_t o = 8 * c + (awq ? order[n] : n);
          const uint32_t z = zeros[o * G + g];
          qzeros[static_cast<size_t>(g * (O / 8) + c)] |= (awq ? z : (z - 1) & 15u) << (4 * n);
        }
    if (awq) {
      for (int64_t i = 0; i < I; ++i)
        for (int64_t c = 0; c < O / 8; ++c)
          for (int n = 0; n < 8; ++n) qweight[static_cast<size_t>(i * (O / 8) + c)] |= code(8 * c + order[n], i) << (4 * n);
    } else {
      for (int64_t r = 0; r < I / 8; ++r)
        for (int64_t o = 0; o < O; ++o)
          for (int n = 0; n < 8; ++n) qweight[static_cast<size_t>(r * O + o)] |= code(o, 8 * r + n) << (4 * n);
      std::vector<int32_t> g_idx(static_cast<size_t>(I));
      for (int64_t i = 0; i < I; ++i) g_idx[static_cast<size_t>(i)] = static_cast<int32_t>(i / group);
      out.push_back({module + ".g_idx", {I}, loom::SafetensorsDtype::I32, bytes_of(g_idx)});
    }
    out.push_back({module + ".qweight", awq ? std::vector<int64_t>{I, O / 8} : std::vector<int64_t>{I / 8, O},
                   loom::SafetensorsDtype::I32, bytes_of(qweight)});
    out.push_back({module + ".qzeros", {G, O / 8}, loom::SafetensorsDtype::I32, bytes_of(qzeros)});
    out.push_back({module + ".scales", {G, O}, loom::SafetensorsDtype::F16, bytes_of(s16)});
  }
  const fs::path to = fresh_dir("hf_" + format);
  fs::create_directories(to);
  fs::copy_file(dir / "tokenizer.model", to / "tokenizer.model");
  auto config = nlohmann::json::parse(std::ifstream(dir / "config.json"));
  if (!qconfig.is_null()) config["quantization_config"] = qconfig;
  std::ofstream(to / "config.json") << config.dump(2);
  std::vector<loom::TensorToWrite> w;
  for (const auto &t : out) w.push_back({t.name, t.dtype, t.shape, t.bytes});
  std::map<std::string, std::string> file_meta;
  if (format == "loom") file_meta["loom.quantization"] = meta.dump();
  loom::write_safetensors(to / "model.safetensors", w, file_meta);
  return to;
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

TEST_CASE("AutoAWQ and GPTQ checkpoints load through config.json's quantization_config", "[quant][checkpoint]") {
  const std::string int4 = "use = \"int4\"\ngroup_size = 64\n";
  const fs::path dir = fresh_dir("hf_source");
  loom::Runtime::from_string(manifest(kKjv, int4), "q.toml")->export_quantized(dir);
  const nlohmann::json awq = {{"quant_method", "awq"}, {"bits", 4}, {"group_size", 64}, {"zero_point", true}, {"version", "gemm"}};
  const nlohmann::json gptq = {{"quant_method", "gptq"}, {"bits", 4},         {"group_size", 64},
                               {"desc_act", false},    {"sym", false},      {"checkpoint_format", "gptq"}};
  const fs::path reference = hf_checkpoint(dir, "loom", 64, nullptr);
  const fs::path awq_dir = hf_checkpoint(dir, "awq", 64, awq), gptq_dir = hf_checkpoint(dir, "gptq", 64, gptq);
  // The codes, zero points and float16 scales are the checkpoint's: the same logits, exactly.
  const std::vector<float> expected = logits(reference, int4, false);
  CHECK(logits(awq_dir, int4, false) == expected);
  CHECK(logits(gptq_dir, int4, false) == expected);
  // Generation runs on them, and a checkpoint without [quantizer] names what to add.
  CHECK(load_error(awq_dir, int4).empty());
  CHECK_THAT(load_error(awq_dir, ""), Catch::Contains("quantized by 'int4' (AutoAWQ)") && Catch::Contains("[quantizer]"));

  // What does not load is refused naming the key or tensor.
  auto with_config = [&](const fs::path &from, const std::string &name, const std::function<void(nlohmann::json &)> &edit) {
    const fs::path to = fresh_dir(name);
    fs::create_directories(to);
    for (const char *f : {"model.safetensors", "tokenizer.model"}) fs::copy_file(from / f, to / f);
    auto config = nlohmann::json::parse(std::ifstream(from / "config.json"));
    edit(config["quantization_config"]);
    std::ofstream(to / "config.json") << config.dump(2);
    return to;
  };
  auto expect = [&](const fs::path &bad, const std::vector<std::string> &words) {
    const std::string e = load_error(bad, int4);
    INFO(e);
    for (const auto &w : words) CHECK_THAT(e, Catch::Contains(w));
    fs::remove_all(bad);
  };
  expect(with_config(awq_dir, "bnb", [](auto &q) { q["quant_method"] = "bitsandbytes"; }), {"quant_method", "bitsandbytes"});
  expect(with_config(awq_dir, "bits8", [](auto &q) { q["bits"] = 8; }), {"quantization_config.bits", "only 4-bit"});
  expect(with_config(awq_dir, "gemv", [](auto &q) { q["version"] = "gemv"; }), {"version", "gemv"});
  expect(with_config(gptq_dir, "desc_act", [](auto &q) { q["desc_act"] = true; }), {"desc_act"});
  expect(with_config(awq_dir, "group", [](auto &q) { q["group_size"] = 128; }), {"model.layers.0", "group_size 128"});
  // An act-order g_idx (inputs of one group scattered) and a scales tensor of the wrong shape.
  const std::string module = "model.layers.1.mlp.down_proj";
  auto rewrite_tensor = [&](const fs::path &from, const std::string &name, const std::string &tensor,
                            const std::function<void(Rewritten &)> &edit) {
    return rewrite(from, name, [&](std::vector<Rewritten> &ts, nlohmann::json &) {
      for (auto &t : ts)
        if (t.name == tensor) edit(t);
    });
  };
  expect(rewrite_tensor(gptq_dir, "g_idx", module + ".g_idx",
                        [](Rewritten &t) { t.bytes[0] = std::byte{1}; }), // input 0 in group 1
         {module, "g_idx", "act-order"});
  expect(rewrite_tensor(awq_dir, "scales_shape", module + ".scales", [](Rewritten &t) { std::swap(t.shape[0], t.shape[1]); }),
         {module, "'scales'", "shape"});
  for (const fs::path &d : {dir, reference, awq_dir, gptq_dir}) fs::remove_all(d);
}
