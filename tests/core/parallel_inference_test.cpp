// Parallel inference on the CPU backend ([Parallel]), over 2 forked ranks (torchrun's variables,
// the TCP backend on loopback): tensor parallel (each rank holds half of the default model's
// heads, MLP width and vocabulary) and pipeline parallel (each rank two of its four layers).
// Every rank's backend returns the logits of the whole model within float32 rounding: a ragged
// prefill batch, then decode steps against the KV cache.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <sstream>

#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/runtime.hpp"
#include "loom/core/safetensors.hpp"
#include "model_backend.hpp"
#include "process_util.hpp"

namespace fs = std::filesystem;

namespace {

const fs::path kKjv = fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv";
const fs::path kGpt2 = fs::path(LOOM_SOURCE_DIR) / "tests/fixtures/models/tiny-gpt2";  // 2 layers, 4 heads, vocab 256

// The logits of three prompts prefilled together, then of four decode steps of each (token ids
// taken modulo the model's vocabulary).
std::vector<float> logits(loom::Runtime &rt, const fs::path &model = kKjv) {
  const loom::ModelConfig config = loom::load_model_config(model);
  loom::BackendOptions options;
  options.device = {kDLCPU, 0};
  options.dtype = loom::ComputeDtype::float32;
  options.threads = 1;
  options.source_name = "test";
  auto backend = loom::make_backend(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(model)),
                                    rt.pipeline(), options);
  std::vector<std::vector<int32_t>> prompts = {{5, 17, 300, 1999, 42}, {7, 8}, {1000, 1001, 1002}};
  const auto V = static_cast<int32_t>(config.vocab_size);
  for (auto &p : prompts)
    for (int32_t &id : p) id %= V;
  backend->reserve(3, 16);
  std::vector<float> out;
  loom::StepBatch b;
  b.seq_offsets = {0};
  for (size_t s = 0; s < prompts.size(); ++s) {
    b.tokens.insert(b.tokens.end(), prompts[s].begin(), prompts[s].end());
    b.seq_offsets.push_back(static_cast<int32_t>(b.tokens.size()));
    b.seq_positions.push_back(0);
    b.seq_slots.push_back(static_cast<int32_t>(s));
  }
  const auto take = [&](DLTensor *t) {
    const float *p = static_cast<const float *>(t->data);
    out.insert(out.end(), p, p + t->shape[0] * t->shape[1]);
  };
  take(backend->forward(b));
  for (int32_t step = 0; step < 4; ++step) {
    loom::StepBatch d;
    d.seq_offsets = {0, 1, 2, 3};
    for (size_t s = 0; s < prompts.size(); ++s) {
      d.tokens.push_back(static_cast<int32_t>(11 * step + 3 * s) % V);
      d.seq_positions.push_back(static_cast<int32_t>(prompts[s].size()) + step);
      d.seq_slots.push_back(static_cast<int32_t>(s));
    }
    take(backend->forward(d));
  }
  return out;
}

std::string manifest(const std::string &parallel, const fs::path &model = kKjv) {
  return "[loom]\ndevice = \"cpu\"\n[model]\npath = \"" + model.string() +
         "\"\n[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n" + parallel;
}

// What is wrong with a rank's logits: empty when within 1e-4 of the largest wanted.
std::string differences(int rank, const std::vector<float> &want, const std::vector<float> &got) {
  if (got.size() != want.size()) return "rank " + std::to_string(rank) + ": " + std::to_string(got.size()) + " logits";
  double worst = 0, scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::fabs(got[i] - want[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(want[i])));
  }
  if (worst <= 1e-4 * scale) return "";
  std::ostringstream o;
  o << "rank " << rank << ": logits differ by " << worst << " (largest " << scale << ")";
  return o.str();
}

}  // namespace

TEST_CASE("data, tensor and pipeline parallel inference over 2 and 4 processes give one rank's logits", "[parallel]") {
  loom_test::clear_rank_env();
  static const auto want = [] {
    auto rt = loom::Runtime::from_string(manifest(""));
    return logits(*rt);
  }();
  REQUIRE(want.size() == 3 * 2000 * 5);
  struct Case {
    const char *component;
    int world;
    const char *table, *describes;  // describes: what a split backend says (nothing for data)
  };
  const auto c = GENERATE(Case{"data", 2, "", ""}, Case{"tensor", 2, "", "tensor parallel rank"},
                          Case{"tensor", 4, "size = 2\n", "tensor parallel rank"}, Case{"pipeline", 2, "", "pipeline stage"},
                          Case{"pipeline", 4, "", "pipeline stage"}, Case{"pipeline", 4, "stages = 2\n", "pipeline stage"});
  INFO(c.component << " over " << c.world << " ranks " << c.table);
  const auto errors = loom_test::run_world(c.world, [&](int rank) -> std::string {
    auto rt = loom::Runtime::from_string(
        manifest("[parallel]\nuse = \"" + std::string(c.component) + "\"\ntimeout_s = 60.0\n" + c.table));
    if (rt->backend_description().find(c.describes) == std::string::npos)
      return "rank " + std::to_string(rank) + ": the backend is not split: " + rt->backend_description();
    const auto got = logits(*rt);
    return differences(rank, want, got);
  });
  for (size_t r = 0; r < errors.size(); ++r) {
    INFO("rank " << r);
    CHECK(errors[r].empty());
    if (!errors[r].empty()) WARN(errors[r]);
  }
}

TEST_CASE("tensor parallel GPT-2 (fused c_attn, c_proj biases, learned positions) gives one rank's logits", "[parallel]") {
  loom_test::clear_rank_env();
  const auto want = [] {
    auto rt = loom::Runtime::from_string(manifest("", kGpt2));
    return logits(*rt, kGpt2);
  }();
  REQUIRE(want.size() == 3 * 256 * 5);
  const auto errors = loom_test::run_world(2, [&](int rank) -> std::string {
    auto rt = loom::Runtime::from_string(manifest("[parallel]\nuse = \"tensor\"\ntimeout_s = 60.0\n", kGpt2));
    if (rt->backend_description().find("tensor parallel rank") == std::string::npos)
      return "rank " + std::to_string(rank) + ": the backend is not split: " + rt->backend_description();
    const auto got = logits(*rt, kGpt2);
    return differences(rank, want, got);
  });
  for (size_t r = 0; r < errors.size(); ++r) {
    INFO("rank " << r << ": " << errors[r]);
    CHECK(errors[r].empty());
  }
}
