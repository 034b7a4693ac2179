// The `loom` CLI as a user runs it: exit codes, one-line errors, --help on every command.
#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <array>
#include <fstream>
#include <set>
#include <sstream>
#include <unistd.h>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "loom/abi.h"
#include "process_util.hpp"
#include <string>
#include <sys/wait.h>

namespace {

using Result = loom_test::ShellResult;  // stdout and stderr together

Result loom(const std::string &args) {
  return loom_test::run_shell(std::string("LOOM_PLUGIN_PATH= ") + LOOM_CLI + " " + args + " 2>&1");
}

const std::string kConfigs = std::string(LOOM_SOURCE_DIR) + "/configs/";

} // namespace

TEST_CASE("help and version", "[cli]") {
  CHECK(loom("--help").code == 0);
  CHECK(loom("--help").out.find("exit codes:") != std::string::npos);
  for (const char *cmd : {"plugins", "validate", "run"}) {
    auto r = loom(std::string(cmd) + " --help");
    INFO(cmd);
    CHECK(r.code == 0);
    CHECK(r.out.find(std::string("usage: loom ") + cmd) == 0);
  }
  CHECK(loom("version").out.find("plugin ABI " + std::to_string(LOOM_ABI_MAJOR) + "." + std::to_string(LOOM_ABI_MINOR)) !=
        std::string::npos);
  CHECK(loom("").code == 2);
  CHECK(loom("frobnicate").code == 2);
  CHECK(loom("run").code == 2);
  CHECK(loom("run x.toml --steps zero").code == 2);
  CHECK(loom("plugins --bogus").code == 2);
}

TEST_CASE("plugins lists components of every kind, as a table and as JSON", "[cli]") {
  auto table = loom("plugins");
  CHECK(table.code == 0);
  for (const char *kind : {"attention", "quantizer", "adapter", "sampler", "parallel", "retriever", "tool", "drafter"}) {
    INFO(kind);
    CHECK(table.out.find(std::string("\n  ") + kind) != std::string::npos);
  }
  auto json = loom("plugins --json");
  REQUIRE(json.code == 0);
  auto doc = nlohmann::json::parse(json.out);
  CHECK(doc["abi"]["major"] == 1);
  std::set<std::string> kinds;
  for (const auto &lib : doc["libraries"])
    for (const auto &c : lib["components"]) kinds.insert(c["kind"].get<std::string>());
  CHECK(kinds.size() == 8);
  // Broken libraries in an extra path are reported, and the good ones still listed.
  auto bad = loom("plugins --path " + std::string(LOOM_TEST_PLUGIN_DIR) + "/bad");
  CHECK(bad.code == 0);
  CHECK(bad.out.find("warning:") != std::string::npos);
  CHECK(bad.out.find("libwrong-abi.so: built for Loom plugin ABI 99") != std::string::npos);
  CHECK(bad.out.find("loom-samplers") != std::string::npos);
}

TEST_CASE("validate and run the shipped manifests", "[cli]") {
  int manifests = 0;
  for (const auto &entry : std::filesystem::directory_iterator(kConfigs)) {
    if (entry.path().extension() != ".toml") continue;
    ++manifests;
    std::string m = entry.path().filename().string();
    INFO(m);
    CHECK(loom("validate " + kConfigs + m).code == 0);
    auto r = loom("run " + kConfigs + m + " --steps 4");
    CHECK(r.code == 0);
    CHECK(r.out.find(" tokens in ") != std::string::npos);
    CHECK(r.out.find("tokens/s") != std::string::npos);
  }
  CHECK(manifests >= 3);
  // (CTest runs this from the build tree: the manifests' relative model and corpus paths resolve
  // against configs/, not the working directory.)
  auto r = loom("run " + kConfigs + "pipeline.toml");
  CHECK(r.out.find("tool calculator: 252") != std::string::npos);
  CHECK(r.out.find("plugins.md") != std::string::npos);
  // The default model writes text after the prompt, as it streams.
  CHECK(r.out.find("\nAnd God said ") != std::string::npos);
  CHECK(r.out.find("prompt 4 tokens at") != std::string::npos);
  // --set reaches the plugin's table.
  CHECK(loom("run " + kConfigs + "greedy.toml --set run.steps=2").out.find("\n2 tokens in") != std::string::npos);
  // Served runs end with the scheduler's line; a small pool preempts without losing a request.
  const auto served = loom("run " + kConfigs + "serve.toml --set loom.device=cpu");
  CHECK(served.code == 0);
  CHECK(served.out.find("(8 sequences,") != std::string::npos);
  CHECK(served.out.find("scheduler: ") != std::string::npos);
  CHECK(served.out.find(", 0 preemptions, prefix cache ") != std::string::npos);
  const auto tight = loom("run " + kConfigs + "serve.toml --set loom.device=cpu --set scheduler.kv_blocks=16");
  CHECK(tight.code == 0);
  CHECK(tight.out.find("(8 sequences,") != std::string::npos);
  CHECK(tight.out.find(", 0 preemptions") == std::string::npos);
}

