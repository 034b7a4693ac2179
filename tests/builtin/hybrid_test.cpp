// libloom-retriever-hybrid: bm25 and dense indexes over the same documents, fused by reciprocal
// rank (k = 60): the fused order and scores against sums computed here, filters on both lists,
// save/load, remove, and the refusal of documents without embeddings.
#include <catch2/catch.hpp>

#include <filesystem>
#include <map>

#include "builtin_test_util.hpp"
#include "retriever_test_util.hpp"

namespace {

struct Fixture {
  std::unique_ptr<loom::Runtime> rt;
  loom::Instance *r;
  const loom_retriever_vtable *vt;

  explicit Fixture(const std::string &extra = "") : rt(bt::runtime("[[retriever]]\nuse = \"hybrid\"\n" + extra)) {
    r = &rt->pipeline().at("retriever[0]");
    vt = r->vtable<loom_retriever_vtable>();
  }
  loom_status add(const char *id, const char *text, const char *meta, float x, float y) {
    const float e[2] = {x, y};
    loom_document d{sizeof(loom_document), id, text, meta, e, 2};
    return vt->add(r->handle(), &d, 1);
  }
  std::vector<bt::Hit> search(const char *text, float x, float y, int32_t k = 10, const char *filter = nullptr) {
    const float e[2] = {x, y};
    loom_query q{sizeof(loom_query), text, e, 2, k, filter};
    std::vector<bt::Hit> hits;
    const loom_status s = vt->search(r->handle(), &q, &bt::collect, &hits);
    INFO(r->last_error());
    REQUIRE(s == LOOM_OK);
    return hits;
  }
  void corpus() {
    REQUIRE(add("east", "the morning sun rises", R"({"side":"e"})", 1, 0) == LOOM_OK);
    REQUIRE(add("north", "cold winds and snow", R"({"side":"n"})", 0, 1) == LOOM_OK);
    REQUIRE(add("northeast", "snow in the morning", R"({"side":"n"})", 0.7f, 0.7f) == LOOM_OK);
  }
};

double rrf(std::initializer_list<int> ranks) {
  double s = 0;
  for (int r : ranks) s += 1.0 / (60.0 + r);
  return s;
}

}  // namespace

TEST_CASE("hybrid: both lists fused by reciprocal rank", "[hybrid]") {
  Fixture f;
  f.corpus();
  // Text "snow": bm25 finds north and northeast (ranks 1 and 2, in bm25's order); the vector
  // (0.8, 0.6) ranks northeast, east, north by cosine.
  const auto hits = f.search("snow", 0.8f, 0.6f);
  REQUIRE(hits.size() == 3);
  std::map<std::string, double> score;
  for (const auto &h : hits) {
    score[h.id] = h.score;
    CHECK(h.kind == LOOM_SCORE_RRF);
  }
  CHECK(hits[0].id == "northeast");
  const bool north_first = score["north"] > rrf({3}) + rrf({2}) - 1e-12;  // lexical rank 1 for north
  CHECK(score["northeast"] == Approx(rrf({north_first ? 2 : 1, 1})));
  CHECK(score["north"] == Approx(rrf({north_first ? 1 : 2, 3})));
  CHECK(score["east"] == Approx(rrf({2})));
  CHECK(hits[2].id == "east");
  CHECK(hits[0].text == "snow in the morning");
  CHECK(hits[0].meta == R"({"side":"n"})");
  CHECK(f.search("snow", 0.8f, 0.6f, 1).size() == 1);
  // A filter applies to both lists.
  const auto north = f.search("snow", 0.8f, 0.6f, 10, "side == \"n\"");
  REQUIRE(north.size() == 2);
  for (const auto &h : north) CHECK(h.id != "east");
}

TEST_CASE("hybrid: save/load, remove, and documents without embeddings", "[hybrid]") {
  const auto dir = bt::temp_dir("hybrid", "save");
  {
    Fixture f;
    f.corpus();
    REQUIRE(f.vt->save(f.r->handle(), dir.string().c_str()) == LOOM_OK);
  }
  CHECK(std::filesystem::is_directory(dir / "bm25"));
  CHECK(std::filesystem::is_directory(dir / "dense"));
  Fixture g;
  REQUIRE(g.vt->load(g.r->handle(), dir.string().c_str()) == LOOM_OK);
  uint64_t n = 0;
  REQUIRE(g.vt->count(g.r->handle(), &n) == LOOM_OK);
  CHECK(n == 3);
  CHECK(g.search("snow", 0.8f, 0.6f).front().id == "northeast");
  REQUIRE(g.vt->remove(g.r->handle(), "northeast") == LOOM_OK);
  for (const auto &h : g.search("snow", 0.8f, 0.6f)) CHECK(h.id != "northeast");
  CHECK(g.vt->remove(g.r->handle(), "northeast") == LOOM_ERR_NOT_FOUND);
  loom_document plain{sizeof(loom_document), "x", "text", nullptr, nullptr, 0};
  CHECK(g.vt->add(g.r->handle(), &plain, 1) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK(g.r->last_error().find("[embedding]") != std::string::npos);
  REQUIRE(g.vt->count(g.r->handle(), &n) == LOOM_OK);
  CHECK(n == 2);  // the refused document went into neither index
  std::vector<bt::Hit> hits;
  loom_query q{sizeof(loom_query), "snow", nullptr, 0, 3, nullptr};
  CHECK(g.vt->search(g.r->handle(), &q, &bt::collect, &hits) == LOOM_ERR_INVALID_ARGUMENT);
  std::filesystem::remove_all(dir);
}
