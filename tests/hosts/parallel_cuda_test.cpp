// Data, tensor and pipeline parallelism on several GPUs of one host ([Parallel], [Multi-GPU]): `loom run`
// and `loom train` over 2 processes (torchrun's variables, NCCL) against one GPU. Skipped (77)
// with fewer than 2 GPUs. The binary and the source tree come from LOOM_CLI / LOOM_SOURCE_DIR
// in the environment when set (a build carried to the GPU machine), else from this build.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "process_util.hpp"
#include "tiny_gpt2.hpp"

namespace fs = std::filesystem;

namespace {

std::string env_or(const char *name, const char *fallback) {
  const char *v = std::getenv(name);
  return v && *v ? v : fallback;
}
const std::string kCli = env_or("LOOM_CLI", LOOM_CLI_PATH);
const fs::path kSource = env_or("LOOM_SOURCE_DIR", LOOM_SOURCE_DIR);

fs::path scratch(const std::string &name) {
  const fs::path d = fs::temp_directory_path() / ("loom-parallel-cuda-" + std::to_string(::getpid())) / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// `loom COMMAND manifest` once, or over 2 ranks (each on its LOCAL_RANK's GPU); rank 0's output.
loom_test::ShellResult launch(const std::string &command, const fs::path &manifest, int world) {
  if (world == 1) return loom_test::run_shell("NCCL_NVLS_ENABLE=0 " + kCli + " " + command + " " + manifest.string() + " 2>&1");
  const int port = loom_test::free_loopback_port();
  std::string cmd = "(pids=; ";
  for (int r = 0; r < world; ++r)
    cmd += "NCCL_NVLS_ENABLE=0 RANK=" + std::to_string(r) + " WORLD_SIZE=" + std::to_string(world) + " LOCAL_RANK=" +
           std::to_string(r) + " MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port) + " " + kCli + " " + command +
           " " + manifest.string() + " > " + manifest.string() + ".rank" + std::to_string(r) + " 2>&1 & pids=\"$pids $!\"; ";
  cmd += "fail=0; for p in $pids; do wait $p || fail=1; done; cat " + manifest.string() + ".rank0; exit $fail)";
  return loom_test::run_shell(cmd);
}

std::string generated(const std::string &out) {
  const size_t at = out.find("\nAnd God said");
  return at == std::string::npos ? std::string() : out.substr(at, out.find('\n', at + 1) - at);
}

std::vector<double> losses(const fs::path &out) {
  std::vector<double> l;
  std::ifstream in(out / "train_log.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) l.push_back(j["loss"].get<double>());
  }
  return l;
}

}  // namespace

TEST_CASE("tensor parallel inference on 2 GPUs writes one GPU's greedy text", "[parallel][cuda]") {
  const auto dir = scratch("run");
  const auto write = [&](const std::string &name, const std::string &parallel) {
    std::ofstream(dir / name) << "[loom]\ndevice = \"cuda\"\n[model]\npath = \"" << (kSource / "models/tiny-kjv").string()
                              << "\"\n[run]\nsteps = 64\nprompt = \"And God said\"\nstop_tokens = []\n[attention]\nuse = "
                                 "\"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n"
                              << parallel;
    return dir / name;
  };
  const auto one = launch("run", write("one.toml", ""), 1);
  const auto two = launch("run", write("two.toml", "[parallel]\nuse = \"tensor\"\n"), 2);
  INFO(one.out << "\n----\n" << two.out);
  REQUIRE(one.code == 0);
  REQUIRE(two.code == 0);
  CHECK(two.out.find("tensor parallel rank 0 of 2") != std::string::npos);
  CHECK_FALSE(generated(one.out).empty());
  CHECK(generated(two.out) == generated(one.out));
}

TEST_CASE("data parallel training on 2 GPUs (with ZeRO-1) follows one GPU's curve", "[parallel][cuda]") {
  const auto write = [&](const fs::path &dir, const std::string &parallel) {
    std::ofstream(dir / "train.toml") << "[loom]\ndevice = \"cuda\"\nseed = 5\n[model]\npath = \""
                                      << (kSource / "models/tiny-kjv").string() << "\"\n[train]\ndata = \""
                                      << (kSource / "tests/fixtures/text/kjv_calibration.txt").string()
                                      << "\"\nvalidation_fraction = 0.0\nseq_len = 64\nbatch_size = 8\nsteps = 12\nlr = 1e-3\n"
                                         "warmup = 2\ngrad_clip = 1.0\neval_every = 0\nout = \""
                                      << (dir / "out").string() << "\"\n"
                                      << parallel;
    return dir / "train.toml";
  };
  const auto one_dir = scratch("train-one");
  const auto one = launch("train", write(one_dir, ""), 1);
  INFO(one.out);
  REQUIRE(one.code == 0);
  const auto want = losses(one_dir / "out");
  REQUIRE(want.size() == 12);
  for (const std::string zero : {"0", "1"}) {
    const auto dir = scratch("train-two-" + zero);
    const auto two = launch("train", write(dir, "[parallel]\nuse = \"data\"\nzero_stage = " + zero + "\n"), 2);
    INFO("zero_stage " << zero << "\n" << two.out);
    REQUIRE(two.code == 0);
    CHECK(two.out.find("data parallel x2") != std::string::npos);
    const auto got = losses(dir / "out");
    REQUIRE(got.size() == want.size());
    for (size_t i = 0; i < want.size(); ++i) CHECK(std::fabs(got[i] - want[i]) <= 1e-4 * std::fabs(want[i]));
  }
}

// A GPT-2 of 4 layers (tests/fixtures/models/tiny-gpt2's shape) with the byte-level tokenizer:
// trained from random weights (train.init), it covers learned positions, LayerNorm and a tied
// head whose two copies live on the first and last stages.
fs::path tiny_gpt2() {
  const fs::path d = scratch("tiny-gpt2");
  loom_test::write_tiny_gpt2(kSource, d, 4);
  return d;
}

TEST_CASE("pipeline parallel training on 2 GPUs follows one GPU's curve", "[parallel][cuda]") {
  const fs::path gpt2 = tiny_gpt2();
  struct Case {
    const char *name;
    fs::path model;
    const char *extra;  // [train] lines
  };
  for (const Case &c : {Case{"tiny-kjv (Llama, tied)", kSource / "models/tiny-kjv", ""},
                        Case{"tiny-kjv with recomputation and accumulation", kSource / "models/tiny-kjv",
                             "recompute = true\ngrad_accum = 2\n"},
                        Case{"GPT-2 (random init)", gpt2, "init = \"random\"\n"}}) {
    const auto write = [&](const fs::path &dir, const std::string &parallel) {
      std::ofstream(dir / "train.toml") << "[loom]\ndevice = \"cuda\"\nseed = 5\n[model]\npath = \"" << c.model.string()
                                        << "\"\n[train]\ndata = \""
                                        << (kSource / "tests/fixtures/text/kjv_calibration.txt").string()
                                        << "\"\nvalidation_fraction = 0.0\nseq_len = 64\nbatch_size = 6\nsteps = 10\n"
                                           "lr = 1e-3\nwarmup = 2\ngrad_clip = 1.0\neval_every = 0\nout = \""
                                        << (dir / "out").string() << "\"\n"
                                        << c.extra << parallel;
      return dir / "train.toml";
    };
    const auto one_dir = scratch("pipe-one"), two_dir = scratch("pipe-two");
    const auto one = launch("train", write(one_dir, ""), 1);
    const auto two = launch("train", write(two_dir, "[parallel]\nuse = \"pipeline\"\nstages = 2\n"), 2);
    INFO(c.name << "\n" << one.out << "\n----\n" << two.out);
    REQUIRE(one.code == 0);
    REQUIRE(two.code == 0);
    CHECK(two.out.find("pipeline stage 0 of 2") != std::string::npos);
    const auto want = losses(one_dir / "out"), got = losses(two_dir / "out");
    REQUIRE(want.size() == 10);
    REQUIRE(got.size() == want.size());
    for (size_t i = 0; i < want.size(); ++i) CHECK(std::fabs(got[i] - want[i]) <= 1e-4 * std::fabs(want[i]));
    // Every step says how much of it the stages waited (1F1B over 6 micro-batches, 2 stages).
    std::ifstream log(two_dir / "out/train_log.jsonl");
    std::string line;
    int idle = 0;
    while (std::getline(log, line)) {
      const auto j = nlohmann::json::parse(line);
      if (!j.contains("pipeline_idle")) continue;
      ++idle;
      CHECK(j["pipeline_idle"].get<double>() > 0.0);
      CHECK(j["pipeline_idle"].get<double>() < 1.0);
    }
    CHECK(idle == 10);
    // The exported model is the whole model (both stages' parameters).
    CHECK(fs::file_size(two_dir / "out/model/model.safetensors") == fs::file_size(one_dir / "out/model/model.safetensors"));
  }
}

int main(int argc, char **argv) {
  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus < 2) {
    std::cout << "parallel_cuda_test: skipped: " << gpus << " CUDA device(s), 2 needed\n";
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
