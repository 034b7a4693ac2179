// Parallel training as a user launches it: several `loom train` processes with torchrun's
// environment variables on loopback (the CPU collective backend), against one process. The same
// global batch gives the same loss curve within float32 tolerance and the same exported weights:
// data parallel over 2 and 4 ranks (with and without ZeRO stage 1 and overlap, a LoRA adapter, a
// ZeRO-1 run interrupted and resumed), tensor parallel (2, and 2 x data 2) and pipeline
// parallel (2 stages, and 2 stages x data 2).
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cctype>
#include <cmath>
#include <cstring>
#include <iterator>
#include <map>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "process_util.hpp"
#include "tiny_gpt2.hpp"

namespace fs = std::filesystem;

namespace {

const fs::path kSource = LOOM_SOURCE_DIR;

using Run = loom_test::ShellResult;
using loom_test::free_loopback_port;

// `world` processes of `loom train manifest args` (one without a launcher when world is 0),
// started together; their outputs and the worst exit code.
Run launch(int world, const fs::path &manifest, const std::string &args = "") {
  const int port = free_loopback_port();
  std::string cmd;
  const std::string train = std::string(LOOM_CLI) + " train " + manifest.string() + " " + args;
  if (world == 0) {
    cmd = "LOOM_PLUGIN_PATH= LOOM_DEVICE=cpu " + train + " 2>&1";
  } else {
    cmd = "(pids=; ";
    for (int r = 0; r < world; ++r)
      cmd += "LOOM_PLUGIN_PATH= LOOM_DEVICE=cpu RANK=" + std::to_string(r) + " WORLD_SIZE=" + std::to_string(world) +
             " LOCAL_RANK=" + std::to_string(r) + " MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " " +
             train + " > " + manifest.string() + ".rank" + std::to_string(r) + " 2>&1 & pids=\"$pids $!\"; ";
    cmd += "fail=0; for p in $pids; do wait $p || fail=1; done; ";
    for (int r = 0; r < world; ++r) cmd += "cat " + manifest.string() + ".rank" + std::to_string(r) + "; ";
    cmd += "exit $fail)";
  }
  return loom_test::run_shell(cmd);
}

// A manifest training the shipped model (or a LoRA adapter on it) for 20 steps, 4 sequences of
// 32 tokens a micro-batch, 2 micro-batches a step.
fs::path manifest(const fs::path &dir, const std::string &parallel, bool lora = false, const std::string &resume = "",
                  const std::string &component = "data") {
  fs::create_directories(dir);
  std::ofstream m(dir / "train.toml");
  m << "[loom]\nseed = 5\n\n[model]\npath = \"" << (kSource / "models/tiny-kjv").string() << "\"\n\n"
    << "[train]\ndata = \"" << (kSource / "tests/fixtures/text/kjv_calibration.txt").string() << "\"\n"
    << "validation_data = \"" << (kSource / "tests/fixtures/text/kjv_heldout.txt").string() << "\"\n"
    << "seq_len = 32\nbatch_size = 4\ngrad_accum = 2\nsteps = 20\nlr = " << (lora ? "2e-3" : "5e-4")
    << "\nwarmup = 3\nweight_decay = 0.1\ngrad_clip = 1.0\neval_every = 10\nout = \"" << (dir / "out").string() << "\"\n";
  if (!resume.empty()) m << "resume = \"" << resume << "\"\n";
  if (lora) m << "\n[[adapter]]\nuse = \"lora\"\nr = 4\nalpha = 8.0\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\n";
  if (!parallel.empty()) m << "\n[parallel]\nuse = \"" << component << "\"\n" << parallel;
  return dir / "train.toml";
}

// (step, loss or val_loss) from a run's log.
std::vector<std::pair<int64_t, double>> curve(const fs::path &dir) {
  std::vector<std::pair<int64_t, double>> c;
  std::ifstream in(dir / "out/train_log.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    c.emplace_back(j["step"].get<int64_t>(), j.contains("loss") ? j["loss"].get<double>() : -j["val_loss"].get<double>());
  }
  return c;
}

void check_same_curve(const std::vector<std::pair<int64_t, double>> &want, const std::vector<std::pair<int64_t, double>> &got) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    INFO("entry " << i << " step " << want[i].first << ": " << want[i].second << " vs " << got[i].second);
    CHECK(got[i].first == want[i].first);
    CHECK(std::fabs(got[i].second - want[i].second) <= 1e-4 * std::fabs(want[i].second));
  }
}

