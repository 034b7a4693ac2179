// libloom-adapter-lora: targeting, PEFT init and names, forward against the formula, backward
// against finite differences, dropout consistency, load errors and merge/unmerge.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <map>

#include "builtin_test_util.hpp"

namespace {

constexpr int64_t IN = 5, OUT = 3, R = 2, N = 3;
const std::string kModule = "model.layers.0.self_attn.q_proj";
const std::string kA = "base_model.model." + kModule + ".lora_A.weight";
const std::string kB = "base_model.model." + kModule + ".lora_B.weight";

struct Param {
  std::vector<int64_t> shape;
  std::vector<float> value, grad;
};
loom_status collect(void *user, const char *name, DLTensor *t, DLTensor *g) {
  auto &m = *static_cast<std::map<std::string, Param> *>(user);
  size_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= static_cast<size_t>(t->shape[i]);
  const float *tv = static_cast<const float *>(t->data);
  Param p{std::vector<int64_t>(t->shape, t->shape + t->ndim), std::vector<float>(tv, tv + n), {}};
  if (g != nullptr) p.grad.assign(static_cast<const float *>(g->data), static_cast<const float *>(g->data) + n);
  m[name] = std::move(p);
  return LOOM_OK;
}

struct Fixture {
  std::unique_ptr<loom::Runtime> rt;
  loom::Instance *ad;
  const loom_adapter_vtable *vt;
  loom_adapter_site *site = nullptr;

  explicit Fixture(const std::string &extra = "")
      : rt(bt::runtime("[[adapter]]\nuse = \"lora\"\nr = 2\nalpha = 4.0\nseed = 3\n"
                       "target_modules = [\"q_proj\", \"model.layers.0.mlp.up_proj\"]\n" + extra)) {
    ad = &rt->pipeline().at("adapter[0]");
    vt = ad->vtable<loom_adapter_vtable>();
    loom_adapter_module m{sizeof(loom_adapter_module), kModule.c_str(), IN, OUT, {kDLFloat, 32, 1}, {kDLCPU, 0}, LOOM_ADAPTER_SITE_LINEAR};
    REQUIRE(vt->attach(ad->handle(), &m, &site) == LOOM_OK);
  }
  std::map<std::string, Param> params() {
    std::map<std::string, Param> p;
    loom_tensor_sink sink{sizeof(sink), &p, &collect};
    REQUIRE(vt->parameters(ad->handle(), &sink) == LOOM_OK);
    return p;
  }
  loom_status load(std::vector<float> a, std::vector<float> b) {
    bt::Tensor<float> ta({R, IN}, std::move(a)), tb({OUT, R}, std::move(b));
    loom_named_tensor ts[2] = {{sizeof(loom_named_tensor), kA.c_str(), ta.dl()},
                               {sizeof(loom_named_tensor), kB.c_str(), tb.dl()}};
    return vt->load(ad->handle(), ts, 2);
  }
  std::vector<float> forward(const std::vector<float> &x, std::vector<float> y, const int32_t *mask = nullptr,
                             int32_t training = 0) {
    bt::Tensor<float> tx({N, IN}, x), ty({N, OUT}, std::move(y));
    bt::Tensor<int32_t> tm({N}, mask ? std::vector<int32_t>(mask, mask + N) : std::vector<int32_t>(N, 1));
    loom_adapter_io io{sizeof(io), tx.dl(), ty.dl(), mask ? tm.dl() : nullptr, training};
    REQUIRE(vt->forward(ad->handle(), site, &io) == LOOM_OK);
    return ty.v;
  }
};

// y0 + scale * x A^T B^T, computed densely here.
std::vector<float> expected(const std::vector<float> &x, const std::vector<float> &y0, const std::vector<float> &A,
                            const std::vector<float> &B, float scale) {
  std::vector<float> y = y0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OUT; ++o) {
      double acc = 0;
      for (int64_t k = 0; k < R; ++k)
        for (int64_t i = 0; i < IN; ++i) acc += x[n * IN + i] * A[k * IN + i] * B[o * R + k];
      y[n * OUT + o] += static_cast<float>(scale * acc);
    }
  return y;
}

double dot(const std::vector<float> &a, const std::vector<float> &b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

} // namespace

TEST_CASE("lora targets modules by last component or full name", "[lora]") {
  Fixture f;
  auto t = [&](const char *n) { return f.vt->targets(f.ad->handle(), n); };
  CHECK(t("model.layers.3.self_attn.q_proj") != 0);
  CHECK(t("q_proj") != 0);
  CHECK(t("model.layers.0.mlp.up_proj") != 0);
  CHECK(t("model.layers.1.mlp.up_proj") == 0);
  CHECK(t("model.layers.0.self_attn.k_proj") == 0);
  CHECK(t("model.layers.0.self_attn.q_proj_extra") == 0);
}

