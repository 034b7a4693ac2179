// Pipelines built from manifests: creation, errors, lifetimes, runs.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

#include "loom/core/error.hpp"
#include "loom/core/runtime.hpp"
#include "loom/host_kernels.h"
#include "test_support.hpp"

using loom::Runtime;

namespace {
const std::string kPaths = "[loom]\nplugin_paths = [\"" + loom::test::plugin_dir("misc") + "\", \"" +
                           loom::test::plugin_dir("swap") + "\"]\n";

loom::Error error_of(const std::string &text) {
  try {
    Runtime::from_string(text, "p.toml");
  } catch (const loom::Error &e) {
    return e;
  }
  FAIL("no error for: " << text);
  return loom::Error(loom::ErrorCategory::runtime, "");
}
} // namespace

TEST_CASE("a pipeline holds one instance per component, in manifest order", "[pipeline]") {
  auto rt = Runtime::from_string(kPaths + R"(
[attention]
use = "sdpa"
[[sampler]]
use = "top-k"
k = 2
[[sampler]]
use = "greedy"
[[tool]]
use = "echo"
)");
  auto &p = rt->pipeline();
  CHECK(p.slots() == std::vector<std::string>{"attention", "sampler[0]", "sampler[1]", "tool[0]"});
  CHECK(std::string(p.at("sampler[1]").desc().name) == "greedy");
  CHECK(p.list(LOOM_KIND_SAMPLER).size() == 2);
  CHECK_THROWS_WITH(p.at("sampler[2]"), Catch::Contains("slots: attention, sampler[0], sampler[1], tool[0]"));
}

TEST_CASE("instances are destroyed in reverse creation order, also when creation fails", "[pipeline]") {
  const std::string trace = (std::filesystem::temp_directory_path() / "loom-pipeline-trace.txt").string();
  std::filesystem::remove(trace);
  auto probe = [&](const char *label) {
    return std::string("[[sampler]]\nuse = \"swap-probe\"\ntrace = \"") + trace + "\"\nlabel = \"" + label + "\"\n";
  };
  auto read = [&] {
    std::ifstream in(trace);
    std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::filesystem::remove(trace);
    return all;
  };
  Runtime::from_string(kPaths + probe("a") + probe("b") + probe("c")).reset();
  CHECK(read() == "create a\ncreate b\ncreate c\ndestroy c\ndestroy b\ndestroy a\n");
  CHECK_THROWS(Runtime::from_string(kPaths + probe("a") + probe("b") + "[[sampler]]\nuse = \"create-fails\"\n"));
  CHECK(read() == "create a\ncreate b\ndestroy b\ndestroy a\n");
}

TEST_CASE("creation errors name the slot, the component and the cause", "[pipeline]") {
  auto e = error_of(kPaths + "[[sampler]]\nuse = \"greedy\"\n[[sampler]]\nuse = \"create-fails\"\n");
  CHECK(e.category() == loom::ErrorCategory::plugin);
  CHECK(std::string(e.what()) ==
        "p.toml:5:1: sampler[1] (create-fails from libloom-test-misc.so): create failed: create-fails: refused on purpose");

  e = error_of("[[sampler]]\nuse = \"nucleus\"\n");
  CHECK(e.category() == loom::ErrorCategory::plugin);
  CHECK(std::string(e.what()).find("no sampler component 'nucleus'") != std::string::npos);

  e = error_of("[[sampler]]\nuse = \"top-k\"\nk = 2.5\n");
  CHECK(e.category() == loom::ErrorCategory::manifest);
  CHECK(std::string(e.what()) == "p.toml:3:5: sampler[0].k: expected an integer, got a float");

  e = error_of("[[sampler]]\nuse = \"top-k\"\ntopk = 2\n");
  CHECK(std::string(e.what()).find("p.toml:3:1: sampler[0].topk: unknown key for component 'top-k' (known: k)") == 0);

  e = error_of("[[sampler]]\nuse = \"greedy\"\nlibrary = \"/nonexistent/libx.so\"\n");
  CHECK(std::string(e.what()).find("/nonexistent/libx.so: no such plugin library file") != std::string::npos);

  e = error_of("[[sampler]]\nuse = \"greedy\"\nlibrary = \"" + loom::test::plugin_dir("bad") + "/libwrong-abi.so\"\n");
  CHECK(std::string(e.what()).find("built for Loom plugin ABI 99") != std::string::npos);
}