// The float32 tensors of a safetensors file, by name.
std::map<std::string, std::vector<float>> read_f32_tensors(const fs::path &file) {
  std::ifstream in(file, std::ios::binary);
  uint64_t header_size = 0;
  in.read(reinterpret_cast<char *>(&header_size), 8);
  std::string header(header_size, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_size));
  const std::string body((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::map<std::string, std::vector<float>> out;
  const auto index = nlohmann::json::parse(header);
  for (const auto &[name, t] : index.items()) {
    if (name == "__metadata__" || t["dtype"] != "F32") continue;
    const auto begin = t["data_offsets"][0].get<size_t>(), end = t["data_offsets"][1].get<size_t>();
    std::vector<float> v((end - begin) / 4);
    std::memcpy(v.data(), body.data() + begin, end - begin);
    out[name] = std::move(v);
  }
  return out;
}

fs::path scratch(const std::string &name) {
  std::string safe = name;
  for (char &ch : safe)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '-';
  const fs::path d = fs::temp_directory_path() / ("loom-parallel-train-" + std::to_string(::getpid())) / safe;
  fs::remove_all(d);
  return d;
}

}  // namespace

TEST_CASE("data parallel training on 2 and 4 CPU ranks follows one rank's loss curve", "[parallel]") {
  // One process's curve and exported weights, computed once (Catch runs the case again for
  // each section).
  static const auto base_dir = [] {
    const auto d = scratch("one");
    const Run one = launch(0, manifest(d, ""));
    INFO(one.out);
    REQUIRE(one.code == 0);
    return d;
  }();
  static const auto want = curve(base_dir);
  static const auto want_weights = read_f32_tensors(base_dir / "out/model/model.safetensors");
  REQUIRE(want.size() == 23);  // 20 steps and 3 evaluations

  struct Case {
    const char *name;
    int world;
    std::string component, table, describes;
  };
  const Case cases[] = {
      {"2 ranks", 2, "data", "overlap = true\n", "data parallel x2"},
      {"4 ranks, ZeRO-1, small buckets", 4, "data", "zero_stage = 1\nbucket_mb = 0.02\n", "data parallel x4 (ZeRO-1)"},
      {"2 ranks, ZeRO-1, no overlap", 2, "data", "zero_stage = 1\noverlap = false\n", "data parallel x2 (ZeRO-1)"},
      {"tensor parallel over 2 ranks", 2, "tensor", "size = 2\n", "tensor parallel x2;"},
      {"tensor 2 x data 2, ZeRO-1", 4, "tensor", "size = 2\nzero_stage = 1\n", "tensor parallel x2, data parallel x2 (ZeRO-1)"},
      {"pipeline of 2 stages", 2, "pipeline", "stages = 2\n", "pipeline stage 0 of 2;"},
      {"pipeline of 4 stages (a layer each)", 4, "pipeline", "stages = 4\n", "pipeline stage 0 of 4;"},
      {"pipeline 2 x data 2, ZeRO-1", 4, "pipeline", "stages = 2\nzero_stage = 1\n", "pipeline stage 0 of 2, data parallel x2 (ZeRO-1)"},
  };
  for (const auto &c : cases) {
    SECTION(c.name) {
      const auto dir = scratch(c.name);
      const Run r = launch(c.world, manifest(dir, c.table, false, "", c.component));
      INFO(r.out);
      REQUIRE(r.code == 0);
      CHECK(r.out.find(c.describes) != std::string::npos);
      check_same_curve(want, curve(dir));
      // The exported model (gathered from the tensor ranks) holds one rank's weights.
      const auto mine = read_f32_tensors(dir / "out/model/model.safetensors");
      REQUIRE(mine.size() == want_weights.size());
      for (const auto &[name, values] : want_weights) {
        INFO(name);
        REQUIRE(mine.count(name) == 1);
        REQUIRE(mine.at(name).size() == values.size());
        // Relative Frobenius distance: AdamW turns float32 rounding in a near-zero gradient into a
        // step of about lr either way, so single elements may differ by that much.
        double diff = 0, norm = 1e-30;
        for (size_t i = 0; i < values.size(); ++i) {
          const double d = static_cast<double>(mine.at(name)[i]) - static_cast<double>(values[i]);
          diff += d * d;
          norm += static_cast<double>(values[i]) * static_cast<double>(values[i]);
        }
        CHECK(std::sqrt(diff / norm) <= 1e-5);
      }
    }
  }
}