TEST_CASE("lora starts as an exact no-op with PEFT names and init", "[lora]") {
  Fixture f;
  auto p = f.params();
  REQUIRE(p.size() == 2);
  REQUIRE(p.count(kA) == 1);
  REQUIRE(p.count(kB) == 1);
  CHECK(p[kA].shape == std::vector<int64_t>{R, IN});
  CHECK(p[kB].shape == std::vector<int64_t>{OUT, R});
  const float bound = 1.0f / std::sqrt(static_cast<float>(IN));
  bool any_nonzero = false;
  for (float a : p[kA].value) {
    CHECK(std::fabs(a) <= bound);
    any_nonzero = any_nonzero || a != 0.0f;
  }
  CHECK(any_nonzero);
  for (float b : p[kB].value) CHECK(b == 0.0f);
  CHECK(p[kA].grad.size() == p[kA].value.size());

  const auto x = bt::random_floats(N * IN, 1), y0 = bt::random_floats(N * OUT, 2);
  CHECK(f.forward(x, y0) == y0);

  Fixture same; // same seed and module name: the same initialisation
  CHECK(same.params()[kA].value == p[kA].value);
}

TEST_CASE("lora forward adds scale * x A^T B^T on masked rows", "[lora]") {
  Fixture f;
  const auto A = bt::random_floats(R * IN, 3), B = bt::random_floats(OUT * R, 4);
  REQUIRE(f.load(A, B) == LOOM_OK);
  const auto x = bt::random_floats(N * IN, 5), y0 = bt::random_floats(N * OUT, 6);
  const auto want = expected(x, y0, A, B, 4.0f / 2.0f);
  const auto got = f.forward(x, y0);
  for (size_t i = 0; i < got.size(); ++i) CHECK(got[i] == Approx(want[i]).margin(1e-5));

  const int32_t mask[N] = {1, 0, 1};
  const auto masked = f.forward(x, y0, mask);
  for (int64_t o = 0; o < OUT; ++o) {
    CHECK(masked[OUT + o] == y0[OUT + o]);
    CHECK(masked[o] == Approx(want[o]).margin(1e-5));
  }

  Fixture rs("use_rslora = true\n");
  REQUIRE(rs.load(A, B) == LOOM_OK);
  const auto want_rs = expected(x, y0, A, B, 4.0f / std::sqrt(2.0f));
  const auto got_rs = rs.forward(x, y0);
  for (size_t i = 0; i < got_rs.size(); ++i) CHECK(got_rs[i] == Approx(want_rs[i]).margin(1e-5));
}

TEST_CASE("lora backward matches finite differences", "[lora]") {
  Fixture f;
  auto A = bt::random_floats(R * IN, 7), B = bt::random_floats(OUT * R, 8);
  REQUIRE(f.load(A, B) == LOOM_OK);
  const auto x = bt::random_floats(N * IN, 9), G = bt::random_floats(N * OUT, 10);
  const std::vector<float> zeros(N * OUT, 0.0f);

  bt::Tensor<float> tx({N, IN}, x), dy({N, OUT}, G), dx({N, IN});
  loom_adapter_grad_io io{sizeof(io), tx.dl(), dy.dl(), dx.dl(), nullptr};
  REQUIRE(f.vt->backward(f.ad->handle(), f.site, &io) == LOOM_OK);
  auto p = f.params();

  // L = sum(G * delta(A, B, x)); central differences (the loss is linear in each argument).
  const float eps = 1e-2f;
  auto loss = [&](const std::vector<float> &a, const std::vector<float> &b, const std::vector<float> &xx) {
    REQUIRE(f.load(a, b) == LOOM_OK);
    return dot(G, f.forward(xx, zeros));
  };
  for (size_t i = 0; i < A.size(); ++i) {
    auto ap = A, am = A;
    ap[i] += eps;
    am[i] -= eps;
    CHECK(p[kA].grad[i] == Approx((loss(ap, B, x) - loss(am, B, x)) / (2 * eps)).margin(2e-3));
  }
  for (size_t i = 0; i < B.size(); ++i) {
    auto bp = B, bm = B;
    bp[i] += eps;
    bm[i] -= eps;
    CHECK(p[kB].grad[i] == Approx((loss(A, bp, x) - loss(A, bm, x)) / (2 * eps)).margin(2e-3));
  }
  for (size_t i = 0; i < x.size(); ++i) {
    auto xp = x, xm = x;
    xp[i] += eps;
    xm[i] -= eps;
    CHECK(dx.v[i] == Approx((loss(A, B, xp) - loss(A, B, xm)) / (2 * eps)).margin(2e-3));
  }

  // Gradients accumulate: a second backward doubles them.
  REQUIRE(f.load(A, B) == LOOM_OK);
  REQUIRE(f.vt->backward(f.ad->handle(), f.site, &io) == LOOM_OK);
  auto p2 = f.params();
  for (size_t i = 0; i < A.size(); ++i) CHECK(p2[kA].grad[i] == Approx(2 * p[kA].grad[i]).margin(1e-5));
}

