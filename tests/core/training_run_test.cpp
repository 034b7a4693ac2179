// `loom train` on the CPU (loom::train): [train] manifest errors, data files (text and JSON
// Lines with "text" or chat "messages") and their errors, the learning-rate schedule in the log,
// a resumed run equal to an uninterrupted one (losses and final weights bit for bit), the
// exported model loading in Loom's engine, validation loss going down, and the plot.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <span>
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../../core/training_data.hpp"
#include "loom/core/error.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/core/safetensors_writer.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/tokenizer.hpp"
#include "loom/core/training.hpp"

namespace fs = std::filesystem;

namespace {

const fs::path kSource = LOOM_SOURCE_DIR;
const fs::path kKjv = kSource / "models/tiny-kjv";
const fs::path kTrainText = kSource / "tests/fixtures/text/kjv_calibration.txt";
const fs::path kHeldOut = kSource / "tests/fixtures/text/kjv_heldout.txt";

fs::path scratch(const std::string &name) {
  const fs::path d = fs::temp_directory_path() / ("loom_train_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::string manifest_text(const fs::path &out, const std::string &extra = "") {
  return "[loom]\nseed = 3\ndevice = \"cpu\"\n[model]\npath = \"" + kKjv.string() + "\"\n[train]\ndata = \"" + kTrainText.string() +
         "\"\nvalidation_data = \"" + kHeldOut.string() + "\"\nseq_len = 32\nbatch_size = 2\nsteps = 8\nlr = 1e-3\n"
         "warmup = 2\neval_every = 4\nout = \"" + out.string() + "\"\n" + extra;
}

loom::Manifest manifest(const fs::path &out, const std::vector<std::string> &overrides = {}, const std::string &extra = "") {
  return loom::parse_manifest_string(manifest_text(out, extra), "train.toml", overrides);
}

std::vector<nlohmann::json> read_log(const fs::path &path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

std::string file_bytes(const fs::path &p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string manifest_error(const std::string &text) {
  try {
    loom::parse_manifest_string(text, "t.toml");
  } catch (const loom::Error &e) {
    return e.what();
  }
  return "";
}

loom::TrainOptions quiet(int64_t stop_after = 0) {
  loom::TrainOptions o;
  o.progress = false;
  o.stop_after = stop_after;
  return o;
}

}  // namespace

TEST_CASE("[train] values are checked where they are written", "[train]") {
  const std::string model = "[model]\npath = \"" + kKjv.string() + "\"\n";
  CHECK_THAT(manifest_error(model + "[train]\nout = \"/tmp/x\"\n"), Catch::Contains("t.toml:") && Catch::Contains("train.data: is required"));
  CHECK_THAT(manifest_error(model + "[train]\ndata = \"a.txt\"\nout = \"o\"\nschedule = \"step\"\n"),
             Catch::Contains("train.schedule: expected \"cosine\", \"linear\" or \"constant\""));
  CHECK_THAT(manifest_error(model + "[train]\ndata = \"a.txt\"\nout = \"o\"\nlearning_rate = 0.1\n"),
             Catch::Contains("train.learning_rate: unknown key"));
  CHECK_THAT(manifest_error(model + "[train]\ndata = \"a.txt\"\nout = \"o\"\nlr = \"fast\"\n"),
             Catch::Contains("train.lr: expected a number"));
  CHECK_THAT(manifest_error(model + "[train]\ndata = \"a.txt\"\nout = \"o\"\nlr = 1e-4\nmin_lr = 1e-3\n"),
             Catch::Contains("train.min_lr: must not exceed lr"));
  CHECK_THAT(manifest_error("[train]\ndata = \"a.txt\"\nout = \"o\"\n"), Catch::Contains("needs a [model] to train"));
  CHECK_THAT(manifest_error(model + "[train]\ndata = \"a.txt\"\nout = \"o\"\nprecision = \"fp16\"\n"),
             Catch::Contains("train.precision: expected \"float32\" or \"bf16\", got \"fp16\""));
  const fs::path out = scratch("errors");
  CHECK_THROWS_WITH(loom::train(manifest(out, {"train.precision=\"bf16\""}), quiet()),
                    Catch::Contains("train.precision: \"bf16\" trains on CUDA only"));
  CHECK_THROWS_WITH(loom::train(manifest(out, {"train.seq_len=100000"}), quiet()),
                    Catch::Contains("train.seq_len: 100000 exceeds the model's 512 positions"));
  CHECK_THROWS_WITH(loom::train(manifest(out, {"train.data=\"" + (out / "missing.txt").string() + "\""}), quiet()),
                    Catch::Contains("missing.txt: cannot open the training data"));
  fs::remove_all(out);
}

TEST_CASE("training data: text lines and JSON Lines with text or chat messages, with errors by line", "[train]") {
  const loom::ModelConfig config = loom::load_model_config(kKjv);
  const auto tokenizer = loom::Tokenizer::load(kKjv);
  REQUIRE(tokenizer);
  const fs::path dir = scratch("data");
  std::ofstream(dir / "a.txt") << "In the beginning\n\n   \nGod created\n";
  const auto text = loom::load_token_stream(dir / "a.txt", *tokenizer, config, loom::ChatFamily::plain);
  auto expect = tokenizer->encode("In the beginning", true);
  expect.push_back(config.eos_token_ids.front());
  auto second = tokenizer->encode("God created", true);
  expect.insert(expect.end(), second.begin(), second.end());
  expect.push_back(config.eos_token_ids.front());
  CHECK(text == expect);

  std::ofstream(dir / "b.jsonl") << R"({"text": "In the beginning"})" << "\n"
                                 << R"({"messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "God"}]})"
                                 << "\n";
  const auto jsonl = loom::load_token_stream(dir / "b.jsonl", *tokenizer, config, loom::ChatFamily::plain);
  auto chat = loom::encode_chat(*tokenizer, loom::render_chat(loom::ChatFamily::plain,
                                                              {{"user", "Who?"}, {"assistant", "God"}}, false));
  CHECK(jsonl.size() == (expect.size() - second.size() - 1) + chat.size() + 1);
  CHECK(std::equal(chat.begin(), chat.end(), jsonl.end() - static_cast<std::ptrdiff_t>(chat.size()) - 1));

  std::ofstream(dir / "bad.jsonl") << R"({"text": "fine"})" << "\n" << R"({"txt": "typo"})" << "\n";
  CHECK_THROWS_WITH(loom::load_token_stream(dir / "bad.jsonl", *tokenizer, config, loom::ChatFamily::plain),
                    Catch::Contains("bad.jsonl:2: expected an object with \"text\" or \"messages\""));
  std::ofstream(dir / "broken.jsonl") << "{\"text\": \n";
  CHECK_THROWS_WITH(loom::load_token_stream(dir / "broken.jsonl", *tokenizer, config, loom::ChatFamily::plain),
                    Catch::Contains("broken.jsonl:1: not JSON"));
  std::ofstream(dir / "roles.jsonl") << R"({"messages": [{"role": "user"}]})" << "\n";
  CHECK_THROWS_WITH(loom::load_token_stream(dir / "roles.jsonl", *tokenizer, config, loom::ChatFamily::plain),
                    Catch::Contains("roles.jsonl:1: messages[0] must be an object with string \"role\" and \"content\""));
  std::ofstream(dir / "empty.txt") << "\n\n";
  CHECK_THROWS_WITH(loom::load_token_stream(dir / "empty.txt", *tokenizer, config, loom::ChatFamily::plain),
                    Catch::Contains("no documents"));

  const std::vector<int32_t> stream = {1, 2, 3, 4, 5, 6, 7};
  CHECK(loom::pack_sequences(stream, 3) == std::vector<std::vector<int32_t>>{{1, 2, 3}, {4, 5, 6}});
  std::vector<std::vector<int32_t>> seqs;
  for (int32_t i = 0; i < 20; ++i) seqs.push_back({i, i});
  const auto a = loom::split_sequences(seqs, 0.1, 9), b = loom::split_sequences(seqs, 0.1, 9);
  CHECK(a.validation.size() == 2);
  CHECK(a.train.size() == 18);
  CHECK(a.validation == b.validation);  // seeded
  CHECK(loom::epoch_order(10, 4, 0) == loom::epoch_order(10, 4, 0));
  CHECK(loom::epoch_order(10, 4, 0) != loom::epoch_order(10, 4, 1));
  fs::remove_all(dir);
}

