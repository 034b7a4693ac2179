// libloom-retriever-dense: recall@10 of the HNSW search against exact search on a synthetic
// 100k x 128 set ([RAG+Tools] item 1: at least 0.95; vectors of intrinsic dimension 16 plus
// noise, as embeddings are: iid Gaussian vectors in 128 dimensions, whose nearest neighbours are
// hardly nearer than the rest, need a denser graph and more candidates), metrics and scores, filters (the graph
// path and the exact path give exact search's answer over the matching documents), replace and
// remove, save/load (and refusals of damaged or mismatched indexes), and the refusals of
// documents and queries without usable embeddings.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>

#include "builtin_test_util.hpp"
#include "retriever_test_util.hpp"

namespace fs = std::filesystem;

namespace {

using bt::collect;
using bt::Hit;

fs::path temp_dir(const std::string &tag) { return bt::temp_dir("dense", tag); }

// "d<i>" (appended: GCC 12 -O3 warns falsely about "d" + std::string, PR 105329)
std::string doc_id(size_t i) { return std::string("d").append(std::to_string(i)); }

std::vector<float> gaussian(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto &x : v) x = d(g);
  return v;
}

// n vectors x = A z + 0.3 e in `dim` dimensions: z and e standard normal (16 and dim values),
// A a fixed standard normal dim x 16 matrix (seed 1), each row from `seed`.
std::vector<float> low_rank(size_t n, int32_t dim, uint32_t seed) {
  constexpr int32_t rank = 16;
  const std::vector<float> a = gaussian(static_cast<size_t>(dim) * rank, 1);
  const std::vector<float> z = gaussian(n * rank, seed), e = gaussian(n * static_cast<size_t>(dim), seed + 1000);
  std::vector<float> out(n * static_cast<size_t>(dim));
  for (size_t i = 0; i < n; ++i)
    for (int32_t j = 0; j < dim; ++j) {
      float v = 0.3f * e[i * static_cast<size_t>(dim) + static_cast<size_t>(j)];
      for (int32_t r = 0; r < rank; ++r) v += a[static_cast<size_t>(j * rank + r)] * z[i * rank + static_cast<size_t>(r)];
      out[i * static_cast<size_t>(dim) + static_cast<size_t>(j)] = v;
    }
  return out;
}

struct Fixture {
  std::unique_ptr<loom::Runtime> rt;
  loom::Instance *r;
  const loom_retriever_vtable *vt;

  explicit Fixture(const std::string &extra = "") : rt(bt::runtime("[[retriever]]\nuse = \"dense\"\n" + extra)) {
    r = &rt->pipeline().at("retriever[0]");
    vt = r->vtable<loom_retriever_vtable>();
  }
  // Adds vectors [n, dim] as documents "d<first + i>", metadata {"i": first + i, "even": ...}.
  void add_rows(const std::vector<float> &v, int32_t dim, size_t first = 0) {
    const size_t n = v.size() / static_cast<size_t>(dim);
    std::vector<std::string> ids(n), metas(n);
    std::vector<loom_document> docs(n);
    for (size_t i = 0; i < n; ++i) {
      ids[i] = doc_id(first + i);
      metas[i] = "{\"i\": " + std::to_string(first + i) + ", \"parity\": \"" + ((first + i) % 2 ? "odd" : "even") + "\"}";
      docs[i] = loom_document{sizeof(loom_document), ids[i].c_str(), ids[i].c_str(), metas[i].c_str(),
                              v.data() + i * static_cast<size_t>(dim), dim};
    }
    for (size_t at = 0; at < n; at += 4096) {
      const loom_status s = vt->add(r->handle(), docs.data() + at, static_cast<uint32_t>(std::min<size_t>(4096, n - at)));
      INFO(r->last_error());
      REQUIRE(s == LOOM_OK);
    }
  }
  loom_status search(const float *q, int32_t dim, std::vector<Hit> &out, int32_t k, const char *filter = nullptr) {
    loom_query query{sizeof(loom_query), "", q, dim, k, filter};
    out.clear();
    return vt->search(r->handle(), &query, &collect, &out);
  }
  std::vector<std::string> ids(const float *q, int32_t dim, int32_t k, const char *filter = nullptr) {
    std::vector<Hit> hits;
    const loom_status s = search(q, dim, hits, k, filter);
    INFO(r->last_error());
    REQUIRE(s == LOOM_OK);
    std::vector<std::string> out;
    for (auto &h : hits) out.push_back(h.id);
    return out;
  }
  uint64_t count() {
    uint64_t n = 0;
    REQUIRE(vt->count(r->handle(), &n) == LOOM_OK);
    return n;
  }
};

