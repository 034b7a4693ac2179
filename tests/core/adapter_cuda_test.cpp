// [PEFT] item 4 on CUDA: LoRA adapters served through the gathered extension (the lora plugin's
// lora_gathered.cu, the backend's cuda_adapters.cpp). One step batch holds rows of two adapters
// and of the base model; each row's logits must be the CPU backend's (float32, the same rows and
// choices) within the precision of the CUDA side: bfloat16 copies of A and B (the first version
// of the kernels printed 3.5e-3 of the largest logit in float32 mode on the H100), and in bfloat16
// mode bfloat16 activations. Prefill and a decode step (captured in a CUDA graph) both, through
// both kernel paths (fused on sm_90, the shrink/expand pair).
// Served requests on CUDA with per-request adapters get the tokens they get alone on CUDA.
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cpu_backend.hpp"
#include "cuda_backend.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/core/registry.hpp"
#include "loom/core/request_queue.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/safetensors.hpp"

namespace fs = std::filesystem;

namespace {

// As cuda_test_main.hpp's (whose main lives in model_cuda_test.cpp): LOOM_SOURCE_DIR in the
// environment (a build run on the GPU machine), else where this build was configured.
fs::path source_dir() {
  const char *env = std::getenv("LOOM_SOURCE_DIR");
  return env && *env ? fs::path(env) : fs::path(LOOM_SOURCE_DIR);
}

std::string adapters_toml() {
  std::string text;
  for (const auto &[name, fixture] : {std::pair{"bible", "loom-lora"}, std::pair{"peft", "peft-lora"}})
    text += std::string("[[adapter]]\nname = \"") + name + "\"\nuse = \"lora\"\nr = 4\nalpha = 8\n" +
            "target_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\nweights = \"" +
            (source_dir() / "tests/fixtures/peft" / fixture).string() + "\"\n";
  return text;
}

struct Side {
  loom::Manifest manifest;
  std::unique_ptr<loom::Registry> registry;
  std::unique_ptr<loom::Pipeline> pipeline;
  std::unique_ptr<loom::ModelBackend> backend;
};

// The default model with both adapters, on `device`, as a backend of its own.
Side side(DLDevice device, loom::ComputeDtype dtype) {
  const fs::path dir = source_dir() / "models/tiny-kjv";
  Side s;
  s.manifest = loom::parse_manifest_string("[model]\npath = \"" + dir.string() + "\"\n[attention]\nuse = \"sdpa\"\n" + adapters_toml(),
                                           "adapters.toml");
  s.registry = std::make_unique<loom::Registry>(loom::Registry::default_search_paths(s.manifest.plugin_paths));
  s.registry->scan();
  loom::InstanceEnvironment env;
  env.device = device;
  s.pipeline = std::make_unique<loom::Pipeline>(*s.registry, env);
  s.pipeline->build(s.manifest);
  const loom::ModelConfig config = loom::load_model_config(dir);
  auto weights = loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir));
  if (device.device_type == kDLCUDA) {
    loom::CudaBackendOptions o;
    o.dtype = dtype;
    o.source_name = "cuda";
    s.backend = loom::make_cuda_backend(config, std::move(weights), *s.pipeline, o);
  } else {
    loom::CpuBackendOptions o;
    o.dtype = loom::ComputeDtype::float32;
    o.threads = 2;
    o.source_name = "cpu";
    s.backend = std::make_unique<loom::CpuBackend>(config, std::move(weights), *s.pipeline, o);
  }
  s.backend->reserve(8, 128);
  return s;
}

