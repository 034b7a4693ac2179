// Perplexity on held-out text through core's CPU backend, shared by the accuracy benches
// (kv_dtype_accuracy.cpp, quant_accuracy.cpp).
//
// The text is one verse a line; each verse is encoded with BOS (as in training) and verses are
// packed whole into windows of at most max_position_embeddings tokens. Each window is fed one
// token per forward (teacher-forced decode steps through the paged cache: every key and value
// the model attends to was read back from the cache), and the logits of step p score token
// p + 1. Perplexity = exp(mean negative log-likelihood), in double, over every scored token.
#pragma once

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_backend.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/tokenizer.hpp"

namespace bench {

struct HeldOut {
  std::vector<std::vector<int32_t>> windows;
  std::vector<std::string> first_verses; // the first verse of each window
  int64_t tokens = 0;
};

inline HeldOut load_held_out(const std::filesystem::path &text, const loom::Tokenizer &tokenizer,
                             const loom::ModelConfig &config) {
  std::ifstream in(text);
  if (!in) throw std::runtime_error("cannot read " + text.string());
  HeldOut h;
  h.windows.emplace_back();
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const auto ids = tokenizer.encode(line, true);
    h.tokens += static_cast<int64_t>(ids.size());
    if (static_cast<int64_t>(ids.size()) > config.max_positions) throw std::runtime_error("a verse longer than the model's context");
    if (static_cast<int64_t>(h.windows.back().size() + ids.size()) > config.max_positions) h.windows.emplace_back();
    if (h.windows.back().empty()) h.first_verses.push_back(line);
    h.windows.back().insert(h.windows.back().end(), ids.begin(), ids.end());
  }
  return h;
}

// Perplexity over every window; scored tokens in n. All windows decode together, one
// sequence each (slot w), so a step reads the weights once for every window; the CPU backend's
// results do not depend on the batch, so this equals scoring one window at a time.
inline double perplexity(loom::CpuBackend &backend, const HeldOut &text, int64_t vocab, int64_t &n) {
  size_t longest = 0;
  for (const auto &w : text.windows) longest = std::max(longest, w.size());
  backend.reserve(static_cast<int32_t>(text.windows.size()), static_cast<int64_t>(longest));
  double nll = 0;
  n = 0;
  for (size_t p = 0; p + 1 < longest; ++p) {
    loom::StepBatch b;
    std::vector<size_t> live;
    b.seq_offsets = {0};
    for (size_t w = 0; w < text.windows.size(); ++w) {
      if (p + 1 >= text.windows[w].size()) continue;
      live.push_back(w);
      b.tokens.push_back(text.windows[w][p]);
      b.seq_offsets.push_back(static_cast<int32_t>(b.tokens.size()));
      b.seq_positions.push_back(static_cast<int32_t>(p));
      b.seq_slots.push_back(static_cast<int32_t>(w));
    }
    const DLTensor *t = backend.forward(b);
    for (size_t s = 0; s < live.size(); ++s) {
      const float *row = static_cast<const float *>(t->data) + static_cast<int64_t>(s) * vocab;
      double mx = -INFINITY, sum = 0;
      for (int64_t v = 0; v < vocab; ++v) mx = std::max(mx, static_cast<double>(row[v]));
      for (int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - mx);
      nll += mx + std::log(sum) - static_cast<double>(row[text.windows[live[s]][p + 1]]);
      ++n;
    }
  }
  return std::exp(nll / static_cast<double>(n));
}

} // namespace bench
