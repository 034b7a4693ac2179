// libloom-retriever-bm25: ranking, stemming, top_k, filters (and their refusals), replace and
// remove, save/load, and the documents directory.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "builtin_test_util.hpp"
#include "retriever_test_util.hpp"

namespace fs = std::filesystem;

namespace {

using bt::collect;
using bt::Hit;

fs::path temp_dir(const std::string &tag) { return bt::temp_dir("bm25", tag); }

struct Fixture {
  std::unique_ptr<loom::Runtime> rt;
  loom::Instance *r;
  const loom_retriever_vtable *vt;

  explicit Fixture(const std::string &extra = "") : rt(bt::runtime("[[retriever]]\nuse = \"bm25\"\n" + extra)) {
    r = &rt->pipeline().at("retriever[0]");
    vt = r->vtable<loom_retriever_vtable>();
  }
  loom_status add(const std::string &id, const std::string &text, const char *meta) {
    loom_document d{sizeof(loom_document), id.c_str(), text.c_str(), meta, nullptr, 0};
    return vt->add(r->handle(), &d, 1);
  }
  void corpus() {
    REQUIRE(add("d1", "The quick brown fox jumps over the lazy dog", R"({"lang":"en","year":2019})") == LOOM_OK);
    REQUIRE(add("d2", "A lazy afternoon with the dog sleeping", R"({"lang":"en","year":2021})") == LOOM_OK);
    REQUIRE(add("d3", "Quantum chromodynamics describes the strong interaction and is not lazy",
                R"({"lang":"en","year":2023,"kind":"physics"})") == LOOM_OK);
    REQUIRE(add("d4", "Le chien paresseux dort", R"({"lang":"fr","year":2020})") == LOOM_OK);
    REQUIRE(add("d5", "dogs and more dogs, running dogs", R"({"lang":"en","year":2022})") == LOOM_OK);
  }
  loom_status search(const std::string &text, std::vector<Hit> &out, int32_t k = 10, const char *filter = nullptr) {
    loom_query q{sizeof(loom_query), text.c_str(), nullptr, 0, k, filter};
    out.clear();
    return vt->search(r->handle(), &q, &collect, &out);
  }
  std::vector<std::string> ids(const std::string &text, const char *filter = nullptr, int32_t k = 10) {
    std::vector<Hit> hits;
    const loom_status s = search(text, hits, k, filter);
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

} // namespace

TEST_CASE("bm25 ranks the document with the rare term first", "[bm25]") {
  Fixture f;
  f.corpus();
  CHECK(f.count() == 5);
  std::vector<Hit> hits;
  REQUIRE(f.search("lazy chromodynamics", hits) == LOOM_OK);
  REQUIRE(hits.size() == 3); // d1, d2, d3 contain "lazy"; only d3 has the rare term
  CHECK(hits[0].id == "d3");
  CHECK(hits[0].kind == LOOM_SCORE_BM25);
  CHECK(hits[0].score > 0);
  for (size_t i = 1; i < hits.size(); ++i) CHECK(hits[i - 1].score >= hits[i].score);
  CHECK(hits[0].begin == -1);
  CHECK(hits[0].end == -1);
  CHECK(hits[0].text.find("Quantum") == 0);
  CHECK(nlohmann::json::parse(hits[0].meta)["kind"] == "physics");

  CHECK(f.ids("jumping") == std::vector<std::string>{"d1"}); // porter: jumping ~ jumps
  CHECK(f.ids("dog", nullptr, 2).size() == 2);
  CHECK(f.ids("dog").front() == "d5"); // three occurrences in a short document
  CHECK(f.ids("").empty());
  CHECK(f.ids("   ").empty());
  // FTS5 syntax is quoted away: NOT is just the word "not", which only d3 contains.
  CHECK(f.ids("say \"hello OR NOT (") == std::vector<std::string>{"d3"});
  CHECK(f.ids("fox \"").size() == 1);
}

TEST_CASE("bm25 filters by metadata with bound parameters", "[bm25]") {
  Fixture f;
  f.corpus();
  CHECK(f.ids("chien dog", R"(lang == "fr")") == std::vector<std::string>{"d4"});
  auto en = f.ids("dog", R"(lang == "en" && year >= 2021)");
  std::sort(en.begin(), en.end());
  CHECK(en == std::vector<std::string>{"d2", "d5"});
  CHECK(f.ids("dog chien", R"(lang != "en")") == std::vector<std::string>{"d4"});
  CHECK(f.ids("lazy", "year < 2020") == std::vector<std::string>{"d1"});
  CHECK(f.ids("lazy", "year == 2023 && kind == \"physics\"") == std::vector<std::string>{"d3"});
  CHECK(f.ids("lazy", "year != 2023").size() == 2);
  CHECK(f.ids("lazy", "kind != \"physics\"").size() == 2); // absent field: != holds
  CHECK(f.ids("lazy", "missing > 1").empty());
  CHECK(f.ids("lazy", "year > -1e3").size() == 3);
  CHECK(f.ids("lazy", R"(lang == "en'); DROP TABLE docs; --")").empty());
  CHECK(f.count() == 5);

  std::vector<Hit> hits;
  CHECK(f.search("dog", hits, 10, R"(lang == "en" || year > 3)") == LOOM_ERR_UNSUPPORTED);
  CHECK_THAT(f.r->last_error(), Catch::Contains("&&"));
  CHECK(hits.empty());
  CHECK(f.search("dog", hits, 10, R"(year > "2020")") == LOOM_ERR_UNSUPPORTED);
  CHECK_THAT(f.r->last_error(), Catch::Contains("strings compare only"));
  CHECK(f.search("dog", hits, 10, "(year > 1)") == LOOM_ERR_UNSUPPORTED);
  CHECK(f.search("dog", hits, 10, "flag == true") == LOOM_ERR_UNSUPPORTED);
  CHECK(f.search("dog", hits, 10, "year ~ 3") == LOOM_ERR_UNSUPPORTED);
}

TEST_CASE("bm25 replaces by doc_id and removes", "[bm25]") {
  Fixture f;
  f.corpus();
  REQUIRE(f.add("d1", "elephants everywhere", nullptr) == LOOM_OK);
  CHECK(f.count() == 5);
  CHECK(f.ids("fox").empty());
  CHECK(f.ids("elephants") == std::vector<std::string>{"d1"});
  REQUIRE(f.vt->remove(f.r->handle(), "d2") == LOOM_OK);
  CHECK(f.count() == 4);
  CHECK(f.vt->remove(f.r->handle(), "d2") == LOOM_ERR_NOT_FOUND);
  CHECK(f.add("d9", "text", "[1, 2]") == LOOM_ERR_INVALID_ARGUMENT);
  CHECK_THAT(f.r->last_error(), Catch::Contains("JSON object"));
  CHECK(f.count() == 4);
}

TEST_CASE("bm25 saves and loads its index", "[bm25]") {
  const fs::path dir = temp_dir("save");
  {
    Fixture f;
    f.corpus();
    REQUIRE(f.vt->save(f.r->handle(), dir.c_str()) == LOOM_OK);
    CHECK(fs::exists(dir / "bm25.sqlite"));
    REQUIRE(f.vt->save(f.r->handle(), dir.c_str()) == LOOM_OK); // overwriting is fine
  }
  Fixture g;
  REQUIRE(g.add("other", "unrelated", nullptr) == LOOM_OK);
  REQUIRE(g.vt->load(g.r->handle(), dir.c_str()) == LOOM_OK);
  CHECK(g.count() == 5);
  CHECK(g.ids("lazy chromodynamics").front() == "d3");
  CHECK(g.ids("unrelated").empty());
  CHECK(g.ids("chien", R"(lang == "fr")") == std::vector<std::string>{"d4"});
  REQUIRE(g.add("d6", "lazy lazy lazy", nullptr) == LOOM_OK); // the loaded index is writable
  CHECK(g.count() == 6);

  const fs::path missing = dir / "nope";
  CHECK(g.vt->load(g.r->handle(), missing.c_str()) == LOOM_ERR_NOT_FOUND);
  CHECK_THAT(g.r->last_error(), Catch::Contains("nope"));
  CHECK(g.count() == 6);
  fs::remove_all(dir);
}

TEST_CASE("bm25 indexes a documents directory at create", "[bm25]") {
  const fs::path dir = temp_dir("docs");
  std::ofstream(dir / "b.md") << "# Sourdough\nFeed the starter with flour and water.";
  std::ofstream(dir / "a.txt") << "Bread needs flour, water, salt and yeast.";
  std::ofstream(dir / "c.json") << "{\"flour\": 1}";
  fs::create_directories(dir / "sub.txt");
  Fixture f("documents = \"" + dir.string() + "\"\n");
  CHECK(f.count() == 2);
  std::vector<Hit> hits;
  REQUIRE(f.search("starter", hits) == LOOM_OK);
  REQUIRE(hits.size() == 1);
  CHECK(hits[0].id == "b.md");
  CHECK(nlohmann::json::parse(hits[0].meta)["path"] == (dir / "b.md").string());
  CHECK(f.ids("flour").size() == 2);
  fs::remove_all(dir);

  CHECK_THAT(bt::build_error("[[retriever]]\nuse = \"bm25\"\ndocuments = \"/no/such/loom-dir\"\n"),
             Catch::Contains("/no/such/loom-dir"));
  CHECK_THAT(bt::build_error("[[retriever]]\nuse = \"bm25\"\ndocs = \"x\"\n"), Catch::Contains("docs"));
}
