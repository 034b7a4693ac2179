// The CPU training engine's first piece ([Training] items 1 and 5): every operation's backward
// against central finite differences in double, the whole Llama-family model's gradient (every
// parameter tensor sampled) against finite differences in double on the tiny fixture models
// (GQA, q/k/v biases, tied head, sliding window, GPT-2), the training forward against ReferenceModel,
// AdamW against a hand-computed update, clipping, a short training run that fits a sequence, and
// 200 steps against PyTorch's loss curve on the same weights, batches and hyperparameters.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <vector>

#include <nlohmann/json.hpp>

#include "../../core/grad_ops.hpp"
#include "../../core/decoder_trainer.hpp"
#include "train_curve_fixture.hpp"
#include "loom/core/error.hpp"
#include "loom/core/model_config.hpp"
#include "loom/core/model_weights.hpp"
#include "loom/core/reference_model.hpp"
#include "loom/core/manifest.hpp"
#include "loom/core/pipeline.hpp"
#include "loom/core/registry.hpp"
#include "loom/core/safetensors.hpp"
#include "loom/loom_plugin_api.h"

namespace fs = std::filesystem;

namespace {

const fs::path kModels = fs::path(LOOM_SOURCE_DIR) / "tests/fixtures/models";

// The pipeline a manifest's text builds, with the registry it was built from.
struct Built {
  loom::Manifest manifest;
  loom::Registry registry;
  loom::InstanceEnvironment env;
  loom::Pipeline pipeline;
  explicit Built(const std::string &text)
      : manifest(loom::parse_manifest_string(text, "built.toml")),
        registry(loom::Registry::default_search_paths(manifest.plugin_paths)), pipeline(registry, env) {
    registry.scan();
    pipeline.build(manifest);
  }
  std::shared_ptr<loom::Instance> attention() { return pipeline.list(LOOM_KIND_ATTENTION).front(); }
};

std::vector<double> random_values(size_t n, uint32_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (double &e : v) e = dist(rng);
  return v;
}

double dot(const std::vector<double> &a, const std::vector<double> &b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Checks d(sum(f(x) * w))/dx from `backward` (given dy = w) against central differences, for
// every entry of x. f writes y from x; backward adds dx given dy.
template <class F, class B>
void check_op(std::vector<double> x, size_t y_size, F f, B backward, uint32_t seed) {
  const auto w = random_values(y_size, seed);
  std::vector<double> y(y_size), dx(x.size(), 0.0);
  f(x, y);
  backward(x, w, dx);
  const double h = 1e-6;
  for (size_t i = 0; i < x.size(); ++i) {
    auto xp = x, xm = x;
    xp[i] += h;
    xm[i] -= h;
    std::vector<double> yp(y_size), ym(y_size);
    f(xp, yp);
    f(xm, ym);
    const double numeric = (dot(yp, w) - dot(ym, w)) / (2 * h);
    INFO("entry " << i);
    CHECK(dx[i] == Approx(numeric).margin(1e-7).epsilon(1e-6));
  }
}

}  // namespace

TEST_CASE("each operation's backward matches finite differences", "[train]") {
  using namespace loom::grad;
  namespace grad = loom::grad;
  using namespace loom::ops;  // the row operations' forward passes
  SECTION("linear: input, weight and bias") {
    const int64_t n = 3, out = 4, in = 5;
    const auto W = random_values(out * in, 1), b = random_values(out, 2);
    check_op(random_values(n * in, 3), n * out,
             [&](const std::vector<double> &x, std::vector<double> &y) { grad::linear(x.data(), n, W.data(), out, in, b.data(), y.data()); },
             [&](const std::vector<double> &x, const std::vector<double> &dy, std::vector<double> &dx) {
               linear_backward(dy.data(), x.data(), n, W.data(), out, in, dx.data(), static_cast<double *>(nullptr),
                               static_cast<double *>(nullptr));
             },
             4);
    const auto x = random_values(n * in, 5);
    check_op(W, n * out,
             [&](const std::vector<double> &w, std::vector<double> &y) { grad::linear(x.data(), n, w.data(), out, in, b.data(), y.data()); },
             [&](const std::vector<double> &w, const std::vector<double> &dy, std::vector<double> &dw) {
               linear_backward(dy.data(), x.data(), n, w.data(), out, in, static_cast<double *>(nullptr), dw.data(),
                               static_cast<double *>(nullptr));
             },
             6);
    check_op(b, n * out,
             [&](const std::vector<double> &bb, std::vector<double> &y) { grad::linear(x.data(), n, W.data(), out, in, bb.data(), y.data()); },
             [&](const std::vector<double> &, const std::vector<double> &dy, std::vector<double> &db) {
               linear_backward(dy.data(), x.data(), n, W.data(), out, in, static_cast<double *>(nullptr),
                               static_cast<double *>(nullptr), db.data());
             },
             7);
  }
  SECTION("RMSNorm: input and weight") {
    const int64_t H = 6;
    const auto w = random_values(H, 8, 0.5, 1.5), x0 = random_values(H, 9);
    check_op(x0, H, [&](const std::vector<double> &x, std::vector<double> &y) { rms_norm(x.data(), w.data(), H, 1e-5, y.data()); },
             [&](const std::vector<double> &x, const std::vector<double> &dy, std::vector<double> &dx) {
               std::vector<double> y(H), dw(H, 0.0);
               const double r = rms_norm(x.data(), w.data(), H, 1e-5, y.data());
               rms_norm_backward(dy.data(), x.data(), w.data(), r, H, dx.data(), dw.data());
             },
             10);
    check_op(w, H, [&](const std::vector<double> &ww, std::vector<double> &y) { rms_norm(x0.data(), ww.data(), H, 1e-5, y.data()); },
             [&](const std::vector<double> &ww, const std::vector<double> &dy, std::vector<double> &dw) {
               std::vector<double> y(H), dx(H, 0.0);
               const double r = rms_norm(x0.data(), ww.data(), H, 1e-5, y.data());
               rms_norm_backward(dy.data(), x0.data(), ww.data(), r, H, dx.data(), dw.data());
             },
             11);
  }
  SECTION("LayerNorm: input, weight and bias") {
    const int64_t H = 6;
    const auto w = random_values(H, 30, 0.5, 1.5), b = random_values(H, 31), x0 = random_values(H, 32);
    auto back = [&](const std::vector<double> &x, const std::vector<double> &ww, const std::vector<double> &dy,
                    std::vector<double> &dx, std::vector<double> &dw, std::vector<double> &db) {
      std::vector<double> y(H);
      double mean = 0;
      const double r = layer_norm(x.data(), ww.data(), b.data(), H, 1e-5, y.data(), &mean);
      layer_norm_backward(dy.data(), x.data(), ww.data(), mean, r, H, dx.data(), dw.data(), db.data());
    };
    double mean = 0;
    check_op(x0, H, [&](const std::vector<double> &x, std::vector<double> &y) { layer_norm(x.data(), w.data(), b.data(), H, 1e-5, y.data(), &mean); },
             [&](const std::vector<double> &x, const std::vector<double> &dy, std::vector<double> &dx) {
               std::vector<double> dw(H, 0.0), db(H, 0.0);
               back(x, w, dy, dx, dw, db);
             },
             33);
    check_op(w, H, [&](const std::vector<double> &ww, std::vector<double> &y) { layer_norm(x0.data(), ww.data(), b.data(), H, 1e-5, y.data(), &mean); },
             [&](const std::vector<double> &ww, const std::vector<double> &dy, std::vector<double> &dw) {
               std::vector<double> dx(H, 0.0), db(H, 0.0);
               back(x0, ww, dy, dx, dw, db);
             },
             34);
  }
  SECTION("GELU (tanh) and Conv1D") {
    check_op(random_values(9, 35, -4, 4), 9,
             [&](const std::vector<double> &x, std::vector<double> &y) {
               for (size_t i = 0; i < x.size(); ++i) y[i] = gelu_new(x[i]);
             },
             [&](const std::vector<double> &x, const std::vector<double> &dy, std::vector<double> &dx) {
               for (size_t i = 0; i < x.size(); ++i) dx[i] += dy[i] * gelu_new_grad(x[i]);
             },
             36);
    const int64_t n = 3, in = 4, out = 5;
    const auto W = random_values(in * out, 37), b = random_values(out, 38), x0 = random_values(n * in, 39);
    check_op(x0, n * out, [&](const std::vector<double> &x, std::vector<double> &y) { conv1d(x.data(), n, W.data(), in, out, b.data(), y.data()); },
             [&](const std::vector<double> &x, const std::vector<double> &dy, std::vector<double> &dx) {
               std::vector<double> dw(W.size(), 0.0), db(out, 0.0);
               conv1d_backward(dy.data(), x.data(), n, W.data(), in, out, dx.data(), dw.data(), db.data());
             },
             40);
    check_op(W, n * out, [&](const std::vector<double> &ww, std::vector<double> &y) { conv1d(x0.data(), n, ww.data(), in, out, b.data(), y.data()); },
             [&](const std::vector<double> &ww, const std::vector<double> &dy, std::vector<double> &dw) {
               std::vector<double> dx(x0.size(), 0.0), db(out, 0.0);
               conv1d_backward(dy.data(), x0.data(), n, ww.data(), in, out, dx.data(), dw.data(), db.data());
             },
             41);
    check_op(b, n * out, [&](const std::vector<double> &bb, std::vector<double> &y) { conv1d(x0.data(), n, W.data(), in, out, bb.data(), y.data()); },
             [&](const std::vector<double> &, const std::vector<double> &dy, std::vector<double> &db) {
               std::vector<double> dx(x0.size(), 0.0), dw(W.size(), 0.0);
               conv1d_backward(dy.data(), x0.data(), n, W.data(), in, out, dx.data(), dw.data(), db.data());
             },
             42);
  }
  SECTION("RoPE") {
    const int64_t heads = 2, D = 8;
    const std::vector<double> inv_freq = {1.0, 0.3, 0.1, 0.01};
    check_op(random_values(heads * D, 12), heads * D,
             [&](const std::vector<double> &x, std::vector<double> &y) {
               y = x;
               rope(y.data(), heads, D, 7, inv_freq, false);
             },
             [&](const std::vector<double> &, const std::vector<double> &dy, std::vector<double> &dx) {
               auto g = dy;
               rope(g.data(), heads, D, 7, inv_freq, true);
               for (size_t i = 0; i < g.size(); ++i) dx[i] += g[i];
             },
             13);
  }
  SECTION("SwiGLU: gate and up") {
    const int64_t n = 7;
    const auto u = random_values(n, 14, -3, 3), g0 = random_values(n, 15, -4, 4);
    check_op(g0, n, [&](const std::vector<double> &g, std::vector<double> &m) { swiglu(g.data(), u.data(), n, m.data()); },
             [&](const std::vector<double> &g, const std::vector<double> &dm, std::vector<double> &dg) {
               std::vector<double> du(n, 0.0);
               swiglu_backward(dm.data(), g.data(), u.data(), n, dg.data(), du.data());
             },
             16);
    check_op(u, n, [&](const std::vector<double> &uu, std::vector<double> &m) { swiglu(g0.data(), uu.data(), n, m.data()); },
             [&](const std::vector<double> &uu, const std::vector<double> &dm, std::vector<double> &du) {
               std::vector<double> dg(n, 0.0);
               swiglu_backward(dm.data(), g0.data(), uu.data(), n, dg.data(), du.data());
             },
             17);
  }
  SECTION("causal attention with GQA and a sliding window: q, k and v") {
    const int64_t L = 5, Hq = 4, Hkv = 2, D = 3;
    for (const int64_t window : {int64_t{0}, int64_t{3}}) {
      INFO("window " << window);
      const auto q0 = random_values(L * Hq * D, 18), k0 = random_values(L * Hkv * D, 19), v0 = random_values(L * Hkv * D, 20);
      std::vector<double> p(static_cast<size_t>(Hq * L * L));
      auto grads = [&](const std::vector<double> &q, const std::vector<double> &k, const std::vector<double> &v,
                       const std::vector<double> &dy, std::vector<double> &dq, std::vector<double> &dk, std::vector<double> &dv) {
        std::vector<double> out(q.size());
        attention(q.data(), k.data(), v.data(), L, Hq, Hkv, D, window, out.data(), p.data());
        attention_backward(dy.data(), q.data(), k.data(), v.data(), p.data(), L, Hq, Hkv, D, dq.data(), dk.data(), dv.data());
      };
      const size_t n_out = static_cast<size_t>(L * Hq * D);
      check_op(q0, n_out,
               [&](const std::vector<double> &q, std::vector<double> &y) {
                 attention(q.data(), k0.data(), v0.data(), L, Hq, Hkv, D, window, y.data(), p.data());
               },
               [&](const std::vector<double> &q, const std::vector<double> &dy, std::vector<double> &dq) {
                 std::vector<double> dk(k0.size(), 0.0), dv(v0.size(), 0.0);
                 grads(q, k0, v0, dy, dq, dk, dv);
               },
               21);
      check_op(k0, n_out,
               [&](const std::vector<double> &k, std::vector<double> &y) {
                 attention(q0.data(), k.data(), v0.data(), L, Hq, Hkv, D, window, y.data(), p.data());
               },
               [&](const std::vector<double> &k, const std::vector<double> &dy, std::vector<double> &dk) {
                 std::vector<double> dq(q0.size(), 0.0), dv(v0.size(), 0.0);
                 grads(q0, k, v0, dy, dq, dk, dv);
               },
               22);
      check_op(v0, n_out,
               [&](const std::vector<double> &v, std::vector<double> &y) {
                 attention(q0.data(), k0.data(), v.data(), L, Hq, Hkv, D, window, y.data(), p.data());
               },
               [&](const std::vector<double> &v, const std::vector<double> &dy, std::vector<double> &dv) {
                 std::vector<double> dq(q0.size(), 0.0), dk(k0.size(), 0.0);
                 grads(q0, k0, v, dy, dq, dk, dv);
               },
               23);
    }
  }
  SECTION("cross-entropy") {
    const int64_t n = 3, V = 5;
    const std::vector<int32_t> targets = {2, -1, 4};
    const auto logits = random_values(n * V, 24, -3, 3);
    std::vector<double> d(logits.size());
    int64_t count = 0;
    const double total = cross_entropy(logits.data(), targets.data(), n, V, d.data(), 1.0, &count);
    CHECK(count == 2);
    double expect = 0;
    for (int64_t r : {0, 2}) {
      double s = 0;
      for (int64_t c = 0; c < V; ++c) s += std::exp(logits[static_cast<size_t>(r * V + c)]);
      expect += std::log(s) - logits[static_cast<size_t>(r * V + targets[static_cast<size_t>(r)])];
    }
    CHECK(total == Approx(expect).epsilon(1e-12));
    const double h = 1e-6;
    for (size_t i = 0; i < logits.size(); ++i) {
      auto lp = logits, lm = logits;
      lp[i] += h;
      lm[i] -= h;
      const double numeric = (cross_entropy(lp.data(), targets.data(), n, V, static_cast<double *>(nullptr), 1.0, &count) -
                              cross_entropy(lm.data(), targets.data(), n, V, static_cast<double *>(nullptr), 1.0, &count)) /
                             (2 * h) / 2.0;  // the gradient is of the mean over the 2 scored rows
      CHECK(d[i] == Approx(numeric).margin(1e-8));
    }
  }
}

TEST_CASE("the trainer's gradients match finite differences in double", "[train]") {
  // Every parameter tensor, a few entries each: embeddings (tied head included), norms, q/k/v
  // with Qwen2's biases, o, gate, up, down, the head; GPT-2's LayerNorms, Conv1Ds and positions.
  for (const char *name : {"tiny-llama", "tiny-qwen2", "tiny-llama3-tied", "tiny-mistral", "tiny-gpt2"}) {
    INFO(name);
    const fs::path dir = kModels / name;
    const loom::ModelConfig config = loom::load_model_config(dir);
    loom::DecoderTrainer<double> trainer(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)));
    const std::vector<int32_t> tokens = {1, 17, 4, 33, 8, 21, 5, 99, 3};
    trainer.zero_grad();
    const double loss = trainer.loss(tokens, true);
    CHECK(std::isfinite(loss));
    std::mt19937 rng(7);
    int checked = 0;
    for (auto &p : trainer.params()) {
      // Embedding rows of tokens that occur (others have no gradient), elsewhere any entry.
      std::vector<size_t> entries;
      if (p.name == "model.embed_tokens.weight" || p.name == "wte.weight") {
        const size_t H = static_cast<size_t>(config.hidden_size);
        for (int32_t t : {17, 5, 3}) entries.push_back(static_cast<size_t>(t) * H + rng() % H);
        if (config.tie_word_embeddings || p.name == "wte.weight")
          entries.push_back(static_cast<size_t>(200) * H + rng() % H);  // the head's row only
      } else if (p.name == "wpe.weight") {  // positions of the sequence
        const size_t H = static_cast<size_t>(config.hidden_size);
        for (size_t t : {0, 4, 8}) entries.push_back(t * H + rng() % H);
      } else {
        for (int i = 0; i < 3; ++i) entries.push_back(rng() % p.value.size());
      }
      for (const size_t e : entries) {
        const double saved = p.value[e], h = 1e-5;
        p.value[e] = saved + h;
        const double up = trainer.loss(tokens, false);
        p.value[e] = saved - h;
        const double down = trainer.loss(tokens, false);
        p.value[e] = saved;
        const double numeric = (up - down) / (2 * h);
        INFO(p.name << "[" << e << "]");
        CHECK(p.grad[e] == Approx(numeric).margin(1e-8).epsilon(1e-5));
        ++checked;
      }
    }
    CHECK(checked > 30);
  }
}

