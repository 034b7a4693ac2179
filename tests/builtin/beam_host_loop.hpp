// A host's beam-search loop written for tests: drives a beam sampler through its C vtable over
// a model given as a function (prefix -> logits of the next token), recomputing every row's
// logits from its whole prefix, with no KV cache and none of core's reordering. Used by the
// sampler's own suite and, over the reference model, as the check of core's beam loop.
#pragma once

#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#include <catch2/catch.hpp>

#include "builtin_test_util.hpp"
#include "loom/core/host_buffer.hpp"
#include "loom/core/instance.hpp"

namespace bt {

// logits of the next token after `prefix` (prompt and generated tokens)
using Model = std::function<std::vector<float>(const std::vector<int32_t> &prefix)>;

struct Hypothesis {
  std::vector<int32_t> tokens; // generated, an ending end token included
  double score = 0;
  int calls = 0;                // apply() calls until the group was done
};

inline const loom_sampler_beams *beams_of(loom::Instance &in) {
  auto *vt = in.vtable<loom_sampler_vtable>();
  REQUIRE(vt->life.get_extension != nullptr);
  auto *b = static_cast<const loom_sampler_beams *>(vt->life.get_extension(in.handle(), LOOM_SAMPLER_BEAMS_EXTENSION));
  REQUIRE(b != nullptr);
  return b;
}

// A host's beam loop: the groups of `prompts` (group id 10 + i) in one batch until each is done.
inline std::vector<Hypothesis> run_beams(loom::Instance &in, const Model &model, const std::vector<std::vector<int32_t>> &prompts,
                                  int32_t vocab, std::vector<int32_t> ends, int32_t max_new) {
  const auto *beams = beams_of(in);
  const int32_t W = beams->width(in.handle());
  std::vector<Hypothesis> out(prompts.size());
  std::vector<int64_t> group;             // per row
  std::vector<std::vector<int32_t>> hist; // per row
  for (size_t g = 0; g < prompts.size(); ++g)
    for (int32_t k = 0; k < W; ++k) {
      group.push_back(10 + static_cast<int64_t>(g));
      hist.push_back(prompts[g]);
    }
  int calls = 0;
  while (!group.empty()) {
    REQUIRE(calls <= max_new);
    ++calls;
    const size_t R = group.size();
    bt::Tensor<float> logits({static_cast<int64_t>(R), vocab});
    for (size_t r = 0; r < R; ++r) {
      auto row = model(hist[r]);
      std::copy(row.begin(), row.end(), logits.v.begin() + static_cast<std::ptrdiff_t>(r * static_cast<size_t>(vocab)));
    }
    std::vector<int64_t> seq(R);
    std::vector<const int32_t *> hp(R);
    std::vector<int32_t> hl(R), mx(R, max_new), tokens(R, -1), parents(R, -1), done(R, 0);
    for (size_t r = 0; r < R; ++r) {
      seq[r] = static_cast<int64_t>(r);
      hp[r] = hist[r].data();
      hl[r] = static_cast<int32_t>(hist[r].size());
    }
    loom_sampling_batch b{};
    b.struct_size = sizeof(b);
    b.n_rows = static_cast<int32_t>(R);
    b.vocab_size = vocab;
    b.logits = logits.dl();
    b.seq_ids = seq.data();
    b.history = hp.data();
    b.history_len = hl.data();
    b.tokens_out = tokens.data();
    b.group_ids = group.data();
    b.max_new_tokens = mx.data();
    b.end_tokens = ends.data();
    b.n_end_tokens = static_cast<int32_t>(ends.size());
    b.parents_out = parents.data();
    b.done_out = done.data();
    const loom_status st = in.vtable<loom_sampler_vtable>()->apply(in.handle(), &b);
    INFO(in.last_error());
    REQUIRE(st == LOOM_OK);
    std::vector<int64_t> next_group;
    std::vector<std::vector<int32_t>> next_hist;
    for (size_t r = 0; r < R; r += static_cast<size_t>(W)) {
      if (done[r]) {
        for (size_t k = r; k < r + static_cast<size_t>(W); ++k) CHECK((done[k] && tokens[k] == -1 && parents[k] == -1));
        loom::HostBuffer buf;
        float score = 0;
        REQUIRE(beams->finish(in.handle(), group[r], buf.abi(), &score) == LOOM_OK);
        Hypothesis &h = out[static_cast<size_t>(group[r] - 10)];
        h.tokens.resize(buf.view().size() / sizeof(int32_t));
        std::memcpy(h.tokens.data(), buf.view().data(), buf.view().size());
        h.score = score;
        h.calls = calls;
        // A finished group is forgotten.
        CHECK(beams->finish(in.handle(), group[r], buf.abi(), &score) == LOOM_ERR_NOT_FOUND);
        continue;
      }
      for (size_t k = r; k < r + static_cast<size_t>(W); ++k) {
        REQUIRE(done[k] == 0);
        REQUIRE(parents[k] >= static_cast<int32_t>(r));
        REQUIRE(parents[k] < static_cast<int32_t>(r) + W);
        REQUIRE(tokens[k] >= 0);
        REQUIRE(tokens[k] < vocab);
        next_group.push_back(group[k]);
        next_hist.push_back(hist[static_cast<size_t>(parents[k])]);
        next_hist.back().push_back(tokens[k]);
      }
    }
    group.swap(next_group);
    hist.swap(next_hist);
  }
  return out;
}

} // namespace bt
