// tests/fixtures/models/train_curve.json (made by tests/fixtures/make_train_curve.py: transformers'
// LlamaForCausalLM trained on the GPU machine) read for the trainers' tests: the model, the
// batches (byte windows of a fixture text), the schedule and AdamW's settings, and PyTorch's loss
// at each step, so that the CPU and CUDA tests replay exactly the same run.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../../core/decoder_trainer.hpp"

struct TrainCurve {
  std::filesystem::path model_dir;
  std::string text;
  int64_t steps = 0, batch = 0, seq = 0, stride = 0, warmup = 0;
  double lr = 0, min_lr = 0, clip = 0;
  loom::AdamWOptions adamw;
  std::vector<double> losses;  // PyTorch's, each step's before its update

  // The learning rate of step s + 1: linear warmup, then cosine to min_lr.
  double rate(int64_t s) const {
    const int64_t step = s + 1;
    if (step <= warmup) return lr * static_cast<double>(step) / static_cast<double>(warmup);
    return min_lr + 0.5 * (lr - min_lr) *
                        (1 + std::cos(M_PI * static_cast<double>(step - warmup) / static_cast<double>(steps - warmup)));
  }
  // Step s's sequences: windows of seq bytes of the text, as token ids.
  std::vector<std::vector<int32_t>> batch_of(int64_t s) const {
    std::vector<std::vector<int32_t>> out;
    for (int64_t i = 0; i < batch; ++i) {
      const size_t start = static_cast<size_t>(((s * batch + i) * stride) % (static_cast<int64_t>(text.size()) - seq));
      std::vector<int32_t> ids;
      for (int64_t t = 0; t < seq; ++t) ids.push_back(static_cast<unsigned char>(text[start + static_cast<size_t>(t)]));
      out.push_back(std::move(ids));
    }
    return out;
  }
};

// Reads the fixture under the source tree `root`; an empty `model_dir` means it is missing.
inline TrainCurve load_train_curve(const std::filesystem::path &root) {
  TrainCurve c;
  std::ifstream in(root / "tests/fixtures/models/train_curve.json");
  if (!in) return c;
  const auto golden = nlohmann::json::parse(in);
  c.model_dir = root / "tests/fixtures/models" / golden["model"].get<std::string>();
  std::ifstream text_in(root / "tests/fixtures/text" / golden["text"].get<std::string>(), std::ios::binary);
  c.text.assign(std::istreambuf_iterator<char>(text_in), std::istreambuf_iterator<char>());
  c.steps = golden["steps"];
  c.batch = golden["batch"];
  c.seq = golden["seq"];
  c.stride = golden["stride"];
  c.warmup = golden["warmup"];
  c.lr = golden["lr"];
  c.min_lr = golden["min_lr"];
  c.clip = golden["clip"];
  c.adamw.beta1 = golden["beta1"];
  c.adamw.beta2 = golden["beta2"];
  c.adamw.eps = golden["eps"];
  c.adamw.weight_decay = golden["weight_decay"];
  for (const auto &l : golden["losses"]) c.losses.push_back(l.get<double>());
  return c;
}