TEST_CASE("loom train logs its schedule, lowers the validation loss and exports a model the engine runs", "[train]") {
  const fs::path out = scratch("run");
  // From random weights: the default model has already seen these verses, so eight steps of
  // fine-tuning on them need not lower its validation loss, while pretraining must.
  const loom::TrainResult r = loom::train(manifest(out, {"train.init=\"random\""}), quiet());
  CHECK(r.step == 8);
  REQUIRE(r.train_loss.size() == 8);
  REQUIRE(r.val_loss.size() == 3);  // steps 0, 4 and 8
  CHECK(r.val_loss.front().first == 0);
  CHECK(r.val_loss.back().second < r.val_loss.front().second);
  // The log: warmup 2 then cosine from 1e-3 to 0 over steps 3..8.
  const auto log = read_log(out / "train_log.jsonl");
  std::vector<double> lrs;
  for (const auto &j : log)
    if (j.contains("lr")) lrs.push_back(j["lr"].get<double>());
  REQUIRE(lrs.size() == 8);
  CHECK(lrs[0] == Approx(0.5e-3));
  CHECK(lrs[1] == Approx(1e-3));
  for (int s = 3; s <= 8; ++s)
    CHECK(lrs[static_cast<size_t>(s - 1)] == Approx(0.5e-3 * (1 + std::cos(M_PI * (s - 2) / 6.0))).margin(1e-12));
  for (const auto &j : log)
    if (j.contains("loss")) {
      CHECK(j["tokens_per_s"].get<double>() > 0);
      CHECK(std::isfinite(j["grad_norm"].get<double>()));
    }
  // The export is a model directory the engine loads and runs; it is not the starting model.
  REQUIRE(fs::exists(r.model_dir / "model.safetensors"));
  for (const char *f : {"config.json", "tokenizer.model"}) CHECK(fs::exists(r.model_dir / f));
  auto run = [&](const fs::path &model) {
    return loom::Runtime::from_string("[loom]\ndevice = \"cpu\"\n[model]\npath = \"" + model.string() +
                                          "\"\n[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n"
                                          "[run]\nprompt = \"And God said\"\nsteps = 12\nstop_tokens = []\n",
                                      "run.toml")
        ->run()
        .tokens;
  };
  CHECK(run(r.model_dir).size() == 12);
  CHECK(file_bytes(r.model_dir / "model.safetensors") != file_bytes(kKjv / "model.safetensors"));
  if (!r.plot.empty()) CHECK(file_bytes(r.plot).substr(1, 3) == "PNG");
  fs::remove_all(out);
}