// Exact cosine neighbours: the ids "d<i>" of the k rows closest to q among those `keep` allows.
std::vector<std::string> exact_cosine(const std::vector<float> &rows, int32_t dim, const float *q, size_t k,
                                      const std::function<bool(size_t)> &keep = nullptr) {
  const size_t n = rows.size() / static_cast<size_t>(dim);
  double qn = 0;
  for (int32_t j = 0; j < dim; ++j) qn += static_cast<double>(q[j]) * q[j];
  std::vector<std::pair<double, size_t>> scored;
  for (size_t i = 0; i < n; ++i) {
    if (keep && !keep(i)) continue;
    double dot = 0, rn = 0;
    for (int32_t j = 0; j < dim; ++j) {
      const double x = rows[i * static_cast<size_t>(dim) + static_cast<size_t>(j)];
      dot += x * q[j];
      rn += x * x;
    }
    scored.push_back({-dot / std::sqrt(rn * qn), i});
  }
  const size_t m = std::min(k, scored.size());
  std::partial_sort(scored.begin(), scored.begin() + static_cast<std::ptrdiff_t>(m), scored.end());
  std::vector<std::string> out;
  for (size_t i = 0; i < m; ++i) out.push_back(doc_id(scored[i].second));
  return out;
}

double overlap(const std::vector<std::string> &got, const std::vector<std::string> &want) {
  size_t hit = 0;
  for (const auto &w : want) hit += std::count(got.begin(), got.end(), w) > 0 ? 1 : 0;
  return want.empty() ? 1.0 : static_cast<double>(hit) / static_cast<double>(want.size());
}

}  // namespace

TEST_CASE("dense: recall@10 against exact search on 100k x 128 synthetic vectors is at least 0.95", "[dense][recall]") {
  constexpr int32_t dim = 128;
  constexpr size_t n = 100000, queries = 200;
  const std::vector<float> rows = low_rank(n, dim, 2), qs = low_rank(queries, dim, 3);
  Fixture f;
  f.add_rows(rows, dim);
  REQUIRE(f.count() == n);
  double recall = 0;
  for (size_t q = 0; q < queries; ++q) {
    const float *query = qs.data() + q * dim;
    recall += overlap(f.ids(query, dim, 10), exact_cosine(rows, dim, query, 10));
  }
  recall /= queries;
  WARN("dense recall@10 over " << queries << " queries (100k x 128, intrinsic dimension 16, m 16, ef_search 128): " << recall);
  CHECK(recall >= 0.95);
}

TEST_CASE("dense: scores and metrics", "[dense]") {
  // Three 2-d documents around the unit circle; the query points at d1.
  const std::vector<float> rows = {1, 0, 0.8f, 0.6f, 0, 1};
  const float q[2] = {2, 1.5f};  // the direction of (0.8, 0.6), longer
  SECTION("cosine: similarity, best first, whatever the lengths") {
    Fixture f;
    f.add_rows(rows, 2);
    std::vector<Hit> hits;
    REQUIRE(f.search(q, 2, hits, 3) == LOOM_OK);
    REQUIRE(hits.size() == 3);
    CHECK(hits[0].id == "d1");
    CHECK(hits[0].score == Approx(1.0).margin(1e-6));
    CHECK(hits[1].id == "d0");
    CHECK(hits[1].score == Approx(0.8).margin(1e-6));
    CHECK(hits[2].score == Approx(0.6).margin(1e-6));
    CHECK(hits[0].kind == LOOM_SCORE_COSINE);
    CHECK(hits[0].meta == R"({"i":1,"parity":"odd"})");
    CHECK(f.ids(q, 2, 1) == std::vector<std::string>{"d1"});
    CHECK(f.ids(q, 2, 0).empty());
  }
  SECTION("l2: Euclidean distance, smallest first") {
    Fixture f("metric = \"l2\"\n");
    f.add_rows(rows, 2);
    const float near[2] = {0.1f, 0.9f};
    std::vector<Hit> hits;
    REQUIRE(f.search(near, 2, hits, 2) == LOOM_OK);
    REQUIRE(hits.size() == 2);
    CHECK(hits[0].id == "d2");
    CHECK(hits[0].score == Approx(std::sqrt(0.02)).margin(1e-6));
    CHECK(hits[0].kind == LOOM_SCORE_L2);
    CHECK(hits[1].id == "d1");
  }
  SECTION("ip: the inner product as given") {
    Fixture f("metric = \"ip\"\n");
    f.add_rows(rows, 2);
    std::vector<Hit> hits;
    REQUIRE(f.search(q, 2, hits, 1) == LOOM_OK);
    REQUIRE(hits.size() == 1);
    CHECK(hits[0].id == "d1");
    CHECK(hits[0].score == Approx(2 * 0.8 + 1.5 * 0.6).margin(1e-5));
    CHECK(hits[0].kind == LOOM_SCORE_INNER_PRODUCT);
  }
}

