// [PEFT] item 5's multi-LoRA number: decode tokens/s of the CUDA backend at batch B with N LoRA
// adapters served together (row s runs with adapter s mod N, through the lora plugin's gathered
// kernels), against the same model without adapters, in one process on one GPU. Both sides are
// the backend's forward passes (the decode step replayed as a CUDA graph), no sampling, so the
// ratio is the adapters' cost alone. Also: the adapters loaded but every row on the base model,
// and the adapters through the two-kernel path (LOOM_LORA_FUSED=0) rather than the fused one.
//
// usage: loom_lora_bench MODEL_DIR [--adapters 8] [--rank 16] [--batch 32] [--context 128]
//                        [--steps 64] [--reps 5] [--attention flash] [--only-adapters 1]
// (--only-adapters 1: only the adapters' side, prefill and decode, for a profiler's run.)
// Each adapter targets q/k/v/o/gate/up/down with r = rank, alpha = 2 rank, and random A and B
// (B is zero at initialisation, which would change no logits; the kernels do the same work).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_args.hpp"
#include "cuda_backend.hpp"
#include "loom/core/error.hpp"
#include "loom/core/host_context.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/metrics.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/core/registry.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/loom_plugin_api.h"

namespace {

using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

void check(cudaError_t e, const char *what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// Random values (U(-0.05, 0.05)) for every parameter of `adapter`, through its own load().
void randomise(loom::Instance &adapter, uint32_t seed) {
  struct Param {
    std::string name;
    std::vector<int64_t> shape;
  };
  std::vector<Param> params;
  loom_tensor_sink sink{sizeof(loom_tensor_sink), &params, [](void *user, const char *name, DLTensor *t, DLTensor *) -> loom_status {
                          static_cast<std::vector<Param> *>(user)->push_back({name, std::vector<int64_t>(t->shape, t->shape + t->ndim)});
                          return LOOM_OK;
                        }};
  const auto *vt = adapter.vtable<loom_adapter_vtable>();
  adapter.check(vt->parameters(adapter.handle(), &sink), "parameters");
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-0.05f, 0.05f);
  std::vector<std::vector<float>> values;
  std::vector<DLTensor> tensors(params.size());
  std::vector<loom_named_tensor> named(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    size_t n = 1;
    for (int64_t d : params[i].shape) n *= static_cast<size_t>(d);
    values.emplace_back(n);
    for (float &v : values.back()) v = dist(rng);
  }
  for (size_t i = 0; i < params.size(); ++i) {
    tensors[i] = DLTensor{values[i].data(), {kDLCPU, 0}, static_cast<int32_t>(params[i].shape.size()),
                          DLDataType{kDLFloat, 32, 1}, params[i].shape.data(), nullptr, 0};
    named[i] = loom_named_tensor{sizeof(loom_named_tensor), params[i].name.c_str(), &tensors[i]};
  }
  adapter.check(vt->load(adapter.handle(), named.data(), static_cast<uint32_t>(named.size())), "load");
}

struct Side {
  std::unique_ptr<loom::Pipeline> pipeline;
  std::unique_ptr<loom::ModelBackend> backend;
};

}  // namespace

