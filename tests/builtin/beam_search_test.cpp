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

#include "beam_host_loop.hpp"

namespace {

using bt::Hypothesis;
using bt::Model;
using bt::beams_of;
using bt::run_beams;

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

TEST_CASE("beam-search scores +inf logits as softmax's limit", "[samplers][beams][inf]") {
  // Two +inf logits: each has log p = log(1/2), the finite one -inf (log p was NaN everywhere).
  const Model model = [](const std::vector<int32_t> &) { return std::vector<float>{INFINITY, 0.0f, INFINITY}; };
  auto rt = bt::runtime(manifest(2, "1.0", "false"));
  auto h = run_beams(rt->pipeline().at("sampler[0]"), model, {{1}}, 3, {}, 3);
  CHECK(h[0].tokens == std::vector<int32_t>{0, 0, 0});
  CHECK(h[0].score == Approx(std::log(0.5)));
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
  std::vector<const int32_t *> hp{h1.data(), h0.data()};
  std::vector<int32_t> hl{2, 1};
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
  // The refused call left no state behind: the same group from a one-token prompt is new.
  hp = {h0.data(), h0.data()};
  hl = {1, 1};
  b.history = hp.data();
  CHECK(vt->apply(in.handle(), &b) == LOOM_OK);
  CHECK(done == std::vector<int32_t>{0, 0});
  CHECK(parents == std::vector<int32_t>{0, 0});                // both continue beam 0 at first
  CHECK(tokens == std::vector<int32_t>{2, 1});                 // the two most likely tokens
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