TEST_CASE("the trainer's forward pass is ReferenceModel's", "[train]") {
  for (const char *name : {"tiny-llama", "tiny-qwen2", "tiny-llama3-tied", "tiny-mistral", "tiny-gpt2"}) {
    INFO(name);
    const fs::path dir = kModels / name;
    const loom::ModelConfig config = loom::load_model_config(dir);
    loom::DecoderTrainer<float> trainer(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)));
    const std::vector<int32_t> tokens = {1, 17, 4, 33, 8, 21, 5};
    const auto ours = trainer.logits(tokens);
    const auto ref = loom::ReferenceModel::load(dir).forward(tokens);
    REQUIRE(ours.size() == ref.size());
    for (size_t i = 0; i < ref.size(); ++i) CHECK(ours[i] == Approx(ref[i]).margin(1e-5));
  }
}

TEST_CASE("AdamW follows torch's update, clipping bounds the norm, and training fits a sequence", "[train]") {
  // One parameter, two steps by hand: m = (1-b1) g, v = (1-b2) g^2, bias-corrected, decay first.
  std::vector<loom::TrainParam<double>> params(1);
  params[0].shape = {1, 1};
  params[0].value = {1.0};
  params[0].grad = {0.5};
  loom::AdamWOptions o;
  o.weight_decay = 0.1;
  loom::AdamW<double> adam(o);
  adam.step(params, 0.01);
  // m^ = 0.5, v^ = 0.25: the update is lr * 0.5 / (0.5 + eps), after the decay 1 * (1 - 0.001).
  CHECK(params[0].value[0] == Approx(1.0 * (1 - 0.01 * 0.1) - 0.01 * 0.5 / (0.5 + 1e-8)).epsilon(1e-12));
  params[0].grad = {-1.0};
  const double w1 = params[0].value[0];
  adam.step(params, 0.01);
  const double m = 0.9 * 0.05 + 0.1 * -1.0, v = 0.999 * 0.00025 + 0.001 * 1.0;
  const double expect = w1 * (1 - 0.001) - 0.01 * (m / (1 - 0.81)) / (std::sqrt(v / (1 - 0.999 * 0.999)) + 1e-8);
  CHECK(params[0].value[0] == Approx(expect).epsilon(1e-12));

  params[0].grad = {3.0};
  std::vector<loom::TrainParam<double>> two = params;
  two[0].grad = {4.0};
  params.push_back(two[0]);  // grads 3 and 4: norm 5
  CHECK(loom::clip_grad_norm(params, 1.0) == Approx(5.0));
  CHECK(params[0].grad[0] == Approx(0.6).epsilon(1e-5));
  CHECK(params[1].grad[0] == Approx(0.8).epsilon(1e-5));
  CHECK(loom::clip_grad_norm(params, 10.0) == Approx(1.0).epsilon(1e-5));  // under the bound: unchanged
  CHECK(params[0].grad[0] == Approx(0.6).epsilon(1e-5));

  // 40 AdamW steps on one 24-token sequence of the tiny model take its loss well down.
  const fs::path dir = kModels / "tiny-llama";
  const loom::ModelConfig config = loom::load_model_config(dir);
  loom::DecoderTrainer<float> trainer(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)));
  std::vector<int32_t> tokens;
  for (int i = 0; i < 24; ++i) tokens.push_back((i * 37 + 11) % 256);
  loom::AdamW<float> opt(loom::AdamWOptions{});
  const double first = trainer.loss(tokens, false);
  double last = first;
  for (int step = 0; step < 40; ++step) {
    trainer.zero_grad();
    last = trainer.loss(tokens, true);
    loom::clip_grad_norm(trainer.params(), 1.0);
    opt.step(trainer.params(), 1e-2);
  }
  last = trainer.loss(tokens, false);
  INFO("loss " << first << " -> " << last);
  CHECK(last < 0.2 * first);
}