TEST_CASE("pipeline micro-batches of 2 sequences over an uneven split follow one rank's curve", "[parallel]") {
  const auto one_dir = scratch("pp-micro-one"), two_dir = scratch("pp-micro-two");
  const Run one = launch(0, manifest(one_dir, ""));
  INFO(one.out);
  REQUIRE(one.code == 0);
  // 3 of the 4 layers on the first stage; each batch of 4 sequences as 2 micro-batches of 2.
  const Run two = launch(2, manifest(two_dir, "stages = 2\nstage_layers = [3, 1]\n", false, "", "pipeline"),
                         "--set train.pipeline_micro_batch=2");
  INFO(two.out);
  REQUIRE(two.code == 0);
  check_same_curve(curve(one_dir), curve(two_dir));
  // Each step logs the stages' mean idle share, a fraction.
  std::ifstream log(two_dir / "out/train_log.jsonl");
  std::string line;
  int steps = 0;
  while (std::getline(log, line)) {
    const auto j = nlohmann::json::parse(line);
    if (!j.contains("loss")) continue;
    ++steps;
    REQUIRE(j.contains("pipeline_idle"));
    CHECK(j["pipeline_idle"].get<double>() >= 0.0);
    CHECK(j["pipeline_idle"].get<double>() < 1.0);
  }
  CHECK(steps == 20);
}

TEST_CASE("a pipeline whose layer split or micro-batch does not fit is refused by name", "[parallel]") {
  const auto dir = scratch("pp-bad");
  const Run layers = launch(2, manifest(dir, "stages = 2\nstage_layers = [2, 3]\n", false, "", "pipeline"));
  INFO(layers.out);
  CHECK(layers.code != 0);
  CHECK(layers.out.find("no stage (do its layers per stage add up to 4?)") != std::string::npos);
  const Run count = launch(2, manifest(dir, "stages = 2\nstage_layers = [4]\n", false, "", "pipeline"));
  INFO(count.out);
  CHECK(count.code != 0);
  CHECK(count.out.find("stage_layers lists 1 stages, the pipeline has 2") != std::string::npos);
  const Run micro = launch(2, manifest(dir, "stages = 2\n", false, "", "pipeline"), "--set train.pipeline_micro_batch=3");
  INFO(micro.out);
  CHECK(micro.code != 0);
  CHECK(micro.out.find("train.pipeline_micro_batch = 3 does not divide") != std::string::npos);
}

