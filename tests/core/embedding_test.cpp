// [embedding]: the model as an embedding model (Runtime::embed, CPU backend) against
// transformers' last_hidden_state of the default model (tests/fixtures/make_embedding_golden.py:
// mean and last-token pooling), with normalisation, prefixes, max_tokens and batching, and the
// manifest's refusals. The CUDA backend's embeddings: core_model_cuda_test.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "loom/core/error.hpp"
#include "loom/core/runtime.hpp"

namespace fs = std::filesystem;

namespace {

const fs::path kModel = fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv";

std::unique_ptr<loom::Runtime> runtime(const std::string &embedding) {
  return loom::Runtime::from_string("[loom]\ndevice = \"cpu\"\n[model]\npath = \"" + kModel.string() +
                                    "\"\n[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n" + embedding);
}

nlohmann::json golden() {
  std::ifstream in(fs::path(LOOM_SOURCE_DIR) / "tests/fixtures/models/tiny-kjv-embeddings.json");
  return nlohmann::json::parse(in);
}

double max_abs_diff(const std::vector<float> &a, const std::vector<float> &b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
  return m;
}

double norm(const std::vector<float> &v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

}  // namespace

TEST_CASE("embeddings match transformers' pooled last hidden state (mean and last token)", "[embedding]") {
  const auto g = golden();
  std::vector<std::string> texts;
  for (const auto &c : g["cases"]) texts.push_back(c["text"].get<std::string>());
  for (const char *pooling : {"mean", "last"}) {
    INFO("pooling = " << pooling);
    auto rt = runtime(std::string("[embedding]\nnormalize = false\npooling = \"") + pooling + "\"\n");
    const auto got = rt->embed(texts, /*query=*/false);
    REQUIRE(got.size() == texts.size());
    for (size_t i = 0; i < texts.size(); ++i) {
      INFO(texts[i]);
      const auto want = g["cases"][i][pooling].get<std::vector<float>>();
      CHECK(got[i].size() == 192);
      CHECK(max_abs_diff(got[i], want) < 1e-4);
    }
  }
}

TEST_CASE("embeddings: normalisation, prefixes, max_tokens and batching", "[embedding]") {
  const auto g = golden();
  const std::string text = g["cases"][0]["text"].get<std::string>();
  const auto want = g["cases"][0]["mean"].get<std::vector<float>>();
  SECTION("normalize (the default) gives the unit vector of the pooled state") {
    auto rt = runtime("[embedding]\n");
    const auto v = rt->embed({text}, false).front();
    CHECK(norm(v) == Approx(1.0).epsilon(1e-6));
    const double n = norm(want);
    std::vector<float> unit;
    for (float x : want) unit.push_back(static_cast<float>(x / n));
    CHECK(max_abs_diff(v, unit) < 1e-5);
  }
  SECTION("a query's prefix and a document's") {
    auto prefixed = runtime("[embedding]\nquery_prefix = \"query: \"\ndocument_prefix = \"passage: \"\n");
    auto plain = runtime("[embedding]\n");
    CHECK(max_abs_diff(prefixed->embed({"Jesus wept."}, true).front(), plain->embed({"query: Jesus wept."}, false).front()) < 1e-6);
    CHECK(max_abs_diff(prefixed->embed({"Jesus wept."}, false).front(), plain->embed({"passage: Jesus wept."}, false).front()) < 1e-6);
    CHECK(max_abs_diff(prefixed->embed({"Jesus wept."}, true).front(), prefixed->embed({"Jesus wept."}, false).front()) > 1e-3);
  }
  SECTION("max_tokens keeps a text's first tokens; batches do not change a text's vector") {
    auto cut = runtime("[embedding]\nmax_tokens = 4\nnormalize = false\npooling = \"last\"\n");
    auto whole = runtime("[embedding]\nnormalize = false\npooling = \"last\"\nbatch = 1\n");
    // The first four tokens of "In the beginning God created ..." are BOS and three pieces: the
    // same as the text cut there, whatever follows.
    CHECK(max_abs_diff(cut->embed({text}, false).front(), cut->embed({text + " more words after it"}, false).front()) < 1e-6);
    CHECK(max_abs_diff(cut->embed({text}, false).front(), whole->embed({text}, false).front()) > 1e-3);
    std::vector<std::string> texts;
    for (const auto &c : g["cases"]) texts.push_back(c["text"].get<std::string>());
    auto batched = runtime("[embedding]\nnormalize = false\npooling = \"last\"\nbatch = 3\n");
    const auto a = whole->embed(texts, false), b = batched->embed(texts, false);
    for (size_t i = 0; i < texts.size(); ++i) CHECK(max_abs_diff(a[i], b[i]) < 1e-5);
  }
}

TEST_CASE("embeddings: refusals", "[embedding]") {
  CHECK_THROWS_WITH(runtime("")->embed({"x"}, false), Catch::Contains("[embedding]"));
  CHECK_THROWS_WITH(runtime("[embedding]\npooling = \"max\"\n"), Catch::Contains("embedding.pooling") && Catch::Contains("\"mean\""));
  CHECK_THROWS_WITH(runtime("[embedding]\nsize = 3\n"), Catch::Contains("size"));
  CHECK_THROWS_WITH(runtime("[embedding]\nmax_tokens = 0\n"), Catch::Contains("max_tokens"));
  // Without a tokenizer (random weights) there is no text to embed.
  auto rt = loom::Runtime::from_string("[loom]\ndevice = \"cpu\"\n[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n[embedding]\n");
  CHECK_THROWS_WITH(rt->embed({"x"}, false), Catch::Contains("tokenizer"));
}