TEST_CASE("a 200-step training run follows PyTorch's loss curve within 2%", "[train]") {
  // tests/fixtures/models/train_curve.json: transformers' LlamaForCausalLM trained on the GPU
  // machine by tests/fixtures/make_train_curve.py from the same weights, on the same batches,
  // with the same AdamW, schedule and clipping; each step's loss before its update.
  const TrainCurve curve = load_train_curve(LOOM_SOURCE_DIR);
  REQUIRE(!curve.model_dir.empty());
  const loom::ModelConfig config = loom::load_model_config(curve.model_dir);
  loom::DecoderTrainer<float> trainer(config, loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(curve.model_dir)));
  loom::AdamW<float> opt(curve.adamw);
  REQUIRE(static_cast<int64_t>(curve.losses.size()) == curve.steps);
  double worst = 0;
  for (int64_t s = 0; s < curve.steps; ++s) {
    trainer.zero_grad();
    double loss = 0;
    const double per = 1.0 / static_cast<double>(curve.batch);
    for (const auto &ids : curve.batch_of(s)) loss += trainer.loss(ids, true, per) * per;
    loom::clip_grad_norm(trainer.params(), curve.clip);
    opt.step(trainer.params(), curve.rate(s));
    const double theirs = curve.losses[static_cast<size_t>(s)];
    worst = std::max(worst, std::fabs(loss - theirs) / theirs);
    INFO("step " << s + 1 << ": Loom " << loss << ", PyTorch " << theirs);
    CHECK(std::fabs(loss - theirs) <= 0.02 * theirs);
  }
  WARN("worst relative difference from PyTorch's curve over " << curve.steps << " steps: " << worst << "; loss "
                                                              << curve.losses.front() << " -> " << curve.losses.back());
}

