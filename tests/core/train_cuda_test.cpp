// The CUDA training engine ([Training] items 1, 2 and 5 on CUDA): its loss and every
// parameter's gradient against the CPU trainer (itself checked against finite differences) on
// the fixtures (GQA, q/k/v biases, tied head, sliding window, head dim 64, GPT-2);
// optimizer steps against the CPU's; the same bits on every run and with activation
// recomputation; bf16 GEMM operands close to float32; PyTorch's 200-step loss curve within 2%;
// and `loom train` on CUDA resuming bit for bit and exporting a model the engine runs.
// Exits 77 (skipped) where there is no CUDA device.
#define CATCH_CONFIG_RUNNER
#include "scoped_env.hpp"
#include "cuda_test_main.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <random>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom/core/error.hpp"
#include "loom/core/host_context.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/core/training.hpp"
#include "train_curve_fixture.hpp"
#include "training_engine.hpp"

namespace fs = std::filesystem;

namespace {

using loom_test::source_dir;
const fs::path kModels = source_dir() / "tests/fixtures/models";

loom::TrainEngineOptions options(bool bf16 = false, bool recompute = false) {
  loom::TrainEngineOptions o;
  o.adamw.lr = 1e-3;
  o.adamw.beta1 = 0.9;
  o.adamw.beta2 = 0.95;
  o.adamw.weight_decay = 0.1;
  o.threads = 0;
  o.bf16 = bf16;
  o.recompute = recompute;
  return o;
}

std::unique_ptr<loom::TrainingEngine> cuda_engine(const fs::path &dir, const loom::TrainEngineOptions &o) {
  const loom::ModelConfig config = loom::load_model_config(dir);
  return loom::make_cuda_training_engine(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)), o);
}

std::unique_ptr<loom::TrainingEngine> cpu_engine(const fs::path &dir, const loom::TrainEngineOptions &o) {
  const loom::ModelConfig config = loom::load_model_config(dir);
  return loom::make_cpu_training_engine(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)), o);
}

std::vector<std::vector<int32_t>> random_batch(int64_t B, int64_t n, int32_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> token(0, vocab - 1);
  std::vector<std::vector<int32_t>> batch(static_cast<size_t>(B));
  for (auto &s : batch)
    for (int64_t t = 0; t < n; ++t) s.push_back(token(rng));
  return batch;
}

// max |a - b| / max |b| over a tensor (0 when both are zero).
double relative(const std::vector<float> &a, const std::vector<float> &b) {
  double worst = 0, largest = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - b[i]));
    largest = std::max(largest, std::fabs(static_cast<double>(b[i])));
  }
  return largest == 0 ? worst : worst / largest;
}

// Checks each parameter's gradient in `got` within `bound` of `want` (relative, as above), naming
// the parameter on failure; returns the worst difference.
double check_gradients(const std::vector<loom::TrainParam<float>> &params, const std::vector<std::vector<float>> &got,
                       const std::vector<std::vector<float>> &want, double bound) {
  REQUIRE(got.size() == want.size());
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    INFO(params[i].name);
    const double r = relative(got[i], want[i]);
    worst = std::max(worst, r);
    CHECK(r < bound);
  }
  return worst;
}

