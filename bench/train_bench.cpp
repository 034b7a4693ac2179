// [Training] item 7, Loom's side of bench/train_gpt2_vs_torch.py: training steps of a model
// (config.json only; random initial weights) on random tokens through the CUDA training engine,
// timed with the host clock around whole steps (forward, backward, clipping, AdamW, the loss
// back on the host). Prints one JSON line: the median step time and tokens/s.
//
// usage: loom_train_bench MODEL_DIR [--batch 16] [--seq 1024] [--steps 10] [--warmup 3]
//                                   [--precision bf16|float32] [--recompute]
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "loom/core/error.hpp"
#include "loom/core/model_config.hpp"
#include "training_engine.hpp"
#include "weight_init.hpp"

int main(int argc, char **argv) {
  if (argc < 2) {
    std::cerr << "usage: loom_train_bench MODEL_DIR [--batch N] [--seq N] [--steps N] [--warmup N] "
                 "[--precision bf16|float32] [--recompute]\n";
    return 2;
  }
  int64_t batch = 16, seq = 1024, steps = 10, warmup = 3;
  std::string precision = "bf16";
  bool recompute = false;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--batch") batch = std::stoll(next());
    else if (a == "--seq") seq = std::stoll(next());
    else if (a == "--steps") steps = std::stoll(next());
    else if (a == "--warmup") warmup = std::stoll(next());
    else if (a == "--precision") precision = next();
    else if (a == "--recompute") recompute = true;
    else {
      std::cerr << "loom_train_bench: unknown argument " << a << "\n";
      return 2;
    }
  }
  try {
    const loom::ModelConfig config = loom::load_model_config(argv[1]);
    loom::TrainEngineOptions o;
    o.adamw.lr = 6e-4;
    o.adamw.beta1 = 0.9;
    o.adamw.beta2 = 0.95;
    o.adamw.weight_decay = 0.1;
    o.bf16 = precision == "bf16";
    o.recompute = recompute;
    auto engine = loom::make_cuda_training_engine(config, loom::random_initial_weights(config, 0, 0.02), o);
    std::mt19937 rng(0);
    std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(config.vocab_size) - 1);
    std::vector<std::vector<int32_t>> tokens(static_cast<size_t>(batch), std::vector<int32_t>(static_cast<size_t>(seq)));
    std::vector<double> times;
    double loss = 0;
    for (int64_t s = 0; s < warmup + steps; ++s) {
      for (auto &row : tokens)
        for (auto &t : row) t = token(rng);
      const auto start = std::chrono::steady_clock::now();
      engine->zero_grad();
      loss = engine->run(tokens, true, 1.0 / static_cast<double>(batch)) / static_cast<double>(batch);
      engine->clip_grad_norm(1.0);
      engine->optimizer_step(6e-4);
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (s >= warmup) times.push_back(t);
    }
    std::sort(times.begin(), times.end());
    const double median = times[times.size() / 2];
    nlohmann::json out = {{"engine", engine->describe()},
                          {"batch", batch},
                          {"seq", seq},
                          {"steps", steps},
                          {"step_s_median", median},
                          {"tokens_per_s", static_cast<double>(batch * seq) / median},
                          {"last_loss", loss}};
    std::cout << out.dump() << std::endl;
  } catch (const std::exception &e) {
    std::cerr << "loom_train_bench: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