TEST_CASE("activation recomputation and threads give the same gradients bit for bit", "[train]") {
  for (const char *name : {"tiny-llama", "tiny-gpt2", "tiny-qwen2"}) {
    INFO(name);
    const fs::path dir = kModels / name;
    const loom::ModelConfig config = loom::load_model_config(dir);
    auto weights = [&] { return loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)); };
    loom::DecoderTrainer<float> kept(config, weights()), recomputed(config, weights()), threaded(config, weights());
    recomputed.set_recompute(true);
    threaded.set_threads(3);
    const std::vector<int32_t> tokens = {1, 17, 4, 33, 8, 21, 5, 99, 3, 42, 7};
    const double loss = kept.loss(tokens, true, 0.5);
    CHECK(loss == recomputed.loss(tokens, true, 0.5));
    CHECK(loss == threaded.loss(tokens, true, 0.5));
    for (size_t i = 0; i < kept.params().size(); ++i) {
      INFO(kept.params()[i].name);
      CHECK(kept.params()[i].grad == recomputed.params()[i].grad);
      CHECK(kept.params()[i].grad == threaded.params()[i].grad);
    }
  }
}

TEST_CASE("training through the sdpa component's forward and backward gives the core's gradients", "[train]") {
  // train.attention = "plugin": each layer's attention and its gradients by the [attention]
  // component (sdpa: its forward over a scratch cache, its backward recomputing the
  // probabilities). The same model as the core's attention within float32 rounding, on the
  // fixtures with GQA, a sliding window (tiny-mistral), q/k/v biases and GPT-2's layer.
  for (const char *name : {"tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2"}) {
    INFO(name);
    const fs::path dir = kModels / name;
    REQUIRE(fs::exists(dir));
    const loom::ModelConfig config = loom::load_model_config(dir);
    Built built("[model]\npath = \"" + dir.string() + "\"\n[attention]\nuse = \"sdpa\"\nblock_size = 4\n");
    auto weights = [&] { return loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)); };
    loom::DecoderTrainer<float> core(config, weights()), plugin(config, weights()), recomputed(config, weights());
    plugin.attach_attention(built.attention());
    recomputed.attach_attention(built.attention());
    recomputed.set_recompute(true);
    // 11 tokens: past the sliding window of tiny-mistral and over three cache blocks of 4.
    const std::vector<int32_t> tokens = {1, 17, 4, 33, 8, 21, 5, 99, 3, 42, 7};
    const double loss = core.loss(tokens, true, 1.0);
    CHECK(plugin.loss(tokens, true, 1.0) == Approx(loss).epsilon(1e-5));
    CHECK(recomputed.loss(tokens, true, 1.0) == Approx(loss).epsilon(1e-5));
    size_t differing = 0;  // gradient values not bit-identical to the core's
    for (size_t i = 0; i < core.params().size(); ++i) {
      INFO(core.params()[i].name);
      const auto &want = core.params()[i].grad, &got = plugin.params()[i].grad, &again = recomputed.params()[i].grad;
      double largest = 0, worst = 0;
      for (size_t j = 0; j < want.size(); ++j) {
        largest = std::max(largest, static_cast<double>(std::fabs(want[j])));
        worst = std::max(worst, static_cast<double>(std::fabs(got[j] - want[j])));
      }
      CHECK(worst <= 1e-4 * std::max(largest, 1e-3));
      CHECK(again == got);  // the component's forward is recomputed exactly
      for (size_t j = 0; j < want.size(); ++j) differing += got[j] != want[j];
    }
    // The component ran: sdpa's forward sums as the core does (the losses agree to the bit), but
    // its backward takes each row's sum from d_out . out where the core sums P . dP, so some
    // gradients differ in their last bits; had the trainer fallen back to the core, none would.
    CHECK(differing > 0);
  }
}

