// Hot swap: another library, a rebuilt copy of the same file, state carried over, rollback,
// swaps between steps of a running pipeline.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <fstream>
#include <thread>

#include "loom/core/error.hpp"
#include "loom/core/runtime.hpp"
#include "test_support.hpp"

namespace fs = std::filesystem;
using loom::Runtime;
using loom::test::apply_selecting;

namespace {
const std::string kV1 = loom::test::plugin_dir("swap") + "/libloom-test-swap-v1.so";
const std::string kV2 = loom::test::plugin_dir("swap") + "/libloom-test-swap-v2.so";

std::string probe_table(const std::string &library, const std::string &extra = "") {
  return "use = \"swap-probe\"\nlibrary = \"" + library + "\"\n" + extra;
}

bool mapped(const std::string &path) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line))
    if (line.find(path) != std::string::npos) return true;
  return false;
}

struct TempDir {
  fs::path path;
  TempDir() {
    std::string t = (fs::temp_directory_path() / "loom-swap-test-XXXXXX").string();
    path = mkdtemp(t.data());
  }
  ~TempDir() { fs::remove_all(path); }
};
} // namespace

TEST_CASE("a swap to another library carries the state over", "[swap]") {
  auto rt = Runtime::from_string("[[sampler]]\n" + probe_table(kV1));
  float count = 0;
  for (int i = 0; i < 3; ++i) CHECK(apply_selecting(rt->pipeline().at("sampler[0]"), &count) == 1);
  CHECK(count == 3);
  auto report = rt->swap("sampler[0]", probe_table(kV2));
  CHECK(report.state_transferred);
  CHECK(report.state_format == "loom.test.counter/1");
  CHECK(report.new_component.find("swap-probe 2.0.0") == 0);
  CHECK(apply_selecting(rt->pipeline().at("sampler[0]"), &count) == 2);
  CHECK(count == 4); // 3 applies carried over, plus this one
}

TEST_CASE("a failed swap leaves the old instance serving", "[swap]") {
  auto rt = Runtime::from_string("[[sampler]]\n" + probe_table(kV1));
  float count = 0;
  apply_selecting(rt->pipeline().at("sampler[0]"), &count);

  SECTION("the new instance refuses the state") {
    CHECK_THROWS_WITH(rt->swap("sampler[0]", probe_table(kV2, "fail_import = true\n")),
                      Catch::Contains("import_state failed: swap-probe: import refused on purpose"));
  }
  SECTION("the new instance fails to create") {
    CHECK_THROWS_WITH(rt->swap("sampler[0]", "use = \"create-fails\"\nlibrary = \"" + loom::test::plugin_dir("misc") +
                                                 "/libloom-test-misc.so\"\n"),
                      Catch::Contains("create failed: create-fails: refused on purpose"));
  }
  SECTION("the table is invalid") {
    CHECK_THROWS_WITH(rt->swap("sampler[0]", probe_table(kV2, "fail_import = 3\n")),
                      Catch::Contains("fail_import: expected a boolean"));
  }
  SECTION("the component is of another kind") {
    CHECK_THROWS_WITH(rt->swap("sampler[0]", "use = \"sdpa\"\n"), Catch::Contains("no sampler component 'sdpa'"));
  }
  SECTION("the slot does not exist") {
    CHECK_THROWS_WITH(rt->swap("sampler[9]", probe_table(kV2)), Catch::Contains("no component in slot 'sampler[9]'"));
  }
  CHECK(apply_selecting(rt->pipeline().at("sampler[0]"), &count) == 1);
  CHECK(count == 2);
}

TEST_CASE("a rebuilt library at the same path is loaded anew and the old one unloaded", "[swap]") {
  TempDir dir;
  const fs::path lib = dir.path / "libprobe.so";
  fs::copy_file(kV1, lib);
  {
    auto rt = Runtime::from_string("[[sampler]]\n" + probe_table(lib.string()));
    CHECK(apply_selecting(rt->pipeline().at("sampler[0]")) == 1);
    CHECK(mapped(lib.string()));
    // "Rebuild" the plugin: a new file at the same path, as a linker writes its output (writing
    // into the mapped file in place would corrupt the running code).
    fs::copy_file(kV2, dir.path / "libprobe.so.tmp");
    fs::rename(dir.path / "libprobe.so.tmp", lib);
    fs::last_write_time(lib, fs::last_write_time(lib) + std::chrono::seconds(1));
    auto report = rt->swap("sampler[0]", probe_table(lib.string()));
    CHECK(report.state_transferred);
    float count = 0;
    CHECK(apply_selecting(rt->pipeline().at("sampler[0]"), &count) == 2);
    CHECK(count == 2);
    // The first build had no instance left: it is gone from the process.
    CHECK_FALSE(mapped(lib.string() + "\n"));
    std::ifstream maps("/proc/self/maps");
    std::string line;
    int mappings_of_original = 0;
    while (std::getline(maps, line))
      if (line.size() >= lib.string().size() && line.compare(line.size() - lib.string().size(), std::string::npos, lib.string()) == 0)
        ++mappings_of_original;
    CHECK(mappings_of_original == 0);
  }
}

TEST_CASE("swaps land between steps of a running pipeline", "[swap][run]") {
  const std::string manifest = "[run]\nsteps = 40\n[attention]\nuse = \"sdpa\"\n[quantizer]\nuse = \"int8\"\n"
                               "[[adapter]]\nuse = \"lora\"\n[[sampler]]\n" + probe_table(kV1);
  SECTION("from the token callback, deterministically") {
    auto rt = Runtime::from_string(manifest);
    std::vector<loom::SwapReport> reports;
    auto result = rt->run(0, [&](int32_t step, int32_t) {
      if (step == 9) {
        reports.push_back(rt->swap("sampler[0]", probe_table(kV2)));
        reports.push_back(rt->swap("quantizer", "use = \"int8\"\n"));
        reports.push_back(rt->swap("adapter[0]", "use = \"lora\"\nr = 2\n"));
        reports.push_back(rt->swap("attention", "use = \"sdpa\"\n"));
      }
      return true;
    });
    REQUIRE(result.tokens.size() == 40);
    for (size_t i = 0; i < 40; ++i) CHECK(result.tokens[i] == (i < 10 ? 1 : 2));
    CHECK(reports.size() == 4);
    // An attention that wants another KV layout cannot take over a cache in use.
    auto rt2 = Runtime::from_string(manifest);
    CHECK_THROWS_WITH(rt2->run(0, [&](int32_t step, int32_t) {
      if (step == 2) rt2->swap("attention", "use = \"sdpa\"\nblock_size = 4\n");
      return true;
    }),
                      Catch::Contains("wants another KV layout"));
  }
  SECTION("from another thread") {
    auto rt = Runtime::from_string(manifest, "m", {"run.steps=400"});
    std::atomic<int> produced{0};
    std::thread swapper([&] {
      while (produced.load() < 20) std::this_thread::sleep_for(std::chrono::microseconds(100));
      rt->swap("sampler[0]", probe_table(kV2));
    });
    auto result = rt->run(0, [&](int32_t, int32_t) {
      ++produced;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      return true;
    });
    swapper.join();
    REQUIRE(result.tokens.size() == 400);
    // Once the swap lands, every later token comes from the new library.
    size_t first_two = 0;
    while (first_two < result.tokens.size() && result.tokens[first_two] == 1) ++first_two;
    CHECK(first_two >= 20);
    CHECK(first_two < 400);
    for (size_t i = first_two; i < result.tokens.size(); ++i) CHECK(result.tokens[i] == 2);
  }
}