TEST_CASE("dense: filters give exact search's answer over the matching documents", "[dense][filter]") {
  constexpr int32_t dim = 32;
  constexpr size_t n = 3000;
  const std::vector<float> rows = gaussian(n * dim, 3), qs = gaussian(20 * dim, 4);
  for (const char *exact_below : {"0", "100000"}) {  // the graph path, then the exact path
    INFO("exact_below = " << exact_below);
    Fixture f(std::string("exact_below = ") + exact_below + "\n");
    f.add_rows(rows, dim);
    for (size_t q = 0; q < 20; ++q) {
      const float *query = qs.data() + q * dim;
      CHECK(overlap(f.ids(query, dim, 5, "parity == \"even\""), exact_cosine(rows, dim, query, 5, [](size_t i) { return i % 2 == 0; })) >= 0.8);
      CHECK(f.ids(query, dim, 5, "i < 7 && i >= 3 && parity != \"odd\"") == exact_cosine(rows, dim, query, 5, [](size_t i) {
              return i >= 3 && i < 7 && i % 2 == 0;
            }));
    }
    const float *query = qs.data();
    CHECK(f.ids(query, dim, 5, "missing == 1").empty());         // a missing field is false for ==
    CHECK(f.ids(query, dim, 5, "missing != 1").size() == 5);      // and true for !=
    CHECK(f.ids(query, dim, 5, "parity == 1").empty());           // a number never equals a string
    CHECK(f.ids(query, dim, 5, "i > 2999").empty());
    std::vector<Hit> hits;
    for (const char *bad : {"i ~ 3", "i == 3 || i == 4", "parity < \"x\"", "i == \"3", "(i == 3)", "i == 1e999"}) {
      INFO(bad);
      CHECK(f.search(query, dim, hits, 5, bad) == LOOM_ERR_UNSUPPORTED);
      CHECK(f.r->last_error().find("dense: unsupported filter syntax") != std::string::npos);
    }
  }
}

TEST_CASE("dense: replace, remove and count", "[dense]") {
  Fixture f;
  const std::vector<float> rows = {1, 0, 0, 1};
  f.add_rows(rows, 2);
  CHECK(f.count() == 2);
  const float east[2] = {1, 0}, north[2] = {0, 1};
  CHECK(f.ids(east, 2, 1) == std::vector<std::string>{"d0"});
  // d0 re-added pointing north: one document, found from the north now.
  const std::vector<float> moved = {0, 1};
  f.add_rows(moved, 2);
  CHECK(f.count() == 2);
  CHECK(f.ids(north, 2, 2).size() == 2);
  CHECK(f.ids(east, 2, 2) == f.ids(north, 2, 2));  // both point north: ties, same two documents
  REQUIRE(f.vt->remove(f.r->handle(), "d1") == LOOM_OK);
  CHECK(f.count() == 1);
  CHECK(f.ids(north, 2, 5) == std::vector<std::string>{"d0"});
  CHECK(f.vt->remove(f.r->handle(), "d1") == LOOM_ERR_NOT_FOUND);
}