TEST_CASE("train.attention = plugin refuses what it cannot train, by name", "[train]") {
  const fs::path dir = kModels / "tiny-llama";
  const loom::ModelConfig config = loom::load_model_config(dir);
  auto weights = [&] { return loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)); };
  const std::string model = "[model]\npath = \"" + dir.string() + "\"\n";
  loom::DecoderTrainer<float> trainer(config, weights());
  // A quantized cache rounds k and v in the forward; the gradient would not see it.
  Built int8(model + "[attention]\nuse = \"sdpa\"\nkv_dtype = \"int8\"\n");
  CHECK_THROWS_WITH(trainer.attach_attention(int8.attention()), Catch::Contains("its KV cache does not store float32 (kv_dtype)"));
  // A window of its own: the model would train on attention it does not run with.
  Built windowed(model + "[attention]\nuse = \"sdpa\"\nsliding_window = 4\n");
  CHECK_THROWS_WITH(trainer.attach_attention(windowed.attention()), Catch::Contains("its sliding window (4) is not the model's (0)"));
  loom::DecoderTrainer<double> in_double(config, weights());
  Built sdpa(model + "[attention]\nuse = \"sdpa\"\n");
  CHECK_THROWS_WITH(in_double.attach_attention(sdpa.attention()), Catch::Contains("float32 only"));
  // A prefix adapter, either order: its virtual tokens are not in the component's cache.
  Built prefix(model + "[attention]\nuse = \"sdpa\"\n[[adapter]]\nuse = \"prefix\"\nnum_virtual_tokens = 3\n");
  loom::DecoderTrainer<float> attention_first(config, weights()), prefix_first(config, weights());
  attention_first.attach_attention(prefix.attention());
  CHECK_THROWS_WITH(attention_first.attach_adapters(prefix.pipeline.list(LOOM_KIND_ADAPTER)),
                    Catch::Contains("a prefix adapter with training through an attention component is not supported yet"));
  prefix_first.attach_adapters(prefix.pipeline.list(LOOM_KIND_ADAPTER));
  CHECK_THROWS_WITH(prefix_first.attach_attention(prefix.attention()),
                    Catch::Contains("with a prefix adapter is not supported yet"));
}