std::string file_bytes(const fs::path &p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

TEST_CASE("CUDA gradients match the CPU trainer's on every fixture architecture", "[train][cuda]") {
  for (const char *name : {"tiny-llama", "tiny-llama-hd64", "tiny-llama3-tied", "tiny-mistral", "tiny-qwen2", "tiny-gpt2"}) {
    INFO(name);
    const fs::path dir = kModels / name;
    auto cpu = cpu_engine(dir, options());
    auto gpu = cuda_engine(dir, options());
    // Three sequences of 24 tokens (tiny-mistral's window of 4 is far shorter), scale 1/3.
    const auto batch = random_batch(3, 24, 256, 7);
    const double cpu_loss = cpu->run(batch, true, 1.0 / 3);
    const double gpu_loss = gpu->run(batch, true, 1.0 / 3);
    CHECK(gpu_loss == Approx(cpu_loss).epsilon(1e-5));
    const auto &params = cpu->host_params();
    const auto cpu_grads = cpu->host_grads(), gpu_grads = gpu->host_grads();
    const double worst = check_gradients(params, gpu_grads, cpu_grads, 1e-4);
    WARN(name << ": worst gradient difference from the CPU " << worst << " (relative to each tensor's largest)");
    // A second batch accumulates into the same gradients on both.
    const auto more = random_batch(3, 24, 256, 8);
    CHECK(gpu->run(more, true, 1.0 / 3) == Approx(cpu->run(more, true, 1.0 / 3)).epsilon(1e-5));
    const auto cpu_sum = cpu->host_grads(), gpu_sum = gpu->host_grads();
    for (size_t i = 0; i < cpu_sum.size(); ++i) CHECK(relative(gpu_sum[i], cpu_sum[i]) < 1e-4);
  }
}

TEST_CASE("CUDA optimizer steps follow the CPU's; runs repeat bit for bit, with or without recomputation", "[train][cuda]") {
  for (const char *name : {"tiny-qwen2", "tiny-gpt2"}) {
  INFO(name);
  const fs::path dir = kModels / name;
  auto cpu = cpu_engine(dir, options());
  auto gpu = cuda_engine(dir, options()), again = cuda_engine(dir, options()), recomputed = cuda_engine(dir, options(false, true));
  std::vector<double> losses;
  for (int step = 1; step <= 12; ++step) {
    const auto batch = random_batch(4, 32, 256, static_cast<uint32_t>(100 + step));
    double l[4];
    loom::TrainingEngine *engines[4] = {cpu.get(), gpu.get(), again.get(), recomputed.get()};
    double norms[4];
    for (int e = 0; e < 4; ++e) {
      engines[e]->zero_grad();
      l[e] = engines[e]->run(batch, true, 0.25);
      norms[e] = engines[e]->clip_grad_norm(0.5);
      engines[e]->optimizer_step(1e-3);
    }
    INFO("step " << step);
    CHECK(l[1] == Approx(l[0]).epsilon(1e-4));
    CHECK(norms[1] == Approx(norms[0]).epsilon(1e-4));
    CHECK(l[1] == l[2]);  // the same doubles
    CHECK(l[1] == l[3]);
    CHECK(norms[1] == norms[2]);
  }
  const auto cpu_params = cpu->host_params();
  const auto gpu_params = gpu->host_params();
  const auto again_params = again->host_params();
  const auto recomputed_params = recomputed->host_params();
  std::vector<std::vector<float>> m1, v1, m2, v2;
  gpu->host_moments(m1, v1);
  cpu->host_moments(m2, v2);
  REQUIRE(m1.size() == cpu_params.size());
  for (size_t i = 0; i < cpu_params.size(); ++i) {
    INFO(cpu_params[i].name);
    CHECK(relative(gpu_params[i].value, cpu_params[i].value) < 1e-3);
    CHECK(gpu_params[i].value == again_params[i].value);
    CHECK(gpu_params[i].value == recomputed_params[i].value);
    CHECK(relative(m1[i], m2[i]) < 1e-3);
  }
  CHECK(gpu->optimizer_steps() == 12);
  }
}

TEST_CASE("bf16 GEMM operands stay close to float32 and still learn", "[train][cuda]") {
  const fs::path dir = kModels / "tiny-llama";
  auto f32 = cuda_engine(dir, options()), bf16 = cuda_engine(dir, options(true));
  CHECK_THAT(bf16->describe(), Catch::Contains("bf16"));
  const auto fixed = random_batch(2, 48, 256, 3);
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    f32->zero_grad();
    bf16->zero_grad();
    const double a = f32->run(fixed, true, 0.5), b = bf16->run(fixed, true, 0.5);
    if (step == 0) {
      first = b;
      CHECK(b == Approx(a).epsilon(1e-2));
    }
    last = b;
    f32->clip_grad_norm(1.0);
    bf16->clip_grad_norm(1.0);
    f32->optimizer_step(3e-3);
    bf16->optimizer_step(3e-3);
  }
  CHECK(last < 0.5 * first);  // it fits the two sequences
}

