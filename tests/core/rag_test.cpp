// [RAG+Tools] item 2, the RAG stage: a prompt (run.prompt or a run.messages content) with
// {passages} gets the retrievers' top run.top_k passages for run.query, numbered for citations,
// and {question} the query; several retrievers are fused by reciprocal rank (k = 60). The
// default model and bm25 over small folders written here.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <unistd.h>

#include "loom/core/document_chunks.hpp"
#include "loom/core/passage_fusion.hpp"
#include "loom/core/error.hpp"
#include "loom/core/runtime.hpp"
#include "loom/loom_plugin_api.h"
#include <nlohmann/json.hpp>

namespace fs = std::filesystem;

namespace {

const fs::path kModel = fs::path(LOOM_SOURCE_DIR) / "models/tiny-kjv";

fs::path folder(const std::string &name, const std::map<std::string, std::string> &files) {
  const fs::path d = fs::temp_directory_path() / ("loom-rag-" + std::to_string(::getpid())) / name;
  fs::remove_all(d);
  fs::create_directories(d);
  for (const auto &[file, text] : files) std::ofstream(d / file) << text;
  return d;
}

std::string manifest(const std::string &run, const std::vector<fs::path> &folders) {
  std::string m = "[loom]\ndevice = \"cpu\"\n[model]\npath = \"" + kModel.string() +
                  "\"\n[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n[run]\nsteps = 4\n" + run;
  for (const auto &f : folders) m += "\n[[retriever]]\nuse = \"bm25\"\ndocuments = \"" + f.string() + "\"\n";
  return m;
}

const std::map<std::string, std::string> kFirst = {
    {"wept.txt", "Jesus wept."},
    {"light.txt", "And God said, Let there be light: and there was light."},
    {"waters.txt", "And the Spirit of God moved upon the face of the waters, and God divided the light."},
    {"beasts.txt", "And God made the beast of the earth after his kind."}};

}  // namespace

TEST_CASE("a prompt with {passages} gets the top passages, numbered for citation, and the question", "[rag]") {
  const fs::path docs = folder("one", kFirst);
  auto rt = loom::Runtime::from_string(
      manifest("query = \"light\"\ntop_k = 2\nprompt = \"Passages:\\n{passages}Question: {question}\\nAnswer:\"\n", {docs}));
  const loom::RunResult r = rt->run();
  REQUIRE(r.passages.size() >= 2);
  REQUIRE(r.context.size() == 2);  // top_k of the retriever's list, in its order
  CHECK(r.context[0].doc_id == r.passages[0].doc_id);
  CHECK(r.context[1].doc_id == r.passages[1].doc_id);
  const std::string prompt = *rt->decode(r.sequences.at(0).prompt);
  INFO(prompt);
  // Both light passages, cited [1] and [2] with their ids, then the question.
  const auto at = [&](const std::string &s) { return prompt.find(s); };
  REQUIRE(at("[1]") != std::string::npos);
  REQUIRE(at("[2]") != std::string::npos);
  CHECK(at("[1]") < at("(" + r.context[0].doc_id + ")"));
  CHECK(at("(" + r.context[0].doc_id + ")") < at("[2]"));
  CHECK(at("(" + r.context[1].doc_id + ")") < at("Question: light"));
  CHECK(at("{passages}") == std::string::npos);
  CHECK(at("Jesus wept") == std::string::npos);  // not retrieved for "light"
  CHECK(r.sequences.at(0).tokens.size() == 4);
}