TEST_CASE("tensor parallel GPT-2 (fused c_attn, c_proj biases, learned positions) trains like one rank", "[parallel]") {
  // A 2-layer GPT-2 (tests/fixtures/models/tiny-gpt2's shape) with the byte-level tokenizer,
  // trained from random weights.
  const auto dir = scratch("gpt2-tensor");
  loom_test::write_tiny_gpt2(kSource, dir / "model", 2);
  const auto write = [&](const std::string &name, const std::string &parallel) {
    fs::create_directories(dir / name);
    std::ofstream(dir / name / "train.toml")
        << "[loom]\nseed = 5\ndevice = \"cpu\"\n[model]\npath = \"" << (dir / "model").string() << "\"\n[train]\ndata = \""
        << (kSource / "tests/fixtures/text/kjv_calibration.txt").string()
        << "\"\nvalidation_fraction = 0.0\ninit = \"random\"\nseq_len = 32\nbatch_size = 4\nsteps = 12\nlr = 2e-3\n"
           "warmup = 2\nweight_decay = 0.1\ngrad_clip = 1.0\neval_every = 0\nout = \""
        << (dir / name / "out").string() << "\"\n"
        << parallel;
    return dir / name / "train.toml";
  };
  const Run one = launch(0, write("one", ""));
  INFO(one.out);
  REQUIRE(one.code == 0);
  const Run two = launch(2, write("two", "[parallel]\nuse = \"tensor\"\n"));
  INFO(two.out);
  REQUIRE(two.code == 0);
  CHECK(two.out.find("tensor parallel x2") != std::string::npos);
  check_same_curve(curve(dir / "one"), curve(dir / "two"));
  const auto want = read_f32_tensors(dir / "one/out/model/model.safetensors"),
             got = read_f32_tensors(dir / "two/out/model/model.safetensors");
  REQUIRE(got.size() == want.size());
  for (const auto &[name, values] : want) {
    INFO(name);
    REQUIRE(got.count(name) == 1);
    REQUIRE(got.at(name).size() == values.size());
    // The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by all
    // keys): what it gets is float32 rounding, which AdamW turns into steps of about lr either
    // way. c_attn.bias's middle third is therefore left out.
    const bool key_bias = name.size() > 11 && name.compare(name.size() - 11, 11, "c_attn.bias") == 0;
    double diff = 0, norm = 1e-30;
    for (size_t i = 0; i < values.size(); ++i) {
      if (key_bias && i >= values.size() / 3 && i < 2 * values.size() / 3) continue;
      const double d = static_cast<double>(got.at(name)[i]) - static_cast<double>(values[i]);
      diff += d * d;
      norm += static_cast<double>(values[i]) * static_cast<double>(values[i]);
    }
    CHECK(std::sqrt(diff / norm) <= 1e-5);
  }
}

TEST_CASE("a LoRA adapter trains data parallel like on one rank", "[parallel]") {
  const auto one_dir = scratch("lora-one"), two_dir = scratch("lora-two");
  const Run one = launch(0, manifest(one_dir, "", true));
  INFO(one.out);
  REQUIRE(one.code == 0);
  const Run two = launch(2, manifest(two_dir, "zero_stage = 1\n", true));
  INFO(two.out);
  REQUIRE(two.code == 0);
  check_same_curve(curve(one_dir), curve(two_dir));
  CHECK(fs::exists(two_dir / "out/adapter/adapter_model.safetensors"));
}

TEST_CASE("a data, tensor or pipeline parallel run (ZeRO-1) interrupted and resumed gives the uninterrupted curve", "[parallel]") {
  const std::string component = GENERATE(std::string("data"), std::string("tensor"), std::string("pipeline"));
  INFO(component);
  const auto whole = scratch("whole-" + component), parts = scratch("parts-" + component);
  const std::string table = "zero_stage = 1\n";
  const Run w = launch(2, manifest(whole, table, false, "", component));
  INFO(w.out);
  REQUIRE(w.code == 0);
  const Run first = launch(2, manifest(parts, table, false, "", component), "--steps 7");
  INFO(first.out);
  REQUIRE(first.code == 0);
  const Run second = launch(2, manifest(parts, table, false, (parts / "out/checkpoint").string(), component));
  INFO(second.out);
  REQUIRE(second.code == 0);
  check_same_curve(curve(whole), curve(parts));
}