TEST_CASE("two pipeline stages chained give the whole model's loss and gradients", "[train][parallel]") {
  for (const char *name : {"tiny-llama", "tiny-llama3-tied", "tiny-gpt2"}) {
    INFO(name);
    const fs::path dir = kModels / name;
    const loom::ModelConfig config = loom::load_model_config(dir);
    auto weights = [&] { return loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)); };
    REQUIRE(config.n_layers == 2);
    loom::DecoderTrainer<float> whole(config, weights()), first(config, weights(), {0, 1, true, false}),
        last(config, weights(), {1, 2, false, true});
    const std::vector<std::vector<int32_t>> batch = {{1, 17, 4, 33, 8, 21, 5, 99, 3, 42, 7}, {2, 9, 14, 6, 30}};
    double want = 0, got = 0;
    for (const auto &tokens : batch) want += whole.loss(tokens, true, 0.5);
    // Both micro-batches forward, then both backward (the order a pipeline may take).
    for (size_t i = 0; i < batch.size(); ++i) {
      const auto x = first.stage_forward(static_cast<int64_t>(i), batch[i], nullptr, true, 0.5, nullptr);
      REQUIRE(x.size() == batch[i].size() * static_cast<size_t>(config.hidden_size));
      double loss = 0;
      CHECK(last.stage_forward(static_cast<int64_t>(i), batch[i], &x, true, 0.5, &loss).empty());
      got += loss;
    }
    for (size_t i = batch.size(); i-- > 0;) {
      const auto d = last.stage_backward(static_cast<int64_t>(i), nullptr);
      CHECK(first.stage_backward(static_cast<int64_t>(i), &d).empty());
    }
    CHECK(got == Approx(want).epsilon(1e-12));
    // Every parameter is on one stage, except a tied embedding, which both hold: its gradient is
    // the sum of theirs.
    for (const auto &p : whole.params()) {
      INFO(p.name);
      std::vector<float> sum(p.grad.size(), 0.0f);
      int holders = 0;
      for (auto *stage : {&first, &last})
        for (const auto &q : stage->params())
          if (q.name == p.name) {
            ++holders;
            for (size_t k = 0; k < sum.size(); ++k) sum[k] += q.grad[k];
          }
      const bool tied = p.name == "wte.weight" || (config.tie_word_embeddings && p.name == "model.embed_tokens.weight");
      CHECK(holders == (tied ? 2 : 1));
      double worst = 0, scale = 1e-30;
      for (size_t k = 0; k < sum.size(); ++k) {
        worst = std::max(worst, static_cast<double>(std::fabs(sum[k] - p.grad[k])));
        scale = std::max(scale, static_cast<double>(std::fabs(p.grad[k])));
      }
      CHECK(worst <= 1e-6 * scale);
    }
  }
}