int main(int argc, char **argv) {
  if (argc < 2) {
    std::cerr << "usage: loom_lora_bench MODEL_DIR [--adapters 8] [--rank 16] [--batch 32] [--context 128] [--steps 64] "
                 "[--reps 5] [--attention flash] [--only-adapters 1]\n";
    return 2;
  }
  const std::string model_dir = argv[1];
  int adapters = 8, rank = 16, batch = 32, context = 128, steps = 64, reps = 5;
  bool only_adapters = false;  // --only-adapters 1: just the adapters' side (a profiler's run)
  std::string attention = "flash";
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--only-adapters") only_adapters = v == "1";
    else if (k == "--adapters") adapters = std::stoi(v);
    else if (k == "--rank") rank = std::stoi(v);
    else if (k == "--batch") batch = std::stoi(v);
    else if (k == "--context") context = std::stoi(v);
    else if (k == "--steps") steps = std::stoi(v);
    else if (k == "--reps") reps = std::stoi(v);
    else if (k == "--attention") attention = v;
    else {
      std::cerr << "unknown option " << k << "\n";
      return 2;
    }
  }
  try {
    if (!loom::cuda_device_present()) {
      std::cerr << "loom_lora_bench: no CUDA device\n";
      return 77;
    }
    loom::Registry registry(loom::Registry::default_search_paths({}));
    registry.scan();
    loom::Metrics metrics;
    std::atomic<bool> cancelled{false};
    const auto config = loom::load_model_config(model_dir);
    auto make = [&](int n) {
      std::string text = "[loom]\ndevice = \"cuda\"\n[attention]\nuse = \"" + attention + "\"\n[[sampler]]\nuse = \"greedy\"\n";
      for (int a = 0; a < n; ++a)
        text += "[[adapter]]\nname = \"lora" + std::to_string(a) + "\"\nuse = \"lora\"\nr = " + std::to_string(rank) +
                "\nalpha = " + std::to_string(2 * rank) + "\nseed = " + std::to_string(a) +
                "\ntarget_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]\n";
      Side s;
      s.pipeline = std::make_unique<loom::Pipeline>(registry, loom::InstanceEnvironment{{kDLCUDA, 0}, &metrics, &cancelled});
      s.pipeline->build(loom::parse_manifest_string(text, "lora-bench"));
      loom::CudaBackendOptions options;
      options.source_name = model_dir;
      s.backend = loom::make_cuda_backend(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(model_dir)),
                                          *s.pipeline, options);
      s.backend->reserve(batch, context + steps + 1);
      uint32_t seed = 100;
      for (auto &a : s.pipeline->list(LOOM_KIND_ADAPTER)) randomise(*a, seed++);
      return s;
    };
    Side base;
    if (!only_adapters) base = make(0);
    Side multi = make(adapters);
    std::mt19937 rng(7);
    std::uniform_int_distribution<int32_t> token(10, static_cast<int32_t>(config.vocab_size) - 1);
    loom::StepBatch prefill;
    prefill.seq_offsets = {0};
    for (int s = 0; s < batch; ++s) {
      for (int t = 0; t < context; ++t) prefill.tokens.push_back(token(rng));
      prefill.seq_offsets.push_back(static_cast<int32_t>(prefill.tokens.size()));
      prefill.seq_positions.push_back(0);
      prefill.seq_slots.push_back(s);
    }
    // Decode tokens/s over `steps` steps (positions context .. context + steps - 1) with the
    // rows' adapter choices `choice(s)`.
    auto decode = [&](Side &side, auto choice, bool adapters_given) {
      loom::StepBatch p = prefill;
      if (adapters_given)
        for (int s = 0; s < batch; ++s) p.seq_adapters.push_back(choice(s));
      side.backend->forward(p);
      std::vector<double> runs;
      for (int r = 0; r < reps + 1; ++r) {
        check(cudaDeviceSynchronize(), "decode");
        const auto start = Clock::now();
        for (int i = 0; i < steps; ++i) {
          loom::StepBatch d;
          d.seq_offsets = {0};
          for (int s = 0; s < batch; ++s) {
            d.tokens.push_back(token(rng));
            d.seq_offsets.push_back(s + 1);
            d.seq_positions.push_back(context + i);
            d.seq_slots.push_back(s);
            if (adapters_given) d.seq_adapters.push_back(choice(s));
          }
          side.backend->forward(d);
        }
        check(cudaDeviceSynchronize(), "decode");
        const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
        if (r > 0) runs.push_back(batch * steps / seconds);
      }
      return median(runs);
    };
    if (only_adapters) {
      const double tps = decode(multi, [&](int s) { return s % adapters; }, true);
      std::printf("%d adapters, row s on adapter s mod %d: %.1f tok/s\n", adapters, adapters, tps);
      return 0;
    }
    const double base_tps = decode(base, [](int) { return loom::StepBatch::kNoAdapter; }, false);
    const double multi_tps = decode(multi, [&](int s) { return s % adapters; }, true);
    const double unused_tps = decode(multi, [](int) { return loom::StepBatch::kNoAdapter; }, true);
    // The shrink/expand pair instead of the fused kernel (sm_90), in a backend of its own: graphs
    // keep the kernels of their capture.
    ::setenv("LOOM_LORA_FUSED", "0", 1);
    Side pair = make(adapters);
    const double pair_tps = decode(pair, [&](int s) { return s % adapters; }, true);
    ::unsetenv("LOOM_LORA_FUSED");
    pair.backend.reset();  // before the pipeline whose adapters it uses
    pair.pipeline.reset();
    const double base_again = decode(base, [](int) { return loom::StepBatch::kNoAdapter; }, false);
    std::printf("model %s, batch %d, context %d, %d decode steps, median of %d; %d LoRA adapters of rank %d on all 7 "
                "projections\n",
                model_dir.c_str(), batch, context, steps, reps, adapters, rank);
    std::printf("| measure | decode tok/s | step ms | / base |\n| --- | ---: | ---: | ---: |\n");
    const double b = (base_tps + base_again) / 2;
    auto row = [&](const char *name, double tps) { std::printf("| %s | %.1f | %.3f | %.2fx |\n", name, tps, 1e3 * batch / tps, tps / b); };
    row("base model (no adapters)", base_tps);
    row("base model again (after the others)", base_again);
    const std::string label = std::to_string(adapters) + " adapters, row s on adapter s mod " + std::to_string(adapters);
    row(label.c_str(), multi_tps);
    row("adapters loaded, every row on the base", unused_tps);
    row((label + ", LOOM_LORA_FUSED=0 (shrink + expand)").c_str(), pair_tps);
    std::printf("backend: %s\n", base.backend->describe().c_str());
  } catch (const std::exception &e) {
    std::cerr << "loom_lora_bench: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