TEST_CASE("ranks launched without a [parallel] component are refused", "[parallel]") {
  const auto dir = scratch("no-parallel");
  const Run r = launch(2, manifest(dir, ""));
  CHECK(r.code != 0);
  CHECK(r.out.find("WORLD_SIZE=2") != std::string::npos);
  CHECK(r.out.find("[parallel]") != std::string::npos);
  CHECK_FALSE(fs::exists(dir / "out/train_log.jsonl"));
}

TEST_CASE("loom run over a tensor or pipeline parallel pair writes what one process writes", "[parallel]") {
  const std::string component = GENERATE(std::string("tensor"), std::string("pipeline"));
  INFO(component);
  const auto dir = scratch("run-" + component);
  fs::create_directories(dir);
  const auto write = [&](const std::string &name, const std::string &parallel) {
    std::ofstream(dir / name) << "[loom]\ndevice = \"cpu\"\n[model]\npath = \"" << (kSource / "models/tiny-kjv").string()
                              << "\"\n[run]\nsteps = 16\nprompt = \"And God said\"\nstop_tokens = []\n[attention]\nuse = "
                                 "\"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n"
                              << parallel;
    return dir / name;
  };
  const auto text = [](const std::string &out) {  // the generated line: the one starting with the prompt
    const size_t at = out.find("\nAnd God said");
    return at == std::string::npos ? std::string() : out.substr(at, out.find('\n', at + 1) - at);
  };
  const auto one_manifest = write("one.toml", ""), two_manifest = write("two.toml", "[parallel]\nuse = \"" + component + "\"\n");
  const Run one = loom_test::run_shell("LOOM_PLUGIN_PATH= " + std::string(LOOM_CLI) + " run " + one_manifest.string() + " 2>&1");
  REQUIRE(one.code == 0);
  const int port = free_loopback_port();
  std::string cmd = "(";
  for (int r = 0; r < 2; ++r)
    cmd += "LOOM_PLUGIN_PATH= RANK=" + std::to_string(r) + " WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" +
           std::to_string(port) + " " + LOOM_CLI + " run " + two_manifest.string() + " > " + (dir / "rank").string() +
           std::to_string(r) + " 2>&1 & ";
  cmd += "wait; cat " + (dir / "rank0").string() + "; echo ====; cat " + (dir / "rank1").string() + ")";
  const Run two = loom_test::run_shell(cmd);
  INFO(two.out);
  const auto split = two.out.find("====");
  REQUIRE(split != std::string::npos);
  CHECK(two.out.find(component == "tensor" ? "tensor parallel rank 0 of 2" : "pipeline stage 1 of 2") != std::string::npos);
  CHECK_FALSE(text(one.out).empty());
  CHECK(text(two.out.substr(0, split)) == text(one.out));
  CHECK(text(two.out.substr(split)) == text(one.out));
}

TEST_CASE("a model the tensor group cannot split is refused with the size that does not divide", "[parallel]") {
  const auto dir = scratch("tensor-4");
  const Run r = launch(4, manifest(dir, "size = 4\n", false, "", "tensor"));  // the default model has 2 KV heads
  CHECK(r.code != 0);
  CHECK(r.out.find("num_key_value_heads (2) does not divide by 4") != std::string::npos);
}

TEST_CASE("a rank that dies makes the others fail with a message, not hang", "[parallel]") {
  const auto dir = scratch("dies");
  // Rank 1 is given a model that does not exist; rank 0 waits for it at the start.
  const fs::path m = manifest(dir, "timeout_s = 3.0\n");
  const int port = free_loopback_port();
  const std::string env = "LOOM_PLUGIN_PATH= LOOM_DEVICE=cpu WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port);
  const std::string cmd = "(" + env + " RANK=0 " + LOOM_CLI + " train " + m.string() + " 2>&1 & pid=$!; " + env + " RANK=1 " +
                          LOOM_CLI + " train " + m.string() + " --set model.path=/nonexistent >/dev/null 2>&1; wait $pid)";
  const Run r = loom_test::run_shell(cmd);
  INFO(r.out);
  CHECK(r.code != 0);
  CHECK(r.out.find("timed out waiting for 1 more rank(s) of 2") != std::string::npos);
}