TEST_CASE("bad input gets a one-line error and its exit code", "[cli]") {
  auto missing = loom("validate /nonexistent/m.toml");
  CHECK(missing.code == 3);
  CHECK(missing.out == "loom: /nonexistent/m.toml: cannot open the manifest\n");
  auto unknown_key = loom("validate " + kConfigs + "greedy.toml --set sampler[0].temperature=2");
  CHECK(unknown_key.code == 3);
  CHECK(unknown_key.out.find("sampler[0].temperature: unknown key for component 'greedy'") != std::string::npos);
  auto no_plugin = loom("run " + kConfigs + "greedy.toml --set attention.use=ring-attention");
  CHECK(no_plugin.code == 4);
  CHECK(no_plugin.out.find("no attention component 'ring-attention'") != std::string::npos);
  auto bad_value = loom("run " + kConfigs + "greedy.toml --set run.steps=-1");
  CHECK(bad_value.code == 3);
  auto runtime_failure = loom("run " + kConfigs + "greedy.toml --set sampler[0].use=top-k");
  CHECK(runtime_failure.code == 1);
  CHECK(runtime_failure.out.find("selecting sampler") != std::string::npos);
  for (const auto *r : {&missing, &unknown_key, &no_plugin, &bad_value}) {
    INFO(r->out);
    CHECK(std::count(r->out.begin(), r->out.end(), '\n') == 1);
  }
}

TEST_CASE("run generates a batch of prompts and prints every sequence", "[cli]") {
  auto ids = loom("run " + kConfigs + "greedy.toml --set 'run.prompts=[[1, 2], [3], [4, 5, 6]]' --set loom.threads=2");
  CHECK(ids.code == 0);
  CHECK(ids.out.find("  model          cpu float32 x2 threads\n") != std::string::npos);
  CHECK(ids.out.find("\n[0] tokens: ") != std::string::npos);
  CHECK(ids.out.find("\n[2] tokens: ") != std::string::npos);
  // The totals count every sequence: 3 x 8 tokens after 6 prompt tokens.
  CHECK(ids.out.find("\n24 tokens in ") != std::string::npos);
  CHECK(ids.out.find("prompt 6 tokens at") != std::string::npos);
  CHECK(ids.out.find("(3 sequences, 0 stopped by a stop token or string)") != std::string::npos);
  auto text = loom("run " + kConfigs + "pipeline.toml --set 'run.prompts=[\"And God said\", \"Jesus wept\"]'");
  CHECK(text.code == 3); // pipeline.toml has run.prompt
  CHECK(text.out.find("run.prompts: give one of prompts, prompt or messages, not several") != std::string::npos);
  // --warmup: the same greedy tokens after untimed runs; a bad count is a usage error.
  auto warm = loom("run " + kConfigs + "greedy.toml --set 'run.prompts=[[1, 2], [3], [4, 5, 6]]' --warmup 2");
  CHECK(warm.code == 0);
  const auto tokens_of = [](const std::string &out) { return out.substr(out.find("\n[0] tokens: "), out.find("\n24 tokens in ") - out.find("\n[0] tokens: ")); };
  CHECK(tokens_of(warm.out) == tokens_of(ids.out));
  CHECK(loom("run " + kConfigs + "greedy.toml --warmup many").code == 2);
  CHECK(loom("train " + kConfigs + "greedy.toml --warmup 1").code == 2);  // loom run's alone
  // --tokens: a model with a tokenizer prints text, and with the flag its token ids as well.
  auto text_only = loom("run " + kConfigs + "pipeline.toml --steps 6");
  auto with_ids = loom("run " + kConfigs + "pipeline.toml --steps 6 --tokens");
  REQUIRE(text_only.code == 0);
  REQUIRE(with_ids.code == 0);
  CHECK(text_only.out.find("tokens:") == std::string::npos);
  const size_t at = with_ids.out.find("\ntokens: ");
  REQUIRE(at != std::string::npos);
  std::istringstream ids_line(with_ids.out.substr(at + 9, with_ids.out.find('\n', at + 1) - at - 9));
  std::vector<int> printed_ids;
  for (int id; ids_line >> id;) printed_ids.push_back(id);
  CHECK(!printed_ids.empty());
  CHECK(printed_ids.size() <= 6);
  CHECK(with_ids.out.substr(0, at) == text_only.out.substr(0, at));  // the same text before the ids
  CHECK(loom("train " + kConfigs + "greedy.toml --tokens").code == 2);
  auto threads = loom("run " + kConfigs + "greedy.toml --set loom.threads=-2");
  CHECK(threads.code == 3);
  CHECK(threads.out.find("loom.threads: must be 0 (one per hardware thread) or a positive count, got -2") != std::string::npos);
}