TEST_CASE("bf16 mode's fused attention gives the materialised attention's loss and gradients", "[train][cuda][flash]") {
  // The fused kernels (kernels/cuda/flash_train.cu: bfloat16 q, k, v, P and dS on tensor cores)
  // against the materialised path (TF32 products of float32 operands, LOOM_TRAIN_FLASH=0), both in
  // bf16 mode: GQA (tiny-llama), a sliding window (tiny-mistral), GPT-2, head dim 64; sequences of
  // 24 tokens (one block) and 100 (two, the second partial).
  const ScopedEnv flash("LOOM_TRAIN_FLASH");  // the user's value back on the way out
  for (const char *name : {"tiny-llama", "tiny-mistral", "tiny-gpt2", "tiny-llama-hd64"})
    for (const int64_t n : {int64_t{24}, int64_t{100}}) {
      INFO(name << ", sequences of " << n);
      const fs::path dir = kModels / name;
      flash.unset();
      auto fused = cuda_engine(dir, options(true));
      flash.set("0");
      auto plain = cuda_engine(dir, options(true));
      CHECK_THAT(fused->describe(), Catch::Contains("fused attention"));
      CHECK_THAT(plain->describe(), !Catch::Contains("fused attention"));
      const auto batch = random_batch(3, n, 256, 11);
      const double a = fused->run(batch, true, 1.0 / 3), b = plain->run(batch, true, 1.0 / 3);
      CHECK(a == Approx(b).epsilon(5e-3));
      const auto &params = plain->host_params();
      const auto ga = fused->host_grads(), gb = plain->host_grads();
      const double worst = check_gradients(params, ga, gb, 3e-2);
      WARN(name << ", n " << n << ": worst gradient difference of the fused attention " << worst);
      // No atomics: the same batch again gives the same bits.
      fused->zero_grad();
      CHECK(fused->run(batch, true, 1.0 / 3) == a);
      CHECK(fused->host_grads() == ga);
    }
}

TEST_CASE("the CUDA trainer follows PyTorch's 200-step loss curve within 2%", "[train][cuda]") {
  // The fixture and batches of train_grad_test.cpp's CPU case (tests/fixtures/make_train_curve.py).
  const TrainCurve curve = load_train_curve(source_dir());
  REQUIRE(!curve.model_dir.empty());
  loom::TrainEngineOptions o;
  o.adamw = curve.adamw;
  auto engine = cuda_engine(curve.model_dir, o);
  double worst = 0;
  for (int64_t s = 0; s < curve.steps; ++s) {
    engine->zero_grad();
    const double per = 1.0 / static_cast<double>(curve.batch);
    const double loss = engine->run(curve.batch_of(s), true, per) * per;
    engine->clip_grad_norm(curve.clip);
    engine->optimizer_step(curve.rate(s));
    const double theirs = curve.losses[static_cast<size_t>(s)];
    worst = std::max(worst, std::fabs(loss - theirs) / theirs);
    INFO("step " << s + 1 << ": Loom " << loss << ", PyTorch " << theirs);
    CHECK(std::fabs(loss - theirs) <= 0.02 * theirs);
  }
  WARN("CUDA: worst relative difference from PyTorch's curve over " << curve.steps << " steps: " << worst);
}