TEST_CASE("a create() error tied to a config key points at that key only when it is declared and set",
          "[pipeline][host]") {
  // bad-value (tests/plugins/misc.c) refuses with set_config_error(key), its message naming no key.
  auto error = [](const std::string &table) {
    return std::string(error_of(kPaths + "[[sampler]]\nuse = \"bad-value\"\n" + table).what());
  };
  const std::string tail = " (bad-value from libloom-test-misc.so): create failed: the value is refused on purpose";
  CHECK(error("level = 5\n") == "p.toml:5:9: sampler[0].level" + tail);
  // A path inside a declared parameter points at that element.
  CHECK(error("list = [1, 2, 3]\nkey = \"list[1]\"\n") == "p.toml:5:12: sampler[0].list[1]" + tail);
  // The key's own parameter is as good as any other.
  CHECK(error("key = \"key\"\n") == "p.toml:5:7: sampler[0].key" + tail);
  // No pointing: a declared key the manifest leaves at its default, an undeclared or reserved key,
  // paths that name nothing or are not paths at all, no key, and a key dropped by a later set_error.
  CHECK(error("") == "p.toml:3:1: sampler[0]" + tail);
  for (const char *key : {"nope", "use", "", "level.x", "list[7]", "list[", "list]]", "list[-1]", "list..x",
                          "list[99999999999999999999]", "[0]", ".", "level[0]", "ключ"}) {
    INFO(key);
    CHECK(error("level = 5\nlist = [1]\nkey = \"" + std::string(key) + "\"\n") == "p.toml:3:1: sampler[0]" + tail);
  }
  CHECK(error("level = 5\nmode = \"null-key\"\n") == "p.toml:3:1: sampler[0]" + tail);
  CHECK(error("level = 5\nmode = \"then-set-error\"\n") ==
        "p.toml:3:1: sampler[0] (bad-value from libloom-test-misc.so): create failed: a later error about no key");
}

TEST_CASE("the host keeps a config error's key beside its message (ABI 1.3)", "[pipeline][host]") {
  auto rt = Runtime::from_string("[[sampler]]\nuse = \"top-k\"\nk = 3\n");
  auto &inst = rt->pipeline().at("sampler[0]");
  const loom_host_api *host = inst.host();
  CHECK(host->abi_minor == LOOM_ABI_MINOR);
  REQUIRE(LOOM_HAS_FIELD(host, loom_host_api, set_config_error));
  REQUIRE(host->set_config_error != nullptr);
  std::string key;
  host->set_config_error(inst.ctx(), "no-such-key", "m1");
  CHECK(inst.ctx()->take_error(&key) == "m1");
  CHECK(key == "no-such-key");
  CHECK(inst.ctx()->take_error(&key).empty()); // cleared by reading, key included
  CHECK(key.empty());
  host->set_config_error(inst.ctx(), "k", "m2");
  host->set_error(inst.ctx(), "m3"); // the last wins: a message about no key
  CHECK(inst.ctx()->take_error(&key) == "m3");
  CHECK(key.empty());
  host->set_config_error(inst.ctx(), nullptr, nullptr);
  CHECK(inst.ctx()->take_error(&key) == "(no message)");
  CHECK(key.empty());
  host->set_config_error(nullptr, "k", "no instance"); // ignored, no crash
  host->set_config_error(inst.ctx(), "k", "read through the instance");
  CHECK(inst.last_error() == "read through the instance");
}

TEST_CASE("the host API reads the instance's own table with defaults", "[pipeline][host]") {
  auto rt = Runtime::from_string(R"(
[[sampler]]
use = "top-p"
p = 0.5
)");
  auto &inst = rt->pipeline().at("sampler[0]");
  const loom_host_api *host = inst.host();
  double p = 0;
  int64_t min_keep = 0;
  CHECK(host->config_get_float(inst.ctx(), "p", &p) == LOOM_OK);
  CHECK(p == 0.5);
  CHECK(host->config_get_int(inst.ctx(), "min_keep", &min_keep) == LOOM_OK); // the declared default
  CHECK(min_keep == 1);
  CHECK(host->config_get_int(inst.ctx(), "p", &min_keep) == LOOM_ERR_INVALID_ARGUMENT);
  CHECK(host->config_get_int(inst.ctx(), "absent", &min_keep) == LOOM_ERR_NOT_FOUND);
  const char *json = nullptr;
  REQUIRE(host->config_get_json(inst.ctx(), "", &json) == LOOM_OK);
  CHECK(std::string(json).find("\"p\"") != std::string::npos);
  CHECK(std::string(json).find("use") == std::string::npos);
  CHECK(host->get_extension(inst.ctx(), LOOM_HOST_KERNELS_EXTENSION) != nullptr);
  CHECK(host->get_extension(inst.ctx(), "loom.host.nothing/1") == nullptr);
  void *mem = nullptr;
  REQUIRE(host->device_alloc(inst.ctx(), {kDLCPU, 0}, 1000, 64, &mem) == LOOM_OK);
  CHECK(reinterpret_cast<uintptr_t>(mem) % 64 == 0);
  host->device_free(inst.ctx(), {kDLCPU, 0}, mem);
  CHECK(host->device_alloc(inst.ctx(), {kDLCPU, 0}, 10, 3, &mem) == LOOM_ERR_INVALID_ARGUMENT);
  host->metric_count(inst.ctx(), "probe", 2);
  host->metric_count(inst.ctx(), "probe", 3);
  CHECK(rt->metrics().snapshot().at("sampler.sampler[0].probe").value == 5);
}