TEST_CASE("loom train through the [attention] component (train.attention = plugin) follows the core's losses", "[train]") {
  const std::string model = "[model]\npath = \"" + kKjv.string() + "\"\n";
  CHECK_THAT(manifest_error(model + "[train]\ndata = \"a.txt\"\nout = \"o\"\nattention = \"flash\"\n"),
             Catch::Contains("train.attention: expected \"core\" or \"plugin\", got \"flash\""));
  const fs::path core_out = scratch("attn_core"), plugin_out = scratch("attn_plugin");
  CHECK_THROWS_WITH(loom::train(manifest(plugin_out, {"train.attention=\"plugin\""}), quiet()),
                    Catch::Contains("train.attention: \"plugin\" needs an [attention] component"));
  const std::string sdpa = "[attention]\nuse = \"sdpa\"\n";
  const loom::TrainResult core = loom::train(manifest(core_out, {"train.init=\"random\""}, sdpa), quiet());
  const loom::TrainResult plugin =
      loom::train(manifest(plugin_out, {"train.init=\"random\"", "train.attention=\"plugin\""}, sdpa), quiet());
  CHECK_THAT(plugin.device, Catch::Contains("attention by attention (sdpa)"));
  REQUIRE(plugin.train_loss.size() == core.train_loss.size());
  for (size_t i = 0; i < core.train_loss.size(); ++i)
    CHECK(plugin.train_loss[i].second == Approx(core.train_loss[i].second).epsilon(1e-4));
  REQUIRE(plugin.val_loss.size() == core.val_loss.size());
  CHECK(plugin.val_loss.back().second < plugin.val_loss.front().second);
  fs::remove_all(core_out);
  fs::remove_all(plugin_out);
}