TEST_CASE("a LoRA adapter's gradients through the trainer are the merged weight's, projected", "[train][peft]") {
  // y = x (W + s B A)^T: with W' = W + s B A, dB = s dW' A^T and dA = s B^T dW'. The adapter's
  // gradients through the frozen trainer must equal those computed from the merged model's dW'.
  const fs::path dir = kModels / "tiny-llama";
  const loom::ModelConfig config = loom::load_model_config(dir);
  const loom::Manifest m = loom::parse_manifest_string(
      "[model]\npath = \"" + dir.string() +
          "\"\n[[adapter]]\nuse = \"lora\"\nr = 2\nalpha = 4\nseed = 3\ntarget_modules = [\"q_proj\", \"down_proj\"]\n",
      "lora.toml");
  loom::Registry registry(loom::Registry::default_search_paths(m.plugin_paths));
  registry.scan();
  loom::InstanceEnvironment env;
  loom::Pipeline pipeline(registry, env);
  pipeline.build(m);
  const auto adapters = pipeline.list(LOOM_KIND_ADAPTER);
  REQUIRE(adapters.size() == 1);
  auto weights = [&] { return loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)); };
  loom::DecoderTrainer<float> frozen(config, weights());
  frozen.attach_adapters(adapters);
  frozen.set_frozen_base(true);
  struct Param {
    std::string name;
    float *value, *grad;
    int64_t rows, cols;
  };
  std::vector<Param> params;
  loom_tensor_sink sink{sizeof(loom_tensor_sink), &params,
                        [](void *user, const char *name, DLTensor *t, DLTensor *g) -> loom_status {
                          static_cast<std::vector<Param> *>(user)->push_back(
                              {name, static_cast<float *>(t->data), static_cast<float *>(g->data), t->shape[0], t->shape[1]});
                          return LOOM_OK;
                        }};
  adapters[0]->check(adapters[0]->vtable<loom_adapter_vtable>()->parameters(adapters[0]->handle(), &sink), "parameters");
  REQUIRE(params.size() == 8);  // A and B of q_proj and down_proj in two layers
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> dist(-0.2f, 0.2f);
  for (auto &p : params)  // B starts at 0 (no gradient for A then): give both random values
    for (int64_t i = 0; i < p.rows * p.cols; ++i) p.value[i] = dist(rng);
  const std::vector<int32_t> tokens = {1, 17, 4, 33, 8, 21, 5, 99, 3, 42, 7};
  const double loss = frozen.loss(tokens, true, 1.0);
  // The merged model, trained in full.
  std::map<std::string, loom::HostWeight, std::less<>> merged_map;
  const auto base = weights();
  for (const auto &[name, shape] : loom::expected_weights(config)) merged_map.emplace(name, base.at(name));
  const float s = 4.0f / 2.0f;
  for (size_t k = 0; k < params.size(); k += 2) {  // lora_A then lora_B of one module
    const Param &A = params[k], &B = params[k + 1];
    REQUIRE(A.name.find("lora_A") != std::string::npos);
    const std::string module = A.name.substr(std::string("base_model.model.").size(),
                                             A.name.size() - std::string("base_model.model.").size() - std::string(".lora_A.weight").size());
    auto &W = merged_map.at(module + ".weight").values;
    const int64_t out = B.rows, in = A.cols, r = A.rows;
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) {
        float acc = 0;
        for (int64_t j = 0; j < r; ++j) acc += B.value[o * r + j] * A.value[j * in + i];
        W[static_cast<size_t>(o * in + i)] += s * acc;
      }
  }
  loom::DecoderTrainer<float> merged(config, loom::ModelWeights::from_map(std::move(merged_map)));
  CHECK(merged.loss(tokens, true, 1.0) == Approx(loss).epsilon(1e-5));
  for (size_t k = 0; k < params.size(); k += 2) {
    const Param &A = params[k], &B = params[k + 1];
    const std::string module = A.name.substr(std::string("base_model.model.").size(),
                                             A.name.size() - std::string("base_model.model.").size() - std::string(".lora_A.weight").size());
    const auto &dW = merged.param(module + ".weight").grad;
    const int64_t out = B.rows, in = A.cols, r = A.rows;
    double worst = 0, largest = 0;
    for (int64_t o = 0; o < out; ++o)
      for (int64_t j = 0; j < r; ++j) {  // dB[o][j] = s sum_i dW[o][i] A[j][i]
        double e = 0;
        for (int64_t i = 0; i < in; ++i) e += static_cast<double>(dW[static_cast<size_t>(o * in + i)]) * A.value[j * in + i];
        worst = std::max(worst, std::fabs(s * e - B.grad[o * r + j]));
        largest = std::max(largest, std::fabs(s * e));
      }
    for (int64_t j = 0; j < r; ++j)
      for (int64_t i = 0; i < in; ++i) {  // dA[j][i] = s sum_o B[o][j] dW[o][i]
        double e = 0;
        for (int64_t o = 0; o < out; ++o) e += static_cast<double>(B.value[o * r + j]) * dW[static_cast<size_t>(o * in + i)];
        worst = std::max(worst, std::fabs(s * e - A.grad[j * in + i]));
        largest = std::max(largest, std::fabs(s * e));
      }
    INFO(module << ": worst " << worst << " of " << largest);
    CHECK(worst <= 1e-4 * largest);
  }
}