TEST_CASE("several retrievers are fused by reciprocal rank (k = 60)", "[rag]") {
  const fs::path a = folder("a", kFirst);
  const fs::path b = folder("b", {{"waters.txt", kFirst.at("waters.txt")},
                                  {"dark.txt", "And darkness was upon the face of the deep, and God called the light Day."},
                                  {"lights.txt", "And God made two great lights; the greater light to rule the day."}});
  auto rt = loom::Runtime::from_string(
      manifest("query = \"light\"\ntop_k = 3\nprompt = \"{passages}Q: {question}\"\n", {a, b}));
  const loom::RunResult r = rt->run();
  // The fusion, computed here from the two lists: sum of 1 / (60 + rank) per doc id.
  std::map<std::string, double> want;
  std::map<std::string, int> rank;
  for (const auto &p : r.passages) want[p.doc_id] += 1.0 / (60.0 + ++rank[p.retriever_slot]);
  REQUIRE(want.size() >= 3);
  REQUIRE(r.context.size() == 3);
  for (size_t i = 0; i < r.context.size(); ++i) {
    INFO(i << ": " << r.context[i].doc_id);
    CHECK(r.context[i].score_kind == "rrf");
    CHECK(std::fabs(r.context[i].score - want.at(r.context[i].doc_id)) < 1e-12);
    if (i > 0) CHECK(r.context[i - 1].score >= r.context[i].score);
  }
  // No fused passage scores below one left out.
  for (const auto &[id, score] : want) {
    bool placed = false;
    for (const auto &c : r.context) placed = placed || c.doc_id == id;
    if (!placed) CHECK(score <= r.context.back().score);
  }
  // waters.txt is in both lists: it leads.
  CHECK(r.context[0].doc_id == "waters.txt");
  CHECK(r.context[0].retriever_slot == "retriever[0],retriever[1]");
}

TEST_CASE("{passages} in a chat message, and the stage's refusals", "[rag]") {
  const fs::path docs = folder("chat", kFirst);
  auto rt = loom::Runtime::from_string(manifest(
      "query = \"wept\"\ntop_k = 1\nchat_template = \"plain\"\n"
      "messages = [{ role = \"system\", content = \"Cite passages as [n].\" }, { role = \"user\", content = \"{passages}{question}\" }]\n",
      {docs}));
  const loom::RunResult r = rt->run();
  REQUIRE(r.context.size() == 1);
  CHECK(r.context[0].doc_id == "wept.txt");
  const std::string prompt = *rt->decode(r.sequences.at(0).prompt);
  INFO(prompt);
  CHECK(prompt.find("[1] Jesus wept. (wept.txt)") != std::string::npos);
  CHECK(prompt.find("Cite passages as [n].") != std::string::npos);  // the system message, rendered too

  const auto error = [&](const std::string &run, const std::vector<fs::path> &folders) -> std::string {
    try {
      loom::Runtime::from_string(manifest(run, folders));
    } catch (const loom::Error &e) {
      return e.what();
    }
    return "";
  };
  CHECK_THAT(error("prompt = \"{passages}\"\n", {docs}), Catch::Contains("run.prompt: {passages} needs run.query"));
  CHECK_THAT(error("query = \"x\"\nprompt = \"{passages}\"\n", {}), Catch::Contains("run.prompt: {passages} needs a [[retriever]]"));
  CHECK_THAT(error("query = \"x\"\nprompts = [\"{passages}\", \"b\"]\n", {docs}),
             Catch::Contains("run.prompts: {passages} is for run.prompt or run.messages"));
}

