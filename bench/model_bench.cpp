// Loom's side of the engine benchmark (bench/engine_bench.sh runs it beside the PyTorch peers on
// the same weights): decode tokens/s at several batch sizes and prefill tokens/s of one long
// prompt, through the CUDA backend and an attention plugin, plus the two ceilings the results
// are judged against, measured on the same GPU: device copy bandwidth and the cuBLAS bf16 GEMM
// peak.
//
// usage: loom_model_bench MODEL_DIR [--attention flash] [--quantizer NAME] [--batches 1,32]
//                         [--prompt 128] [--new 128] [--prefill 2048] [--reps 5] [--json FILE]
// (--quantizer: every linear through that quantizer component, e.g. int8)
// Decode: each of B sequences gets a `prompt`-token random prompt, then `new` greedy tokens,
// through loom::Runtime exactly as `loom run` generates (the greedy sampler plugin, stop rules,
// every token back on the host each step), with the next step queued ahead (the default) and
// step by step (LOOM_DECODE_AHEAD=0); tokens/s = B x (new - 1) / the run's decode time (its
// first token comes from the prefill). Prefill: one forward of a `prefill`-token prompt through
// the CUDA backend. Medians over `reps` repetitions after a warm-up.
// Sampling (batch 32): the chain penalties -> temperature -> top-k -> top-p -> min-p -> dist
// applied on the GPU to 32 rows of logits the model produced, timed with CUDA events around the
// links, beside the greedy decode step (32 / decode tokens/s) as a share of it; and decode
// tokens/s through the runtime with that chain.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
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
#include "loom/core/runtime.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/core/sampler_chain.hpp"
#include "loom/loom_plugin_api.h"