TEST_CASE("over a quantized base, the adapter's gradients are those over the dequantized weights", "[train][peft]") {
  // QLoRA-style training: the frozen base's linears compute through the int8 quantizer, their
  // float copies released. The loss and the adapter's gradients must equal a trainer whose base
  // weights are the quantizer's dequantized weights, with the same adapter values.
  const fs::path dir = kModels / "tiny-llama";
  const loom::ModelConfig config = loom::load_model_config(dir);
  const std::string text = "[model]\npath = \"" + dir.string() +
                           "\"\n[quantizer]\nuse = \"int8\"\n[[adapter]]\nuse = \"lora\"\nr = 2\nalpha = 4\nseed = 3\n"
                           "target_modules = [\"q_proj\", \"v_proj\", \"up_proj\", \"down_proj\"]\n";
  const loom::Manifest m = loom::parse_manifest_string(text, "qlora.toml");
  loom::Registry registry(loom::Registry::default_search_paths(m.plugin_paths));
  registry.scan();
  loom::Pipeline quantized_side(registry, loom::InstanceEnvironment{}), float_side(registry, loom::InstanceEnvironment{});
  quantized_side.build(m);
  float_side.build(m);
  auto weights = [&] { return loom::ModelWeights::load(config, loom::SafetensorsIndex::open_model_dir(dir)); };
  // The float side's base: every layer linear quantized and dequantized by the same quantizer.
  std::map<std::string, loom::HostWeight, std::less<>> dequantized_map;
  const auto base = weights();
  for (const auto &[name, shape] : loom::expected_weights(config)) dequantized_map.emplace(name, base.at(name));
  loom::Instance &q = float_side.at("quantizer");
  auto qvt = q.vtable<loom_quantizer_vtable>();
  int64_t replaced = 0;
  for (auto &[name, w] : dequantized_map) {
    if (name.find("layers.") == std::string::npos || name.find("_proj.weight") == std::string::npos) continue;
    int64_t shape[2] = {w.shape[0], w.shape[1]};
    DLTensor t{};
    t.data = w.values.data();
    t.device = {kDLCPU, 0};
    t.ndim = 2;
    t.dtype = {kDLFloat, 32, 1};
    t.shape = shape;
    loom_quantize_request r{};
    r.struct_size = sizeof(r);
    r.module_name = name.c_str();
    r.weight = &t;
    r.target_device = {kDLCPU, 0};
    loom_qweight *qw = nullptr;
    q.check(qvt->quantize(q.handle(), &r, &qw), "quantize");
    q.check(qvt->dequantize(q.handle(), qw, &t), "dequantize");  // in place
    qvt->free_weight(q.handle(), qw);
    ++replaced;
  }
  CHECK(replaced == 2 * 7);
  loom::DecoderTrainer<float> quantized(config, weights()), dequantized(config, loom::ModelWeights::from_map(std::move(dequantized_map)));
  for (auto *t : {&quantized, &dequantized}) t->set_frozen_base(true);
  quantized.attach_adapters(quantized_side.list(LOOM_KIND_ADAPTER));
  dequantized.attach_adapters(float_side.list(LOOM_KIND_ADAPTER));
  quantized.quantize_base(quantized_side.get("quantizer"));
  CHECK(quantized.param("model.layers.0.self_attn.q_proj.weight").value.empty());  // released
  CHECK(!quantized.param("model.layers.0.input_layernorm.weight").value.empty());
  struct Param {
    float *value, *grad;
    size_t n;
  };
  auto params_of = [](loom::Pipeline &p) {
    std::vector<Param> out;
    loom_tensor_sink sink{sizeof(loom_tensor_sink), &out, [](void *user, const char *, DLTensor *t, DLTensor *g) -> loom_status {
                            static_cast<std::vector<Param> *>(user)->push_back(
                                {static_cast<float *>(t->data), static_cast<float *>(g->data),
                                 static_cast<size_t>(t->shape[0] * t->shape[1])});
                            return LOOM_OK;
                          }};
    auto a = p.list(LOOM_KIND_ADAPTER).front();
    a->check(a->vtable<loom_adapter_vtable>()->parameters(a->handle(), &sink), "parameters");
    return out;
  };
  const auto pq = params_of(quantized_side), pd = params_of(float_side);
  REQUIRE(pq.size() == 16);
  REQUIRE(pd.size() == pq.size());
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> dist(-0.2f, 0.2f);
  for (size_t k = 0; k < pq.size(); ++k)
    for (size_t i = 0; i < pq[k].n; ++i) pq[k].value[i] = pd[k].value[i] = dist(rng);
  const std::vector<int32_t> tokens = {1, 17, 4, 33, 8, 21, 5, 99, 3, 42, 7};
  const double lq = quantized.loss(tokens, true, 1.0), ld = dequantized.loss(tokens, true, 1.0);
  CHECK(lq == Approx(ld).epsilon(1e-5));
  for (size_t k = 0; k < pq.size(); ++k) {
    double worst = 0, largest = 0;
    for (size_t i = 0; i < pq[k].n; ++i) {
      worst = std::max(worst, static_cast<double>(std::fabs(pq[k].grad[i] - pd[k].grad[i])));
      largest = std::max(largest, static_cast<double>(std::fabs(pd[k].grad[i])));
    }
    INFO("adapter parameter " << k << ": worst " << worst << " of " << largest);
    CHECK(largest > 0);
    CHECK(worst <= 1e-4 * largest);
  }
  // The trainer refuses a quantized base that would train (not frozen).
  loom::DecoderTrainer<float> full(config, weights());
  CHECK_THROWS_WITH(full.quantize_base(quantized_side.get("quantizer")), Catch::Contains("a quantized base is frozen"));
}