TEST_CASE("index build ingests a folder into the retrievers; index query reloads it", "[cli]") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("loom-cli-index-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir / "docs");
  {
    std::ofstream long_file(dir / "docs/long.md");
    for (int i = 0; i < 40; ++i) long_file << "In the beginning God created the heaven and the earth, verse " << i << ".\n";
    long_file << "\nThe quick zebra appears only at the very end.\n";
    std::ofstream(dir / "docs/short.txt") << "Jesus wept.\n";
  }
  std::ofstream(dir / "index.toml") << "[[retriever]]\nuse = \"bm25\"\n";
  const std::string manifest = (dir / "index.toml").string();
  auto built = loom("index build " + manifest + " --docs " + (dir / "docs").string() + " --out " + (dir / "idx").string() +
                    " --chunk 300 --overlap 50");
  INFO(built.out);
  REQUIRE(built.code == 0);
  CHECK(built.out.find("indexed ") != std::string::npos);
  CHECK(fs::is_directory(dir / "idx/retriever[0]"));
  // A fresh process loads the saved index: the zebra is in long.md's last chunk.
  auto q = loom("index query " + manifest + " --index " + (dir / "idx").string() + " --top-k 2 quick zebra");
  INFO(q.out);
  REQUIRE(q.code == 0);
  const size_t first = q.out.find("  1. long.md#");
  REQUIRE(first != std::string::npos);
  CHECK(q.out.find("zebra", first) != std::string::npos);
  CHECK(q.out.find("1 passage(s) for \"quick zebra\"") != std::string::npos);
  auto wept = loom("index query " + manifest + " --index " + (dir / "idx").string() + " wept");
  CHECK(wept.out.find("  1. short.txt#0") != std::string::npos);
  // Two retrievers: each list, then their fusion (the doc both found leads).
  std::ofstream(dir / "two.toml") << "[[retriever]]\nuse = \"bm25\"\n[[retriever]]\nuse = \"bm25\"\n";
  const std::string two = (dir / "two.toml").string();
  REQUIRE(loom("index build " + two + " --docs " + (dir / "docs").string() + " --out " + (dir / "idx2").string()).code == 0);
  auto fused = loom("index query " + two + " --index " + (dir / "idx2").string() + " --top-k 3 wept");
  INFO(fused.out);
  CHECK(fused.code == 0);
  const size_t fused_at = fused.out.find("retriever[1] (bm25)");
  REQUIRE(fused_at != std::string::npos);
  CHECK(fused.out.find("  1. short.txt#0", fused_at) != std::string::npos);
  CHECK(fused.out.find("fused (reciprocal rank, k = 60): ") != std::string::npos);
  // Errors: no index yet, no retriever, bad numbers, an overlap too large.
  CHECK(loom("index query " + manifest + " --index " + (dir / "none").string() + " x").code == 1);
  std::ofstream(dir / "empty.toml") << "[run]\nsteps = 1\n";
  CHECK(loom("index build " + (dir / "empty.toml").string() + " --docs " + (dir / "docs").string() + " --out x").code == 3);
  CHECK(loom("index build " + manifest + " --docs d --out o --chunk many").code == 2);
  CHECK(loom("index frobnicate " + manifest).code == 2);
  auto overlap = loom("index build " + manifest + " --docs " + (dir / "docs").string() + " --out " + (dir / "o").string() +
                      " --chunk 100 --overlap 60");
  CHECK(overlap.code == 1);
  CHECK(overlap.out.find("overlap") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("a hybrid index: the model embeds the chunks once; loom run loads the saved index", "[cli]") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("loom-cli-hybrid-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir / "docs");
  std::ofstream(dir / "docs/wept.txt") << "Jesus wept.\n";
  std::ofstream(dir / "docs/light.txt") << "And God said, Let there be light: and there was light.\n";
  std::ofstream(dir / "docs/beasts.txt") << "And God made the beast of the earth after his kind.\n";
  const std::string head = "[loom]\ndevice = \"cpu\"\n[model]\npath = \"" + std::string(LOOM_SOURCE_DIR) +
                           "/models/tiny-kjv\"\n[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n[embedding]\n";
  std::ofstream(dir / "hybrid.toml") << head << "[[retriever]]\nuse = \"bm25\"\n[[retriever]]\nuse = \"dense\"\n";
  const std::string manifest = (dir / "hybrid.toml").string();
  auto built = loom("index build " + manifest + " --docs " + (dir / "docs").string() + " --out " + (dir / "idx").string());
  INFO(built.out);
  REQUIRE(built.code == 0);
  CHECK(built.out.find("embedded 3 chunks") != std::string::npos);
  CHECK(built.out.find("(192 dimensions)") != std::string::npos);
  CHECK(built.out.find("retriever[1] (dense): 3 documents") != std::string::npos);
  auto q = loom("index query " + manifest + " --index " + (dir / "idx").string() + " --top-k 3 Let there be light");
  INFO(q.out);
  REQUIRE(q.code == 0);
  CHECK(q.out.find("retriever[1] (dense): 3 passage(s)") != std::string::npos);
  CHECK(q.out.find("fused (reciprocal rank, k = 60): 3 passage(s)") != std::string::npos);
  // loom run with index = the saved directory: the RAG prompt gets the fused passages.
  std::ofstream(dir / "run.toml") << head << "[run]\nsteps = 2\nquery = \"Let there be light\"\ntop_k = 2\n"
                                  << "prompt = \"{passages}Question: {question}\\nAnswer:\"\n"
                                  << "[[retriever]]\nuse = \"bm25\"\nindex = \"idx\"\n[[retriever]]\nuse = \"dense\"\nindex = \"idx\"\n";
  auto run = loom("run " + (dir / "run.toml").string());
  INFO(run.out);
  CHECK(run.code == 0);
  CHECK(run.out.find("context: [1] light.txt#0") != std::string::npos);
  // The same manifest builds the index it loads: a build does not load it first.
  fs::remove_all(dir / "idx");
  REQUIRE(loom("index build " + (dir / "run.toml").string() + " --docs " + (dir / "docs").string() + " --out " +
               (dir / "idx").string()).code == 0);
  CHECK(loom("run " + (dir / "run.toml").string()).out.find("context: [1] light.txt#0") != std::string::npos);
  // A missing index names the key and what to do.
  std::ofstream(dir / "missing.toml") << head << "[[retriever]]\nuse = \"dense\"\nindex = \"nowhere\"\n";
  auto missing = loom("run " + (dir / "missing.toml").string());
  CHECK(missing.code != 0);
  CHECK(missing.out.find("retriever[0].index (dense): no saved index") != std::string::npos);
  CHECK(missing.out.find("loom index build") != std::string::npos);
  // A query without [embedding] reaches dense without a vector: refused, saying why.
  std::ofstream(dir / "plain.toml") << "[[retriever]]\nuse = \"dense\"\n";
  auto plain = loom("index build " + (dir / "plain.toml").string() + " --docs " + (dir / "docs").string() + " --out " +
                    (dir / "idx3").string());
  CHECK(plain.code != 0);
  CHECK(plain.out.find("[embedding]") != std::string::npos);
  fs::remove_all(dir);
}