TEST_CASE("dense: refusals of documents and queries without usable embeddings", "[dense]") {
  Fixture f;
  const float v2[2] = {1, 0}, v3[3] = {1, 0, 0}, zero[2] = {0, 0}, nan2[2] = {NAN, 1};
  const auto add = [&](const char *id, const float *e, int32_t dim) {
    loom_document d{sizeof(loom_document), id, "text", nullptr, e, dim};
    return f.vt->add(f.r->handle(), &d, 1);
  };
  CHECK(add("a", nullptr, 0) == LOOM_ERR_INVALID_ARGUMENT);
  const std::string error = f.r->last_error();  // (taken: a second call gives "")
  CHECK(error.find("has no embedding") != std::string::npos);
  CHECK(error.find("[embedding]") != std::string::npos);
  CHECK(add("a", zero, 2) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK(add("a", nan2, 2) == LOOM_ERR_INVALID_ARGUMENT);
  REQUIRE(add("a", v2, 2) == LOOM_OK);
  CHECK(add("b", v3, 3) == LOOM_ERR_INVALID_ARGUMENT);  // the first document fixed dimension 2
  CHECK(f.r->last_error().find("dimension 3") != std::string::npos);
  // A batch with one bad document adds nothing.
  loom_document two[2] = {{sizeof(loom_document), "c", "t", nullptr, v2, 2}, {sizeof(loom_document), "d", "t", "[1]", v2, 2}};
  CHECK(f.vt->add(f.r->handle(), two, 2) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK(f.count() == 1);
  std::vector<Hit> hits;
  CHECK(f.search(nullptr, 0, hits, 3) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK(f.r->last_error().find("the query has no embedding") != std::string::npos);
  CHECK(f.search(v3, 3, hits, 3) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK(f.search(v2, 2, hits, 3) == LOOM_OK);
  CHECK(hits.size() == 1);
  // Bad parameters name their key.
  CHECK_THROWS_WITH(bt::runtime("[[retriever]]\nuse = \"dense\"\nmetric = \"dot\"\n"), Catch::Contains("metric"));
  CHECK_THROWS_WITH(bt::runtime("[[retriever]]\nuse = \"dense\"\nm = 1\n"), Catch::Contains("m must be in"));
}

TEST_CASE("dense: save and load keep results; damaged and mismatched indexes are refused", "[dense][persist]") {
  constexpr int32_t dim = 16;
  const std::vector<float> rows = gaussian(500 * dim, 5), qs = gaussian(10 * dim, 6);
  const fs::path dir = temp_dir("save");
  std::vector<std::vector<std::string>> before;
  {
    Fixture f;
    f.add_rows(rows, dim);
    REQUIRE(f.vt->remove(f.r->handle(), "d7") == LOOM_OK);
    for (size_t q = 0; q < 10; ++q) before.push_back(f.ids(qs.data() + q * dim, dim, 8, q % 2 ? "parity == \"odd\"" : nullptr));
    REQUIRE(f.vt->save(f.r->handle(), dir.string().c_str()) == LOOM_OK);
  }
  Fixture g;
  REQUIRE(g.vt->load(g.r->handle(), dir.string().c_str()) == LOOM_OK);
  CHECK(g.count() == 499);
  for (size_t q = 0; q < 10; ++q) CHECK(g.ids(qs.data() + q * dim, dim, 8, q % 2 ? "parity == \"odd\"" : nullptr) == before[q]);
  // The loaded index takes more documents.
  g.add_rows(gaussian(10 * dim, 7), dim, 500);
  CHECK(g.count() == 509);

  SECTION("another metric") {
    Fixture h("metric = \"l2\"\n");
    CHECK(h.vt->load(h.r->handle(), dir.string().c_str()) == LOOM_ERR_INVALID_ARGUMENT);
    CHECK(h.r->last_error().find("metric") != std::string::npos);
  }
  SECTION("another dimension") {
    Fixture h("dim = 8\n");
    CHECK(h.vt->load(h.r->handle(), dir.string().c_str()) == LOOM_ERR_INVALID_ARGUMENT);
  }
  SECTION("damaged graph files, documents and metadata") {
    const fs::path graph = dir / "dense.hnsw";
    std::string bytes;
    {
      std::ifstream in(graph, std::ios::binary);
      bytes.assign(std::istreambuf_iterator<char>(in), {});
    }
    const auto refused = [&](const std::string &content, const fs::path &file) {
      std::string saved;
      {
        std::ifstream in(file, std::ios::binary);
        saved.assign(std::istreambuf_iterator<char>(in), {});
      }
      std::ofstream(file, std::ios::binary | std::ios::trunc) << content;
      Fixture h;
      const loom_status s = h.vt->load(h.r->handle(), dir.string().c_str());
      const std::string error = h.r->last_error();
      std::ofstream(file, std::ios::binary | std::ios::trunc) << saved;
      INFO(error);
      CHECK(s != LOOM_OK);
      CHECK(error.find(file.filename().string()) != std::string::npos);
      CHECK(h.count() == 0);  // nothing replaced
    };
    refused(bytes.substr(0, bytes.size() / 2), graph);           // truncated
    refused(bytes.substr(0, 40), graph);                         // truncated header
    std::string link = bytes;                                    // element 0's first link -> far outside
    const size_t header = 8 * 6 + 4 + 4 + 8 * 3 + 8 + 8;
    link[header + 4] = '\xff';
    link[header + 5] = '\xff';
    link[header + 6] = '\x7f';
    refused(link, graph);
    refused(bytes + "x", graph);                                 // trailing bytes
    refused("{\"id\": \"x\"}\n", dir / "dense_docs.jsonl");      // fewer lines than slots
    refused("{\"format\": \"other\"}", dir / "dense.json");
    // Still loads once restored.
    Fixture h;
    CHECK(h.vt->load(h.r->handle(), dir.string().c_str()) == LOOM_OK);
  }
  fs::remove_all(dir);
}