namespace {

using Clock = std::chrono::steady_clock;

// The sampling chain the bench times: penalties (repetition 1.1, last 64 tokens), temperature
// 0.8, top-k 40, top-p 0.95, min-p 0.05, dist.
const char *const kChain = "[[sampler]]\nuse = \"penalties\"\nrepetition_penalty = 1.1\nlast_n = 64\n"
                           "[[sampler]]\nuse = \"temperature\"\nt = 0.8\n"
                           "[[sampler]]\nuse = \"top-k\"\nk = 40\n"
                           "[[sampler]]\nuse = \"top-p\"\np = 0.95\n"
                           "[[sampler]]\nuse = \"min-p\"\np = 0.05\n"
                           "[[sampler]]\nuse = \"dist\"\n";

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void check(cudaError_t e, const char *what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// GPU milliseconds of `launch` (work on the legacy stream), 12 times, the first 2 dropped as
// warm-up.
template <class F> std::vector<double> timed_ms(F launch) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<double> out;
  for (int i = 0; i < 12; ++i) {
    cudaEventRecord(start);
    launch();
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    if (i >= 2) out.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return out;
}

// Device-to-device copy bandwidth of a 1 GiB buffer, counting bytes read plus bytes written.
double copy_bandwidth_gbs() {
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  check(cudaMalloc(&a, bytes), "cudaMalloc");
  check(cudaMalloc(&b, bytes), "cudaMalloc");
  std::vector<double> runs;
  for (double ms : timed_ms([&] { check(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpy"); }))
    runs.push_back(2.0 * static_cast<double>(bytes) / (ms * 1e-3) / 1e9);
  cudaFree(a);
  cudaFree(b);
  return median(runs);
}

// cuBLAS bf16 GEMM throughput (float32 accumulation) at m = n = k = size, in TFLOP/s.
double gemm_tflops(int m, int n, int k) {
  cublasHandle_t h;
  cublasCreate(&h);
  void *a, *b, *c;
  check(cudaMalloc(&a, static_cast<size_t>(m) * k * 2), "cudaMalloc");
  check(cudaMalloc(&b, static_cast<size_t>(k) * n * 2), "cudaMalloc");
  check(cudaMalloc(&c, static_cast<size_t>(m) * n * 2), "cudaMalloc");
  // Random operands: all-zero matrices draw less power and let the GPU clock higher than a
  // model's weights do, which overstates the peak.
  {
    std::mt19937 rng(3);
    std::uniform_int_distribution<int> bits(0x3c00, 0x3f7f); // bf16 values in [2^-7, 1)
    std::vector<uint16_t> host(static_cast<size_t>(std::max(m, n)) * static_cast<size_t>(k));
    for (auto &v : host) v = static_cast<uint16_t>(bits(rng) | ((rng() & 1u) << 15));
    check(cudaMemcpy(a, host.data(), static_cast<size_t>(m) * k * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
    check(cudaMemcpy(b, host.data(), static_cast<size_t>(k) * n * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  const float alpha = 1, beta = 0;
  std::vector<double> runs;
  for (double ms : timed_ms([&] {
         cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, a, CUDA_R_16BF, k, b, CUDA_R_16BF, k, &beta, c,
                      CUDA_R_16BF, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
       }))
    runs.push_back(2.0 * m * n * static_cast<double>(k) / (ms * 1e-3) / 1e12);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  cublasDestroy(h);
  return median(runs);
}

} // namespace

int main(int argc, char **argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0); // lines reach a pipe as they are printed
  if (argc < 2 || std::string(argv[1]) == "--help") {
    std::cerr << "usage: loom_model_bench MODEL_DIR [--attention flash] [--quantizer NAME] [--batches 1,32] [--prompt 128]"
                 " [--new 128] [--prefill 2048] [--reps 5] [--json FILE]\n";
    return 2;
  }
  std::string model_dir = argv[1], attention = "flash", json_path, quantizer;
  std::vector<int> batches{1, 32};
  int prompt = 128, fresh = 128, prefill = 2048, reps = 5;
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--attention") attention = v;
    else if (k == "--quantizer") quantizer = "[quantizer]\nuse = \"" + v + "\"\n";
    else if (k == "--batches") batches = loom_bench::parse_int_list(v);
    else if (k == "--prompt") prompt = std::stoi(v);
    else if (k == "--new") fresh = std::stoi(v);
    else if (k == "--prefill") prefill = std::stoi(v);
    else if (k == "--reps") reps = std::stoi(v);
    else if (k == "--json") json_path = v;
    else {
      std::cerr << "unknown option " << k << "\n";
      return 2;
    }
  }
  try {
    if (!loom::cuda_device_present()) {
      std::cerr << "loom_model_bench: no CUDA device\n";
      return 77;
    }
    const int max_batch = *std::max_element(batches.begin(), batches.end());
    auto t0 = Clock::now();
    loom::Manifest manifest = loom::parse_manifest_string("[loom]\ndevice = \"cuda\"\n[attention]\nuse = \"" + attention +
                                                              "\"\n[[sampler]]\nuse = \"greedy\"\n" + quantizer,
                                                          "bench");
    loom::Registry registry(loom::Registry::default_search_paths({}));
    registry.scan();
    loom::Metrics metrics;
    std::atomic<bool> cancelled{false};
    loom::Pipeline pipeline(registry, loom::InstanceEnvironment{{kDLCUDA, 0}, &metrics, &cancelled});
    pipeline.build(manifest);
    auto config = loom::load_model_config(model_dir);
    loom::CudaBackendOptions options;
    options.source_name = model_dir;
    auto backend = loom::make_cuda_backend(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(model_dir)),
                                           pipeline, options);
    const double load_s = std::chrono::duration<double>(Clock::now() - t0).count();
    backend->reserve(max_batch, std::max(prompt + fresh, prefill) + 1);
    auto guard = pipeline.begin_step();

    std::mt19937 rng(7);
    std::uniform_int_distribution<int32_t> token(10, static_cast<int32_t>(config.vocab_size) - 1);
    std::string error;
    std::printf("%-28s %12s\n", "measure", "value");
    std::printf("%-28s %12s\n", "model", model_dir.c_str());
    std::printf("%-28s %12s\n", "backend", backend->describe().c_str());
    std::printf("%-28s %12.1f\n", "load seconds", load_s);
    std::ostringstream json;
    json << "{\"backend\":\"" << backend->describe() << "\",\"attention\":\"" << attention << "\"";
    {
      std::vector<double> runs;
      loom::StepBatch pre;
      for (int t = 0; t < prefill; ++t) pre.tokens.push_back(token(rng));
      pre.seq_offsets = {0, prefill};
      pre.seq_positions = {0};
      pre.seq_slots = {0};
      for (int r = 0; r < reps + 1; ++r) {
        auto start = Clock::now();
        DLTensor *logits = backend->forward(pre);
        check(cudaDeviceSynchronize(), "prefill");
        (void)logits;
        const double s = std::chrono::duration<double>(Clock::now() - start).count();
        if (r > 0) runs.push_back(prefill / s);
      }
      const double tps = median(runs);
      std::printf("prefill tok/s (%d tokens)  %12.1f\n", prefill, tps);
      json << ",\"prefill\":" << tps << ",\"prefill_tokens\":" << prefill;
    }
    // The sampling chain on 32 rows of the model's logits (the last token of 32 short
    // sequences), every link applied on the GPU; microseconds between CUDA events on the
    // stream the links use, the rows restored before each repetition.
    double chain_us = 0.0;
    if (std::find(batches.begin(), batches.end(), 32) != batches.end()) {
      const int B = 32, len = 64;
      loom::StepBatch step;
      for (int s = 0; s < B; ++s) {
        for (int t = 0; t < len; ++t) step.tokens.push_back(token(rng));
        step.seq_offsets.push_back(s * len);
        step.seq_positions.push_back(0);
        step.seq_slots.push_back(s);
      }
      step.seq_offsets.push_back(B * len);
      DLTensor *logits = backend->forward(step);
      check(cudaDeviceSynchronize(), "sampling rows");
      if (logits->ndim != 2 || logits->shape[0] != B || logits->device.device_type != kDLCUDA)
        throw std::runtime_error("the backend returned unexpected logits for 32 sequences");
      const int64_t vocab = logits->shape[1];
      const size_t bytes = static_cast<size_t>(B * vocab) * sizeof(float);
      void *saved = nullptr, *work = nullptr, *tokens_dev = nullptr;
      check(cudaMalloc(&saved, bytes), "cudaMalloc");
      check(cudaMalloc(&work, bytes), "cudaMalloc");
      check(cudaMalloc(&tokens_dev, B * sizeof(int32_t)), "cudaMalloc");
      check(cudaMemcpy(saved, logits->data, bytes, cudaMemcpyDeviceToDevice), "copy logits");
      loom::Pipeline chain_pipeline(registry, loom::InstanceEnvironment{{kDLCUDA, 0}, &metrics, &cancelled});
      chain_pipeline.build(loom::parse_manifest_string(std::string("[loom]\ndevice = \"cuda\"\n") + kChain, "bench-chain"));
      auto chain = chain_pipeline.list(LOOM_KIND_SAMPLER);
      std::vector<std::vector<int32_t>> hist(B);
      std::vector<const int32_t *> hist_ptr(B);
      std::vector<int32_t> hist_len(B), tokens_out(B, -1);
      std::vector<int64_t> seq_ids(B);
      std::vector<uint64_t> keys(B, 1234), counters(B, 0);
      for (int s = 0; s < B; ++s) {
        hist[s].assign(step.tokens.begin() + s * len, step.tokens.begin() + (s + 1) * len);
        hist_ptr[s] = hist[s].data();
        hist_len[s] = len;
        seq_ids[s] = s;
      }
      int64_t shape[2] = {B, vocab}, tok_shape[1] = {B};
      DLTensor rows_view{work, {kDLCUDA, 0}, 2, DLDataType{kDLFloat, 32, 1}, shape, nullptr, 0};
      DLTensor tokens_view{tokens_dev, {kDLCUDA, 0}, 1, DLDataType{kDLInt, 32, 1}, tok_shape, nullptr, 0};
      auto stream = static_cast<cudaStream_t>(loom::cuda_compute_stream(0));
      cudaEvent_t start, stop;
      check(cudaEventCreate(&start), "cudaEventCreate");
      check(cudaEventCreate(&stop), "cudaEventCreate");
      // A long copy ahead of the rows keeps the GPU busy while the host queues the links, as the
      // decoder's next step does (decode ahead): the events then time the device alone.
      const size_t busy_bytes = size_t{256} << 20;
      void *busy_a = nullptr, *busy_b = nullptr;
      check(cudaMalloc(&busy_a, busy_bytes), "cudaMalloc");
      check(cudaMalloc(&busy_b, busy_bytes), "cudaMalloc");
      // Through core's SamplerChain, as the decoder runs it: candidate rows between the links that
      // read them, or dense rows throughout.
      auto time_chain = [&](bool candidates) {
        loom::SamplerChain runner(candidates);
        std::vector<double> runs;
        for (int r = 0; r < 3 + 5 * reps; ++r) {
          check(cudaMemcpyAsync(busy_b, busy_a, busy_bytes, cudaMemcpyDeviceToDevice, stream), "busy copy");
          check(cudaMemcpyAsync(work, saved, bytes, cudaMemcpyDeviceToDevice, stream), "restore rows");
          loom_sampling_batch b{};
          b.struct_size = sizeof(b);
          b.n_rows = B;
          b.vocab_size = static_cast<int32_t>(vocab);
          b.logits = &rows_view;
          b.seq_ids = seq_ids.data();
          b.history = hist_ptr.data();
          b.history_len = hist_len.data();
          b.rng_key = keys.data();
          counters.assign(B, static_cast<uint64_t>(r));
          b.rng_counter = counters.data();
          b.tokens_out = tokens_out.data();
          b.tokens_device = &tokens_view;
          check(cudaEventRecord(start, stream), "cudaEventRecord");
          runner.apply(chain, b, "selecting samplers must come last");
          check(cudaEventRecord(stop, stream), "cudaEventRecord");
          check(cudaEventSynchronize(stop), "cudaEventSynchronize");
          float ms = 0;
          check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
          if (r >= 3) runs.push_back(1000.0 * ms);
        }
        return median(runs);
      };
      const double dense_us = time_chain(false);
      chain_us = time_chain(true);
      cudaEventDestroy(start);
      cudaEventDestroy(stop);
      cudaFree(saved);
      cudaFree(work);
      cudaFree(tokens_dev);
      cudaFree(busy_a);
      cudaFree(busy_b);
      std::printf("sampling chain us (b32)     %12.1f\n", chain_us);
      std::printf("  same, dense rows only      %12.1f\n", dense_us);
      json << ",\"sampling_chain_us_b32\":" << chain_us << ",\"sampling_chain_dense_us_b32\":" << dense_us;
    }
    // Decode through the runtime, as `loom run` does it (sampler plugin, stop rules, tokens to
    // the host every step), queued ahead (the default) and step by step (LOOM_DECODE_AHEAD=0).
    // Its decode time covers `fresh` samplings and fresh - 1 forward passes (the first token
    // comes from the prefill's logits), so tokens/s counts B x (fresh - 1) tokens.
    auto decode_tps = [&](int B, bool ahead, const std::string &samplers) {
      std::string prompts;
      for (int s = 0; s < B; ++s) {
        prompts += s ? ", [" : "[";
        for (int t = 0; t < prompt; ++t) prompts += (t ? ", " : "") + std::to_string(token(rng));
        prompts += "]";
      }
      if (ahead) unsetenv("LOOM_DECODE_AHEAD");
      else setenv("LOOM_DECODE_AHEAD", "0", 1);
      auto rt = loom::Runtime::from_string("[loom]\ndevice = \"cuda\"\n[model]\npath = \"" + model_dir +
                                           "\"\n[attention]\nuse = \"" + attention +
                                           "\"\n" + quantizer + samplers + "[run]\nsteps = " + std::to_string(fresh) +
                                           "\nstop_tokens = []\nprompts = [" + prompts + "]\n",
                                           "bench");
      unsetenv("LOOM_DECODE_AHEAD");
      std::fprintf(stderr, "decode batch %d (%s): model loaded\n", B, ahead ? "ahead" : "step by step");
      std::vector<double> runs;
      for (int r = 0; r < reps + 1; ++r) {
        const loom::RunResult result = rt->run();
        for (const auto &seq : result.sequences)
          if (static_cast<int>(seq.tokens.size()) != fresh) throw std::runtime_error("a sequence stopped early");
        if (r > 0) runs.push_back(static_cast<double>(B) * (fresh - 1) / result.decode_seconds); // r = 0 warms up
      }
      return median(runs);
    };
    guard.unlock();  // (the backend's destructor takes the step lock itself)
    backend.reset(); // one model on the GPU at a time
    for (int B : batches) {
      const std::string greedy = "[[sampler]]\nuse = \"greedy\"\n";
      const double tps = decode_tps(B, true, greedy), step_by_step = decode_tps(B, false, greedy);
      std::printf("decode tok/s batch %-9d %12.1f\n", B, tps);
      std::printf("  step by step, batch %-6d %12.1f\n", B, step_by_step);
      json << ",\"decode_b" << B << "\":" << tps << ",\"decode_b" << B << "_step_by_step\":" << step_by_step;
      if (B == 32) {
        // The same decode with the sampling chain instead of greedy, and the chain's GPU time
        // as a share of the greedy decode step.
        const double chain_tps = decode_tps(B, true, kChain);
        const double step_us = 1e6 * B / tps;
        std::printf("  sampling chain, batch %-4d %12.1f\n", B, chain_tps);
        std::printf("  greedy decode step us      %12.1f\n", step_us);
        std::printf("  sampling chain %% of step   %12.2f\n", 100.0 * chain_us / step_us);
        json << ",\"decode_b32_chain\":" << chain_tps << ",\"decode_b32_step_us\":" << step_us
             << ",\"sampling_share_b32_pct\":" << 100.0 * chain_us / step_us;
      }
    }
    const double bw = copy_bandwidth_gbs();
    const double peak = gemm_tflops(8192, 8192, 8192);
    std::printf("%-28s %12.1f\n", "copy bandwidth GB/s", bw);
    std::printf("%-28s %12.1f\n", "cuBLAS bf16 TFLOP/s 8192^3", peak);
    json << ",\"copy_bandwidth_gbs\":" << bw << ",\"gemm_tflops\":" << peak << "}\n";
    if (!json_path.empty()) std::ofstream(json_path) << json.str();
  } catch (const std::exception &e) {
    std::cerr << "loom_model_bench: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