TEST_CASE("a resumed training run continues exactly where it stopped", "[train]") {
  const fs::path straight = scratch("straight"), resumed = scratch("resumed");
  const loom::TrainResult full = loom::train(manifest(straight, {"train.eval_every=0"}), quiet());
  const loom::TrainResult first = loom::train(manifest(resumed, {"train.eval_every=0"}), quiet(3));
  CHECK(first.step == 3);
  CHECK(first.model_dir.empty());
  REQUIRE(fs::exists(resumed / "checkpoint/trainer_state.json"));
  const loom::TrainResult rest =
      loom::train(manifest(resumed, {"train.eval_every=0", "train.resume=\"" + (resumed / "checkpoint").string() + "\""}), quiet());
  CHECK(rest.step == 8);
  REQUIRE(rest.train_loss.size() == 5);
  for (size_t i = 0; i < 5; ++i) {
    INFO("step " << rest.train_loss[i].first);
    CHECK(rest.train_loss[i] == full.train_loss[i + 3]);  // the same doubles
  }
  CHECK(file_bytes(rest.model_dir / "model.safetensors") == file_bytes(full.model_dir / "model.safetensors"));
  // The log holds each step once, as the uninterrupted run's does.
  std::vector<int64_t> steps;
  for (const auto &j : read_log(resumed / "train_log.jsonl"))
    if (j.contains("loss")) steps.push_back(j["step"].get<int64_t>());
  CHECK(steps == std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8});
  // A checkpoint refuses a manifest with another data order.
  CHECK_THROWS_WITH(loom::train(manifest(resumed, {"train.resume=\"" + (resumed / "checkpoint").string() + "\"",
                                                   "train.batch_size=3"}),
                                quiet()),
                    Catch::Contains("train.resume: the checkpoint was made with train.batch_size = 2, the manifest says 3"));
  fs::remove_all(straight);
  fs::remove_all(resumed);
}

TEST_CASE("pretraining starts from seeded random weights and can export bfloat16", "[train]") {
  const fs::path a = scratch("init_a"), b = scratch("init_b");
  const std::vector<std::string> o = {"train.init=\"random\"", "train.steps=2", "train.eval_every=0",
                                      "train.save_dtype=\"bfloat16\""};
  const loom::TrainResult first = loom::train(manifest(a, o), quiet());
  const loom::TrainResult second = loom::train(manifest(b, o), quiet());
  // Random weights predict the 2,000-piece vocabulary about uniformly: a loss near ln(2000).
  REQUIRE(first.train_loss.size() == 2);
  CHECK(first.train_loss[0].second == Approx(std::log(2000.0)).margin(0.3));
  CHECK(first.train_loss == second.train_loss);  // the same seed, the same weights
  const auto header = [](const fs::path &p) {
    std::ifstream in(p, std::ios::binary);
    uint64_t n = 0;
    in.read(reinterpret_cast<char *>(&n), 8);
    std::string h(n, '\0');
    in.read(h.data(), static_cast<std::streamsize>(n));
    return nlohmann::json::parse(h);
  };
  const auto h = header(first.model_dir / "model.safetensors");
  CHECK(h["model.embed_tokens.weight"]["dtype"] == "BF16");
  CHECK(header(a / "checkpoint/model.safetensors")["model.embed_tokens.weight"]["dtype"] == "F32");
  // A different seed, different weights.
  const loom::TrainResult other = loom::train(manifest(b, {o[0], o[1], o[2], "loom.seed=4"}), quiet());
  CHECK(other.train_loss[0].second != first.train_loss[0].second);
  CHECK_THAT(manifest_error("[model]\npath = \"m\"\n[train]\ndata = \"a.txt\"\nout = \"o\"\ninit = \"zeros\"\n"),
             Catch::Contains("train.init: expected \"pretrained\" or \"random\""));
  fs::remove_all(a);
  fs::remove_all(b);
}

namespace {

// The default model with a LoRA adapter on every projection, trained on DESIGN.md (a text it
// has never seen) with its weights frozen.
std::string lora_manifest(const fs::path &out, const std::string &extra = "") {
  return "[loom]\ndevice = \"cpu\"\nseed = 5\n[model]\npath = \"" + kKjv.string() +
         "\"\n[[adapter]]\nuse = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\n"
         "[train]\ndata = \"" + (kSource / "DESIGN.md").string() +
         "\"\nvalidation_fraction = 0.1\nseq_len = 32\nbatch_size = 4\nsteps = 12\nlr = 3e-3\nwarmup = 2\n"
         "eval_every = 0\nout = \"" + out.string() + "\"\n" + extra;
}

}  // namespace