TEST_CASE("runs are reproducible for a seed and end in a selecting sampler", "[pipeline][run]") {
  const std::string m = "[loom]\nseed = 3\n[run]\nsteps = 12\n[attention]\nuse = \"sdpa\"\nblock_size = 2\n"
                        "[[sampler]]\nuse = \"top-k\"\nk = 8\n[[sampler]]\nuse = \"dist\"\n";
  auto a = Runtime::from_string(m)->run();
  auto b = Runtime::from_string(m)->run();
  REQUIRE(a.tokens.size() == 12);
  CHECK(a.tokens == b.tokens);
  auto c = Runtime::from_string(m, "m", {"loom.seed=4"})->run();
  CHECK(c.tokens != a.tokens);

  auto no_select = Runtime::from_string("[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"top-k\"\n");
  CHECK_THROWS_WITH(no_select->run(), Catch::Contains("end the chain with a selecting sampler"));
  auto select_first = Runtime::from_string("[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n[[sampler]]\nuse = \"top-k\"\n");
  CHECK_THROWS_WITH(select_first->run(), Catch::Contains("selecting samplers (greedy, dist) must come last"));
  auto no_attention = Runtime::from_string("[[sampler]]\nuse = \"greedy\"\n");
  CHECK_THROWS_WITH(no_attention->run(), Catch::Contains("has no [attention]"));
}

TEST_CASE("every kind takes part in a run", "[pipeline][run]") {
  auto rt = Runtime::from_file(std::string(LOOM_SOURCE_DIR) + "/configs/pipeline.toml");
  auto r = rt->run(6);
  CHECK(r.tokens.size() == 6);
  REQUIRE(r.tool_results.size() == 1);
  CHECK(r.tool_results[0].content == "252");
  CHECK_FALSE(r.tool_results[0].is_error);
  REQUIRE_FALSE(r.passages.empty());
  CHECK(r.passages[0].doc_id == "plugins.md");
}

TEST_CASE("a runtime runs many times and keeps what it prepared", "[pipeline][run]") {
  // Quantized weights and adapter sites are made once; a second run must not attach again.
  auto rt = Runtime::from_file(std::string(LOOM_SOURCE_DIR) + "/configs/pipeline.toml");
  auto a = rt->run(5);
  auto b = rt->run(9); // longer: the KV cache grows
  auto c = rt->run(5);
  CHECK(a.tokens.size() == 5);
  CHECK(b.tokens.size() == 9);
  CHECK(c.tokens == a.tokens); // same seed, same prompt, state released between runs
}

TEST_CASE("slot names cannot confuse the decoder about kinds", "[pipeline][run]") {
  auto rt = Runtime::from_string("[attention]\nuse = \"sdpa\"\nname = \"attn\"\n"
                                 "[[sampler]]\nuse = \"greedy\"\nname = \"attention\"\n[run]\nsteps = 3\n");
  CHECK(rt->run().tokens.size() == 3);
}

TEST_CASE("--set can extend a list without reordering the chain", "[pipeline][manifest]") {
  auto rt = Runtime::from_string("[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"top-k\"\nk = 4\n"
                                 "[[sampler]]\nuse = \"temperature\"\n",
                                 "m.toml", {"sampler[1]={use=\"greedy\"}"});
  CHECK(std::string(rt->pipeline().at("sampler[0]").desc().name) == "top-k");
  CHECK(std::string(rt->pipeline().at("sampler[1]").desc().name) == "greedy");
  CHECK(rt->run(2).tokens.size() == 2);
}

TEST_CASE("a cancel stops the run at the next step and is then cleared", "[pipeline][run]") {
  auto rt = Runtime::from_string("[attention]\nuse = \"sdpa\"\n[[sampler]]\nuse = \"greedy\"\n[run]\nsteps = 50\n");
  auto r = rt->run(0, [&](int32_t step, int32_t) {
    if (step == 4) rt->cancel();
    return true;
  });
  CHECK(r.cancelled);
  CHECK(r.tokens.size() == 5);
  CHECK_FALSE(rt->run(3).cancelled);
}

TEST_CASE("manifest paths and devices are checked before anything runs", "[pipeline]") {
  auto e = error_of("[loom]\nplugin_paths = [\"/no/such/dir\"]\n");
  CHECK(std::string(e.what()) == "p.toml: loom.plugin_paths: '/no/such/dir' is not a directory");
  auto big = error_of("[run]\nprompt = [2147483648]\n");
  CHECK(std::string(big.what()) == "p.toml:2:11: run.prompt[0]: token 2147483648 is outside the vocabulary of 256");
}