TEST_CASE("lora dropout is used consistently by forward and backward", "[lora]") {
  Fixture f("dropout = 0.5\n");
  const auto A = bt::random_floats(R * IN, 11), B = bt::random_floats(OUT * R, 12);
  REQUIRE(f.load(A, B) == LOOM_OK);
  const auto x = bt::random_floats(N * IN, 13), G = bt::random_floats(N * OUT, 14);
  const std::vector<float> zeros(N * OUT, 0.0f);
  // Inference ignores dropout.
  const auto eval = f.forward(x, zeros);
  const auto want = expected(x, zeros, A, B, 2.0f);
  for (size_t i = 0; i < eval.size(); ++i) CHECK(eval[i] == Approx(want[i]).margin(1e-5));
  // Training drops inputs; the loss is linear in A and in B, so sum(dA * A) = sum(dB * B) = L.
  const auto train = f.forward(x, zeros, nullptr, 1);
  CHECK(train != eval);
  bt::Tensor<float> tx({N, IN}, x), dy({N, OUT}, G), dx({N, IN});
  loom_adapter_grad_io io{sizeof(io), tx.dl(), dy.dl(), dx.dl(), nullptr};
  REQUIRE(f.vt->backward(f.ad->handle(), f.site, &io) == LOOM_OK);
  auto p = f.params();
  const double L = dot(G, train);
  CHECK(dot(p[kA].grad, A) == Approx(L).margin(1e-4));
  CHECK(dot(p[kB].grad, B) == Approx(L).margin(1e-4));
}

TEST_CASE("lora merge folds the delta into the base weight and back", "[lora]") {
  Fixture f;
  const auto A = bt::random_floats(R * IN, 15), B = bt::random_floats(OUT * R, 16);
  REQUIRE(f.load(A, B) == LOOM_OK);
  bt::Tensor<float> w({OUT, IN}, bt::random_floats(OUT * IN, 17));
  const auto w0 = w.v;
  REQUIRE(f.vt->merge(f.ad->handle(), f.site, w.dl(), 1) == LOOM_OK);
  for (int64_t o = 0; o < OUT; ++o)
    for (int64_t i = 0; i < IN; ++i) {
      double d = 0;
      for (int64_t k = 0; k < R; ++k) d += B[o * R + k] * A[k * IN + i];
      CHECK(w.v[o * IN + i] == Approx(w0[o * IN + i] + 2.0 * d).margin(1e-5));
    }
  REQUIRE(f.vt->merge(f.ad->handle(), f.site, w.dl(), -1) == LOOM_OK);
  for (size_t i = 0; i < w.v.size(); ++i) CHECK(w.v[i] == Approx(w0[i]).margin(1e-6));
  CHECK(f.vt->merge(f.ad->handle(), f.site, w.dl(), 2) == LOOM_ERR_INVALID_ARGUMENT);
}

TEST_CASE("lora load and config errors are clear", "[lora]") {
  Fixture f;
  bt::Tensor<float> a({R, IN});
  const std::string unknown = "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight";
  loom_named_tensor t1{sizeof(loom_named_tensor), unknown.c_str(), a.dl()};
  CHECK(f.vt->load(f.ad->handle(), &t1, 1) == LOOM_ERR_NOT_FOUND);
  CHECK_THAT(f.ad->last_error(), Catch::Contains(unknown));

  bt::Tensor<float> wrong({R + 1, IN});
  loom_named_tensor t2{sizeof(loom_named_tensor), kA.c_str(), wrong.dl()};
  CHECK(f.vt->load(f.ad->handle(), &t2, 1) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(f.ad->last_error(), Catch::Contains(kA) && Catch::Contains("shape"));

  loom_adapter_module m{sizeof(loom_adapter_module), kModule.c_str(), IN, OUT, {kDLFloat, 16, 1}, {kDLCPU, 0}, LOOM_ADAPTER_SITE_LINEAR};
  loom_adapter_site *s = nullptr;
  CHECK(f.vt->attach(f.ad->handle(), &m, &s) == LOOM_ERR_UNSUPPORTED);
  // A block's output (ABI 1.6) is not a linear: refused, naming it.
  const std::string block = "model.layers.0.mlp";
  loom_adapter_module bm{sizeof(loom_adapter_module), block.c_str(), IN, IN, {kDLFloat, 32, 1}, {kDLCPU, 0}, LOOM_ADAPTER_SITE_BLOCK};
  CHECK(f.vt->attach(f.ad->handle(), &bm, &s) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(f.ad->last_error(), Catch::Contains("'model.layers.0.mlp' is a block's output, not a linear module"));

  CHECK_THAT(bt::build_error("[[adapter]]\nuse = \"lora\"\ndropout = 1.5\n"), Catch::Contains("dropout"));
  CHECK_THAT(bt::build_error("[[adapter]]\nuse = \"lora\"\nr = 0\n"), Catch::Contains("r must"));
  CHECK_THAT(bt::build_error("[[adapter]]\nuse = \"lora\"\nrank = 4\n"), Catch::Contains("rank"));
}