TEST_CASE("loom train trains a LoRA adapter over an int8-quantized base (QLoRA-style)", "[train][peft]") {
  const fs::path out = scratch("qlora");
  const std::string quantizer = "[quantizer]\nuse = \"int8\"\n";
  const loom::TrainResult r = loom::train(loom::parse_manifest_string(lora_manifest(out) + quantizer, "qlora.toml"), quiet());
  CHECK_THAT(r.device, Catch::Contains("adapters only (base frozen, quantized)"));
  REQUIRE(r.val_loss.size() == 2);
  CHECK(r.val_loss.back().second < r.val_loss.front().second - 0.25);
  REQUIRE(fs::exists(r.adapter_dir / "adapter_model.safetensors"));
  // The same run over the float base starts from another loss: the quantized base is in use.
  const fs::path plain = scratch("qlora_plain");
  std::string one_step = lora_manifest(plain);
  one_step.replace(one_step.find("steps = 12"), 10, "steps = 1");
  const loom::TrainResult f = loom::train(loom::parse_manifest_string(one_step, "lora.toml"), quiet());
  CHECK(f.val_loss.front().second != r.val_loss.front().second);
  CHECK(std::fabs(f.val_loss.front().second - r.val_loss.front().second) < 0.05);  // int8 is close
  // A quantizer without an adapter would train quantized weights: refused, by table.
  const std::string full = "[loom]\ndevice = \"cpu\"\n[model]\npath = \"" + kKjv.string() + "\"\n" + quantizer +
                           "[train]\ndata = \"" + (kSource / "DESIGN.md").string() + "\"\nout = \"" + out.string() + "\"\n";
  CHECK_THROWS_WITH(loom::train(loom::parse_manifest_string(full, "full.toml"), quiet()),
                    Catch::Contains("full.toml: [quantizer] in a training manifest: only an adapter trains over a quantized base"));
  fs::remove_all(out);
  fs::remove_all(plain);
}