TEST_CASE("documents are cut into overlapping chunks at breaks, never inside a UTF-8 character", "[rag]") {
  std::string text;
  for (int p = 0; p < 6; ++p) {
    for (int w = 0; w < 30; ++w) text += (w % 7 == 3 ? "naïve " : "word ");
    text += "\n\n";
  }
  const auto ranges = loom::chunk_ranges(text, 100, 20);
  REQUIRE(ranges.size() > 4);
  CHECK(ranges.front().first == 0);
  CHECK(ranges.back().second == static_cast<int64_t>(text.size()));
  for (size_t i = 0; i < ranges.size(); ++i) {
    const auto [b, e] = ranges[i];
    INFO("chunk " << i << " [" << b << ", " << e << ")");
    CHECK(e - b <= 100);
    CHECK(e > b);
    const auto inner = [&](int64_t at) { return at < static_cast<int64_t>(text.size()) && (static_cast<unsigned char>(text[static_cast<size_t>(at)]) & 0xC0) == 0x80; };
    CHECK_FALSE(inner(b));
    CHECK_FALSE(inner(e));
    if (e < static_cast<int64_t>(text.size())) CHECK((text[static_cast<size_t>(e - 1)] == ' ' || text[static_cast<size_t>(e - 1)] == '\n'));
    if (i > 0) {
      CHECK(b < ranges[i - 1].second);             // overlaps the previous chunk
      CHECK(b >= ranges[i - 1].second - 20);       // by at most the overlap
      CHECK(b > ranges[i - 1].first);              // and moves on
      CHECK((text[static_cast<size_t>(b - 1)] == ' ' || text[static_cast<size_t>(b - 1)] == '\n'));  // at a word
    }
  }
  CHECK_THROWS_WITH(loom::chunk_ranges(text, 100, 50), Catch::Contains("overlap"));
  // Folders: *.txt and *.md, recursively, ids "path#n", metadata with the byte offsets.
  const fs::path d = folder("ingest", {{"a.md", text}, {"skip.bin", "x"}});
  fs::create_directories(d / "sub");
  std::ofstream(d / "sub/b.txt") << "Jesus wept.";
  const auto chunks = loom::chunk_documents(d, 100, 20);
  REQUIRE(chunks.size() == ranges.size() + 1);
  CHECK(chunks.front().doc_id == "a.md#0");
  CHECK(chunks.back().doc_id == "sub/b.txt#0");
  CHECK(chunks.back().text == "Jesus wept.");
  CHECK(chunks[1].offset_begin == ranges[1].first);
  CHECK(chunks[1].text == text.substr(static_cast<size_t>(ranges[1].first), static_cast<size_t>(ranges[1].second - ranges[1].first)));
  CHECK(chunks[1].metadata_json.find("\"source\":\"a.md\"") != std::string::npos);
  CHECK_THROWS_WITH(loom::chunk_documents(d / "missing", 100, 20), Catch::Contains("missing: no such file or folder"));
}

TEST_CASE("run.filter narrows every retriever's answers by metadata", "[rag]") {
  const fs::path docs = folder("filter", kFirst);
  const std::string waters = (docs / "waters.txt").string();
  auto rt = loom::Runtime::from_string(manifest("query = \"light\"\ntop_k = 3\nfilter = 'path == \"" + waters +
                                                    "\"'\nprompt = \"{passages}Q: {question}\"\n",
                                                {docs}));
  const loom::RunResult r = rt->run();
  REQUIRE(r.passages.size() == 1);  // light.txt matches "light" too, but not the filter
  CHECK(r.passages[0].doc_id == "waters.txt");
  REQUIRE(r.context.size() == 1);
  auto bad = loom::Runtime::from_string(manifest("query = \"light\"\nfilter = \"path ~~ 3\"\n", {docs}));
  CHECK_THROWS_AS(bad->run(), loom::Error);
}