std::vector<float> host_rows(const DLTensor *t) {
  size_t n = static_cast<size_t>(t->shape[0] * t->shape[1]);
  std::vector<float> v(n);
  if (t->device.device_type == kDLCUDA)
    REQUIRE(cudaMemcpy(v.data(), t->data, n * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  else
    std::copy_n(static_cast<const float *>(t->data), n, v.begin());
  return v;
}

// max over rows of max |a - b| / max |b| per row.
double worst_row_error(const std::vector<float> &a, const std::vector<float> &b, size_t vocab) {
  double worst = 0;
  for (size_t r = 0; r * vocab < b.size(); ++r) {
    double w = 0, largest = 0;
    for (size_t v = r * vocab; v < (r + 1) * vocab; ++v) {
      w = std::max(w, std::fabs(static_cast<double>(a[v]) - b[v]));
      largest = std::max(largest, std::fabs(static_cast<double>(b[v])));
    }
    worst = std::max(worst, w / largest);
  }
  return worst;
}

}  // namespace

TEST_CASE("LoRA on CUDA: rows of different adapters in one batch compute what the CPU computes", "[cuda][peft]") {
  // 88 prefill rows (more than 64: the kernels by row) and 4 decode rows (by adapter).
  std::vector<std::vector<int32_t>> prompts = {{1, 140, 7, 33}, {1, 512, 48, 9, 1200}, {1, 77, 5}, {1, 301, 22, 88, 6, 14}};
  for (int32_t t = 0; t < 70; ++t) prompts[3].push_back(3 + (t * 37) % 1990);
  const std::vector<int32_t> choices = {0, 1, loom::StepBatch::kNoAdapter, 1};  // bible, peft, base, peft
  // Both kernel paths: the fused one (sm_90 and newer; elsewhere "1" runs the pair too) and the
  // shrink/expand pair (LOOM_LORA_FUSED=0), each in backends of its own (graphs keep the choice
  // of their capture).
  for (const char *fused : {"1", "0"})
  for (const auto &[dtype, tolerance] : {std::pair{loom::ComputeDtype::float32, 1e-2}, std::pair{loom::ComputeDtype::bfloat16, 4e-2}}) {
    ::setenv("LOOM_LORA_FUSED", fused, 1);
    INFO("LOOM_LORA_FUSED=" << fused << ", " << (dtype == loom::ComputeDtype::float32 ? "float32" : "bfloat16"));
    Side cpu = side({kDLCPU, 0}, dtype), cuda = side({kDLCUDA, 0}, dtype);
    loom::StepBatch prefill;
    prefill.seq_offsets = {0};
    for (size_t s = 0; s < prompts.size(); ++s) {
      prefill.tokens.insert(prefill.tokens.end(), prompts[s].begin(), prompts[s].end());
      prefill.seq_offsets.push_back(static_cast<int32_t>(prefill.tokens.size()));
      prefill.seq_positions.push_back(0);
      prefill.seq_slots.push_back(static_cast<int32_t>(s));
    }
    prefill.seq_adapters = choices;
    const size_t vocab = 2000;  // the default model's
    const auto expected = host_rows(cpu.backend->forward(prefill));
    const auto got = host_rows(cuda.backend->forward(prefill));
    CHECK(worst_row_error(got, expected, vocab) < tolerance);
    // A decode step (captured and replayed as a CUDA graph, twice), then one in which no row
    // runs with an adapter (the base model's own paths and graph, the adapters still loaded).
    for (int repeat = 0; repeat < 3; ++repeat) {
      loom::StepBatch decode;
      decode.seq_offsets = {0};
      for (size_t s = 0; s < prompts.size(); ++s) {
        decode.tokens.push_back(42 + static_cast<int32_t>(s));
        decode.seq_offsets.push_back(static_cast<int32_t>(s + 1));
        decode.seq_positions.push_back(static_cast<int32_t>(prompts[s].size()));
        decode.seq_slots.push_back(static_cast<int32_t>(s));
      }
      decode.seq_adapters = choices;
      if (repeat == 2) decode.seq_adapters.assign(choices.size(), loom::StepBatch::kNoAdapter);
      const auto e = host_rows(cpu.backend->forward(decode));
      const auto g = host_rows(cuda.backend->forward(decode));
      CHECK(worst_row_error(g, e, vocab) < tolerance);
    }
    // The choices matter: every row on the base model is far from these.
    loom::StepBatch plain = prefill;  // in slots of their own
    for (auto &slot : plain.seq_slots) slot += 4;
    plain.seq_adapters.assign(choices.size(), loom::StepBatch::kNoAdapter);
    const auto base = host_rows(cuda.backend->forward(plain));
    std::vector<float> adapted_rows(got.begin(), got.begin() + static_cast<std::ptrdiff_t>(2 * vocab)),
        base_rows(base.begin(), base.begin() + static_cast<std::ptrdiff_t>(2 * vocab));
    CHECK(worst_row_error(base_rows, adapted_rows, vocab) > 5 * tolerance);
  }
  ::unsetenv("LOOM_LORA_FUSED");
}

TEST_CASE("served on CUDA, requests choosing adapters get the tokens they get alone", "[cuda][peft]") {
  const std::string head = "[loom]\ndevice = \"cuda\"\n[model]\npath = \"" + (source_dir() / "models/tiny-kjv").string() +
                           "\"\ndtype = \"float32\"\n[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n";
  auto rt = loom::Runtime::from_string(head + adapters_toml() + "[scheduler]\nmax_seqs = 8\nmax_batched_tokens = 64\n[run]\nprompt = [1]\n");
  const std::vector<std::vector<int32_t>> prompts = {{1, 140, 7, 33}, {1, 512, 48, 9, 1200}, {1, 77, 5}};
  const std::vector<std::optional<std::string>> choices = {std::string("bible"), std::string("peft"), std::string("")};
  // Alone: one request at a time through the same runtime.
  auto serve = [&](const std::vector<std::pair<size_t, size_t>> &which) {
    loom::RequestQueue queue;
    std::vector<std::vector<int32_t>> out(which.size());
    std::vector<std::string> errors(which.size());
    for (size_t i = 0; i < which.size(); ++i) {
      loom::ServeRequest r;
      r.prompt = prompts[which[i].first];
      r.max_new_tokens = 12;
      r.adapter = choices[which[i].second];
      r.on_done = [&, i](const loom::SequenceResult &res, const std::string &error) {
        out[i] = res.tokens;
        errors[i] = error;
      };
      queue.submit(std::move(r));
    }
    queue.close();
    rt->serve(queue, 64);
    for (const auto &e : errors) CHECK(e.empty());
    return out;
  };
  std::vector<std::pair<size_t, size_t>> all;
  for (size_t p = 0; p < prompts.size(); ++p)
    for (size_t c = 0; c < choices.size(); ++c) all.emplace_back(p, c);
  const auto together = serve(all);
  for (size_t i = 0; i < all.size(); ++i) {
    INFO("prompt " << all[i].first << ", adapter " << all[i].second);
    CHECK(together[i] == serve({all[i]})[0]);
  }
  CHECK(together[0] != together[2]);  // bible against the base model on the same prompt
  // Every adapter at once for one row is not expressible on CUDA: that request is refused.
  loom::RequestQueue queue;
  std::string error;
  loom::ServeRequest r;
  r.prompt = prompts[0];
  r.on_done = [&](const loom::SequenceResult &, const std::string &e) { error = e; };
  queue.submit(std::move(r));
  queue.close();
  rt->serve(queue, 64);
  CHECK_THAT(error, Catch::Contains("2 adapters are loaded and on cuda:0 float32") && Catch::Contains("each request chooses one"));
}

TEST_CASE("on CUDA, adapters load, swap and unload between steps and serve what they serve from the start", "[cuda][peft]") {
  // The CUDA backend's membership and swap hooks: groups rebuilt and graphs dropped. A runtime
  // that loads "bible" and then swaps it for peft's adapter must give the tokens of runtimes
  // that had each adapter from the start (float32, served one request at a time).
  const std::string head = "[loom]\ndevice = \"cuda\"\n[model]\npath = \"" + (source_dir() / "models/tiny-kjv").string() +
                           "\"\ndtype = \"float32\"\n[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n";
  const std::string tail = "[scheduler]\nmax_seqs = 4\nmax_batched_tokens = 64\n[run]\nprompt = [1]\n";
  auto table = [&](const char *fixture) {
    return std::string("use = \"lora\"\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\nweights = \"") +
           (source_dir() / "tests/fixtures/peft" / fixture).string() + "\"\n";
  };
  auto tokens = [&](loom::Runtime &rt, const std::optional<std::string> &adapter) {
    loom::RequestQueue queue;
    std::vector<int32_t> out;
    std::string error;
    loom::ServeRequest r;
    r.prompt = {1, 140, 7, 33, 512};
    r.max_new_tokens = 10;
    r.adapter = adapter;
    r.on_done = [&](const loom::SequenceResult &res, const std::string &e) {
      out = res.tokens;
      error = e;
    };
    queue.submit(std::move(r));
    queue.close();
    rt.serve(queue, 64);
    CHECK(error.empty());
    return out;
  };
  auto from_start = [&](const char *fixture) {
    auto rt = loom::Runtime::from_string(head + "[[adapter]]\nname = \"a\"\n" + table(fixture) + tail);
    return tokens(*rt, std::string("a"));
  };
  const auto bible = from_start("loom-lora"), peft = from_start("peft-lora");
  auto rt = loom::Runtime::from_string(head + tail);
  const auto base = tokens(*rt, std::nullopt);
  rt->load_adapter("a", table("loom-lora"));
  CHECK(tokens(*rt, std::string("a")) == bible);
  CHECK(tokens(*rt, std::string("")) == base);
  rt->swap("a", table("peft-lora"));
  CHECK(tokens(*rt, std::string("a")) == peft);
  rt->unload_adapter("a");
  CHECK(tokens(*rt, std::nullopt) == base);
  CHECK(bible != base);
  CHECK_THROWS_WITH(rt->load_adapter("b", "use = \"bottleneck\"\n"), Catch::Contains("this adapter has no CUDA path"));
}