TEST_CASE("loom train trains a LoRA adapter over the frozen default model and saves it in the PEFT layout", "[train][peft]") {
  const fs::path out = scratch("lora");
  const loom::TrainResult r = loom::train(loom::parse_manifest_string(lora_manifest(out), "lora.toml"), quiet());
  CHECK_THAT(r.device, Catch::Contains("adapters only (base frozen)"));
  REQUIRE(r.val_loss.size() == 2);
  CHECK(r.val_loss.back().second < r.val_loss.front().second - 0.25);  // it learns the new text (8.21 -> 7.83)
  CHECK(r.model_dir.empty());
  REQUIRE(fs::exists(r.adapter_dir / "adapter_model.safetensors"));
  std::ifstream config_in(r.adapter_dir / "adapter_config.json");
  const auto config = nlohmann::json::parse(config_in);
  CHECK(config["peft_type"] == "LORA");
  CHECK(config["r"] == 4);
  CHECK(config["lora_alpha"] == 8.0);
  CHECK(config["target_modules"] == nlohmann::json({"q_proj", "v_proj", "down_proj"}));
  const auto adapter = loom::SafetensorsFile::open(r.adapter_dir / "adapter_model.safetensors");
  const auto *a = adapter.find("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  const auto *b = adapter.find("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight");
  REQUIRE(a != nullptr);
  REQUIRE(b != nullptr);
  CHECK(a->shape == std::vector<int64_t>{4, 192});
  CHECK(b->shape == std::vector<int64_t>{192, 4});
  CHECK(adapter.find("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight") == nullptr);  // not targeted
  // Stopped after 5 steps and resumed: the same losses and adapter bytes as the straight run.
  const fs::path resumed = scratch("lora_resumed");
  CHECK(loom::train(loom::parse_manifest_string(lora_manifest(resumed), "lora.toml"), quiet(5)).step == 5);
  const loom::TrainResult rest = loom::train(
      loom::parse_manifest_string(lora_manifest(resumed, "resume = \"" + (resumed / "checkpoint").string() + "\"\n"),
                                  "lora.toml"),
      quiet());
  REQUIRE(rest.train_loss.size() == 7);
  for (size_t i = 0; i < 7; ++i) CHECK(rest.train_loss[i] == r.train_loss[i + 5]);
  CHECK(file_bytes(rest.adapter_dir / "adapter_model.safetensors") == file_bytes(r.adapter_dir / "adapter_model.safetensors"));
  // The saved adapter loads for inference ([[adapter]] weights) and generates what the base
  // model with the delta merged into its weights generates.
  const fs::path merged = scratch("lora_merged");
  {
    const loom::ModelConfig model_config = loom::load_model_config(kKjv);
    const auto base = loom::ModelWeights::load(model_config, loom::SafetensorsIndex::open_model_dir(kKjv));
    std::map<std::string, std::vector<float>> w;
    std::map<std::string, std::vector<int64_t>> shapes = loom::expected_weights(model_config);
    for (const auto &[name, shape] : shapes) w[name] = base.at(name).values;
    const float scale = 8.0f / 4.0f;
    for (const auto &t : adapter.tensors()) {
      if (t.name.find(".lora_A.") == std::string::npos) continue;
      const std::string module = t.name.substr(17, t.name.size() - 17 - 14);  // "base_model.model." ... ".lora_A.weight"
      const auto *bt = adapter.find("base_model.model." + module + ".lora_B.weight");
      REQUIRE(bt != nullptr);
      std::vector<float> A(t.numel), B(bt->numel);
      std::memcpy(A.data(), t.data, t.nbytes);
      std::memcpy(B.data(), bt->data, bt->nbytes);
      auto &W = w.at(module + ".weight");
      const int64_t rank = t.shape[0], in = t.shape[1], outs = bt->shape[0];
      for (int64_t o = 0; o < outs; ++o)
        for (int64_t i = 0; i < in; ++i) {
          float acc = 0;
          for (int64_t j = 0; j < rank; ++j) acc += B[static_cast<size_t>(o * rank + j)] * A[static_cast<size_t>(j * in + i)];
          W[static_cast<size_t>(o * in + i)] += scale * acc;
        }
    }
    loom::copy_model_files(kKjv, merged);
    std::vector<loom::TensorToWrite> tensors;
    for (const auto &[name, v] : w)
      tensors.push_back({name, loom::SafetensorsDtype::F32, shapes.at(name), std::as_bytes(std::span<const float>(v))});
    loom::write_safetensors(merged / "model.safetensors", tensors, {});
  }
  auto generate = [&](const fs::path &model, const std::string &adapter_table) {
    return loom::Runtime::from_string("[loom]\ndevice = \"cpu\"\n[model]\npath = \"" + model.string() +
                                          "\"\ndtype = \"float32\"\n" + adapter_table +
                                          "[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n"
                                          "[run]\nprompt = \"The core loads\"\nsteps = 16\nstop_tokens = []\n",
                                      "run.toml")
        ->run()
        .tokens;
  };
  const std::string lora = "[[adapter]]\nuse = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\n";
  const auto with_adapter = generate(kKjv, lora + "weights = \"" + r.adapter_dir.string() + "\"\n");
  CHECK(with_adapter == generate(merged, ""));
  // (Twelve steps may leave greedy tokens as they were; that the delta is not zero is what makes
  // the comparison above mean something.)
  std::vector<float> b_values(b->numel);
  std::memcpy(b_values.data(), b->data, b->nbytes);
  CHECK(std::any_of(b_values.begin(), b_values.end(), [](float v) { return v != 0.0f; }));
  // A table that disagrees with adapter_config.json is refused, naming both.
  CHECK_THROWS_WITH(generate(kKjv, "[[adapter]]\nuse = \"lora\"\nr = 4\nalpha = 16\ntarget_modules = [\"q_proj\", \"v_proj\", "
                                   "\"down_proj\"]\nweights = \"" + r.adapter_dir.string() + "\"\n"),
                    Catch::Contains("adapter_config.json: \"lora_alpha\" is 8.0, but adapter[0] (lora) has alpha = 16"));
  CHECK_THROWS_WITH(loom::parse_manifest_string("[[sampler]]\nuse = \"greedy\"\nweights = \"x\"\n", "w.toml"),
                    Catch::Contains("sampler[0].weights: only an [[adapter]] takes weights"));
  fs::remove_all(merged);
  // What an adapter run refuses, by key.
  CHECK_THROWS_WITH(loom::train(loom::parse_manifest_string(lora_manifest(out, "recompute = true\n"), "lora.toml"), quiet()),
                    Catch::Contains("train.recompute: not with an adapter"));
  CHECK_THROWS_WITH(loom::train(loom::parse_manifest_string(lora_manifest(out, "init = \"random\"\n"), "lora.toml"), quiet()),
                    Catch::Contains("train.init"));
  fs::remove_all(out);
  fs::remove_all(resumed);
}