TEST_CASE("loom train on CUDA resumes bit for bit and exports a model the engine runs", "[train][cuda]") {
  const fs::path kjv = source_dir() / "models/tiny-kjv";
  const fs::path text = source_dir() / "tests/fixtures/text/kjv_calibration.txt";
  auto manifest = [&](const fs::path &out, const std::vector<std::string> &overrides) {
    return loom::parse_manifest_string("[loom]\nseed = 3\ndevice = \"cuda\"\n[model]\npath = \"" + kjv.string() +
                                           "\"\n[train]\ndata = \"" + text.string() +
                                           "\"\nseq_len = 64\nbatch_size = 4\ngrad_accum = 2\nsteps = 10\nlr = 1e-3\n"
                                           "warmup = 2\ninit = \"random\"\nout = \"" + out.string() + "\"\n",
                                       "train.toml", overrides);
  };
  auto scratch = [](const std::string &name) {
    const fs::path d = fs::temp_directory_path() / ("loom_cuda_train_" + name + "_" + std::to_string(::getpid()));
    fs::remove_all(d);
    return d;
  };
  loom::TrainOptions quiet;
  quiet.progress = false;
  const fs::path straight = scratch("straight"), resumed = scratch("resumed");
  const loom::TrainResult full = loom::train(manifest(straight, {}), quiet);
  CHECK_THAT(full.device, Catch::Contains("cuda:0"));
  REQUIRE(full.val_loss.size() == 2);  // steps 0 and 10 (a 5% split)
  CHECK(full.val_loss.back().second < full.val_loss.front().second);
  loom::TrainOptions stop = quiet;
  stop.stop_after = 4;
  CHECK(loom::train(manifest(resumed, {}), stop).step == 4);
  const loom::TrainResult rest =
      loom::train(manifest(resumed, {"train.resume=\"" + (resumed / "checkpoint").string() + "\""}), quiet);
  REQUIRE(rest.train_loss.size() == 6);
  for (size_t i = 0; i < 6; ++i) CHECK(rest.train_loss[i] == full.train_loss[i + 4]);
  CHECK(file_bytes(rest.model_dir / "model.safetensors") == file_bytes(full.model_dir / "model.safetensors"));
  // The export runs in the CUDA engine.
  auto rt = loom::Runtime::from_string("[loom]\ndevice = \"cuda\"\n[model]\npath = \"" + full.model_dir.string() +
                                           "\"\n[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n[run]\nprompt = \"And God said\"\nsteps = 8\n"
                                           "stop_tokens = []\n",
                                       "run.toml");
  CHECK(rt->run().tokens.size() == 8);
  fs::remove_all(straight);
  fs::remove_all(resumed);
}

TEST_CASE("loom train on CUDA with a data parallel world of one (an NCCL communicator of one) keeps its losses",
          "[train][cuda][parallel]") {
  const fs::path kjv = source_dir() / "models/tiny-kjv";
  const fs::path text = source_dir() / "tests/fixtures/text/kjv_calibration.txt";
  auto manifest = [&](const fs::path &out, const std::string &parallel) {
    return loom::parse_manifest_string("[loom]\nseed = 3\ndevice = \"cuda\"\n[model]\npath = \"" + kjv.string() +
                                           "\"\n[train]\ndata = \"" + text.string() +
                                           "\"\nseq_len = 64\nbatch_size = 4\ngrad_accum = 2\nsteps = 6\nlr = 1e-3\n"
                                           "warmup = 2\nout = \"" + out.string() + "\"\n" + parallel,
                                       "train.toml");
  };
  const fs::path plain = fs::temp_directory_path() / ("loom_cuda_dp_plain_" + std::to_string(::getpid())),
                 dp = fs::temp_directory_path() / ("loom_cuda_dp_one_" + std::to_string(::getpid()));
  loom::TrainOptions quiet;
  quiet.progress = false;
  const loom::TrainResult want = loom::train(manifest(plain, ""), quiet);
  const loom::TrainResult got = loom::train(manifest(dp, "[parallel]\nuse = \"data\"\n"), quiet);
  CHECK_THAT(got.device, Catch::Contains("data parallel x1"));
  REQUIRE(got.train_loss.size() == want.train_loss.size());
  for (size_t i = 0; i < want.train_loss.size(); ++i) CHECK(got.train_loss[i] == want.train_loss[i]);
  // ZeRO stage 1 over one rank: that rank owns every parameter, updated one launch each (the
  // sharded path) with the same arithmetic as the one launch.
  const loom::TrainResult zero = loom::train(manifest(dp, "[parallel]\nuse = \"data\"\nzero_stage = 1\n"), quiet);
  CHECK_THAT(zero.device, Catch::Contains("(ZeRO-1)"));
  REQUIRE(zero.train_loss.size() == want.train_loss.size());
  for (size_t i = 0; i < want.train_loss.size(); ++i) CHECK(zero.train_loss[i] == want.train_loss[i]);
  fs::remove_all(plain);
  fs::remove_all(dp);
}

int main(int argc, char **argv) { return loom_test::run_cuda_suite("train_cuda_test", argc, argv); }