TEST_CASE("retrieval set: recall@5 of bm25, dense and hybrid over the held-out KJV verses", "[rag]") {
  // tests/fixtures/text/kjv_retrieval.json: hand-written questions, each with its verse. The
  // verses are added through the retriever ABI (doc_id "v<line>"); dense gets the default
  // model's embeddings ([embedding]: mean pooling), made by Runtime::embed as `loom index build`
  // makes them; hybrid is the RAG stage's fusion of both top-5 lists (reciprocal rank, k = 60),
  // and "hybrid component" the `hybrid` retriever (both indexes in one, their top 50 fused).
  const fs::path text = fs::path(LOOM_SOURCE_DIR) / "tests/fixtures/text";
  std::ifstream in(text / "kjv_retrieval.json");
  const auto set = nlohmann::json::parse(in);
  std::ifstream corpus(text / set["corpus"].get<std::string>());
  std::vector<std::string> ids, verses;
  for (std::string line; std::getline(corpus, line);) {
    std::string id = "v";  // (appended: GCC 12 warns falsely on "v" + std::string at -O3)
    id += std::to_string(ids.size() + 1);
    ids.push_back(id);
    verses.push_back(line);
  }
  REQUIRE(verses.size() == 440);
  auto rt = loom::Runtime::from_string(manifest("[embedding]\npooling = \"mean\"\n", {}) +
                                       "[[retriever]]\nuse = \"bm25\"\n[[retriever]]\nuse = \"dense\"\n[[retriever]]\nuse = \"hybrid\"\n");
  const std::vector<std::vector<float>> vectors = rt->embed(verses, /*query=*/false);
  REQUIRE(vectors.size() == verses.size());
  REQUIRE(vectors[0].size() == 192);  // the default model's hidden size
  for (const char *slot : {"retriever[0]", "retriever[1]", "retriever[2]"}) {
    auto &r = rt->pipeline().at(slot);
    std::vector<loom_document> docs;
    for (size_t i = 0; i < verses.size(); ++i)
      docs.push_back(loom_document{sizeof(loom_document), ids[i].c_str(), verses[i].c_str(), nullptr, vectors[i].data(),
                                   static_cast<int32_t>(vectors[i].size())});
    r.check(r.vtable<loom_retriever_vtable>()->add(r.handle(), docs.data(), static_cast<uint32_t>(docs.size())), "add");
  }
  std::map<std::string, int> found;
  int total = 0;
  for (const auto &item : set["questions"]) {
    const std::string q = item["q"].get<std::string>();
    std::string want = "v";
    want += std::to_string(item["line"].get<int>());
    const std::vector<float> qv = rt->embed({q}, /*query=*/true).front();
    std::vector<loom::PassageResult> lists;  // bm25's top 5, dense's, then the hybrid component's
    for (const char *slot : {"retriever[0]", "retriever[1]", "retriever[2]"}) {
      auto &r = rt->pipeline().at(slot);
      loom_query query{sizeof(loom_query), q.c_str(), qv.data(), static_cast<int32_t>(qv.size()), 5, nullptr};
      struct Sink {
        std::vector<loom::PassageResult> *lists;
        std::string slot;
      } sink{&lists, slot};
      r.check(r.vtable<loom_retriever_vtable>()->search(r.handle(), &query,
                                                        [](void *user, const loom_passage *p) -> loom_status {
                                                          auto *s = static_cast<Sink *>(user);
                                                          loom::PassageResult got;
                                                          got.retriever_slot = s->slot;
                                                          got.doc_id = p->doc_id;
                                                          s->lists->push_back(got);
                                                          return LOOM_OK;
                                                        },
                                                        &sink),
              "search");
    }
    const auto has = [&](const std::vector<loom::PassageResult> &list, const char *slot) {
      for (const auto &p : list)
        if ((slot == nullptr || p.retriever_slot == slot) && p.doc_id == want) return true;
      return false;
    };
    ++total;
    found["bm25"] += has(lists, "retriever[0]") ? 1 : 0;
    found["dense"] += has(lists, "retriever[1]") ? 1 : 0;
    std::vector<loom::PassageResult> two(lists.begin(), lists.end());
    two.erase(std::remove_if(two.begin(), two.end(), [](const auto &p) { return p.retriever_slot == "retriever[2]"; }), two.end());
    found["hybrid"] += has(loom::fuse_passages(two, 5), nullptr) ? 1 : 0;
    found["hybrid component"] += has(lists, "retriever[2]") ? 1 : 0;
  }
  CHECK(total == 20);
  std::map<std::string, double> recall;
  for (const auto &[name, n] : found) {
    recall[name] = static_cast<double>(n) / total;
    WARN(name << " recall@5 over " << total << " questions: " << recall[name]);
  }
  // Measured at 1.00 / 0.70 / 1.00 / 0.95 (README's RAG stage row); the floors leave room for another
  // tokenizer or graph build, far above chance (5 of 440 verses: 0.011).
  CHECK(recall["bm25"] >= 0.85);
  CHECK(recall["dense"] >= 0.5);
  CHECK(recall["hybrid"] >= 0.85);
  CHECK(recall["hybrid component"] >= 0.85);  // each index's top 50 fused, then the top 5
}

TEST_CASE("the RAG prompt is also what a scheduled run serves", "[rag]") {
  const fs::path docs = folder("scheduled", kFirst);
  auto rt = loom::Runtime::from_string(manifest("query = \"wept\"\ntop_k = 1\nprompt = \"{passages}Q: {question}\"\n", {docs}) +
                                       "\n[scheduler]\nmax_seqs = 2\n");
  const loom::RunResult r = rt->run();
  REQUIRE(r.context.size() == 1);
  CHECK(r.scheduler.used);
  const std::string prompt = *rt->decode(r.sequences.at(0).prompt);
  INFO(prompt);
  CHECK(prompt.find("[1] Jesus wept. (wept.txt)") != std::string::npos);
  CHECK(r.sequences.at(0).tokens.size() == 4);
}
