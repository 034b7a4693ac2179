// The beam-search sampler through its C vtable, driven by a host loop written here over
// synthetic models (logits a fixed function of the prefix, a vocabulary of a few tokens, one
// end token): its best hypothesis against an exhaustive search over every sequence where beam
// search is exact, against hand-computed results where early stopping decides, and its checks.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "builtin_test_util.hpp"
#include "loom/core/host_buffer.hpp"

namespace {

// logits of the next token after `prefix` (prompt and generated tokens)
using Model = std::function<std::vector<float>(const std::vector<int32_t> &prefix)>;

struct Hypothesis {
  std::vector<int32_t> tokens; // generated, an ending end token included
  double score = 0;
  int calls = 0;                // apply() calls until the group was done
};

const loom_sampler_beams *beams_of(loom::Instance &in) {
  auto *vt = in.vtable<loom_sampler_vtable>();
  REQUIRE(vt->life.get_extension != nullptr);
  auto *b = static_cast<const loom_sampler_beams *>(vt->life.get_extension(in.handle(), LOOM_SAMPLER_BEAMS_EXTENSION));
  REQUIRE(b != nullptr);
  return b;
}

// A host's beam loop: the groups of `prompts` (group id 10 + i) in one batch until each is done.
std::vector<Hypothesis> run_beams(loom::Instance &in, const Model &model, const std::vector<std::vector<int32_t>> &prompts,
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

std::vector<double> log_softmax(const std::vector<float> &x) {
  double m = -INFINITY, s = 0;
  for (float v : x) m = std::max(m, static_cast<double>(v));
  for (float v : x) s += std::exp(v - m);
  std::vector<double> out;
  for (float v : x) out.push_back(v - m - std::log(s));
  return out;
}

// The best of every sequence a run can produce: ended by `end` at length L <= max_new, or cut
// at max_new; score = sum of log-probabilities / length^lp.
Hypothesis exhaustive(const Model &model, const std::vector<int32_t> &prompt, int32_t vocab, int32_t end, int32_t max_new,
                      double lp) {
  Hypothesis best;
  best.score = -INFINITY;
  std::function<void(std::vector<int32_t> &, double)> walk = [&](std::vector<int32_t> &gen, double sum) {
    std::vector<int32_t> prefix = prompt;
    prefix.insert(prefix.end(), gen.begin(), gen.end());
    auto logp = log_softmax(model(prefix));
    for (int32_t v = 0; v < vocab; ++v) {
      gen.push_back(v);
      const double s = sum + logp[static_cast<size_t>(v)];
      if (v == end || static_cast<int32_t>(gen.size()) == max_new) {
        const double score = s / std::pow(static_cast<double>(gen.size()), lp);
        if (score > best.score) best = Hypothesis{gen, score, 0};
      } else {
        walk(gen, s);
      }
      gen.pop_back();
    }
  };
  std::vector<int32_t> gen;
  walk(gen, 0.0);
  return best;
}

// Logits in [-3, 3], a pure function of the prefix (splitmix64 over its tokens).
Model hashed_model(uint64_t seed, int32_t vocab) {
  return [seed, vocab](const std::vector<int32_t> &prefix) {
    uint64_t h = seed;
    for (int32_t t : prefix) h = (h ^ static_cast<uint64_t>(t + 1)) * 0x9E3779B97F4A7C15ull;
    std::vector<float> x(static_cast<size_t>(vocab));
    for (auto &v : x) {
      h += 0x9E3779B97F4A7C15ull;
      uint64_t z = h;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      v = static_cast<float>(static_cast<double>(z >> 11) / 9007199254740992.0 * 6.0 - 3.0);
    }
    return x;
  };
}

std::string manifest(int width, const std::string &lp, const std::string &early) {
  return "[[sampler]]\nuse = \"beam-search\"\nwidth = " + std::to_string(width) + "\nlength_penalty = " + lp +
         "\nearly_stopping = \"" + early + "\"\n";
}

} // namespace

TEST_CASE("beam-search finds the exhaustive search's best sequence where beam search is exact", "[samplers][beams]") {
  // Vocabulary 5, token 4 ends. With max_new tokens there are at most 4^(max_new-1) * 5
  // candidates at a step, so a width of that many never prunes, and "never" (any length
  // penalty) or "false" (length_penalty <= 0) stop only when no running beam can improve.
  const int32_t V = 5, E = 4;
  for (int32_t max_new : {2, 3}) {
    const int width = max_new == 2 ? 20 : 80;
    for (uint64_t seed : {1u, 2u, 3u, 4u, 5u, 6u}) {
      const Model model = hashed_model(seed, V);
      for (const char *lp : {"-1.0", "0.0", "0.5", "1.0", "2.0"})
        for (const char *early : {"never", "false"}) {
          if (std::string(early) == "false" && std::stod(lp) > 0) continue; // HF's heuristic: inexact
          INFO("max_new " << max_new << ", seed " << seed << ", length_penalty " << lp << ", early_stopping " << early);
          auto rt = bt::runtime(manifest(width, lp, early));
          auto got = run_beams(rt->pipeline().at("sampler[0]"), model, {{1, 2}}, V, {E}, max_new);
          auto want = exhaustive(model, {1, 2}, V, E, max_new, std::stod(lp));
          CHECK(got[0].tokens == want.tokens);
          CHECK(got[0].score == Approx(want.score).epsilon(1e-5));
        }
    }
  }
}

TEST_CASE("beam-search groups in one batch give what each gives alone", "[samplers][beams]") {
  const int32_t V = 5, E = 4;
  const Model model = hashed_model(42, V);
  const std::vector<std::vector<int32_t>> prompts = {{1}, {2, 3, 1}, {0, 0}};
  for (const char *early : {"true", "false", "never"}) {
    INFO(early);
    auto rt = bt::runtime(manifest(3, "1.0", early));
    auto &in = rt->pipeline().at("sampler[0]");
    auto together = run_beams(in, model, prompts, V, {E}, 6);
    for (size_t i = 0; i < prompts.size(); ++i) {
      auto alone = run_beams(in, model, {prompts[i]}, V, {E}, 6);
      CHECK(together[i].tokens == alone[0].tokens);
      CHECK(together[i].score == alone[0].score);
      CHECK(together[i].calls == alone[0].calls);
    }
  }
}

TEST_CASE("beam-search stops as early_stopping says", "[samplers][beams]") {
  // Every prefix continues with A (p 0.45), B (p 0.05) or the end token E (p 0.5).
  const int32_t V = 3, A = 0, E = 2;
  const Model model = [](const std::vector<int32_t> &) {
    return std::vector<float>{std::log(0.45f), std::log(0.05f), std::log(0.5f)};
  };
  const double a = std::log(0.45), e = std::log(0.5);
  // Width 1, length_penalty 2, 4 tokens at most. Step 1 ends [E] (score e) and runs [A].
  // "false" bounds [A]'s future by its score at its current length, a / 1^2 < e: done after one step.
  auto rt = bt::runtime(manifest(1, "2.0", "false"));
  auto h = run_beams(rt->pipeline().at("sampler[0]"), model, {{1}}, V, {E}, 4);
  CHECK(h[0].tokens == std::vector<int32_t>{E});
  CHECK(h[0].score == Approx(e));
  CHECK(h[0].calls == 1);
  // "never" bounds it at the longest length, a / 4^2 > e, and goes on: [A, E] (score
  // (a + e) / 4), [A, A, E] ((2a + e) / 9), then [A, A, A, E] ((3a + e) / 16) at the last step.
  rt = bt::runtime(manifest(1, "2.0", "never"));
  h = run_beams(rt->pipeline().at("sampler[0]"), model, {{1}}, V, {E}, 4);
  CHECK(h[0].tokens == std::vector<int32_t>{A, A, A, E});
  CHECK(h[0].score == Approx((3 * a + e) / 16));
  CHECK(h[0].calls == 4);
  // Width 2, "true": done as soon as 2 hypotheses ended: [E] at step 1, [A, E] at step 2.
  rt = bt::runtime(manifest(2, "2.0", "true"));
  h = run_beams(rt->pipeline().at("sampler[0]"), model, {{1}}, V, {E}, 4);
  CHECK(h[0].tokens == std::vector<int32_t>{A, E});
  CHECK(h[0].score == Approx((a + e) / 4));
  CHECK(h[0].calls == 2);
  // A negative length penalty favours short hypotheses: [E] at once, under any early stopping.
  for (const char *early : {"true", "false", "never"}) {
    rt = bt::runtime(manifest(2, "-1.0", early));
    h = run_beams(rt->pipeline().at("sampler[0]"), model, {{1}}, V, {E}, 4);
    CHECK(h[0].tokens == std::vector<int32_t>{E});
    CHECK(h[0].score == Approx(e));
  }
  // No end token: every hypothesis runs to max_new, and width 1 is greedy.
  rt = bt::runtime(manifest(1, "1.0", "false"));
  h = run_beams(rt->pipeline().at("sampler[0]"), model, {{1}}, V, {}, 3);
  CHECK(h[0].tokens == std::vector<int32_t>{E, E, E});
  CHECK(h[0].calls == 3);
}

TEST_CASE("beam-search checks its parameters and the host's batch", "[samplers][beams]") {
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"beam-search\"\nwidth = 0\n"),
             Catch::Contains("beam-search: width must be >= 1") && Catch::Contains("got 0") &&
                 Catch::Contains("sampler[0].width"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"beam-search\"\nearly_stopping = \"maybe\"\n"),
             Catch::Contains("sampler[0].early_stopping") && Catch::Contains("'maybe'"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"beam-search\"\nearly_stopping = true\n"),
             Catch::Contains("sampler[0].early_stopping") && Catch::Contains("expected a string"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"beam-search\"\nlength_penalty = nan\n"),
             Catch::Contains("sampler[0].length_penalty") && Catch::Contains("finite"));
  CHECK_THAT(bt::build_error("[[sampler]]\nuse = \"beam-search\"\nbeams = 2\n"), Catch::Contains("beams"));
  CHECK(bt::build_error("[[sampler]]\nuse = \"beam-search\"\n").empty()); // width 4, 1.0, "false"

  auto rt = bt::runtime(manifest(2, "1.0", "false"));
  auto &in = rt->pipeline().at("sampler[0]");
  auto *vt = in.vtable<loom_sampler_vtable>();
  CHECK((vt->flags & (LOOM_SAMPLER_SELECTS | LOOM_SAMPLER_BEAMS | LOOM_SAMPLER_USES_HISTORY)) ==
        (LOOM_SAMPLER_SELECTS | LOOM_SAMPLER_BEAMS | LOOM_SAMPLER_USES_HISTORY));
  CHECK(beams_of(in)->width(in.handle()) == 2);
  CHECK(vt->life.get_extension(in.handle(), "loom.sampler.beams/2") == nullptr);

  // A batch without groups (a chain where beam-search is not last, or an old host).
  bt::Tensor<float> logits({2, 3}, {0, 1, 2, 0, 1, 2});
  std::vector<int32_t> h0{1}, h1{1, 2}, tokens(2, -1), parents(2, -1), done(2, 0), mx(2, 4);
  std::vector<const int32_t *> hp{h0.data(), h1.data()};
  std::vector<int32_t> hl{1, 2};
  std::vector<int64_t> seq{0, 1}, group{7, 7};
  loom_sampling_batch b{};
  b.struct_size = sizeof(b);
  b.n_rows = 2;
  b.vocab_size = 3;
  b.logits = logits.dl();
  b.seq_ids = seq.data();
  b.history = hp.data();
  b.history_len = hl.data();
  b.tokens_out = tokens.data();
  CHECK(vt->apply(in.handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(in.last_error(), Catch::Contains("must be the last sampler"));
  b.struct_size = offsetof(loom_sampling_batch, group_ids);
  CHECK(vt->apply(in.handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(in.last_error(), Catch::Contains("ABI < 1.2"));
  // A new group whose rows differ in length.
  b.struct_size = sizeof(b);
  b.group_ids = group.data();
  b.max_new_tokens = mx.data();
  b.parents_out = parents.data();
  b.done_out = done.data();
  CHECK(vt->apply(in.handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(in.last_error(), Catch::Contains("group 7") && Catch::Contains("history tokens"));
  // Rows that are not whole groups.
  b.n_rows = 1;
  bt::Tensor<float> one({1, 3}, {0, 1, 2});
  b.logits = one.dl();
  CHECK(vt->apply(in.handle(), &b) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(in.last_error(), Catch::Contains("groups of width 2"));
  // Unknown groups have no result.
  loom::HostBuffer buf;
  float score = 0;
  CHECK(beams_of(in)->finish(in.handle(), 99, buf.abi(), &score) == LOOM_ERR_NOT_FOUND);
}
